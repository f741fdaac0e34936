"""The merge engine: a weighted average of checkpoints, streamed block by block into a new folder.

The stages, one module each: ``plan`` (headers only: the inputs' common layout, the output's
dtypes and files, and the dry run's projection), ``verify`` (the inputs against the recipe, the
target, free disk), ``read`` (every input's blocks, read ahead on a thread), ``arithmetic`` (the
adders that sum a block: numpy, torch for float8, and the compiled kernel of ``fused`` and
``_fused.c``), ``output`` (the files written into a hidden folder) and ``engine`` (which runs
them in that order and renames the folder into place).
"""

from .engine import (DISK_MARGIN_BYTES, MERGEKIT_FILE, MODEL_FILE, RECIPE_FILE, MergePlan, MergeResult, dry_run,
                     merge, merge_checkpoints, merge_recipe, plan_merge, verify_inputs)
from .output import parse_size

__all__ = ["DISK_MARGIN_BYTES", "MERGEKIT_FILE", "MODEL_FILE", "MergePlan", "MergeResult", "RECIPE_FILE", "dry_run",
           "merge", "merge_checkpoints", "merge_recipe", "parse_size", "plan_merge", "verify_inputs"]
