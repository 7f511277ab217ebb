"""The teacher zoo: `teachers.load(spec)` builds a frozen `distill.Teacher` from a spec string.

    import teachers
    t = teachers.load("torchvision:resnet50", weights="IMAGENET1K_V2")
    t = teachers.load("timm:resnet50.a1_in1k", num_classes=40, output="multilabel")
    t = teachers.load("hf:microsoft/resnet-50")
    t = teachers.load("facenet:vggface2")
    t = teachers.load("file:/ckpt/best.safetensors", arch="torchvision:resnet50")

`python -m teachers list` prints every prefix with its metadata and cache folder;
`python -m teachers where SPEC` says which file a spec needs and where to put it offline.
"""

from teachers._cache import MissingWeightsError
from teachers.registry import TeacherSource, list_teachers, load, parse_spec, register_teacher

# Importing a builder module registers its prefix; add new teacher modules here.
from teachers import torchvision_zoo, timm_zoo, hf_zoo, facenet, local  # isort: skip

__all__ = [
    "MissingWeightsError",
    "TeacherSource",
    "facenet",
    "hf_zoo",
    "list_teachers",
    "load",
    "local",
    "parse_spec",
    "register_teacher",
    "timm_zoo",
    "torchvision_zoo",
]
