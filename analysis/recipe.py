"""The merge recipe: which checkpoints, which weights, why — and proof of which files.

A recipe is what ``recommend -o`` writes and ``merge`` reads, so a merge can be reviewed
and re-run. Paths are stored relative to the recipe file when they are below its
folder; every input carries the sha256 of its files so a changed input is caught.
It can also be exported as a mergekit ``linear`` config.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import yaml

from . import __version__
from .inputs import OUTPUT_DTYPES, OUTPUT_FORMATS, duplicate_inputs, normalize_weights
from .checkpoints.base import main_floating_dtype
from .errors import AnalysisError, InvalidArgument, RecipeError
from .hashing import checkpoint_etag, checkpoint_quick_hash, checkpoint_sha256
from .remote import RemotePath, as_path, is_remote
from .run import CheckpointRef, checkpoint_ref
from .schedules import parse_schedule
from .targets import MERGEKIT_MARKER, RECIPE_KEY, write_text_atomic

if TYPE_CHECKING:
    from .checkpoints import TensorInfo
    from .run import Run

RECIPE_VERSION = 1
METHODS = ("sma", "ema", "wma", "soup", "manual", "recovery", "predicted", "decay")


@dataclass(frozen=True, slots=True)
class RecipeEntry:
    """One input of a merge."""

    path: Path          # absolute once loaded; a RemotePath for a URL (issue 22)
    step: int
    weight: float
    sha256: str
    size_bytes: int
    quick_hash: str = ""   # see checkpoint_quick_hash; empty in recipes written before it existed
    etag: str = ""         # a remote input's ETag (see checkpoint_etag); empty for local files


@dataclass(frozen=True, slots=True)
class Recipe:
    """A reproducible merge."""

    method: str
    checkpoints: tuple[RecipeEntry, ...]
    output_dtype: str = "same"
    reasons: dict[str, str] = field(default_factory=dict)   # str(step) -> why taken / left out
    created_by: str = f"ckpt-select {__version__}"
    source_run: Path | None = None
    output_format: str = "safetensors"   # the merged file's format, one of OUTPUT_FORMATS (issue 21)
    settings: dict[str, object] = field(default_factory=dict)   # decay schedule, window length (issue 24)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(e.weight for e in self.checkpoints)


def build_recipe(method: str, refs: list[CheckpointRef], weights: tuple[float, ...], output_dtype: str = "same",
                 reasons: dict[str, str] | None = None, source_run: Path | None = None, *,
                 hashes: bool = True, settings: Mapping[str, object] | None = None) -> Recipe:
    """A recipe for ``refs`` with ``weights``, hashing every local input file (``hashes=False``: a dry run's, unhashed).

    The inputs are hashed in parallel, one per core: hashlib releases the GIL, and sha256 of every
    byte is most of ``merge --checkpoints``'s time otherwise (3.5 GB: about 3 s on one core). A
    remote input with an ETag is recorded by ETag and size instead, free from the listing: hashing it
    would download the whole checkpoint just to write a recipe (issue 22; ``merge --sha256`` records
    its sha256 from the merge's own reads).
    """
    etags = [checkpoint_etag(ref.files) for ref in refs]
    hashed = [i for i, tag in enumerate(etags) if hashes and not tag]
    sha256s, quick = [""] * len(refs), [""] * len(refs)
    if hashed:
        with ThreadPoolExecutor(max_workers=min(len(hashed), os.cpu_count() or 1)) as pool:
            for i, sha in zip(hashed, pool.map(lambda i: checkpoint_sha256(refs[i].files), hashed)):
                sha256s[i] = sha
        for i in hashed:
            quick[i] = checkpoint_quick_hash(refs[i].files)
    entries = tuple(RecipeEntry(ref.path, ref.step, float(w), sha, ref.size_bytes, q, tag)
                    for ref, w, sha, q, tag in zip(refs, weights, sha256s, quick, etags))
    return Recipe(method, entries, output_dtype, dict(reasons or {}), source_run=source_run,
                  settings=dict(settings or {}))


def recipe_for_selection(run: Run, steps: Sequence[int], weights: Sequence[float], method: str,
                         output_dtype: str = "same", reasons: Mapping[object, str] | None = None, *,
                         hashes: bool = True, settings: Mapping[str, object] | None = None) -> Recipe:
    """The recipe for checkpoints ``steps`` of ``run``: the one builder of both front ends (issue 20).

    ``recommend`` writes or shows it, the app offers it as a download and merges it, so the recipe a
    user downloads is the one written beside the merge: the run folder as source run, the chosen
    dtype, the weights scaled to sum to 1. Hash (``hashes=True``) only when it is written or shown.

    Raises:
        InvalidArgument: bad weights or dtype. AnalysisError: no checkpoint at one of ``steps``.
    """
    if output_dtype not in OUTPUT_DTYPES:
        raise InvalidArgument(f"output dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {output_dtype!r}")
    refs = [run.checkpoint_at(step) for step in steps]
    weights = normalize_weights(tuple(weights), len(refs))
    why = {str(step): str(text) for step, text in (reasons or {}).items()}
    return build_recipe(method, refs, weights, output_dtype, why, run.path, hashes=hashes, settings=settings)


def default_merge_folder(run_path: Path, method: str, steps: Sequence[int]) -> Path:
    """Where a merge of ``steps`` goes unless the user says otherwise: ``RUN/merges/METHOD-FIRST-LAST``.

    Inside the run, so the merge is found with it (and never taken for one of its checkpoints).
    """
    return Path(run_path) / "merges" / f"{method}-{min(steps)}-{max(steps)}"


def recipe_to_dict(recipe: Recipe, relative_to: Path | None = None) -> dict:
    """The YAML document of the contract; paths relative to ``relative_to`` when below it."""
    def show(path: Path) -> str:
        if relative_to is not None and isinstance(path, RemotePath) is isinstance(relative_to, RemotePath):
            try:
                return path.relative_to(relative_to).as_posix()
            except ValueError:
                pass
        return str(path)

    doc = {
        RECIPE_KEY: RECIPE_VERSION,
        "method": recipe.method,
        "output_dtype": recipe.output_dtype,
        "output_format": recipe.output_format,
        "checkpoints": [
            {"path": show(e.path), "step": e.step, "weight": round(e.weight, 12), "sha256": e.sha256,
             **({"quick_hash": e.quick_hash} if e.quick_hash else {}), "bytes": e.size_bytes,
             **({"etag": e.etag} if e.etag else {})}
            for e in recipe.checkpoints
        ],
        "reasons": dict(recipe.reasons),
        "created_by": recipe.created_by,
    }
    if recipe.settings:
        doc["settings"] = dict(recipe.settings)
    if recipe.source_run is not None:
        doc["source_run"] = show(recipe.source_run)
    return doc


def dump_recipe(recipe: Recipe, relative_to: Path | None = None) -> str:
    """The recipe as YAML text."""
    return yaml.safe_dump(recipe_to_dict(recipe, relative_to), sort_keys=False, allow_unicode=True, width=100)


def write_recipe(recipe: Recipe, path: Path, *, force: bool = False, protected: Iterable[Path] = ()) -> Path:
    """Write the recipe YAML (paths relative to its folder), atomically; returns the absolute path.

    It never writes over or into one of the recipe's checkpoints or ``protected`` (the run's files),
    and replaces an existing file only when CkptSelect wrote it or ``force`` is given
    (:func:`analysis.targets.check_file_target`, issue 19).

    Raises:
        OutputError: the target is refused, or the storage refuses the write.
    """
    path = as_path(path)
    path = path if isinstance(path, RemotePath) else path.expanduser().resolve()
    inputs = (*protected, *(e.path for e in recipe.checkpoints))
    return write_text_atomic(path, dump_recipe(recipe, path.parent), inputs, force)


def _read_yaml(path: Path) -> object:
    """A YAML document, or RecipeError naming the file (unreadable, or not YAML)."""
    try:
        return yaml.safe_load(path.read_text())
    except OSError as e:
        raise RecipeError(path, e.strerror or str(e)) from None
    except yaml.YAMLError as e:   # kept as the context: ``--verbose`` shows PyYAML's full report
        raise RecipeError(path, f"not valid YAML: {_yaml_problem(e)}") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: where (line, column) and what (issue 19)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    what = " ".join(str(p) for p in (getattr(error, "context", None), getattr(error, "problem", None)) if p)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{where}{what or error}".split())


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; relative paths resolve against its folder.

    Raises:
        RecipeError: not YAML, wrong version, missing fields, bad weights or dtype.
    """
    path = _located(path)
    doc = _read_yaml(path)
    return recipe_from_dict(doc, path)


def _located(path: "str | Path | RemotePath") -> "Path | RemotePath":
    """A recipe's own location: a RemotePath for a URL (read by ranges), else the resolved local path."""
    return as_path(path) if is_remote(path) else Path(path).expanduser().resolve()


def _beside(base: "Path | RemotePath", name: str) -> "Path | RemotePath":
    """A path a recipe names: a URL as it is, else relative to the recipe's folder (local or remote)."""
    if is_remote(name):
        return as_path(name)
    return base / name if isinstance(base, RemotePath) else (base / name).resolve()


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
    out_format = str(doc.get("output_format", "safetensors"))   # recipes before issue 21 have none
    if out_format not in OUTPUT_FORMATS:
        problems.append(f"output_format {out_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    raw = doc.get("checkpoints")
    if not isinstance(raw, list) or not raw:
        problems.append("'checkpoints' must be a non-empty list")
        raw = []
    indexed = []
    for index, item in enumerate(raw):
        try:
            indexed.append((index, _entry(item, path.parent)))
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"checkpoints[{index}]{_entry_path(item)}: {e}")
    problems += duplicate_inputs([(i, e.path) for i, e in indexed], "checkpoints")
    entries = [e for _, e in indexed]
    total = math.fsum(e.weight for e in entries)
    if entries and abs(total - 1.0) > 1e-6:
        problems.append(f"weights sum to {total:.8f}, not 1")
    settings = _settings(doc.get("settings"), method, problems)
    if problems:
        raise RecipeError(path, "; ".join(problems))
    source = doc.get("source_run")
    return Recipe(method, tuple(entries), dtype, {str(k): str(v) for k, v in (doc.get("reasons") or {}).items()},
                  str(doc.get("created_by", "")), _beside(path.parent, str(source)) if source else None, out_format,
                  settings)



def _settings(raw: object, method: str, problems: list[str]) -> dict[str, object]:
    """The recipe's settings (decay schedule, window length; issue 24), noting what is wrong in ``problems``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append("'settings' must be a mapping")
        return {}
    settings = {str(k): v for k, v in raw.items()}
    if method == "decay" or "schedule" in settings:
        try:
            settings["schedule"] = parse_schedule(str(settings.get("schedule", ""))).spec
        except AnalysisError as e:
            problems.append(f"settings: {e}")
    for key in ("window_tokens", "window_steps"):
        value = settings.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            problems.append(f"settings: {key} must be a positive number, got {value!r}")
    return settings


def _entry_path(item: object) -> str:
    """`` (PATH)`` of a checkpoint entry for a message, when it has one."""
    return f" ({item['path']})" if isinstance(item, dict) and "path" in item else ""


def parse_weight(value: object) -> float:
    """A recipe's weight: a finite, non-negative number; ``"0.5"`` (a string) or ``true`` is an error (issue 19)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"weight {value!r} must be a number, not {type(value).__name__}")
    weight = float(value)
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight {weight} must be finite and non-negative")
    return weight


def _entry(item: dict, base: Path) -> RecipeEntry:
    if not isinstance(item, dict):
        raise TypeError("each checkpoint must be a mapping with path, step, weight, sha256, bytes")
    weight = parse_weight(item["weight"])
    return RecipeEntry(_beside(base, str(item["path"])), int(item["step"]), weight,  # type: ignore[arg-type]
                       str(item.get("sha256", "")), int(item.get("bytes", 0)), str(item.get("quick_hash", "")),
                       str(item.get("etag", "")))


def to_mergekit(recipe: Recipe, relative_to: Path | None = None, same_dtype: str | None = None) -> dict:
    """The recipe as a mergekit ``linear`` merge config (``mergekit-yaml CONFIG OUT``).

    mergekit computes in ``dtype`` and writes ``out_dtype``: float32 arithmetic like ours, and the
    output dtype of the recipe (``same_dtype``, the inputs' dtype, stands for "same" when known).
    """
    out = same_dtype if recipe.output_dtype == "same" else recipe.output_dtype
    doc = recipe_to_dict(recipe, relative_to)
    config = {
        "merge_method": "linear",
        "dtype": "float32",
        "parameters": {"normalize": True},
        "models": [{"model": c["path"], "parameters": {"weight": c["weight"]}} for c in doc["checkpoints"]],
    }
    if out and out != "float32":
        config["out_dtype"] = out
    return config


def mergekit_same_dtype(recipe: Recipe, newest: Iterable[TensorInfo] | None = None) -> str | None:
    """The dtype a mergekit config names for output dtype "same" (None when the recipe names one).

    The one rule of ``export`` and of the config written beside a merge (issue 20): the newest input's
    main floating dtype (:func:`main_floating_dtype`), as the merge's output keeps the newest input's dtypes.

    Args:
        recipe: the recipe.
        newest: the newest input's tensor headers when the caller has them open (the merge); else its
            header is read.
    """
    if recipe.output_dtype != "same" or not recipe.checkpoints:
        return None
    if newest is not None:
        return main_floating_dtype(newest)
    from .checkpoints import open_checkpoint   # late: the readers load only when a header must be read
    with open_checkpoint(recipe.checkpoints[-1].path) as handle:
        return main_floating_dtype(handle.tensors())


def dump_mergekit(recipe: Recipe, relative_to: Path | None = None,
                  newest: Iterable[TensorInfo] | None = None) -> str:
    """The recipe as mergekit config YAML, "same" resolved by :func:`mergekit_same_dtype`."""
    config = yaml.safe_dump(to_mergekit(recipe, relative_to, mergekit_same_dtype(recipe, newest)), sort_keys=False)
    # The first line marks it as ours, so ``export -o`` may later replace it without ``--force``.
    return f"{MERGEKIT_MARKER} {__version__}: a mergekit linear config (mergekit-yaml THIS_FILE OUT_DIR)\n{config}"


_MERGEKIT_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                    "float16": "float16", "fp16": "float16", "half": "float16"}


