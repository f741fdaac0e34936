"""Evaluator of one sample run, for CkptSelect's evaluator protocol (copied into a run as ``evaluate.py``).

    python -m analysis recommend RUN --eval RUN/evaluate.py:evaluate

``evaluate(state_dict)`` returns the mean cross-entropy (nats/byte, lower is better) of the
weights on ``data/val.bin``: the same windows the trainer logged as ``val_loss``, so a float32
checkpoint scores exactly its logged value. ``evaluate_test`` scores ``data/test.bin``, which
no selection ever sees: benchmarks use it to check that a choice made on val generalises.

The file depends only on what sits beside it (``model.py``, ``config.json``, ``data/``), found
relative to this file, so it works from any working directory and after the run folder is
copied elsewhere. State dicts in bfloat16, float16 or float32 are accepted and scored in float32.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

RUN_DIR = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def _model_module() -> ModuleType:
    """This run's own copy of the model code, imported by path under a name unique to the run.

    Registered in ``sys.modules`` because dataclasses look their module up there.
    """
    name = f"_sample_run_model_{abs(hash(str(RUN_DIR))):x}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, RUN_DIR / "model.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@lru_cache(maxsize=1)
def _config():
    """The model's GPTConfig, rebuilt from ``config.json``."""
    model = json.loads((RUN_DIR / "config.json").read_text())["model"]
    return _model_module().GPTConfig(**model)


@lru_cache(maxsize=3)
def _split(name: str) -> np.ndarray:
    """The held-out bytes of one split (``data/NAME.bin``), read once per process."""
    return np.fromfile(RUN_DIR / "data" / f"{name}.bin", dtype=np.uint8)


def _load(state_dict: dict[str, torch.Tensor]):
    """The run's model holding ``state_dict``, on a GPU when there is one (runs of tens of millions of
    parameters), else on the CPU."""
    model = _model_module().as_model(state_dict, _config())
    return model.cuda() if torch.cuda.is_available() else model


def _score(state_dict: dict[str, torch.Tensor], split: str) -> float:
    return _model_module().evaluate_loss(_load(state_dict), _split(split))


def evaluate(state_dict: dict[str, torch.Tensor]) -> float:
    """Mean validation loss in nats per byte (lower is better) of ``state_dict`` on ``data/val.bin``."""
    return _score(state_dict, "val")


def evaluate_test(state_dict: dict[str, torch.Tensor]) -> float:
    """Mean test loss in nats per byte on ``data/test.bin``, the split held out from selection."""
    return _score(state_dict, "test")


def test_window_losses(state_dict: dict[str, torch.Tensor], split: str = "test") -> np.ndarray:
    """The mean loss (nats/byte) of each window ``evaluate_test`` averages, in order: benchmarks resample them.

    Windows of one source file are alike, so a resampling that would measure how sure a test score
    is takes whole files (:func:`test_window_files`), not windows. ``split`` names another held-out
    file of ``data/`` (a benchmark's bigger split) to score the same way.
    """
    model = _load(state_dict).eval()
    device = next(model.parameters()).device
    x, y = _model_module().eval_windows(_split(split), model.config.block_size)
    losses = []
    with torch.no_grad():
        for start in range(0, len(x), 128):
            logits, _ = model(x[start:start + 128].to(device))
            targets = y[start:start + 128].to(device)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            losses.append(loss.view(targets.shape).mean(dim=1).double().cpu())
    return torch.cat(losses).numpy()


def test_window_files(split: str = "test") -> np.ndarray:
    """For each window of :func:`test_window_losses`, the index of the held-out file its first byte is from
    (the splits join whole files with a zero byte)."""
    data = _split(split)
    starts = np.arange((len(data) - 1) // _config().block_size) * _config().block_size
    return np.searchsorted(np.flatnonzero(data == 0), starts)
