"""Command line: parse, call the core, print. ``python -m analysis --help``.

Exit codes: 0 success, 2 bad input (one line naming the file and the problem),
1 internal error (a bug: the traceback is printed).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import click

from . import __version__
from .errors import AnalysisError, InvalidArgument
from .storage import DEFAULT_PRICE_PER_TB_MONTH, DEFAULT_SNAPSHOT_GBPS, OPTIMIZERS, POLICIES
from .scaling import DEFAULT_GAIN_TARGET, DEFAULT_PLATEAU_GAIN

if TYPE_CHECKING:
    from .executors import Executor
    from .merge import MergePlan
    from .recipe import Recipe
    from .run import Run

# Everything else is imported inside the command that needs it: a merge must not pay for
# pandas, scikit-learn and SciPy (about 1 s), which only the analysis commands use (issue 6).

APP_PACKAGE = "ckpt_select_app"  # the repository's app/ folder, as a wheel installs it (see setup.py)


def app_script() -> Path:
    """The web app's entry script: the app/ beside this package in a checkout, else the installed one.

    The checkout's own app/ comes first, so a checkout run with PYTHONPATH serves its own pages
    even where another copy of the app is installed; ``pip install .`` ships app/ as ``ckpt_select_app``.
    """
    from importlib.util import find_spec

    checkout = Path(__file__).resolve().parent.parent / "app" / "streamlit_app.py"
    spec = find_spec(APP_PACKAGE)
    installed = [Path(p) / "streamlit_app.py" for p in (spec.submodule_search_locations or [])] if spec else []
    found = [script for script in (checkout, *installed) if script.is_file()]
    if not found:
        raise click.ClickException(f"the web app ({APP_PACKAGE}) is not installed: reinstall ckpt-select")
    return found[0]


def _progress_bar(desc: str) -> tuple[Callable[[float, str], None], Callable[[], None]]:
    """A tqdm bar on stderr driven by the core's ``progress(fraction, message)`` callbacks.

    Only on a terminal, as tqdm's ``disable=None`` would decide: when stderr is a pipe or a
    file (scripts, CI) tqdm is not even imported, which saves a merge ~40 ms of start-up.
    """
    if not sys.stderr.isatty():
        return (lambda fraction, message: None), (lambda: None)
    from tqdm import tqdm
    bar = tqdm(total=1000, desc=desc, file=sys.stderr, leave=False, disable=None,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def update(fraction: float, message: str) -> None:
        bar.n = int(min(max(fraction, 0.0), 1.0) * 1000)
        bar.set_postfix_str(message[-40:], refresh=True)

    return update, bar.close


class _LazyChoice(click.Choice):
    """A ``click.Choice`` whose choices come from a module loaded only when they are needed."""

    def __init__(self, module: str, name: str, *, sort: bool = False) -> None:
        self._source, self._sort, self._loaded = (module, name), sort, None
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        if self._loaded is None:
            import importlib
            module, name = self._source
            values = getattr(importlib.import_module(module, __package__), name)
            self._loaded = tuple(sorted(values) if self._sort else values)
        return self._loaded


class _PathOrURL(click.ParamType):
    """A local path, as ``click.Path(path_type=Path)`` gives it, or a URL kept as text (``s3://b/run``, issue 22).

    ``click.Path`` would make ``s3://b/run`` the local path ``s3:/b/run``; a ``file://`` URL is its path.
    """

    name = "path"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> object:
        from .remote import is_url, local_part
        if isinstance(value, Path) or value is None:
            return value
        text = str(value)
        return text if is_url(text) else Path(local_part(text))


PATH_OR_URL = _PathOrURL()


def _executor_options(command: Callable[..., None]) -> Callable[..., None]:
    """``--executor local|ray`` and ``--ray-address`` (issue 22), handed to the command as ``executor``."""
    @functools.wraps(command)
    def wrapper(executor: str, ray_address: str, **kwargs: object) -> None:
        from .executors import make_executor
        command(executor=None if executor == "local" else make_executor(executor, ray_address), **kwargs)
    wrapper = click.option("--ray-address", default="auto", show_default=True, metavar="ADDRESS",
                           help="--executor ray: the cluster (auto: the one `ray start` runs here; local: start one "
                                "in this process; HOST:PORT).")(wrapper)
    return click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                        help="Where the heavy work runs: this process, or tasks on a Ray cluster "
                             "(pip install ckpt-select[ray]; docs/cluster.md).")(wrapper)


def _emit(doc: dict) -> None:
    io = _io_this_command()
    if io:   # what object storage served this command: requests, bytes, retries (issue 22)
        doc = {**doc, "io": io}
    click.echo(json.dumps(doc, indent=2, allow_nan=False))


def _io_this_command() -> dict[str, dict[str, int]]:
    """The remote I/O counters of the stores used since the command started, per protocol (empty: none)."""
    from .remote import all_stats
    before = _OPTIONS["io_before"]
    now = all_stats()
    return {protocol: {k: v - before.get(protocol, {}).get(k, 0) for k, v in counts.items()}
            for protocol, counts in now.items()}


# Global options the entry point needs after the command returns (set by the group's callback).
_OPTIONS: dict = {"verbose": False, "io_before": {}}


def _naming_a_file_run(command: Callable[..., None]) -> Callable[..., None]:
    """A command on a run opened from one checkpoint file names that file in its errors (issue 19):
    the run's folder, which the core's messages name, is the file's parent."""
    @functools.wraps(command)
    def wrapper(**kwargs: object) -> None:
        path = kwargs["run_path"]
        try:
            command(**kwargs)
        except AnalysisError as e:
            if isinstance(path, Path) and path.is_file() and path.name not in str(e):
                raise AnalysisError(f"{path}: {str(e).removeprefix(f'{path.resolve().parent}: ')}") from e
            raise
    return wrapper


def _note_unreadable(run: Run, err: bool = True) -> None:
    """One line per file of the run that could not be read: the command goes on without it (issue 19)."""
    from .run import printable
    for u in run.unreadable:
        click.echo(printable(f"{'ckpt-select: note:' if err else ' '} passed over {u.describe()}"), err=err)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckpt-select")
@click.option("--verbose", is_flag=True, help="Show library warnings (torch, transformers) and, on an error, its cause.")
@click.option("--storage-options", metavar="JSON",
              help='Options for object storage URLs (s3://, gs://, hf://...), e.g. \'{"s3": {"endpoint_url": '
                   '"http://minio:9000"}}\'; credentials otherwise come from the environment (docs/remote-runs.md).')
def cli(verbose: bool, storage_options: str | None = None) -> None:
    """CkptSelect: which checkpoints of a training run to average, why, and the merge."""
    _OPTIONS["verbose"] = verbose
    _OPTIONS["storage_options"] = None
    if storage_options is not None:   # never echoed: it may hold secrets
        from .remote import set_storage_options
        set_storage_options(storage_options)
        _OPTIONS["io_before"] = {}
        _OPTIONS["storage_options"] = storage_options   # `ui` hands them to its server process
    if not verbose:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """Keep other libraries' chatter off stderr, where a one-line error must stay one line (issue 19).

    torch and NumPy warn through ``warnings`` (e.g. on ``torch.load``), transformers and
    huggingface_hub through ``logging`` (model building); ``--verbose`` shows both. ``main``
    restores both settings when the command returns.
    """
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=r"analysis(\.|$)")   # CkptSelect's own warnings still show
    logging.disable(logging.WARNING)