def is_mergekit_config(doc: object) -> bool:
    """True for a mergekit config document (it has ``merge_method``; ours has ``ckpt_select_recipe``)."""
    return isinstance(doc, dict) and "merge_method" in doc and "ckpt_select_recipe" not in doc


def recipe_from_mergekit(doc: dict, path: Path) -> Recipe:
    """A mergekit ``linear`` config as a recipe (no hashes: mergekit configs carry none).

    Model paths resolve against the config's folder, else the working folder (as mergekit does).

    Raises:
        RecipeError: another merge method, no models, a bad weight or dtype, normalize off with
            weights not summing to 1 (CkptSelect always normalises), or a model that is not a local checkpoint.
    """
    problems: list[str] = []
    if doc.get("merge_method") != "linear":
        problems.append(f"merge_method {doc.get('merge_method')!r}: only 'linear' (a weighted average) is supported")
    models = doc.get("models")
    if not isinstance(models, list) or not models:
        problems.append("'models' must be a non-empty list")
        models = []
    dtype_name = str(doc.get("out_dtype") or doc.get("dtype") or "float32")
    dtype = _MERGEKIT_DTYPES.get(dtype_name)
    if dtype is None:
        problems.append(f"dtype {dtype_name!r} is not one of {', '.join(_MERGEKIT_DTYPES)}")
    indexed = []
    for index, item in enumerate(models):
        try:
            indexed.append((index, _mergekit_model(item, path.parent)))
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"models[{index}]: {e}")
    problems += duplicate_inputs([(i, p) for i, (p, _) in indexed], "models")
    pairs = [pair for _, pair in indexed]
    normalize = (doc.get("parameters") or {}).get("normalize", True)
    total = math.fsum(w for _, w in pairs)
    if pairs and not normalize and abs(total - 1.0) > 1e-6:
        problems.append(f"normalize is false but the weights sum to {total:.8f}; CkptSelect always normalises")
    if pairs and total <= 0:
        problems.append("weights sum to zero")
    if problems:
        raise RecipeError(path, "; ".join(problems))
    entries = []
    for model, weight in pairs:
        try:
            ref = checkpoint_ref(model)
        except AnalysisError as e:
            raise RecipeError(path, str(e)) from None
        entries.append(RecipeEntry(ref.path, ref.step, weight / total, "", ref.size_bytes))
    return Recipe("manual", tuple(entries), dtype or "float32", {}, f"mergekit config {path.name}")


