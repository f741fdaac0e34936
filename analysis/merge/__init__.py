"""The merge engine: a weighted average of checkpoints, streamed block by block into a new folder.

One entry, :func:`merge` (``merge(recipe, out_dir)``): the Recipe is the only description of a
merge (``merge --checkpoints A B C`` builds one first). Its stages, a module each: ``plan``
(headers only: weights, the inputs' common layout, the output's dtypes, the dry run's projection),
``verify`` (the inputs against the recipe, the target, free disk), ``read`` (every input's blocks
read ahead on a thread, and the sha256 of inputs the recipe has none for, taken from those same
reads), ``arithmetic`` (the contract and the numpy adder; ``fused`` with ``_fused.c`` the compiled
one, ``torch_adder`` the float8 one; ``average`` picks one and runs the stream), ``output`` (the
files the newest input's layout calls for, written into a hidden folder), ``bucket`` (a target in
object storage: files uploaded one by one, the recipe last) and ``engine`` (the stages in order,
then the rename into place). ``in_memory`` builds the same average as a state
dict for evaluators.
"""

from .engine import (DISK_MARGIN_BYTES, MERGEKIT_FILE, MODEL_FILE, RECIPE_FILE, MergePlan, MergeResult, dry_run,
                     merge, merge_checkpoints, merge_recipe, plan_merge, verify_inputs)
from .output import parse_size

__all__ = ["DISK_MARGIN_BYTES", "MERGEKIT_FILE", "MODEL_FILE", "MergePlan", "MergeResult", "RECIPE_FILE", "dry_run",
           "merge", "merge_checkpoints", "merge_recipe", "parse_size", "plan_merge", "verify_inputs"]
