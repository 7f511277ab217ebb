"""Hugging Face transformers image classifiers as teachers: ``hf:microsoft/resnet-50``.

The model comes from ``AutoModelForImageClassification``, the preprocessing (mean, std, input
size, resampling) from ``AutoImageProcessor``; both read the hub cache
``$HF_HOME/hub/models--<org>--<name>/snapshots/<commit>/`` (config.json,
preprocessor_config.json, model.safetensors). When every file is cached the model is loaded with
``local_files_only=True``, so nothing touches the network. ``hf:/path/to/dir`` loads a folder
written by ``save_pretrained``. Needs the optional extra: ``pip install 'mobiledistill[hf]'``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch import Tensor, nn

from distill.serialization import UnsafeCheckpointError, unsafe_message
from distill.teacher import IMAGENET_MEAN, IMAGENET_STD, Teacher
from teachers._cache import (
    MissingWeightsError,
    hf_cached_file,
    hf_hub_cache,
    hf_repo_folder,
    hf_snapshot_hint,
    is_offline,
)
from teachers._common import TeacherMeta, check_kwargs, make_teacher, resolve_output
from teachers.registry import register_teacher

OPTIONS = ("num_classes", "output", "revision", "download", "model_kwargs")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# PIL resampling codes used by image processors.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class HFImageClassifier(nn.Module):
    """A transformers image classifier whose `forward(pixel_values)` returns the logits tensor.

    The wrapped model is `self.model`, so feature paths start with ``model.``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.model(pixel_values=x).logits  # (B, num_labels)
        return logits


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "hf: teachers need transformers: pip install 'mobiledistill[hf]'"
        ) from err
    return transformers


def _check_cache(repo: str, revision: str | None) -> tuple[Path | None, list[str]]:
    """(snapshot folder, missing files) for a hub repo, looking only at the cache."""
    config = hf_cached_file(repo, "config.json", revision)
    weights = [f for f in _WEIGHT_FILES if hf_cached_file(repo, f, revision) is not None]
    missing = ([] if config else ["config.json"]) + ([] if weights else ["model.safetensors"])
    return (config.parent if config else None), missing


def _preprocessing(processor: Any, config: Any) -> dict[str, Any]:
    """Input size, mean/std in 0..1 pixel units and interpolation from an image processor."""
    out: dict[str, Any] = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear"}
    size = getattr(config, "image_size", 224)
    out["input_size"] = (size, size) if isinstance(size, int) else tuple(size)
    if processor is None:
        return out
    scale = 1.0
    if getattr(processor, "do_rescale", True):
        scale = float(getattr(processor, "rescale_factor", 1 / 255)) * 255.0
    if getattr(processor, "do_normalize", True) and getattr(processor, "image_mean", None):
        # The model sees (p * r - m) / s for pixels p in 0..255; in 0..1 units that is
        # (x - m / (255 r)) / (s / (255 r)).
        out["mean"] = tuple(float(m) / scale for m in processor.image_mean)
        out["std"] = tuple(float(s) / scale for s in processor.image_std)
    else:
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1 / scale,) * 3
    crop = (
        getattr(processor, "crop_size", None)
        if getattr(processor, "do_center_crop", False)
        else None
    )
    for candidate in (crop, getattr(processor, "size", None)):
        hw = _size_of(candidate)
        if hw is not None:
            out["input_size"] = hw
            break
    resample = getattr(processor, "resample", None)
    code = getattr(resample, "value", resample)
    if isinstance(code, int) and code in _RESAMPLE:
        out["interpolation"] = _RESAMPLE[code]
    elif isinstance(code, str) and code.lower() in {"bilinear", "bicubic", "nearest"}:
        out["interpolation"] = code.lower()
    return out


def _size_of(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None

    def get(key: str) -> int | None:
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        return int(value) if value else None

    height, width, edge = get("height"), get("width"), get("shortest_edge")
    if height and width:
        return (height, width)
    if edge:  # resize the short side, centre-crop a square
        return (edge, edge)
    return None


def _label_names(config: Any) -> list[str] | None:
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(len(id2label))]
    if not names or all(n.startswith("LABEL_") for n in names):
        return None
    return names


def _download_failed(spec: str, name: str, err: Exception) -> Exception:
    if Path(name).expanduser().is_dir():
        return err
    return MissingWeightsError(
        spec,
        filenames=["config.json", "model.safetensors"],
        folder=f"{hf_repo_folder(name)}/snapshots/<commit>",
        url=f"https://huggingface.co/{name}",
        reason=f"{type(err).__name__}: {err}",
        hint=hf_snapshot_hint(name),
    )


