"""The teacher cache's former single-module home, kept as an import path.

Everything lives in `distill.data.cache` now (see its docstring for the parts); this module
re-exports the names that were importable from here, private helpers included.
"""

from __future__ import annotations

from distill.data.cache import *  # noqa: F403
from distill.data.cache import __all__ as _cache_all
from distill.data.cache.build import _Draws, _takes_prepared, _teacher_logits
from distill.data.cache.fingerprint import _TEACHER_ATTRS
from distill.data.cache.fingerprint import jsonable as _jsonable
from distill.data.cache.store import ARRAYS as _ARRAYS
from distill.data.cache.topk import _LOGIT_FLOOR

__all__ = [
    *_cache_all,
    "_ARRAYS",
    "_LOGIT_FLOOR",
    "_TEACHER_ATTRS",
    "_Draws",
    "_jsonable",
    "_takes_prepared",
    "_teacher_logits",
]
