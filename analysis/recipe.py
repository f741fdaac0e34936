"""The merge recipe: which checkpoints, which weights, why — and proof of which files.

A recipe is what ``recommend -o`` writes and ``merge`` reads, so a merge can be reviewed
and re-run. Paths are stored relative to the recipe file when they are below its
folder; every input carries the sha256 of its files so a changed input is caught.
It can also be exported as a mergekit ``linear`` config.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from . import __version__
from .averaging import OUTPUT_DTYPES
from .errors import RecipeError
from .run import CheckpointRef

RECIPE_VERSION = 1
METHODS = ("sma", "ema", "wma", "soup", "manual", "recovery")
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RecipeEntry:
    """One input of a merge."""

    path: Path          # absolute once loaded
    step: int
    weight: float
    sha256: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Recipe:
    """A reproducible merge."""

    method: str
    checkpoints: tuple[RecipeEntry, ...]
    output_dtype: str = "same"
    reasons: dict[str, str] = field(default_factory=dict)   # str(step) -> why taken / left out
    created_by: str = f"ckpt-select {__version__}"
    source_run: Path | None = None

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(e.weight for e in self.checkpoints)


def checkpoint_sha256(files: tuple[Path, ...] | list[Path], progress: Callable[[float, str], None] | None = None) -> str:
    """sha256 of a checkpoint: of the file itself, or of ``sha256sum``-style lines for several files.

    A single file's value equals ``sha256sum FILE`` so users can check it by hand.
    """
    files = sorted(files)
    digests = [_file_sha256(f, progress) for f in files]
    if len(files) == 1:
        return digests[0]
    lines = "".join(f"{d}  {f.name}\n" for d, f in zip(digests, files))
    return hashlib.sha256(lines.encode()).hexdigest()


def _file_sha256(path: Path, progress: Callable[[float, str], None] | None) -> str:
    digest = hashlib.sha256()
    total = max(path.stat().st_size, 1)
    done = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done / total, f"sha256 {path.name}")
    return digest.hexdigest()


def build_recipe(method: str, refs: list[CheckpointRef], weights: tuple[float, ...], output_dtype: str = "same",
                 reasons: dict[str, str] | None = None, source_run: Path | None = None) -> Recipe:
    """A recipe for ``refs`` with ``weights``, hashing every input file."""
    entries = tuple(
        RecipeEntry(ref.path, ref.step, float(w), checkpoint_sha256(ref.files), ref.size_bytes)
        for ref, w in zip(refs, weights)
    )
    return Recipe(method, entries, output_dtype, dict(reasons or {}), source_run=source_run)


def recipe_to_dict(recipe: Recipe, relative_to: Path | None = None) -> dict:
    """The YAML document of the contract; paths relative to ``relative_to`` when below it."""
    def show(path: Path) -> str:
        if relative_to is not None:
            try:
                return path.relative_to(relative_to).as_posix()
            except ValueError:
                pass
        return str(path)

    doc = {
        "ckpt_select_recipe": RECIPE_VERSION,
        "method": recipe.method,
        "output_dtype": recipe.output_dtype,
        "checkpoints": [
            {"path": show(e.path), "step": e.step, "weight": round(e.weight, 12), "sha256": e.sha256,
             "bytes": e.size_bytes}
            for e in recipe.checkpoints
        ],
        "reasons": dict(recipe.reasons),
        "created_by": recipe.created_by,
    }
    if recipe.source_run is not None:
        doc["source_run"] = show(recipe.source_run)
    return doc


def dump_recipe(recipe: Recipe, relative_to: Path | None = None) -> str:
    """The recipe as YAML text."""
    return yaml.safe_dump(recipe_to_dict(recipe, relative_to), sort_keys=False, allow_unicode=True, width=100)


def write_recipe(recipe: Recipe, path: Path) -> Path:
    """Write the recipe YAML (paths relative to its folder); returns the absolute path."""
    path = path.expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dump_recipe(recipe, path.parent))
    tmp.replace(path)
    return path


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; relative paths resolve against its folder.

    Raises:
        RecipeError: not YAML, wrong version, missing fields, bad weights or dtype.
    """
    path = Path(path).expanduser().resolve()
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RecipeError(path, e.strerror or str(e)) from None
    except yaml.YAMLError as e:
        raise RecipeError(path, f"not valid YAML ({e})") from None
    return recipe_from_dict(doc, path)


def recipe_from_dict(doc: object, path: Path) -> Recipe:
    """Validate a parsed recipe document, collecting every problem before raising once."""
    if not isinstance(doc, dict) or doc.get("ckpt_select_recipe") != RECIPE_VERSION:
        raise RecipeError(path, f"not a CkptSelect recipe (expected 'ckpt_select_recipe: {RECIPE_VERSION}')")
    problems: list[str] = []
    method = str(doc.get("method", "manual"))
    if method not in METHODS:
        problems.append(f"method {method!r} is not one of {', '.join(METHODS)}")
    dtype = str(doc.get("output_dtype", "same"))
    if dtype not in OUTPUT_DTYPES:
        problems.append(f"output_dtype {dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    entries = []
    raw = doc.get("checkpoints")
    if not isinstance(raw, list) or not raw:
        problems.append("'checkpoints' must be a non-empty list")
        raw = []
    for index, item in enumerate(raw):
        try:
            entries.append(_entry(item, path.parent))
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"checkpoints[{index}]: {e}")
    total = math.fsum(e.weight for e in entries)
    if entries and abs(total - 1.0) > 1e-6:
        problems.append(f"weights sum to {total:.8f}, not 1")
    if problems:
        raise RecipeError(path, "; ".join(problems))
    source = doc.get("source_run")
    return Recipe(method, tuple(entries), dtype, {str(k): str(v) for k, v in (doc.get("reasons") or {}).items()},
                  str(doc.get("created_by", "")), (path.parent / source).resolve() if source else None)


def _entry(item: dict, base: Path) -> RecipeEntry:
    if not isinstance(item, dict):
        raise TypeError("each checkpoint must be a mapping with path, step, weight, sha256, bytes")
    weight = float(item["weight"])
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight {weight} must be finite and non-negative")
    return RecipeEntry((base / str(item["path"])).resolve(), int(item["step"]), weight,
                       str(item.get("sha256", "")), int(item.get("bytes", 0)))


def to_mergekit(recipe: Recipe, relative_to: Path | None = None) -> dict:
    """The recipe as a mergekit ``linear`` merge config (``mergekit-yaml CONFIG OUT``)."""
    dtype = "float32" if recipe.output_dtype in ("same", "float32") else recipe.output_dtype
    doc = recipe_to_dict(recipe, relative_to)
    return {
        "merge_method": "linear",
        "dtype": dtype,
        "parameters": {"normalize": True},
        "models": [{"model": c["path"], "parameters": {"weight": c["weight"]}} for c in doc["checkpoints"]],
    }
