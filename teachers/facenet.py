"""FaceNet teachers: ``facenet:vggface2`` and ``facenet:casia-webface``.

Our own Inception-ResNet-v1 (`teachers.inception_resnet_v1`) loads facenet-pytorch 2.6.0's
released files with ``strict=True``. The files are looked up where facenet-pytorch caches them,
``$TORCH_HOME/checkpoints/<file>`` (``~/.cache/torch/checkpoints`` by default; note: not torch.hub's
``hub/checkpoints``, which is also searched), under their release names:

    20180402-114759-vggface2.pt       VGGFace2, 8631 identities
    20180408-102900-casia-webface.pt  CASIA-WebFace, 10575 identities

Both are plain state_dicts and load with ``torch.load(weights_only=True)``.
The teacher outputs 512-d L2-normalised embeddings of 160 x 160 faces standardised as
``(pixel - 127.5) / 128``, i.e. mean 0.5 and std 128/255 in 0..1 units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distill.serialization import load_state_dict
from distill.teacher import Teacher
from teachers._cache import facenet_checkpoints, torch_hub_checkpoints
from teachers._common import TeacherMeta, check_kwargs, load_strict, make_teacher, resolve_output
from teachers._download import cached_or_download
from teachers.inception_resnet_v1 import EMBEDDING_DIM, InceptionResnetV1
from teachers.registry import register_teacher

OPTIONS = ("num_classes", "output", "download", "sha256")
RELEASE_URL = "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/"
INPUT_SIZE = 160
# (x * 255 - 127.5) / 128 == (x - 0.5) / (128 / 255) for x in 0..1.
MEAN = (0.5, 0.5, 0.5)
STD = (128 / 255,) * 3


@dataclass(frozen=True)
class FaceNetWeights:
    filename: str
    num_identities: int
    dataset: str

    @property
    def url(self) -> str:
        return RELEASE_URL + self.filename


WEIGHTS = {
    "vggface2": FaceNetWeights("20180402-114759-vggface2.pt", 8631, "VGGFace2"),
    "casia-webface": FaceNetWeights("20180408-102900-casia-webface.pt", 10575, "CASIA-WebFace"),
}


def _weights(name: str) -> FaceNetWeights:
    key = name.lower().replace("_", "-")
    if key not in WEIGHTS:
        raise ValueError(f"facenet has no weights {name!r}; choose one of {', '.join(WEIGHTS)}")
    return WEIGHTS[key]


def describe(name: str, **_: Any) -> dict[str, Any]:
    w = _weights(name)
    for folder in (facenet_checkpoints(), torch_hub_checkpoints()):
        if (folder / w.filename).is_file():
            return _describe(folder / w.filename, cached=True)
    return _describe(facenet_checkpoints() / w.filename, cached=False)


def _describe(file: Any, cached: bool) -> dict[str, Any]:
    return {
        "input_size": (INPUT_SIZE, INPUT_SIZE),
        "mean": MEAN,
        "std": tuple(round(s, 4) for s in STD),
        "interpolation": "bilinear",
        "output": "embedding",
        "num_outputs": EMBEDDING_DIM,
        "file": str(file),
        "cached": cached,
    }


@register_teacher(
    "facenet",
    summary="FaceNet Inception-ResNet-v1 (facenet-pytorch 2.6.0 weights), 512-d embeddings",
    examples=("facenet:vggface2", "facenet:casia-webface"),
    options=OPTIONS,
    weights_location=lambda: f"{facenet_checkpoints()}/<release file name>",
    describe=describe,
)
def build_facenet(
    name: str,
    *,
    num_classes: int | None = None,
    output: str | None = None,
    download: bool | None = None,
    sha256: str | None = None,
    **kwargs: Any,
) -> Teacher:
    """FaceNet embedding teacher.

    ``output="logits"`` returns the training set's identity logits instead; `num_classes`
    replaces that layer by a fresh one (output then defaults to "logits").
    """
    spec = f"facenet:{name}"
    check_kwargs(spec, kwargs, OPTIONS)
    w = _weights(name)
    out = resolve_output(output, default="embedding" if num_classes is None else "logits")
    check_head_options(out, num_classes)
    path = cached_or_download(
        f"{spec} ({w.dataset})",
        url=w.url,
        folder=facenet_checkpoints(),
        also_look_in=(torch_hub_checkpoints(),),
        download=download,
        hint="(facenet-pytorch's cache folder: set TORCH_HOME to use another)",
    )
    model = InceptionResnetV1(num_identities=w.num_identities)
    state_dict = load_state_dict(path, expected_keys=model.state_dict().keys(), sha256=sha256)
    if "logits.weight" not in state_dict:  # an embedding-only export
        model.logits = None
    load_strict(model, state_dict, what=str(path))
    meta = TeacherMeta(
        name=spec,
        source=str(path),
        input_size=INPUT_SIZE,
        mean=MEAN,
        std=STD,
        interpolation="bilinear",
        output=out,
        num_outputs=EMBEDDING_DIM,
    )
    configure_head(model, meta, num_classes)
    return make_teacher(model, meta, kwargs)


def check_head_options(output: str, num_classes: int | None) -> None:
    if num_classes is not None and output == "embedding":
        raise ValueError(
            "num_classes replaces FaceNet's identity classifier; with output='embedding' it "
            "would be unused. Drop num_classes, or use output='logits'/'multilabel'."
        )


def configure_head(model: InceptionResnetV1, meta: TeacherMeta, num_classes: int | None) -> None:
    """Embeddings, or logits from the file's identity classifier or a fresh `num_classes` one."""
    if meta.output == "embedding":
        model.classify = False
        meta.num_outputs = EMBEDDING_DIM
        return
    if num_classes is not None and (
        model.logits is None or model.logits.out_features != num_classes
    ):
        model.reset_classifier(num_classes)
        meta.source += f" (identity classifier replaced: {num_classes} outputs, re-initialised)"
    if model.logits is None:
        raise ValueError(
            f"{meta.source} has no identity classifier (logits.*): use output='embedding', or "
            "num_classes=N for a new classifier"
        )
    model.classify = True
    meta.num_outputs = model.logits.out_features