@cli.command()
@click.argument("run_path", metavar="RUN", type=PATH_OR_URL)
@click.option("--similarity/--no-similarity", default=True, show_default=True,
              help="Sketch every checkpoint for update norms, cosines and the trajectory (cached on disk).")
@click.option("--run", "run_name", metavar="NAME",
              help="When RUN holds several runs (Lightning version_N, several output folders): the one to read.")
@click.option("--layers", is_flag=True,
              help="Per-layer RMS, max |w|, relative update sizes and cosines, flags and spike leads (same read pass).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@_executor_options
def analyze(run_path: Path, similarity: bool, as_json: bool, run_name: str | None = None, layers: bool = False,
            executor: Executor | None = None) -> None:
    """Discover a run's logs and checkpoints and judge every checkpoint."""
    from .report import analysis_report
    from .run import open_run, printable
    from .signals import assess_run, compare_checkpoints, sketch_run
    run = open_run(run_path, run_name=run_name)
    update, close = _progress_bar("checking checkpoints")
    try:
        if executor is not None:   # the sketches on the cluster, into the cache the pass below reads
            sketch_run(run.checkpoints, executor, progress=update)
        signals = assess_run(run, progress=update)
        sim = compare_checkpoints(run.checkpoints, progress=update) if similarity and run.checkpoints else None
    finally:
        close()
    doc = analysis_report(run, signals, sim, layers=layers)
    if as_json:
        _emit(doc)
        return
    click.echo(printable(f"{run.name}: {len(run.checkpoints)} checkpoints, {len(run.logs)} logs, "
                         f"{len(signals.spikes)} spikes"))
    _note_unreadable(run, err=False)
    for log in doc["logs"]:
        click.echo(printable(f"  log {log['path']} ({log['format']}, {log['rows']} rows, {log['skipped_lines']} skipped)"))
    for spike in signals.spikes:
        click.echo(f"  spike: {spike.describe()}")
    timing = doc["timing"]
    if timing["steady_step_ms"] is not None:
        click.echo(f"  steady step {timing['steady_step_ms']:.1f} ms; {timing['shares']}")
    noise = doc["iterate_noise"]
    if noise is not None and noise["excess_nats"] is not None:
        click.echo(f"  iterate noise {noise['excess_nats']:.4f} nats at LR {noise['lr']:.3g} "
                   f"({noise['source']}: what averaging can win back)")
    for c in doc["checkpoints"]:
        flags = [f for f, on in (("NaN/Inf", not c["finite"]), ("spike", c["spike_contaminated"]),
                                 ("spike cleared by its val loss", c["spike_cleared"]),
                                 ("mismatch", c["mismatch"])) if on]
        val = f"{c['val_loss']:.4f}" if c["val_loss"] is not None else "   -  "
        label = "train" if c["val_loss_source"] == "train" else "val"
        lr = f"{c['lr']:<9.3g}" if c["lr"] is not None else "   -     "
        saved = "*" if c["lr_source"] == "optimizer state" else " "
        click.echo(f"  step {c['step']:>8}  {label} {val}  lr {lr}{saved} {c['bytes'] / 1e6:8.2f} MB  {' '.join(flags)}")
    if any(c["lr_source"] == "optimizer state" for c in doc["checkpoints"]):
        click.echo("  * LR read from the checkpoint's optimizer state: the logs hold none for it")
    if any(c["val_loss_source"] == "train" for c in doc["checkpoints"]):
        click.echo("  train: the run logs no val loss; the mean train loss logged since the checkpoint before stands in")
    if "layers" in doc:
        _echo_layers(doc["layers"])


def _echo_layers(doc: dict) -> None:
    """The text form of `analyze --layers` (issue 25): kind of model, flags, spike leads, one line per layer."""
    from .run import printable
    placement = doc["norm_placement"]
    click.echo(f"  layers: {placement['kind']} ({placement['evidence']})")
    for kind, line in placement["meaning"].items():
        click.echo(f"    {kind}: {line}")
    for flag in doc["flags"]:
        click.echo(printable(f"  layer flag [{flag['kind']}]: {flag['reason']}" + ("; left out of averages"
                                                                                    if flag["excludes"] else "")))
    for lead in doc["spike_leads"]:
        movers = ", ".join(f"{x['layer']} ({x['lead_checkpoints']} ckpt, {x['lead_steps']} steps before)"
                           for x in lead["leaders"][:5]) or "no layer moved beforehand"
        click.echo(printable(f"  {lead['spike']['metric']} spike at step {lead['spike']['start_step']}: "
                             f"first hit checkpoint {lead['first_hit_step']}; moved first: {movers}"))
    click.echo(f"  {'layer':<40} {'rms':>9} {'max|w|':>9} {'rel.update':>10} {'upd.cos':>8}   (newest checkpoint)")
    for layer in doc["layers"]:
        cells = [_cell(layer[key][-1]) for key in ("rms", "max_abs", "relative_update", "update_cosine")]
        click.echo(printable(f"  {layer['name']:<40} {cells[0]:>9} {cells[1]:>9} {cells[2]:>10} {cells[3]:>8}"))


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


@cli.command("watch")
@click.argument("run_path", metavar="RUN", type=PATH_OR_URL)
@click.option("--every", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Seconds between two looks at the run (only what is new is read).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--until-step", type=int, help="Exit once the run has logged or saved this step.")
def watch_cmd(run_path: Path, every: float, as_json: bool, until_step: int | None) -> None:
    """Follow a run while it trains: a line each time the recommendation changes (issue 23).

    For a training job's side-car or a cron line; exits on Ctrl-C or --until-step.
    """
    import time

    from .follow import RunFollower, Watcher, describe_event
    watcher = Watcher(RunFollower(run_path))
    try:
        while True:
            event = watcher.poll()
            if event is not None:
                click.echo(json.dumps(event, allow_nan=False) if as_json else describe_event(event))
                sys.stdout.flush()
            if until_step is not None and watcher.last_step is not None and watcher.last_step >= until_step:
                return
            time.sleep(every)
    except KeyboardInterrupt:   # the way to stop it: no traceback, exit 0
        return


@cli.command("recommend")
@click.argument("run_path", metavar="RUN", type=PATH_OR_URL)
@click.option("--eval", "eval_spec", metavar="FILE.py:FUNC",
              help="Evaluator: func(state_dict) -> loss, or hf-lm:VAL.txt (a Hugging Face causal LM's loss on a text file).")
@click.option("--eval-higher-is-better", is_flag=True, help="The evaluator returns a score to maximise.")
@click.option("--eval-tokens", type=click.IntRange(min=1), default=65_536, show_default=True,
              help="--eval hf-lm:VAL.txt: how many tokens of the text to score each candidate on.")
@click.option("--eval-cache", is_flag=True,
              help="Keep evaluator scores on disk (~/.cache/ckpt-select/scores), keyed by the evaluator's source and "
                   "the checkpoint files, so a search run again or resumed after a crash scores nothing twice. Not for "
                   "an evaluator that reads data which changes between runs.")
@click.option("--method", type=_LazyChoice(".selection", "METHODS"), default="auto", show_default=True)
@click.option("--window", type=int, help="Average the newest N eligible checkpoints instead of choosing.")
@click.option("--window-tokens", type=float, metavar="TOKENS",
              help="Average the eligible checkpoints within this many tokens of the newest (e.g. 50e9), any method.")
@click.option("--window-steps", type=int, metavar="STEPS",
              help="Average the eligible checkpoints within this many steps of the newest, any method.")
@click.option("--schedule", default="1-sqrt", show_default=True, metavar="linear|1-sqrt|cosine|exp[:RATE]",
              help="Method decay: the LR decay the merge emulates (WSM weights at the checkpoints' token positions).")
@click.option("--cooldown", is_flag=True,
              help="Report what a cooldown would give: the emulated-decay loss per schedule and window "
                   "(predicted from logs and Adam's state; measured with --eval), against a real decay if the run has one.")
@click.option("--ema-alpha", type=float, default=0.3, show_default=True, help="Weight of the newest under EMA.")
@click.option("--max-evals", type=int, help="Evaluator calls allowed (default 2 x checkpoints).")
@click.option("--include-contaminated", is_flag=True, help="Also average checkpoints saved inside a spike.")
@click.option("--before", "before_step", type=int,
              help="Method recovery: only checkpoints saved before this step (default: before the newest loss spike).")
@click.option("--dtype", "output_dtype", type=click.Choice(["same", "float32", "bfloat16", "float16"]),
              default="same", show_default=True, help="Dtype of the merged model.")
@click.option("-o", "--output", type=PATH_OR_URL, help="Write the recipe YAML here (a path or a URL).")
@click.option("--force", is_flag=True, help="-o may replace an existing file CkptSelect did not write (never a checkpoint).")
@click.option("--run", "run_name", metavar="NAME",
              help="When RUN holds several runs (Lightning version_N, several output folders): the one to read.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--eval-gpus", type=click.FloatRange(min=0), default=0, show_default=True,
              help="--executor ray: GPUs each candidate evaluation asks the cluster for.")
@_executor_options
@_naming_a_file_run
def recommend_cmd(run_path: Path, eval_spec: str | None, eval_higher_is_better: bool, eval_tokens: int,
                  eval_cache: bool, method: str, window: int | None, window_tokens: float | None,
                  window_steps: int | None, schedule: str, cooldown: bool, ema_alpha: float, max_evals: int | None,
                  include_contaminated: bool, before_step: int | None, output_dtype: str, output: Path | None,
                  force: bool, as_json: bool, run_name: str | None = None, eval_gpus: float = 0,
                  executor: Executor | None = None) -> None:
    """Recommend which checkpoints to average, with a reason for each."""
    from .evaluate import load_evaluator
    from .recipe import recipe_for_selection, write_recipe
    from .selection import RecommendConfig, recommend
    from .report import recommendation_report, unreadable_report
    from .run import open_run
    from .signals import assess_run
    from .targets import check_file_target
    run = open_run(run_path, run_name=run_name)
    _note_unreadable(run)
    protected = [*(c.path for c in run.checkpoints), *(log.path for log in run.logs), *(u.path for u in run.unreadable)]
    if output:   # before the search, which may take long: a refused target is said at once
        check_file_target(output, protected, force)
    evaluator = load_evaluator(eval_spec, eval_higher_is_better, run, eval_tokens) if eval_spec else None
    if evaluator is not None and eval_cache:
        evaluator.persist()
    if evaluator is not None and executor is not None:
        from .executors import Resources
        evaluator.distribute(executor, Resources(num_gpus=eval_gpus))
    config = RecommendConfig(method=method, window=window, ema_alpha=ema_alpha, max_evals=max_evals,
                             output_dtype=output_dtype, include_contaminated=include_contaminated,
                             before_step=before_step, schedule=schedule, window_tokens=window_tokens,
                             window_steps=window_steps)
    update, close = _progress_bar("recommending")
    try:
        signals = assess_run(run, progress=update)
        if cooldown:
            return _print_cooldown(signals, evaluator, output_dtype, as_json)
        rec = recommend(signals, config, evaluator, update)
    finally:
        close()
    # Hashed only when written or shown (issue 20): the text output below does not show it.
    recipe = (recipe_for_selection(run, [r.step for r in rec.checkpoints], rec.weights, rec.method, output_dtype,
                                   rec.reasons, settings=rec.settings) if output or as_json else None)
    recipe_path = write_recipe(recipe, output, force=force, protected=protected) if output else None
    if as_json:
        doc = recommendation_report(rec, recipe)
        doc["recipe_path"] = str(recipe_path) if recipe_path else None
        doc["unreadable"] = unreadable_report(run)
        _emit(doc)
        return
    click.echo(rec.summary)
    if rec.evaluations_cached:
        click.echo(f"  ({rec.evaluations_cached} of the {rec.evaluations} scores read from the evaluator cache, "
                   f"--eval-cache)")
    if evaluator is None:
        click.echo(f"  ({rec.basis_note})")
    for d in rec.decisions:
        click.echo(f"  {'+' if d.taken else '-'} step {d.step:>8}  {d.reason}")
    if recipe_path:
        click.echo(f"Recipe written to {recipe_path}. Merge with: python -m analysis merge {recipe_path} -o OUT_DIR")


def _print_cooldown(signals: object, evaluator: object, output_dtype: str, as_json: bool) -> None:
    """``recommend --cooldown``: the emulated-decay loss per schedule and window (issue 24)."""
    from .report import cooldown_doc
    from .selection import cooldown_report
    doc = cooldown_doc(cooldown_report(signals, evaluator, dtype=output_dtype))
    if as_json:
        _emit(doc)
        return
    click.echo(f"What a cooldown would give: {doc['basis']}")
    def show(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else "-"
    click.echo(f"  newest stable checkpoint (step {doc['stable_step']}): {show(doc['stable_loss'])}"
               + (f"; real decay's end (step {doc['decay_step']}): {show(doc['decay_loss'])}" if doc['decay_step'] else ""))
    for row in doc["rows"]:
        gap = f"  vs real decay {row['predicted_gap_to_decay_nats']:+.4f}" if row["predicted_gap_to_decay_nats"] is not None else ""
        click.echo(f"  {row['describe']:<60} predicted {show(row['predicted_loss'])}  "
                   f"measured {show(row['measured_loss'])}{gap}")


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
                   "written beside the merge, hashed in the merge's own read pass (~1 GB/s a core); by default their "
                   "size and quick hash only.")
@click.option("--force", is_flag=True, help="Replace an existing output folder that an earlier merge wrote, or an empty one "
              "(atomically, once the merge is complete); never anything else.")
@click.option("--out-shard-size", help="Shard the output at this size, e.g. 2GB (default: as the newest input).")
@click.option("--out-format", "out_format", type=click.Choice(["safetensors", "torch", "lightning"]), default=None,
              help="safetensors (default: the recipe's, else this), torch (model.pt, a torch.save dict of tensors) "
                   "or lightning (model.ckpt holding {'state_dict': ...}).")
@click.option("--dry-run", is_flag=True, help="Print what would be read and written, peak memory and time; write nothing.")
@click.option("--storage-options", "storage_options", metavar="JSON",
              help='Options for object storage URLs, e.g. \'{"s3": {"endpoint_url": "http://..."}}\' (credentials '
                   "come from the environment or profiles and are never written to a recipe).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@_executor_options
def merge(paths: tuple[str, ...], checkpoints_given: int, weights: tuple[float, ...],
          output_dtype: str | None, out_dir: str, verify: str, no_verify: bool, hash_inputs: bool, force: bool,
          out_shard_size: str | None, out_format: str | None, dry_run: bool, storage_options: str | None,
          as_json: bool, executor: Executor | None = None) -> None:
    """Average checkpoints (from a recipe, a mergekit linear config, or --checkpoints) into a new folder or prefix.

    Any of them may be a URL (s3://, gs://, hf://, ...): inputs are read by exact byte ranges, a
    wildcard in a URL's last part is matched against one listing.
    """
    from .merge import dry_run as plan_of, merge as merge_into, parse_size
    from .remote import all_stats, set_storage_options
    from .remote.globs import expand_url_globs
    if storage_options:
        set_storage_options(storage_options)
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
    from .inputs import check_distinct, normalize_weights
    from .recipe import build_recipe, load_any_recipe
    from .remote import as_path
    from .run import checkpoint_ref
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
def export(recipe_path: str, fmt: str, output: Path | None, force: bool) -> None:
    """Convert a recipe: ours -> mergekit linear config, or a mergekit linear config -> ours (with hashes)."""
    from .recipe import dump_mergekit, dump_recipe, load_any_recipe, with_hashes
    from .targets import check_file_target, write_text_atomic
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
def storage(params: float | None, config_path: Path | None, dtype: str | None, optimizer: str, keep: int, policy: str,
            keep_every: int | None, top_k: int | None, budget_tb: float | None, total_steps: int | None,
            full_state_last: int | None, ema: bool, bandwidth_gbps: float, asynchronous: bool, snapshot_gbps: float,
            step_time_s: float | None, every: int | None, price_per_tb_month: float, window: int | None,
            run_path: Path | None, as_json: bool, run_name: str | None = None) -> None:
    """What keeping checkpoints costs in bytes, money and training time."""
    from .model_size import count_parameters
    from .report import storage_report
    from .run import open_run
    from .storage import KeepPolicy, estimate_storage, storage_inputs_from_run
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
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--keep", "keep", multiple=True, metavar="POLICY",
              help="What to keep, most important first: window[+N] (the recommended averaging window, N more on "
                   "each side), newest:K, every:M (milestone steps), optimizer[:K] (newest with optimizer state); "
                   "e.g. --keep window+2,newest:3,every:1000,optimizer (docs/prune.md).")
@click.option("--budget", help="Keep at most this many bytes, e.g. 2TB: the --keep terms fill it in their order.")
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing (the default).")
@click.option("--yes", is_flag=True, help="Delete: move to the trash, then empty it once every move succeeded.")
@click.option("--trash", type=click.Path(path_type=Path),
              help="Trash folder, on the run's disk (default RUN/.ckpt-select-trash); each prune in a <UTC time> subfolder.")
@click.option("--keep-trash", is_flag=True, help="With --yes: leave the checkpoints in the trash (restorable), free nothing yet.")
@click.option("--restore", "restore", type=click.Path(path_type=Path), metavar="TRASH_DIR",
              help="Move the checkpoints of an earlier prune's trash folder back into the run.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@_naming_a_file_run
def prune_cmd(run_path: Path, keep: tuple[str, ...], budget: str | None, dry_run: bool, yes: bool, trash: Path | None,
              keep_trash: bool, restore: Path | None, as_json: bool) -> None:
    """Delete the checkpoints a keep policy does not need (a dry run unless --yes), with a reason for each."""
    from .prune import apply_prune, parse_policy, plan_prune, prune_report, restore_trash
    from .run import open_run
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
    from .selection import recommend
    from .signals import assess_run
    return recommend(assess_run(run))


def _print_prune(doc: dict) -> None:
    """The plan, one line per checkpoint, then what was done (or that nothing was)."""
    from .run import printable
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


@cli.command("stop")
@click.argument("run_path", metavar="RUN", type=PATH_OR_URL)
@click.option("--params", type=float, help="Parameter count, for the Chinchilla reference.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="A model's config.json (instead of --params).")
@click.option("--tokens-per-step", type=float, help="Tokens per step, when the run logs no token count.")
@click.option("--plateau-gain", type=float, default=DEFAULT_PLATEAU_GAIN, show_default=True,
              help="Loss the next horizon must gain, else: plateau.")
@click.option("--gain-target", type=float, default=DEFAULT_GAIN_TARGET, show_default=True,
              help="Report the tokens/steps needed to gain this much more.")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@click.option("--run", "run_name", metavar="NAME",
              help="When RUN holds several runs (Lightning version_N, several output folders): the one to read.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@_naming_a_file_run
def stop_cmd(run_path: Path, params: float | None, config_path: Path | None, tokens_per_step: float | None,
             plateau_gain: float, gain_target: float, seed: int, as_json: bool, run_name: str | None = None) -> None:
    """Should I keep training? Fit the loss curve, forecast it, flag a plateau."""
    from .model_size import count_parameters
    from .report import stop_report
    from .run import open_run
    from .scaling import StopConfig, run_stop_signal
    run = open_run(run_path, run_name=run_name)
    _note_unreadable(run)
    if config_path is not None:
        params = float(count_parameters(config_path).total)
    config = StopConfig(plateau_gain=plateau_gain, gain_target=gain_target, seed=seed)
    sig = run_stop_signal(run, config, params, tokens_per_step)
    doc = stop_report(sig, run)
    if as_json:
        _emit(doc)
        return
    fit = sig.fit
    click.echo(f"{run.name}: {sig.metric} = {fit.e:.4f} + {fit.b:.4g} x {fit.x_unit}^-{fit.beta:.3f} "
               f"(beta +/- {fit.beta_stderr or float('nan'):.3f}, {fit.points} points)")
    for f in doc["forecasts"]:
        click.echo(f"  at {f['factor']:g}x the {fit.x_unit} seen: {f['loss']:.4f} ({f['low']:.4f} to {f['high']:.4f})")
    more = doc["to_gain"]["more"]
    needed = f"{more:,.4g} more {fit.x_unit}" if more is not None else "never, per the fit"
    click.echo(f"  another {gain_target:g} lower: {needed}")
    click.echo(f"  {sig.verdict}")
    if sig.compute_optimal is not None and sig.compute_optimal.over_training_factor is not None:
        click.echo(f"  Chinchilla: {sig.compute_optimal.optimal_tokens:,.4g} tokens is compute-optimal; "
                   f"this run is at {sig.compute_optimal.over_training_factor:.2f}x")


@cli.command()
@click.argument("paths", metavar="FILE_OR_DIR...", nargs=-1, required=True, type=PATH_OR_URL)
@click.option("--format", "fmt", type=_LazyChoice(".logs", "LOG_READERS", sort=True), help="Skip sniffing.")
@click.option("--run", "run_name", metavar="NAME",
              help="When RUN holds several runs (Lightning version_N, several output folders): the one to read.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def logs(paths: tuple[Path, ...], fmt: str | None, as_json: bool, run_name: str | None = None) -> None:
    """Read training logs and summarise every metric."""
    from .logs import read_log
    from .remote import as_path
    from .report import log_report, unreadable_report
    from .run import open_run, printable
    tables, unreadable = [], []
    for path in paths:
        if as_path(path).is_dir():
            run = open_run(path, run_name=run_name)
            tables.extend(run.logs)
            unreadable.extend(unreadable_report(run))
            if not as_json:
                _note_unreadable(run)
        else:
            tables.append(read_log(path, fmt))
    docs = [log_report(t) for t in tables]
    if as_json:
        _emit({"logs": docs, "unreadable": unreadable})
        return
    for doc in docs:
        rows = f"{doc['rows']} rows" + (" yet" if doc["rows"] == 0 else "")   # a log just created (issue 19)
        click.echo(printable(f"{doc['path']}: {doc['format']}, {rows}, {doc['skipped_lines']} skipped, "
                             f"{doc['restarts']} restarts"))
        for name, m in doc["metrics"].items():
            click.echo(f"  {name:<24} {m['count']:>8} points  steps {m['first_step']}-{m['last_step']}  last {m['last']}")


@cli.command()
@click.argument("run_path", metavar="RUN", required=False, type=PATH_OR_URL)
@click.option("--root", type=PATH_OR_URL,
              help="Confine the app to this folder or URL prefix (s3://bucket/runs): runs, every file they read, "
                   "evaluators (docs/security.md).")
@click.option("--eval", "evaluators", metavar="FILE.py:FUNC", multiple=True,
              help="With --root: an evaluator the app may also run although it lies outside the root "
                   "(repeatable). An evaluator runs with the server's rights.")
@click.option("--port", type=int, default=8501, show_default=True)
@click.option("--address", help="Interface to listen on, e.g. 127.0.0.1 (default: Streamlit's, every interface).")
@click.option("--open-browser", is_flag=True,
              help="Open a browser tab (Streamlit may first ask for an e-mail on the terminal).")
@click.option("--allow-prune", is_flag=True, help="With --root: let the Storage page delete checkpoints (docs/prune.md).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where the app's similarity pass runs: this process, or tasks on a Ray cluster (docs/cluster.md).")
@click.option("--ray-address", default="auto", show_default=True, metavar="ADDRESS",
              help="--executor ray: the cluster (auto, local, or HOST:PORT).")
def ui(run_path: Path | None, root: Path | None, evaluators: tuple[str, ...], port: int, address: str | None,
       open_browser: bool, allow_prune: bool, executor: str, ray_address: str) -> None:
    """Serve the web app (Streamlit) on RUN.

    Headless unless --open-browser: nothing is asked on the terminal, so it also runs from
    scripts, services and SSH sessions; the address to open is printed.
    """
    from .evaluate import canonical_evaluator_spec, evaluator_file
    env = dict(os.environ)
    if run_path is not None:
        env["CKPT_SELECT_RUN"] = _absolute_text(run_path)
    if root is not None:
        env["CKPT_SELECT_ROOT"] = _absolute_text(root)
    allowed = [canonical_evaluator_spec(spec) for spec in evaluators]
    missing = next((spec for spec in allowed if not evaluator_file(spec).is_file()), None)
    if missing is not None:
        raise InvalidArgument(f"ui --eval {missing}: no such file")
    env["CKPT_SELECT_EVALUATORS"] = json.dumps(allowed)
    if _OPTIONS.get("storage_options"):   # in the server's environment only, never on its command line
        env["CKPT_SELECT_STORAGE_OPTIONS"] = _OPTIONS["storage_options"]
    env.pop("CKPT_SELECT_EXECUTOR", None)
    if executor == "ray":   # the server joins the cluster itself; this process only hands it the address
        env["CKPT_SELECT_EXECUTOR"] = f"ray@{ray_address}"
    env.pop("CKPT_SELECT_ALLOW_PRUNE", None)   # only this flag allows it, never an inherited variable
    if allow_prune:
        env["CKPT_SELECT_ALLOW_PRUNE"] = "1"
    click.echo(f"Serving CkptSelect at http://{address or 'localhost'}:{port}", err=True)
    command = _streamlit_command(port, address, open_browser)
    # The server replaces this process, so a signal sent to `ckpt-select ui` (kill, a service
    # manager's stop) reaches Streamlit itself instead of leaving it running as an orphan.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)


def _absolute_text(path: "Path | str") -> str:
    """A local path resolved, or a URL as given (what the app is told to open or confine itself to)."""
    return str(path.expanduser().resolve()) if isinstance(path, Path) else str(path)


def _streamlit_command(port: int, address: str | None, open_browser: bool) -> list[str]:
    """``streamlit run`` on the app with the server flags ``ui`` was given."""
    command = [sys.executable, "-m", "streamlit", "run", str(app_script()), "--server.port", str(port),
               "--server.headless", str(not open_browser).lower(), "--browser.gatherUsageStats", "false"]
    return command + ["--server.address", address] if address else command


def main(argv: list[str] | None = None) -> int:
    """Entry point: map AnalysisError to exit 2 with a one-line message (and its cause with ``--verbose``).

    Library warnings are silenced for the command unless ``--verbose`` (see ``_quiet_libraries``);
    the process's warning filters and logging are as they were when this returns.
    """
    _OPTIONS["verbose"] = False
    with warnings.catch_warnings(), _logging_restored():
        return _run(argv)


def _run(argv: list[str] | None) -> int:
    from .remote import all_stats
    _OPTIONS["io_before"] = all_stats()   # --json reports this command's remote I/O, not the process's
    try:
        cli.main(args=argv, prog_name="ckpt-select", standalone_mode=False)
    except AnalysisError as e:
        click.echo(f"ckpt-select: error: {_one_line(str(e))}", err=True)
        if _OPTIONS["verbose"]:
            _echo_cause(e)
        return 2
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 1
    except click.ClickException as e:
        e.show()
        return 2
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@contextmanager
def _logging_restored() -> Iterator[None]:
    """Restores ``logging.disable``'s level on exit (``_quiet_libraries`` raises it for one command)."""
    level = logging.root.manager.disable
    try:
        yield
    finally:
        logging.disable(level)


def _one_line(message: str) -> str:
    """An error message on one line, whatever a library put in it: stderr carries one line per error."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _echo_cause(error: BaseException) -> None:
    """``--verbose``: the error's cause (or the context it was raised from) with its traceback."""
    cause = error.__cause__ or error.__context__
    if cause is not None:
        click.echo("caused by:", err=True)
        click.echo("".join(traceback.format_exception(cause)).rstrip(), err=True)