def _mergekit_model(item: object, base: Path) -> tuple[Path, float]:
    """(path, weight) of one ``models`` entry: ``{model: PATH, parameters: {weight: W}}``."""
    if not isinstance(item, dict) or "model" not in item:
        raise TypeError("each model must be a mapping with 'model' and 'parameters: {weight: W}'")
    model = item["model"]
    name = model.get("model") if isinstance(model, dict) else model
    weight = parse_weight((item.get("parameters") or {})["weight"])
    if is_remote(str(name)):
        return as_path(str(name)), weight   # type: ignore[return-value]
    path = Path(str(name)).expanduser()
    if not path.is_absolute():
        path = base / path if (base / path).exists() or not path.exists() else path.resolve()
    return path.resolve(), weight


def load_any_recipe(path: str | Path) -> Recipe:
    """Our recipe or a mergekit linear config, told apart by their top-level keys.

    Raises:
        RecipeError: unreadable, or neither kind of file.
    """
    path = _located(path)
    doc = _read_yaml(path)
    return recipe_from_mergekit(doc, path) if is_mergekit_config(doc) else recipe_from_dict(doc, path)


def with_hashes(recipe: Recipe) -> Recipe:
    """The recipe with sha256, quick hash and size filled in for local entries that lack them (remote: ETag and size)."""
    entries = []
    for e in recipe.checkpoints:
        if e.sha256 and e.quick_hash:
            entries.append(e)
            continue
        ref = checkpoint_ref(e.path, e.step)
        etag = e.etag or checkpoint_etag(ref.files)
        if etag:   # a remote input: its ETag and size say whether it changed, without downloading it
            entries.append(RecipeEntry(e.path, e.step, e.weight, e.sha256, ref.size_bytes, e.quick_hash, etag))
            continue
        entries.append(RecipeEntry(e.path, e.step, e.weight, e.sha256 or checkpoint_sha256(ref.files),
                                   ref.size_bytes, e.quick_hash or checkpoint_quick_hash(ref.files),
                                   e.etag or checkpoint_etag(ref.files)))
    return Recipe(recipe.method, tuple(entries), recipe.output_dtype, recipe.reasons, recipe.created_by,
                  recipe.source_run, recipe.output_format, recipe.settings)
