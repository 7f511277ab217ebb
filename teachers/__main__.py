"""``python -m teachers list`` / ``python -m teachers where SPEC``.

`list` prints every registered spec prefix with its options, where its weights are cached, and
the metadata of its examples (input size, mean/std, output kind, and whether the weight file is
already on this machine). `where` prints the file a spec needs and the folder to put it in.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import teachers
from teachers._cache import hf_hub_cache, is_offline, torch_hub_checkpoints


def _parse_example(example: str) -> tuple[str, dict[str, str]]:
    """``"torchvision:resnet50 weights=IMAGENET1K_V2"`` -> ("resnet50", {"weights": ...})."""
    spec, *options = example.split()
    return spec.partition(":")[2], dict(o.split("=", 1) for o in options if "=" in o)


def _describe(source: teachers.TeacherSource, example: str) -> dict[str, Any] | str:
    if source.describe is None:
        return "(metadata comes from the file and arch=)"
    name, options = _parse_example(example)
    try:
        return source.describe(name, **options)
    except Exception as err:  # an optional package missing, an unknown name in a plugin ...
        return f"(no metadata: {type(err).__name__}: {err})"


def cmd_list(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for source in teachers.list_teachers():
        rows.append(
            {
                "prefix": source.prefix,
                "summary": source.summary,
                "options": list(source.options),
                "weights": source.weights_location(),
                "examples": {ex: _describe(source, ex) for ex in source.examples},
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"teacher specs: teachers.load('<prefix>:<name>', **options)   offline={is_offline()}")
    print(f"torch hub cache: {torch_hub_checkpoints()}   HF hub cache: {hf_hub_cache()}\n")
    for row in rows:
        print(f"{row['prefix']}:  {row['summary']}")
        print(f"    options: {', '.join(row['options'])} (+ input_size, mean, std, features, ...)")
        print(f"    weights: {row['weights']}")
        for example, meta in row["examples"].items():
            print(f"    {example}")
            if isinstance(meta, str):
                print(f"        {meta}")
                continue
            shown = {k: v for k, v in meta.items() if k not in {"file", "cached", "url"}}
            print("        " + ", ".join(f"{k}={v}" for k, v in shown.items()))
            if "file" in meta:
                state = "cached" if meta.get("cached") else "missing"
                print(f"        file ({state}): {meta['file']}")
        print()
    return 0


def cmd_where(args: argparse.Namespace) -> int:
    try:
        source, name = teachers.parse_spec(args.spec)
        if source.describe is None:
            print(f"{args.spec}: the weights are the file itself")
            return 0
        options = dict(o.split("=", 1) for o in args.options if "=" in o)
        meta = source.describe(name, **options)
    except (ValueError, KeyError, TypeError) as e:  # an unknown prefix, name or option
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg} (`python -m teachers list` shows what is known)", file=sys.stderr)
        return 2
    print(" ".join([args.spec, *args.options]))
    print(f"    file:   {meta.get('file')}")
    print(f"    cached: {meta.get('cached')}")
    if meta.get("url"):
        print(f"    url:    {meta['url']}")
    return 0 if meta.get("cached") else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m teachers", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_list = sub.add_parser("list", help="print the registry with metadata and cache folders")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.set_defaults(func=cmd_list)
    p_where = sub.add_parser("where", help="the weight file a spec needs and where it goes")
    p_where.add_argument("spec")
    p_where.add_argument("options", nargs="*", help="key=value, e.g. weights=IMAGENET1K_V1")
    p_where.set_defaults(func=cmd_where)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
