"""Evaluator of a run made by ``make_hf_run.py`` (copied into it as ``evaluate.py``), per CkptSelect's protocol.

    python -m analysis recommend RUN --eval RUN/evaluate.py:evaluate

``evaluate(state_dict)`` is the mean next-byte loss (nats/byte) on ``data/val.bin`` cut into the
same ``n_positions``-byte sequences the Trainer evaluated, so a checkpoint scores its logged
``eval_loss`` (for a Llama; for GPT-2, transformers 5's Trainer logs (T - 1)/T of it, T the
sequence length, because it counts the first token of each sequence as predicted too);
``evaluate_test`` scores ``data/test.bin``, which no selection sees. The model is the
Hugging Face class ``model_config/`` names, built once and given each state dict in turn; a tied
output head (GPT-2) is not in the checkpoint and is tied again. Only files beside this one are read.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

RUN_DIR = Path(__file__).resolve().parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=1)
def _model():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(RUN_DIR / "model_config")
    return AutoModelForCausalLM.from_config(config).to(DEVICE).eval()


@lru_cache(maxsize=3)
def _sequences(split: str) -> torch.Tensor:
    block = _model().config.max_position_embeddings
    data = np.fromfile(RUN_DIR / "data" / f"{split}.bin", dtype=np.uint8).astype(np.int64)
    n = len(data) // block
    return torch.from_numpy(data[:n * block]).view(n, block)


def _load(state_dict: dict[str, torch.Tensor]):
    """The run's model holding ``state_dict`` (in float32; a tied head tied again)."""
    model = _model()
    params = {k: v.to(DEVICE, torch.float32) for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(params, strict=False)
    tied = model.config.tie_word_embeddings
    if unexpected or set(missing) - ({"lm_head.weight"} if tied else set()):
        raise ValueError(f"state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
    return model


def _sequence_losses(state_dict: dict[str, torch.Tensor], split: str) -> torch.Tensor:
    """The mean next-byte loss of each sequence of ``split``, in order (float64): a score is their mean."""
    model = _load(state_dict)
    sequences, losses = _sequences(split), []
    with torch.no_grad():
        for start in range(0, len(sequences), 64):
            batch = sequences[start:start + 64].to(DEVICE)
            logits = model(input_ids=batch).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(),
                                                     reduction="none")
            losses.append(loss.view(len(batch), -1).mean(dim=1).double().cpu())
    return torch.cat(losses)


def _score(state_dict: dict[str, torch.Tensor], split: str) -> float:
    return float(_sequence_losses(state_dict, split).mean())


def evaluate(state_dict: dict[str, torch.Tensor]) -> float:
    """Mean validation loss in nats per byte (lower is better) on ``data/val.bin``."""
    return _score(state_dict, "val")


def evaluate_test(state_dict: dict[str, torch.Tensor]) -> float:
    """Mean test loss in nats per byte on ``data/test.bin``, the split held out from selection."""
    return _score(state_dict, "test")


def test_window_losses(state_dict: dict[str, torch.Tensor], split: str = "test") -> np.ndarray:
    """The mean loss (nats/byte) of each sequence ``evaluate_test`` averages, in order: benchmarks resample them.

    Sequences of one source file are alike, so a resampling that would measure how sure a test score
    is takes whole files (:func:`test_window_files`), not sequences. ``split`` names another held-out
    file of ``data/`` (a benchmark's bigger split) to score the same way.
    """
    return _sequence_losses(state_dict, split).numpy()


def test_window_files(split: str = "test") -> np.ndarray:
    """For each sequence of :func:`test_window_losses`, the index of the held-out file its first byte is from
    (the splits join whole files with a zero byte)."""
    sequences = _sequences(split)
    starts = np.arange(len(sequences)) * sequences.shape[1]
    return np.searchsorted(np.flatnonzero(sequences.reshape(-1).numpy() == 0), starts)
