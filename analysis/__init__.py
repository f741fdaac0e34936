"""CkptSelect's analysis core: read a training run, judge its checkpoints, recommend and merge.

Nothing here imports Streamlit; the app and the CLI call these functions and draw.
"""

__version__ = "0.1.0"

from .averaging import average_state_dict  # noqa: E402  (after __version__, which recipe reads)
from .errors import AnalysisError  # noqa: E402
from .evaluate import Evaluator, load_evaluator  # noqa: E402
from .logs import read_log  # noqa: E402
from .merge import MergeResult, merge_checkpoints, merge_recipe  # noqa: E402
from .recipe import Recipe, build_recipe, load_recipe, write_recipe  # noqa: E402
from .recommend import Recommendation, RecommendConfig, recommend  # noqa: E402
from .run import CheckpointRef, Run, checkpoint_ref, open_run  # noqa: E402
from .signals import RunSignals, assess_run  # noqa: E402
from .model_size import count_parameters  # noqa: E402
from .scaling import run_stop_signal  # noqa: E402
from .storage import StorageEstimate, estimate_storage  # noqa: E402

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
