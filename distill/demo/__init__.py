"""The embedded digits demo: a teacher, MobileNet students from scratch and distilled, compared.

Everything runs on scikit-learn's real handwritten digits (1,797 8x8 images, shipped with
scikit-learn: nothing is downloaded) on a CPU in minutes:

1. a wide CNN teacher (more parameters and mult-adds than any student) is trained on the
   whole training split (1,347 images);
2. MobileNetV1 students (Howard et al. 2017) at several width multipliers alpha and
   resolutions are trained twice on a small labelled subset of that split (10%: 134 images),
   once from the labels alone (scratch) and once with Hinton et al.'s KD loss (2015) from
   the teacher;
3. every run goes through the `Distiller`, so each writes its folder with `metrics.json`, and
   logs a W&B run (offline unless configured otherwise); `distill.compare` then writes
   `report.html` with the accuracy/cost trade-off plots.

Why a small labelled subset: the classic regime where distillation pays is a student that
sees few labels (Hinton et al. 2015, section 4: with soft targets a speech model trained on 3%
of the data nearly matched one trained on all of it, where hard targets overfitted); the
teacher's soft targets carry the similarity between classes that a few hard labels cannot.
benchmarks/digits_kd.py measures this regime and the whole split (benchmarks/RESULTS.md).

Modules: `data` (subset, in-memory batches), `train` (the teacher network, one run through the
Distiller, measurements), `study` (the whole demo), `summary` (tables). `benchmarks/digits_kd.py`
and `python -m distill demo` are both thin layers over this package.
"""

from distill.demo.data import InMemoryLoader, digits_data, random_shift, stratified_subset
from distill.demo.study import (
    MARKER,
    DemoConfig,
    StudyResult,
    as_teacher,
    prepare_out,
    run_study,
    train_students,
    train_teacher,
)
from distill.demo.summary import (
    Gain,
    Row,
    format_count,
    format_gains,
    format_table,
    gains,
    paired_wins,
    rows,
    summary_dict,
)
from distill.demo.train import (
    DATASET,
    EXPERIMENT,
    STUDENT_NAME,
    TEACHER_NAME,
    RunResult,
    TrainSettings,
    agreement,
    digits_cnn,
    measure_inference,
    predictions,
    train_run,
)
from distill.timing import device_name  # the one definition, re-exported for the demo

__all__ = [
    "DATASET",
    "EXPERIMENT",
    "MARKER",
    "STUDENT_NAME",
    "TEACHER_NAME",
    "DemoConfig",
    "Gain",
    "InMemoryLoader",
    "Row",
    "RunResult",
    "StudyResult",
    "TrainSettings",
    "agreement",
    "as_teacher",
    "device_name",
    "digits_cnn",
    "digits_data",
    "format_count",
    "format_gains",
    "format_table",
    "gains",
    "measure_inference",
    "paired_wins",
    "predictions",
    "prepare_out",
    "random_shift",
    "rows",
    "run_study",
    "stratified_subset",
    "summary_dict",
    "train_run",
    "train_students",
    "train_teacher",
]
