"""Errors for data that is laid out or annotated wrongly; each says what to change."""

from __future__ import annotations

from pathlib import Path


class DataLayoutError(FileNotFoundError):
    """A data directory is missing or does not look like the format asked for."""

    def __init__(self, root: str | Path, problem: str, expected: str) -> None:
        self.root = str(root)
        super().__init__(f"{root}: {problem}.\nExpected layout:\n{expected}")


class AnnotationError(ValueError):
    """A line of an annotation file cannot be used; `file` and `line` (1-based) locate it."""

    def __init__(self, file: str | Path, line: int | None, problem: str) -> None:
        self.file = str(file)
        self.line = line
        where = f"{file}, line {line}" if line is not None else str(file)
        super().__init__(f"{where}: {problem}")


def check_label_range(label: int, num_classes: int, file: str | Path, line: int | None) -> None:
    """Raise `AnnotationError` if `label` is not in 0..num_classes-1."""
    if not (0 <= label < num_classes):
        raise AnnotationError(
            file,
            line,
            f"label {label} is outside the class range 0..{num_classes - 1} ({num_classes} "
            "classes); fix the annotation, or pass the num_classes the labels were made for",
        )
