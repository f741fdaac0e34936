"""Commands that read a run: ``analyze``, ``watch``, ``recommend``, ``stop`` and ``logs``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..scaling import DEFAULT_GAIN_TARGET, DEFAULT_PLATEAU_GAIN
from .group import cli
from .options import PATH_OR_URL, _executor_options, _LazyChoice, _naming_a_file_run, _storage_options
from .output import _emit, _note_unreadable, _progress_bar

if TYPE_CHECKING:
    from ..executors import Executor


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
@_storage_options
def analyze(run_path: Path, similarity: bool, as_json: bool, run_name: str | None = None, layers: bool = False,
            executor: Executor | None = None) -> None:
    """Discover a run's logs and checkpoints and judge every checkpoint."""
    from ..report import analysis_report
    from ..run import open_run, printable
    from ..signals import assess_run, compare_checkpoints, sketch_run
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
    from ..run import printable
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
@_storage_options
def watch_cmd(run_path: Path, every: float, as_json: bool, until_step: int | None) -> None:
    """Follow a run while it trains: a line each time the recommendation changes (issue 23).

    For a training job's side-car or a cron line; exits on Ctrl-C or --until-step.
    """
    import time

    from ..follow import RunFollower, Watcher, describe_event
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
@click.option("--method", type=_LazyChoice("..selection", "METHODS"), default="auto", show_default=True)
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
@_storage_options
def recommend_cmd(run_path: Path, eval_spec: str | None, eval_higher_is_better: bool, eval_tokens: int,
                  eval_cache: bool, method: str, window: int | None, window_tokens: float | None,
                  window_steps: int | None, schedule: str, cooldown: bool, ema_alpha: float, max_evals: int | None,
                  include_contaminated: bool, before_step: int | None, output_dtype: str, output: Path | None,
                  force: bool, as_json: bool, run_name: str | None = None, eval_gpus: float = 0,
                  executor: Executor | None = None) -> None:
    """Recommend which checkpoints to average, with a reason for each."""
    from ..evaluate import load_evaluator
    from ..recipe import recipe_for_selection, write_recipe
    from ..selection import RecommendConfig, recommend
    from ..report import recommendation_report, unreadable_report
    from ..run import open_run
    from ..signals import assess_run
    from ..targets import check_file_target
    run = open_run(run_path, run_name=run_name)
    _note_unreadable(run)
    protected = [*(c.path for c in run.checkpoints), *(log.path for log in run.logs), *(u.path for u in run.unreadable)]
    if output:   # before the search, which may take long: a refused target is said at once
        check_file_target(output, protected, force)
    evaluator = load_evaluator(eval_spec, eval_higher_is_better, run, eval_tokens) if eval_spec else None
    if evaluator is not None and eval_cache:
        evaluator.persist()
    if evaluator is not None and executor is not None:
        from ..executors import Resources
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
    from ..report import cooldown_doc
    from ..selection import cooldown_report
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
@_storage_options
def stop_cmd(run_path: Path, params: float | None, config_path: Path | None, tokens_per_step: float | None,
             plateau_gain: float, gain_target: float, seed: int, as_json: bool, run_name: str | None = None) -> None:
    """Should I keep training? Fit the loss curve, forecast it, flag a plateau."""
    from ..model_size import count_parameters
    from ..report import stop_report
    from ..run import open_run
    from ..scaling import StopConfig, run_stop_signal
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
@click.option("--format", "fmt", type=_LazyChoice("..logs", "LOG_READERS", sort=True), help="Skip sniffing.")
@click.option("--run", "run_name", metavar="NAME",
              help="When RUN holds several runs (Lightning version_N, several output folders): the one to read.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@_storage_options
def logs(paths: tuple[Path, ...], fmt: str | None, as_json: bool, run_name: str | None = None) -> None:
    """Read training logs and summarise every metric."""
    from ..logs import read_log
    from ..remote import as_path
    from ..report import log_report, unreadable_report
    from ..run import open_run, printable
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
