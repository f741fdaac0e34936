"""Commands on checkpoint storage: ``storage`` (what keeping checkpoints costs) and ``prune`` (deleting them)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import InvalidArgument
from ..storage import DEFAULT_PRICE_PER_TB_MONTH, DEFAULT_SNAPSHOT_GBPS, OPTIMIZERS, POLICIES
from .group import cli
from .options import PATH_OR_URL, _naming_a_file_run, _storage_options
from .output import _emit, _note_unreadable

if TYPE_CHECKING:
    from ..run import Run


@cli.command()
@click.option("--params", type=float, help="Parameter count, e.g. 7e9 (or give --config, or --run).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="A model's config.json (or its folder).")
@click.option("--dtype", help="Weights dtype: fp32, bf16, fp16, fp8, int8, int4 (default: the run's, else bf16).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True)
@click.option("--keep", type=int, default=20, show_default=True, help="Newest checkpoints kept (policies last, every).")
@click.option("--policy", type=click.Choice(POLICIES), default="last", show_default=True, help="Keep policy.")
@click.option("--keep-every", type=int, help="Policy every: also keep each multiple of this many steps.")
@click.option("--top-k", type=int, help="Policy topk: the k best by validation (+ the newest).")
@click.option("--budget-tb", type=float, help="Policy budget: disk budget in TB; how many checkpoints fit.")
@click.option("--total-steps", type=int, help="Run length in steps (counts the saves).")
@click.option("--full-state-last", type=int, help="Keep optimizer state only in the newest N; the rest weights-only.")
@click.option("--ema/--no-ema", default=False, show_default=True, help="An fp32 EMA copy in each checkpoint.")
@click.option("--bandwidth-gbps", type=float, default=2.0, show_default=True, help="Write bandwidth, GB/s.")
@click.option("--async/--sync", "asynchronous", default=False, show_default=True,
              help="Asynchronous saves: stage to host memory, write in the background.")
@click.option("--snapshot-gbps", type=float, default=DEFAULT_SNAPSHOT_GBPS, show_default=True,
              help="Async: device-to-host copy bandwidth, GB/s.")
@click.option("--step-time-s", type=float, help="Training step time, seconds (default: the run's median).")
@click.option("--every", type=int, help="Steps between checkpoints (default: the run's median).")
@click.option("--price-per-tb-month", type=float, default=DEFAULT_PRICE_PER_TB_MONTH, show_default=True,
              help="USD per TB-month (S3 Standard list price).")
@click.option("--window", type=int, help="Checkpoints the averaging window needs.")
@click.option("--run", "run_path", type=PATH_OR_URL,
              help="A run: parameters, dtype, save interval, step time and window from it (what the app's "
                   "Storage page starts from); checkpoint stalls measured from its step times.")
@click.option("--run-name", "run_name", metavar="NAME",
              help="When --run holds several runs (Lightning version_N, several output folders): the one to read.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@_storage_options
def storage(params: float | None, config_path: Path | None, dtype: str | None, optimizer: str, keep: int, policy: str,
            keep_every: int | None, top_k: int | None, budget_tb: float | None, total_steps: int | None,
            full_state_last: int | None, ema: bool, bandwidth_gbps: float, asynchronous: bool, snapshot_gbps: float,
            step_time_s: float | None, every: int | None, price_per_tb_month: float, window: int | None,
            run_path: Path | None, as_json: bool, run_name: str | None = None) -> None:
    """What keeping checkpoints costs in bytes, money and training time."""
    from ..model_size import count_parameters
    from ..report import storage_report
    from ..run import open_run
    from ..storage import KeepPolicy, estimate_storage, storage_inputs_from_run
    count = count_parameters(config_path) if config_path else None
    if params is not None and count is not None:
        raise InvalidArgument("give --params N or --config config.json, not both")
    given = storage_inputs_from_run(open_run(run_path, run_name=run_name)) if run_path is not None else None
    measured = given.measured if given else None
    if given is not None:   # what the command line names wins; the rest comes from the run
        params = params if params is not None or count is not None else given.params
        dtype, every = dtype or given.dtype, every or given.every_steps
        step_time_s, window = step_time_s or given.step_time_s, window or given.window
    if params is None and count is None:
        raise InvalidArgument("give --params N or --config config.json (one of them), or a --run with checkpoints")
    dtype = dtype or "bf16"
    keep_policy = KeepPolicy(kind=policy, last=keep, keep_every_steps=keep_every, top_k=top_k,
                             budget_bytes=budget_tb * 1e12 if budget_tb else None, total_steps=total_steps,
                             full_state_last=full_state_last)
    est = estimate_storage(params if count is None else count.total, dtype, optimizer, keep, bandwidth_gbps,
                           step_time_s, every, ema, price_per_tb_month, policy=keep_policy,
                           asynchronous=asynchronous, snapshot_gbps=snapshot_gbps, window=window,
                           factored_elements=count.factored_elements if count else None)
    doc = storage_report(est, measured, count)
    if as_json:
        _emit(doc)
        return
    moe = count is not None and count.active != count.total
    click.echo(f"{est.params:,.0f} parameters, {dtype} weights, {optimizer} optimizer state"
               + (f" ({count.model_type}, {count.active:,} active per token)" if moe else ""))
    for line in est.arithmetic:
        click.echo(f"  {line}")
    if est.window is not None:
        click.echo(f"  averaging window: {est.window} checkpoints, {est.window_bytes / 1e9:,.2f} GB of weights; "
                   f"{'kept' if doc['window_fits'] else 'NOT kept by this policy'}")
    if measured is not None:
        click.echo(f"  measured in the run: {measured.stall_seconds:.3g} s stall per save over {measured.saves_seen} saves, "
                   f"{100 * measured.overhead_fraction:.2f}% of wall time")


@cli.command("prune")
@click.argument("run_path", metavar="RUN", type=PATH_OR_URL)
@click.option("--keep", "keep", multiple=True, metavar="POLICY",
              help="What to keep, most important first: window[+N] (the recommended averaging window, N more on "
                   "each side), newest:K, every:M (milestone steps), optimizer[:K] (newest with optimizer state); "
                   "e.g. --keep window+2,newest:3,every:1000,optimizer (docs/prune.md).")
@click.option("--budget", help="Keep at most this many bytes, e.g. 2TB: the --keep terms fill it in their order.")
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing (the default).")
@click.option("--yes", is_flag=True, help="Delete: move to the trash, then empty it once every move succeeded.")
@click.option("--trash", type=PATH_OR_URL,
              help="Trash folder, on the run's disk (default RUN/.ckpt-select-trash; a run in a bucket: a prefix of "
                   "that bucket); each prune in a <UTC time> subfolder.")
@click.option("--keep-trash", is_flag=True, help="With --yes: leave the checkpoints in the trash (restorable), free nothing yet.")
@click.option("--restore", "restore", type=PATH_OR_URL, metavar="TRASH_DIR",
              help="Move the checkpoints of an earlier prune's trash folder back into the run.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@_storage_options
@_naming_a_file_run
def prune_cmd(run_path: Path, keep: tuple[str, ...], budget: str | None, dry_run: bool, yes: bool, trash: Path | None,
              keep_trash: bool, restore: Path | None, as_json: bool) -> None:
    """Delete the checkpoints a keep policy does not need (a dry run unless --yes), with a reason for each."""
    from ..prune import apply_prune, parse_policy, plan_prune, prune_report, restore_trash
    from ..run import open_run
    if restore is not None:
        done = restore_trash(restore)
        for path, why in done.left:
            click.echo(f"ckpt-select: note: {path}: {why}", err=True)
        click.echo(f"restored {len(done.restored)} items from {done.trash_dir}")
        return
    if dry_run and yes:
        raise InvalidArgument("give --dry-run or --yes, not both")
    policy = parse_policy(keep, budget)   # before the run is read: a bad policy is said at once
    run = open_run(run_path)
    _note_unreadable(run)
    plan = plan_prune(run, policy, _recommendation(run) if policy.has("window") else None)
    result = apply_prune(plan, trash, keep_trash=keep_trash) if yes else None
    doc = prune_report(plan, result)
    if as_json:
        _emit(doc)
        return
    _print_prune(doc)


def _recommendation(run: Run):
    """The run's current default recommendation (what ``recommend RUN`` prints)."""
    from ..selection import recommend
    from ..signals import assess_run
    return recommend(assess_run(run))


def _print_prune(doc: dict) -> None:
    """The plan, one line per checkpoint, then what was done (or that nothing was)."""
    from ..run import printable
    click.echo(printable(f"{doc['run']}: {doc['summary']} (--keep {doc['policy']})"))
    for note in doc["notes"]:
        click.echo(f"  note: {note}")
    for row in doc["checkpoints"]:
        step = "-" if row["step"] is None else row["step"]
        click.echo(printable(f"  {row['action']:<6} step {step:>8}  {row['size']:>10}  {row['path']}: "
                             f"{'; '.join(row['reasons'])}"))
    result = doc.get("result")
    if result is None:
        click.echo("Dry run: nothing was changed. Add --yes to delete.")
        return
    for left in result["left_in_place"]:
        click.echo(printable(f"  left in place: {left['path']}: {left['reason']}"))
    if result["trash_emptied"]:
        click.echo(f"Deleted {len(result['moved'])} checkpoints, freed {result['bytes_freed']:,} bytes.")
    elif result["trash"]:
        click.echo(f"Moved {len(result['moved'])} checkpoints to {result['trash']} (nothing freed yet: delete that "
                   f"folder to free it). Restore with: {result['restore_command']}")
