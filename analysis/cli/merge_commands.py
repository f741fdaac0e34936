"""Commands on recipes and merges: ``merge`` (a recipe, a mergekit config or ``--checkpoints``) and ``export``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import InvalidArgument
from .group import cli
from .options import PATH_OR_URL, _executor_options, _storage_options
from .output import _emit, _progress_bar

if TYPE_CHECKING:
    from ..executors import Executor
    from ..merge import MergePlan
    from ..recipe import Recipe


@cli.command()
@click.argument("paths", metavar="RECIPE.yaml | --checkpoints A B ...", nargs=-1)
@click.option("--checkpoints", "checkpoints_given", count=True,
              help="Average the checkpoints named after it, oldest first, instead of a recipe: --checkpoints A B C "
                   "(or --checkpoints A --checkpoints B).")
@click.option("--weights", multiple=True, type=float, help="One weight per checkpoint (default uniform).")
@click.option("--dtype", "output_dtype", type=click.Choice(["same", "float32", "bfloat16", "float16"]),
              default=None, help="Dtype of the merged model (default: the recipe's, else same).")
@click.option("-o", "--output", "out_dir", required=True,
              help="New output folder, or a prefix in object storage (s3://bucket/merged: the recipe is written last).")
@click.option("--verify", "verify", type=click.Choice(["full", "quick", "none"]), default="quick", show_default=True,
              help="Check inputs against the recipe: full (sha256), quick (size, header, sampled blocks), none.")
@click.option("--no-verify", "no_verify", is_flag=True, help="Same as --verify none.")
@click.option("--sha256", "hash_inputs", is_flag=True,
              help="Record the sha256 of inputs the recipe has none for (--checkpoints, a mergekit config) in the recipe "
                   "written beside the merge, hashed in the merge's own read pass (~1 GB/s a core; with --executor ray, "
                   "by one task per file on the cluster); by default their size and quick hash only.")
@click.option("--force", is_flag=True, help="Replace an existing output folder that an earlier merge wrote, or an empty one "
              "(atomically, once the merge is complete); never anything else.")
@click.option("--out-shard-size", help="Shard the output at this size, e.g. 2GB (default: as the newest input).")
@click.option("--out-format", "out_format", type=click.Choice(["safetensors", "torch", "lightning"]), default=None,
              help="safetensors (default: the recipe's, else this), torch (model.pt, a torch.save dict of tensors) "
                   "or lightning (model.ckpt holding {'state_dict': ...}).")
@click.option("--dry-run", is_flag=True, help="Print what would be read and written, peak memory and time; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@_executor_options
@_storage_options
def merge(paths: tuple[str, ...], checkpoints_given: int, weights: tuple[float, ...],
          output_dtype: str | None, out_dir: str, verify: str, no_verify: bool, hash_inputs: bool, force: bool,
          out_shard_size: str | None, out_format: str | None, dry_run: bool, as_json: bool,
          executor: Executor | None = None) -> None:
    """Average checkpoints (from a recipe, a mergekit linear config, or --checkpoints) into a new folder or prefix.

    Any of them may be a URL (s3://, gs://, hf://, ...): inputs are read by exact byte ranges, a
    wildcard in a URL's last part is matched against one listing.
    """
    from ..merge import dry_run as plan_of, merge as merge_into, parse_size
    from ..remote import all_stats
    from ..remote.globs import expand_url_globs
    recipe_path, checkpoint_paths = _split_merge_paths(tuple(expand_url_globs(paths)), checkpoints_given)
    recipe = _merge_inputs(recipe_path, checkpoint_paths, weights, output_dtype)
    recipe = replace(recipe, output_format=out_format) if out_format else recipe
    shard_size = parse_size(out_shard_size)
    if dry_run:
        plan = plan_of(recipe, out_dir, force=force, out_shard_size=shard_size)
        if as_json:
            _emit(_plan_doc(plan))
        else:
            click.echo("\n".join(plan.describe()))
        return
    update, close = _progress_bar("merging")
    try:
        mode = "none" if no_verify or recipe_path is None else verify
        result = merge_into(recipe, out_dir, verify=mode, progress=update, force=force, out_shard_size=shard_size,
                            hash_inputs=hash_inputs, executor=executor)
    finally:
        close()
    doc = {"out_dir": str(result.out_dir), "model_file": str(result.model_file),
           "recipe_file": str(result.recipe_file), "bytes": result.size_bytes, "tensors": result.n_tensors,
           "steps": list(result.steps), "weights": list(result.weights), "files": list(result.files),
           "sharded": result.sharded, "warnings": list(result.warnings), "out_format": result.out_format,
           "io": all_stats()}
    doc["stale_removed"] = [str(p) for p in result.stale.paths]
    doc["stale_freed_bytes"] = result.stale.freed_bytes
    for line in result.warnings:
        click.echo(f"ckpt-select: warning: {line}", err=True)
    if as_json:
        _emit(doc)
    else:
        click.echo(f"Merged {len(result.steps)} checkpoint{'' if len(result.steps) == 1 else 's'} into {result.model_file} ({result.size_bytes / 1e6:.2f} MB)")
    if result.suggestion:
        click.echo(f"ckpt-select: note: {result.suggestion}", err=True)
    if result.stale.paths:
        click.echo(f"ckpt-select: {result.stale.describe()}", err=True)


def _split_merge_paths(paths: tuple[str, ...], checkpoints_given: int) -> tuple[str | None, tuple[str, ...]]:
    """(recipe, checkpoints) from ``merge``'s paths: all checkpoints after ``--checkpoints``, else one recipe."""
    if checkpoints_given:
        if paths and paths[0].lower().endswith((".yaml", ".yml")):
            raise InvalidArgument("give a recipe or --checkpoints, not both")
        return None, paths
    if len(paths) > 1:
        raise InvalidArgument(f"give one recipe, or --checkpoints before the {len(paths)} checkpoints to average")
    return (paths[0] if paths else None), ()


def _merge_inputs(recipe_path: str | None, paths: tuple[str, ...], weights: tuple[float, ...],
                  output_dtype: str | None) -> Recipe:
    """The recipe to merge: loaded (ours or mergekit's), or built for checkpoints named on the command line.

    A recipe built here carries no hashes: the merge computes them in its own read pass
    (:mod:`analysis.merge.read`) and writes them into the recipe beside its output.
    """
    from ..inputs import check_distinct, normalize_weights
    from ..recipe import build_recipe, load_any_recipe
    from ..remote import as_path
    from ..run import checkpoint_ref
    if recipe_path is not None:
        if paths:
            raise InvalidArgument("give a recipe or --checkpoints, not both")
        recipe = load_any_recipe(recipe_path)
        return replace(recipe, output_dtype=output_dtype) if output_dtype else recipe
    if not paths:
        raise InvalidArgument("nothing to merge: give RECIPE.yaml or --checkpoints A B ...")
    if weights and len(weights) != len(paths):
        raise InvalidArgument(f"got {len(weights)} --weights for {len(paths)} checkpoints")
    normalized = normalize_weights(weights or [1.0] * len(paths), len(paths), [str(p) for p in paths])
    check_distinct([as_path(p) for p in paths], "--checkpoints")
    refs = [checkpoint_ref(p) for p in paths]
    return build_recipe("manual", refs, normalized, output_dtype or "same",
                        {str(r.step): "given on the command line" for r in refs}, hashes=False)


def _plan_doc(plan: MergePlan) -> dict:
    """The dry run as JSON (absolute paths)."""
    return {"inputs": [{"path": str(p), "bytes": b} for p, b in plan.inputs], "out_dir": str(plan.out_dir),
            "files": list(plan.files), "output_bytes": plan.output_bytes, "tensors": plan.n_tensors,
            "replaces_existing": plan.replaces_existing, "free_bytes": plan.free_bytes,
            "projected_peak_memory_bytes": plan.peak_memory_bytes, "projected_seconds": plan.projected_seconds,
            "projected_seconds_uncached": plan.projection.uncached_seconds,
            "probe_mb_per_s": plan.probe_mb_per_s, "arithmetic": plan.arithmetic}


@cli.command()
@click.argument("recipe_path", metavar="RECIPE.yaml")
@click.option("--format", "fmt", type=click.Choice(["mergekit", "ckpt-select"]), default="mergekit", show_default=True)
@click.option("-o", "--output", type=PATH_OR_URL, help="Write here (a path or a URL) instead of stdout.")
@click.option("--force", is_flag=True, help="-o may replace an existing file CkptSelect did not write (never a checkpoint).")
@_storage_options
def export(recipe_path: str, fmt: str, output: Path | None, force: bool) -> None:
    """Convert a recipe: ours -> mergekit linear config, or a mergekit linear config -> ours (with hashes)."""
    from ..recipe import dump_mergekit, dump_recipe, load_any_recipe, with_hashes
    from ..targets import check_file_target, write_text_atomic
    recipe = load_any_recipe(recipe_path)
    inputs = [e.path for e in recipe.checkpoints]
    if output:   # before hashing the inputs: a refused target is said at once
        output = check_file_target(output, inputs, force)
    base = output.parent if output else Path.cwd()
    if fmt == "mergekit":
        # Absolute paths: mergekit resolves relative ones against its working folder, and takes
        # "run/checkpoint-100" for a Hugging Face Hub repository id.
        text = dump_mergekit(recipe)
    else:
        text = dump_recipe(with_hashes(recipe), base)
    if output:
        write_text_atomic(output, text, inputs, force)
        click.echo(f"Wrote {output}", err=True)
    else:
        click.echo(text, nl=False)
