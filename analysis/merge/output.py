"""The merged model's files, in the layout of the newest input.

A single file stays a single ``model.safetensors``; a sharded input (or ``--out-shard-size``
smaller than the model) gives ``model-0000i-of-0000n.safetensors`` shards written one after
another, each complete before the next starts, with ``model.safetensors.index.json`` written
last. A Hugging Face folder also gets its ``config.json``, ``generation_config.json`` and
tokenizer files copied from the newest input, so ``from_pretrained(OUT)`` loads the merge.
Everything goes into the temporary folder the caller renames into place.

``out_format`` "torch" writes one ``model.pt`` instead (a plain ``torch.save`` dict of tensors),
"lightning" one ``model.ckpt`` holding ``{"state_dict": ...}``: both streamed by
:class:`analysis.checkpoints.torch_writer.TorchWriter`, one block at a time, never sharded (issue 21).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..checkpoints import TensorInfo
from ..checkpoints.safetensors_writer import SafetensorsWriter
from ..checkpoints.torch_writer import TorchWriter
from ..errors import InvalidArgument, MergeError
from ..inputs import OUTPUT_FORMATS
from ..remote import RemotePath
from ..remote.outputs import SHARD_BYTES_KEY

MODEL_FILE = "model.safetensors"
# The single file of each torch output format, and the key its state dict sits under (None: at the top).
TORCH_FILES = {"torch": ("model.pt", None), "lightning": ("model.ckpt", "state_dict")}
INDEX_FILE = "model.safetensors.index.json"
RECIPE_FILE = "recipe.yaml"
MERGEKIT_FILE = "mergekit_config.yml"
# Copied from the newest input folder: what from_pretrained and tokenizers need beside the weights.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
              "chat_template.jinja", "chat_template.json", "preprocessor_config.json")
# Bytes a shard's header may take beyond its data (names, shapes, offsets, metadata), for the disk check.
HEADER_ALLOWANCE = 1 << 20
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """What the merge will write (names relative to the output folder)."""

    sharded: bool
    shards: tuple[tuple[str, tuple[TensorInfo, ...]], ...]   # file name, its tensors (stored names) in order
    side_files: tuple[Path, ...]                            # copied from the newest input
    data_bytes: int
    out_format: str = "safetensors"                         # or a key of TORCH_FILES

    @property
    def files(self) -> tuple[str, ...]:
        """Every file name the output folder will hold besides the recipes."""
        names = [name for name, _ in self.shards] + ([INDEX_FILE] if self.sharded else [])
        return tuple(names + [p.name for p in self.side_files])

    @property
    def size_bytes(self) -> int:
        """Upper bound of the output's size (data + header allowance + side files)."""
        per_tensor = 512 * sum(len(infos) for _, infos in self.shards) if self.out_format in TORCH_FILES else 0
        return (self.data_bytes + HEADER_ALLOWANCE * len(self.shards) + per_tensor
                + sum(p.stat().st_size for p in self.side_files))

    @property
    def largest_file_bytes(self) -> int:
        """Upper bound of the largest weights file: the local scratch a bucket output needs at once (issue 22)."""
        return max(sum(i.size_bytes for i in infos) for _, infos in self.shards) + HEADER_ALLOWANCE

    @property
    def model_file(self) -> str:
        """The file a loader opens: the single weights file, or the shards' index."""
        return INDEX_FILE if self.sharded else self.shards[0][0]


def parse_size(text: str | int | None) -> int | None:
    """``"2GB"``, ``"500MB"``, ``"5GiB"``, ``1000000`` -> bytes (decimal units as HF uses them)."""
    if text is None or isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise InvalidArgument(f"shard size {text!r} is not a size like 2GB, 500MB or 5GiB")
    unit = (match.group(2) or "b").lower().rstrip("b") or "b"
    scale = {"b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    size = int(float(match.group(1)) * scale)
    if size <= 0:
        raise InvalidArgument(f"shard size {text!r} must be positive")
    return size


def plan_output(newest: object, newest_path: Path, stored: list[TensorInfo],
                out_shard_size: int | None = None, out_format: str = "safetensors") -> OutputPlan:
    """Decide single file or shards, and the side files, from the newest input's layout.

    Args:
        newest: the newest input's open handle (a sharded one reports its shard sizes).
        newest_path: its path (a file, an index file or a folder).
        stored: the output's tensors under the names they are stored with, in write order.
        out_shard_size: bytes per shard; default: the newest input's largest shard, if sharded.
        out_format: "safetensors", or "torch"/"lightning": one torch file, no side files (a state
            dict is loaded into a model the user builds).

    Raises:
        InvalidArgument: an unknown format, or a shard size with a torch format (one file only).
    """
    if out_format in TORCH_FILES:
        if out_shard_size is not None:
            raise InvalidArgument(f"--out-shard-size applies to safetensors output only; {out_format} output is one file")
        data_bytes = sum(i.size_bytes for i in stored)
        return OutputPlan(False, ((TORCH_FILES[out_format][0], tuple(stored)),), (), data_bytes, out_format)
    if out_format not in OUTPUT_FORMATS:
        raise InvalidArgument(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {out_format!r}")
    weights = getattr(newest, "weights", newest)
    shard_sizes = getattr(weights, "shard_sizes", None)
    data_bytes = sum(i.size_bytes for i in stored)
    if callable(shard_sizes) and out_shard_size is None:
        out_shard_size = max(shard_sizes())
    sharded = out_shard_size is not None and (callable(shard_sizes) or data_bytes > out_shard_size)
    groups = _pack(stored, out_shard_size) if sharded else [stored]
    count = len(groups)
    names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)] if sharded else [MODEL_FILE]
    folder = newest_path if newest_path.is_dir() else newest_path.parent
    hf_like = newest_path.is_dir() or newest_path.name.endswith(".index.json")
    side = tuple(folder / f for f in SIDE_FILES if hf_like and (folder / f).is_file())
    return OutputPlan(sharded, tuple((n, tuple(g)) for n, g in zip(names, groups)), side, data_bytes)


