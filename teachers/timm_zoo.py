"""timm models as teachers: ``timm:resnet50.a1_in1k`` (``timm.create_model(pretrained=True)``).

Weights live where timm puts them: for models on the Hugging Face Hub (almost all), the hub
cache ``$HF_HOME/hub/models--timm--<model>/snapshots/<commit>/model.safetensors`` (or
``pytorch_model.bin``); for the few with only a URL, ``$TORCH_HOME/hub/checkpoints/<file>``.
A cached file is handed to timm as a local file, so nothing touches the network; only when it
is missing and the machine is online does timm download it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from distill.serialization import load_state_dict
from distill.teacher import Teacher
from teachers._cache import (
    MissingWeightsError,
    hf_cached_file,
    hf_hub_cache,
    hf_repo_folder,
    hf_snapshot_hint,
    is_offline,
    torch_hub_checkpoints,
)
from teachers._common import (
    TeacherMeta,
    check_kwargs,
    make_teacher,
    resolve_output,
)
from teachers._download import cached_or_download, url_basename
from teachers.registry import register_teacher

OPTIONS = ("num_classes", "output", "pretrained", "download", "model_kwargs", "size")
logger = logging.getLogger(__name__)
_HF_FILES = ("model.safetensors", "pytorch_model.bin")


def check_arch(name: str) -> str:
    import timm

    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        near = timm.list_models(f"*{arch}*")[:12]
        raise ValueError(
            f"timm has no model {name!r}" + (f"; similar: {', '.join(near)}" if near else "")
        )
    return arch


def _pretrained_cfg(name: str) -> Any:
    import timm
    from timm.models import get_pretrained_cfg

    arch = check_arch(name)
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        tags = timm.list_pretrained(f"{arch}.*")[:20]
        raise ValueError(
            f"timm model {arch!r} has no pretrained tag {name.partition('.')[2]!r}; "
            f"available: {', '.join(tags) or 'none'}"
        ) from None
    if cfg is None:
        raise ValueError(f"timm model {name!r} has no pretrained weights (use pretrained=False)")
    return cfg


def _split_revision(hub_id: str) -> tuple[str, str | None]:
    repo, _, rev = hub_id.partition("@")
    return repo, rev or None


def locate_weights(name: str) -> tuple[Path | None, dict[str, Any]]:
    """The cached weight file of a timm model (or None), and where it would go otherwise."""
    cfg = _pretrained_cfg(name)
    if cfg.file:
        return Path(cfg.file), {"file": cfg.file}
    if cfg.hf_hub_id:
        repo, rev = _split_revision(cfg.hf_hub_id)
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_FILES
        for f in files:
            found = hf_cached_file(repo, f, revision=rev)
            if found is not None:
                return found, {"repo": repo, "revision": rev}
        return None, {
            "repo": repo,
            "revision": rev,
            "files": files,
            "folder": f"{hf_repo_folder(repo)}/snapshots/<commit>",
            "url": f"https://huggingface.co/{repo}",
        }
    if cfg.url:
        file = torch_hub_checkpoints() / url_basename(cfg.url)
        return (file if file.is_file() else None), {"url": cfg.url, "file": str(file)}
    raise ValueError(f"timm model {name!r} has no weights source in its pretrained_cfg")


def timm_meta(name: str, model: Any, source: str, size: str = "test") -> TeacherMeta:
    """The teacher's metadata from timm's data config. `size="test"` (the default, as timm's
    own validation does) feeds the model at its test resolution where it has one (288 px for
    resnet18.a1_in1k, 1.65x the compute of its 224 px training size); `size="train"` at the
    training resolution. Either way the choice is logged."""
    from timm.data import ImageNetInfo, infer_imagenet_subset, resolve_model_data_config

    if size not in ("test", "train"):
        raise ValueError(f"timm:{name}: size must be 'test' or 'train', got {size!r}")
    cfg = resolve_model_data_config(model, use_test_size=size == "test")
    train = resolve_model_data_config(model, use_test_size=False)["input_size"]
    if tuple(cfg["input_size"]) != tuple(train):
        cost = (cfg["input_size"][1] * cfg["input_size"][2]) / (train[1] * train[2])
        logger.warning(
            "timm:%s is fed at its %s resolution %d px (training resolution %d px, test %.2fx "
            "the compute); pass size=%s (or input_size=N) for the other",
            name, size, cfg["input_size"][1], train[1], cost,
            "train" if size == "test" else "test",
        )  # fmt: skip
    meta = TeacherMeta(
        name=f"timm:{name}",
        source=source,
        input_size=(int(cfg["input_size"][1]), int(cfg["input_size"][2])),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bilinear")),
        num_outputs=int(getattr(model, "num_classes", 0)) or None,
    )
    if meta.interpolation not in {"bilinear", "bicubic", "nearest", "area"}:
        meta.interpolation = "bilinear"  # timm's "random" is a training-time augmentation
    subset = infer_imagenet_subset(model)
    if subset:
        try:
            meta.label_names = list(ImageNetInfo(subset).label_descriptions())
        except Exception:  # label files missing from an unusual timm install: names are optional
            meta.label_names = None
    return meta


def describe(name: str, **_: Any) -> dict[str, Any]:
    cfg = _pretrained_cfg(name)
    size = cfg.test_input_size or cfg.input_size
    path, where = locate_weights(name)
    if path is not None:
        file = str(path)
    elif "files" in where:
        file = f"{where['folder']}/{' or '.join(where['files'])}"
    else:
        file = where.get("file", "")
    return {
        "input_size": (size[1], size[2]),
        "mean": tuple(round(v, 4) for v in cfg.mean),
        "std": tuple(round(v, 4) for v in cfg.std),
        "interpolation": cfg.interpolation,
        "output": "logits",
        "num_outputs": cfg.num_classes,
        "file": file,
        "cached": path is not None,
    }


@register_teacher(
    "timm",
    summary="timm models via timm.create_model(pretrained=True), weights from the HF hub cache",
    examples=(
        "timm:resnet50.a1_in1k",
        "timm:convnext_tiny.fb_in22k_ft_in1k",
        "timm:vit_base_patch16_224",
    ),
    options=OPTIONS,
    weights_location=lambda: f"{hf_hub_cache()}/models--timm--<model>/snapshots/<commit>/",
    describe=describe,
)
def build_timm(
    name: str,
    *,
    num_classes: int | None = None,
    output: str | None = None,
    pretrained: bool = True,
    download: bool | None = None,
    model_kwargs: dict[str, Any] | None = None,
    size: str = "test",
    **kwargs: Any,
) -> Teacher:
    """A timm model; `num_classes` re-initialises the classifier (timm drops the old one);
    `size` picks timm's test (default) or training resolution (see `timm_meta`)."""
    import timm

    spec = f"timm:{name}"
    check_kwargs(spec, kwargs, OPTIONS)
    out = resolve_output(output, default="logits")
    extra = dict(model_kwargs or {})
    if num_classes is not None:
        extra["num_classes"] = num_classes
    if not pretrained:
        check_arch(name)
        model = timm.create_model(name, pretrained=False, **extra)
        meta = timm_meta(name, model, "random init (pretrained=False)", size)
        meta.label_names = None
    else:
        path, where = locate_weights(name)
        if path is None and "repo" in where:
            if download is False or (download is None and is_offline()):
                raise MissingWeightsError(
                    spec,
                    filenames=list(where["files"]),
                    folder=where["folder"],
                    url=where["url"],
                    reason="offline" if is_offline() else "download=False",
                    hint=hf_snapshot_hint(where["repo"]),
                )
            try:
                model = timm.create_model(
                    name, pretrained=True, cache_dir=str(hf_hub_cache()), **extra
                )
            except Exception as err:
                raise MissingWeightsError(
                    spec,
                    filenames=list(where["files"]),
                    folder=where["folder"],
                    url=where["url"],
                    reason=f"download failed: {type(err).__name__}: {err}",
                    hint=hf_snapshot_hint(where["repo"]),
                ) from err
            path = locate_weights(name)[0] or Path(where["url"])
        else:
            if path is None:  # URL-only weights, torch.hub's cache
                path = cached_or_download(
                    spec, url=where["url"], folder=torch_hub_checkpoints(), download=download
                )
            if path.suffix != ".safetensors":
                load_state_dict(path)  # refuses a pickle that would run code, with a clear error
            # A local file: timm reads it (safetensors or weights_only=True), adapts the head.
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **extra
            )
        meta = timm_meta(name, model, str(path), size)
        if num_classes is not None:
            meta.source += f" (classifier replaced: {num_classes} outputs, re-initialised)"
    meta.output = out
    if num_classes is not None:
        meta.num_outputs = num_classes
    return make_teacher(model, meta, kwargs)
