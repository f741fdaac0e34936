"""A prune plan (and what was done) as plain data: the ``prune --json`` document and the Storage page's table."""

from __future__ import annotations

from pathlib import Path

from ..storage import human_bytes
from .apply import PruneResult
from .plan import PrunePlan


def prune_rows(plan: PrunePlan) -> list[dict]:
    """One row per checkpoint, oldest first: step, path (relative to the run), status, bytes, action, reasons."""
    rows = [{"step": item.step, "path": _shown(item.path, plan.run_path), "status": item.status,
             "bytes": item.size_bytes, "size": human_bytes(item.size_bytes),
             "action": "keep" if item.keep else "delete", "reasons": list(item.reasons)} for item in plan.items]
    return sorted(rows, key=lambda r: (r["step"] is None, r["step"] or 0, r["path"]))


def prune_report(plan: PrunePlan, result: PruneResult | None = None) -> dict:
    """The plan, and the result when it was applied (``dry_run`` true when nothing was done)."""
    doc = {
        "run": str(plan.run_path), "policy": plan.policy.text, "budget_bytes": plan.policy.budget_bytes,
        "bytes_now": plan.bytes_now, "bytes_after": plan.bytes_after, "bytes_freed": plan.bytes_freed,
        "kept": len(plan.kept), "deleted": len(plan.deleted), "summary": plan.summary(),
        "notes": list(plan.notes), "checkpoints": prune_rows(plan), "dry_run": result is None,
    }
    if result is not None:
        doc["result"] = {
            "trash": str(result.trash_dir) if result.trash_dir else None,
            "moved": [_shown(i.path, plan.run_path) for i in result.moved],
            "left_in_place": [{"path": _shown(i.path, plan.run_path), "reason": why} for i, why in result.skipped],
            "trash_emptied": result.emptied, "bytes_freed": result.bytes_freed,
            "restore_command": result.restore_command,
        }
    return doc


def _shown(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