def _pack(stored: list[TensorInfo], limit: int | None) -> list[list[TensorInfo]]:
    """Consecutive tensors into shards of at most ``limit`` bytes (a bigger tensor gets its own)."""
    groups: list[list[TensorInfo]] = [[]]
    filled = 0
    for info in stored:
        if groups[-1] and limit is not None and filled + info.size_bytes > limit:
            groups.append([])
            filled = 0
        groups[-1].append(info)
        filled += info.size_bytes
    return groups


def write_output(tmp: Path, plan: OutputPlan, blocks: Iterable[tuple[str, int, np.ndarray]],
                 metadata: dict[str, str], output_dtype: str,
                 on_file: Callable[[Path], None] | None = None) -> int:
    """Write the shards in order from ``blocks`` (stored name, start element, block), then index and side files.

    ``on_file`` gets each weights file once it is complete, before the next is written (a bucket
    output uploads and deletes it there, so local scratch holds one shard at a time). The index
    records each shard's size, so a reader can tell a complete output from a killed one (issue 22).

    Returns:
        Bytes of the weight files written.
    """
    stream = iter(blocks)
    total = 0
    weight_map: dict[str, str] = {}
    shard_bytes: dict[str, int] = {}
    pending: tuple[str, int, np.ndarray] | None = None
    for file_name, infos in plan.shards:
        with _writer(plan, tmp / file_name, list(infos), metadata) as writer:
            wanted = {i.name for i in infos}
            while writer.remaining:
                pending = pending or next(stream, None)
                if pending is None or pending[0] not in wanted:
                    raise MergeError(f"{tmp / file_name}: the averaged tensors ran out of order")
                writer.write_block(*pending)
                pending = None
        total += writer.total_bytes
        weight_map.update({i.name: file_name for i in infos})
        shard_bytes[file_name] = (tmp / file_name).stat().st_size
        if on_file is not None:
            on_file(tmp / file_name)
    for name, _, _ in stream:
        raise MergeError(f"{tmp}: tensor {name!r} was averaged but has no place in the output")
    if plan.sharded:
        index = {"metadata": {"total_size": plan.data_bytes, **metadata, SHARD_BYTES_KEY: shard_bytes},
                 "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    for source in plan.side_files:
        _copy_side_file(source, tmp / source.name, output_dtype)
    return total


def format_suggestion(newest_path: Path, out_format: str) -> str:
    """A sentence offering ``--out-format lightning`` when Lightning ``.ckpt`` inputs were merged to another format."""
    if newest_path.suffix != ".ckpt" or out_format == "lightning":
        return ""
    return ("the inputs are Lightning checkpoints: --out-format lightning writes model.ckpt, whose "
            "[\"state_dict\"] LightningModule.load_state_dict accepts")


def _writer(plan: OutputPlan, path: Path, infos: list[TensorInfo],
            metadata: dict[str, str]) -> SafetensorsWriter | TorchWriter:
    """The streaming writer of the plan's format for one file."""
    if plan.out_format in TORCH_FILES:
        return TorchWriter(path, infos, metadata, TORCH_FILES[plan.out_format][1])
    return SafetensorsWriter(path, infos, metadata)


def _copy_side_file(source: Path, target: Path, output_dtype: str) -> None:
    """Copy a side file; a config.json gets the output dtype when the merge changed it."""
    if source.name != "config.json" or output_dtype == "same":
        if isinstance(source, RemotePath):   # a side file of a remote input: a few KB, one request
            target.write_bytes(source.read_bytes())
        else:
            shutil.copyfile(source, target)
        return
    try:
        config = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeError(f"{source}: not readable JSON ({e})") from None
    for key in ("torch_dtype", "dtype"):
        if key in config or key == "torch_dtype":
            config[key] = output_dtype
    target.write_text(json.dumps(config, indent=2) + "\n")
