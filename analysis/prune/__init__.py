"""Keep only the checkpoints that matter: ``prune`` plans on the run's real files, then moves to a trash.

``policy`` parses ``--keep window+2,newest:3,every:1000,optimizer`` and ``--budget 2TB``; ``guards``
holds the rules that protect files whatever the policy says (the newest, one being written, one a
recipe names, anything not a checkpoint); ``plan`` decides each checkpoint's fate with its reasons;
``apply`` moves to the trash, deletes once every move succeeded, and restores (``remote_apply`` does it
for a run in a bucket by server-side copies and deletes; ``results`` holds what both report); ``report`` is the
document the CLI prints and the Storage page draws. Nothing imports this package but the front ends.
"""

from .apply import MANIFEST, PruneRefused, PruneResult, RestoreResult, apply_prune, check_prune_allowed, restore_trash
from .guards import TRASH_FOLDER
from .plan import PruneItem, PrunePlan, plan_prune
from .policy import POLICY_SYNTAX, TERMS, KeepTerm, PrunePolicy, parse_bytes, parse_policy
from .report import prune_report, prune_rows

__all__ = [
    "KeepTerm",
    "MANIFEST",
    "POLICY_SYNTAX",
    "PruneItem",
    "PrunePlan",
    "PrunePolicy",
    "PruneRefused",
    "PruneResult",
    "RestoreResult",
    "TERMS",
    "TRASH_FOLDER",
    "apply_prune",
    "check_prune_allowed",
    "parse_bytes",
    "parse_policy",
    "plan_prune",
    "prune_report",
    "prune_rows",
    "restore_trash",
]
