"""CkptSelect's analysis core: read a training run, judge its checkpoints, recommend and merge.

Nothing here imports Streamlit; the app and the CLI call these functions and draw.

The public names load lazily (PEP 562): ``import analysis`` costs nothing, and
``python -m analysis merge`` never pays for pandas, scikit-learn or SciPy, which only
the analysis commands need (issue 6: start-up was half of a merge's wall time).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> the module (relative to this package) that defines it.
_EXPORTS = {
    "AnalysisError": ".errors",
    "CheckpointRef": ".run",
    "Evaluator": ".evaluate",
    "MergeResult": ".merge",
    "Recipe": ".recipe",
    "RecommendConfig": ".selection",
    "Recommendation": ".selection",
    "Run": ".run",
    "RunSignals": ".signals",
    "StorageEstimate": ".storage",
    "assess_run": ".signals",
    "average_state_dict": ".merge.in_memory",
    "build_recipe": ".recipe",
    "checkpoint_ref": ".run",
    "count_parameters": ".model_size",
    "estimate_storage": ".storage",
    "load_evaluator": ".evaluate",
    "load_recipe": ".recipe",
    "merge_checkpoints": ".merge",
    "merge_recipe": ".merge",
    "open_run": ".run",
    "read_log": ".logs",
    "recommend": ".selection",
    "run_stop_signal": ".scaling",
    "write_recipe": ".recipe",
}

__all__ = [
    "AnalysisError",
    "CheckpointRef",
    "Evaluator",
    "MergeResult",
    "Recipe",
    "RecommendConfig",
    "Recommendation",
    "Run",
    "RunSignals",
    "StorageEstimate",
    "__version__",
    "assess_run",
    "average_state_dict",
    "build_recipe",
    "checkpoint_ref",
    "count_parameters",
    "estimate_storage",
    "load_evaluator",
    "load_recipe",
    "merge_checkpoints",
    "merge_recipe",
    "open_run",
    "read_log",
    "recommend",
    "run_stop_signal",
    "write_recipe",
]


def __getattr__(name: str) -> object:
    """Import the module that defines ``name`` on first use, and cache the value here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:   # for type checkers and IDEs: the same names, imported eagerly
    from .merge.in_memory import average_state_dict
    from .errors import AnalysisError
    from .evaluate import Evaluator, load_evaluator
    from .logs import read_log
    from .merge import MergeResult, merge_checkpoints, merge_recipe
    from .model_size import count_parameters
    from .recipe import Recipe, build_recipe, load_recipe, write_recipe
    from .run import CheckpointRef, Run, checkpoint_ref, open_run
    from .scaling import run_stop_signal
    from .selection import Recommendation, RecommendConfig, recommend
    from .signals import RunSignals, assess_run
    from .storage import StorageEstimate, estimate_storage
