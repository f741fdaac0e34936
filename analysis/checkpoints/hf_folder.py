"""Hugging Face folders: ``checkpoint-N/`` from the Trainer and ``save_pretrained`` output.

The folder is one checkpoint: weights (safetensors or pytorch_model.bin, single or
sharded), ``config.json``, and from the Trainer ``trainer_state.json`` (step, epoch,
best metric), ``optimizer.pt`` and ``scheduler.pt``. The optimizer file is opened only
when its moments are asked for: it is twice the model and listing weights never needs it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointReadError
from .base import CheckpointHandle, TensorInfo
from .safetensors_file import SafetensorsHandle
from .optim import moments_by_name, saved_adam_counters
from .sharded import ShardedHandle, shard_files
from .torch_pickle import TensorTable, TorchPickleHandle, safe_torch_load

if TYPE_CHECKING:
    import torch

# Weight files in the order transformers itself prefers them.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
MARKER_FILES = ("config.json", "trainer_state.json")
OPTIMIZER_FILE = "optimizer.pt"
# optimizer.pt is not hashed with the weights: a merge never reads it and it is twice their size.
SIDE_FILES = ("config.json", "trainer_state.json", "generation_config.json")


def weights_file(folder: Path) -> Path | None:
    """The file holding the folder's weights, or None."""
    return next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)


def trainer_metadata(folder: Path) -> dict[str, str]:
    """step, epoch, tokens and best metric from ``trainer_state.json`` (absent keys left out)."""
    path = folder / "trainer_state.json"
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointReadError(path, f"not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointReadError(path, "expected a JSON object")
    pairs = {"step": "global_step", "global_step": "global_step", "epoch": "epoch",
             "tokens": "num_input_tokens_seen", "best_metric": "best_metric",
             "best_model_checkpoint": "best_model_checkpoint", "max_steps": "max_steps"}
    return {ours: str(state[theirs]) for ours, theirs in pairs.items() if state.get(theirs) is not None}


def parameter_order(folder: Path) -> list[TensorInfo] | None:
    """The model's parameters in ``named_parameters()`` order, the order the optimizer indexes them.

    Weight files list tensors alphabetically, so the order comes from the model class that
    ``config.json`` names, built on the meta device (no memory, no weights). Only classes that
    ship with transformers are used: a config asking for remote code (``auto_map``) gets None.
    """
    config_path = folder / "config.json"
    try:
        config_doc = json.loads(config_path.read_text())
        if not isinstance(config_doc, dict) or "auto_map" in config_doc:
            return None
        import torch
        import transformers   # imported late: a heavy import only optimizer access needs
        if isinstance(folder, Path):
            config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        else:   # a URL (issue 22): transformers reads local folders and Hub ids; the config is already read
            config = transformers.AutoConfig.for_model(**config_doc)
        with torch.device("meta"):
            for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
                try:
                    model = auto.from_config(config, trust_remote_code=False)
                    break
                except ValueError:
                    continue
            else:
                return None
        return [TensorInfo(n, tuple(p.shape), str(p.dtype).removeprefix("torch."), 0) for n, p in model.named_parameters()]
    except Exception:  # noqa: BLE001 - an unknown architecture only costs the names, never the read
        return None


class HFFolderHandle:
    """Weights via the single-file or sharded handle; metadata merged with trainer_state.json."""

    def __init__(self, folder: Path) -> None:
        self.path = folder
        source = weights_file(folder)
        if source is None:
            raise CheckpointReadError(folder, f"no weights file (looked for {', '.join(WEIGHT_FILES)})")
        self._weights: CheckpointHandle
        if source.name.endswith(".index.json"):
            self._weights = ShardedHandle(source)
        elif source.suffix == ".safetensors":
            self._weights = SafetensorsHandle(source)
        else:
            self._weights = TorchPickleHandle(source)
        self._metadata = {**self._weights.metadata(), **trainer_metadata(folder)}
        self._optimizer: TensorTable | None = None

    def tensors(self) -> list[TensorInfo]:
        return self._weights.tensors()

    def read(self, name: str) -> torch.Tensor:
        return self._weights.read(name)

    def original_name(self, name: str) -> str:
        return self._weights.original_name(name)  # type: ignore[attr-defined]

    def locate(self, name: str):
        """Raw location of a weight (safetensors weights only; None otherwise)."""
        method = getattr(self._weights, "locate", None)
        return method(name) if callable(method) else None

    @property
    def weights(self) -> CheckpointHandle:
        """The handle of the weight file(s): single file or sharded (the merge mirrors it)."""
        return self._weights

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def optimizer_state(self) -> list[TensorInfo]:
        return list(self._optimizer_table().infos)

    def read_optimizer(self, name: str) -> torch.Tensor:
        return self._optimizer_table().read(name)

    def ema_tensors(self) -> list[TensorInfo]:
        return []

    def _optimizer_table(self) -> TensorTable:
        """optimizer.pt, loaded weights-only and memory-mapped on first use."""
        if self._optimizer is None:
            path = self.path / OPTIMIZER_FILE
            moments: dict[str, torch.Tensor] = {}
            if path.is_file():
                payload = safe_torch_load(path)
                params = parameter_order(self.path) or [i for i in self.tensors() if i.is_floating]
                moments = moments_by_name(payload, params) if isinstance(payload, dict) else {}
                self._metadata.update(saved_adam_counters(payload))   # known once optimizer.pt is read
            self._optimizer = TensorTable(path, moments, normalize=False)
        return self._optimizer

    def close(self) -> None:
        self._weights.close()
        self._optimizer = None

    def __enter__(self) -> "HFFolderHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HFFolderReader:
    """A folder with HF weights and a config.json or trainer_state.json beside them."""

    name = "hf_folder"
    description = ("Hugging Face checkpoint-N/ or save_pretrained folder: safetensors or pytorch_model.bin, "
                   "single or sharded, + trainer_state.json and optimizer.pt")

    def matches(self, path: Path) -> bool:
        return path.is_dir() and weights_file(path) is not None and any((path / m).is_file() for m in MARKER_FILES)

    def files(self, path: Path) -> list[Path]:
        source = weights_file(path)
        weights = shard_files(source) if source and source.name.endswith(".index.json") else [source] if source else []
        return weights + [path / f for f in SIDE_FILES if (path / f).is_file()]

    def open(self, path: Path) -> HFFolderHandle:
        return HFFolderHandle(path)
