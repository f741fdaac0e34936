"""Hugging Face ``trainer_state.json`` (written into every ``checkpoint-N/``).

``log_history`` mixes training entries (``loss``, ``learning_rate``, ``grad_norm``,
``epoch``...) and eval entries (``eval_loss``, ``eval_runtime``...), each with ``step``.
Two facts about it are recorded in ``LogTable.notes``: ``loss`` is the mean over the
logging window (``logging_steps``), not a single batch; and the Trainer skips NaN/inf
losses by default (``logging_nan_inf_filter``), so non-finite steps may be missing.
The final summary entry (``train_runtime``, run-mean ``train_loss``) is kept under
``summary/``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LogParseError
from .base import LogTable, to_float
from .builder import TableBuilder
from .text import read_json

NOTES = (
    "trainer_state.json: loss is the mean over each logging window (logging_steps), not one batch",
    "trainer_state.json: the HF Trainer drops NaN/inf losses by default (logging_nan_inf_filter), so they may be absent",
)


class HfTrainerStateReader:
    """HF ``trainer_state.json`` ``log_history``."""

    name = "hf_trainer_state"
    description = "Hugging Face trainer_state.json (log_history)"

    def sniff(self, path: Path, head: str) -> bool:
        is_object = head.lstrip().startswith("{")
        return is_object and ('"log_history"' in head or path.name == "trainer_state.json")

    def read(self, path: Path) -> LogTable:
        builder = TableBuilder(path, self.name)
        state = read_json(path)
        history = state.get("log_history") if isinstance(state, dict) else None
        if not isinstance(history, list):
            raise LogParseError(path, None, "no log_history list")
        last_step: int | None = None
        for entry in history:
            last_step = self._add_entry(entry, last_step, builder)
        for note in NOTES:
            builder.note(note)
        return builder.build()

    @staticmethod
    def _add_entry(entry: object, last_step: int | None, builder: TableBuilder) -> int | None:
        """Add one log_history entry; returns the step it was placed at.

        Seq2SeqTrainer's ``predict_*`` entries carry an epoch but no step: they belong
        to the step of the entry before them (the eval of the same epoch).
        """
        if not isinstance(entry, dict):
            builder.skip()
            return last_step
        step = to_float(entry.get("step"))
        if step is None or step != step:
            if last_step is None or "step" in entry:
                builder.skip()
                return last_step
            step = last_step
            builder.note("trainer_state.json: entries without a step (predict_*) placed at the step before them")
        prefix = "summary/" if "train_runtime" in entry else ""
        metrics = {f"{prefix}{k}": v for k, raw in entry.items() if k != "step" and (v := to_float(raw)) is not None}
        builder.add(int(step), metrics)
        return int(step)