def describe(name: str, revision: str | None = None, **_options: Any) -> dict[str, Any]:
    """Metadata from the cached JSON files alone (transformers is not imported)."""
    local = name.startswith(("/", ".", "~"))
    if local:
        folder: Path | None = Path(name).expanduser()
        cached = folder is not None and (folder / "config.json").is_file()
        where = str(folder)
    else:
        folder, missing = _check_cache(name, revision)
        cached = not missing
        where = str(folder) if folder else f"{hf_repo_folder(name)}/snapshots/<commit>/"
    out: dict[str, Any] = {"input_size": "from the image processor", "output": "logits"}
    if cached and folder is not None:
        config = json.loads((folder / "config.json").read_text())
        prep_file = folder / "preprocessor_config.json"
        processor = (
            SimpleNamespace(**json.loads(prep_file.read_text())) if prep_file.is_file() else None
        )
        prep = _preprocessing(processor, SimpleNamespace(image_size=config.get("image_size", 224)))
        out = {
            **prep,
            "mean": tuple(round(v, 4) for v in prep["mean"]),
            "std": tuple(round(v, 4) for v in prep["std"]),
            "output": "logits",
            "num_outputs": len(config.get("id2label", {})) or None,
        }
    return {**out, "file": where, "cached": cached}


@register_teacher(
    "hf",
    summary="transformers AutoModelForImageClassification + AutoImageProcessor (hub cache "
    "or a save_pretrained folder)",
    examples=("hf:microsoft/resnet-50", "hf:google/vit-base-patch16-224", "hf:/path/to/folder"),
    options=OPTIONS,
    weights_location=lambda: f"{hf_hub_cache()}/models--<org>--<name>/snapshots/<commit>/",
    describe=describe,
)
def build_hf(
    name: str,
    *,
    num_classes: int | None = None,
    output: str | None = None,
    revision: str | None = None,
    download: bool | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Teacher:
    """A transformers image classifier; `num_classes` re-initialises its classifier."""
    transformers = _import_transformers()
    spec = f"hf:{name}"
    check_kwargs(spec, kwargs, OPTIONS)
    out = resolve_output(output, default="logits")
    load_kwargs: dict[str, Any] = {}
    local = Path(name).expanduser()
    if local.is_dir():
        source, where = str(local), str(local)
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{local} has no config.json: not a save_pretrained folder")
    else:
        where = name
        load_kwargs.update(cache_dir=str(hf_hub_cache()), revision=revision)
        snapshot, missing = _check_cache(name, revision)
        if not missing:
            load_kwargs["local_files_only"] = True
            source = str(snapshot)
        elif download is False or (download is None and is_offline()):
            raise MissingWeightsError(
                spec,
                filenames=missing,
                folder=f"{hf_repo_folder(name)}/snapshots/<commit>",
                url=f"https://huggingface.co/{name}",
                reason="offline" if is_offline() else "download=False",
                hint=hf_snapshot_hint(name),
            )
        else:
            source = f"https://huggingface.co/{name} -> {hf_repo_folder(name)}"
    try:
        config = transformers.AutoConfig.from_pretrained(where, **load_kwargs)
    except OSError as err:
        raise _download_failed(spec, name, err) from err
    model_args = dict(model_kwargs or {})
    if num_classes is not None and num_classes != config.num_labels:
        config.num_labels = num_classes  # also resets id2label/label2id to LABEL_i
        model_args["ignore_mismatched_sizes"] = True  # re-initialise the classifier
    else:
        num_classes = None
    try:
        hf_model = transformers.AutoModelForImageClassification.from_pretrained(
            where, config=config, **load_kwargs, **model_args
        )
    except OSError as err:
        raise _download_failed(spec, name, err) from err
    except pickle.UnpicklingError as err:  # a pytorch_model.bin that would run code
        pickles = sorted(Path(source).glob("*.bin")) if Path(source).is_dir() else []
        raise UnsafeCheckpointError(
            unsafe_message(pickles[0] if pickles else Path(where), err)
        ) from None
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(where, **load_kwargs)
    except OSError:  # no preprocessor_config.json: fall back to the config and ImageNet stats
        processor = None
    prep = _preprocessing(processor, hf_model.config)
    meta = TeacherMeta(
        name=spec,
        source=source,
        input_size=prep["input_size"],
        mean=prep["mean"],
        std=prep["std"],
        interpolation=prep["interpolation"],
        output=out,
        num_outputs=int(hf_model.config.num_labels),
        label_names=_label_names(hf_model.config),
    )
    if num_classes is not None:
        meta.source += f" (classifier replaced: {num_classes} outputs, re-initialised)"
    return make_teacher(HFImageClassifier(hf_model), meta, kwargs)
