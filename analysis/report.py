"""JSON-ready dictionaries of results: the one shape the CLI prints and tests parse.

Every path is absolute; every number carries its unit in its key or the contract.
"""

from __future__ import annotations

import math

from .logs import LogTable
from .recipe import Recipe, recipe_to_dict
from .selection import CooldownReport, Recommendation
from .run import Run
from .model_size import ParamCount
from .scaling import ComputeOptimal, Forecast, StopSignal
from .signals import (ClearedSpike, LayerReport, LayerSeries, LossSpike, RunSignals, SimilarityReport, StepTiming,
                      analyze_step_times)
from .storage import MeasuredOverhead, StorageEstimate


def _num(value: float | None) -> float | None:
    """JSON has no NaN/inf: map them to null."""
    return None if value is None or not math.isfinite(value) else float(value)


def log_report(table: LogTable) -> dict:
    """The `logs --json` record of one log."""
    metrics = {}
    for name, series in table.series_by_metric().items():
        values = series["value"].to_numpy()
        bad = series["step"][~(values == values) | (abs(values) == math.inf)]
        metrics[name] = {
            "count": int(len(series)),
            "first_step": int(series["step"].iloc[0]),
            "last_step": int(series["step"].iloc[-1]),
            "last": _num(float(values[-1])),
            "first_nonfinite_step": int(bad.iloc[0]) if len(bad) else None,
        }
    return {"path": str(table.path), "format": table.format, "rows": table.rows,
            "skipped_lines": table.skipped_lines, "restarts": table.restarts, "metrics": metrics}


def unreadable_report(run: Run) -> list[dict]:
    """The ``unreadable`` list: files of the run that were passed over, and why (issue 19)."""
    return [{"path": str(u.path), "kind": u.kind, "step": u.step, "status": u.status,
             "being_written": u.being_written, "reason": u.reason} for u in run.unreadable]


def timing_report(timing: StepTiming) -> dict:
    """The ``timing`` record: steady step time, eval/checkpoint costs (ms) and wall-time shares."""
    return {
        "source": timing.source, "timed_points": timing.timed_points,
        "steady_step_ms": _num(timing.steady_step_ms), "slow_factor": timing.slow_factor,
        "eval_cost_ms": _num(timing.eval_cost_ms), "checkpoint_cost_ms": _num(timing.checkpoint_cost_ms),
        "eval_checkpoint_cost_ms": _num(timing.eval_checkpoint_cost_ms), "total_ms": _num(timing.total_ms),
        "eval_share": _num(timing.eval_share), "checkpoint_share": _num(timing.checkpoint_share),
        "eval_checkpoint_share": _num(timing.eval_checkpoint_share),
        "shares": timing.describe_shares(),
        "other_slow_share": _num(timing.other_slow_share), "warmup_ms": _num(timing.warmup_ms),
        "slow_iterations": [{"step": s.step, "step_ms": _num(s.step_ms), "extra_ms": _num(s.extra_ms), "kind": s.kind}
                            for s in timing.slow],
    }


def _cleared_report(cleared: ClearedSpike, run: Run) -> dict:
    """A train-loss event the checkpoint's own val loss clears, with the two val losses compared."""
    return {"event": spike_report(cleared.event, run), "val_loss": _num(cleared.val),
            "before_step": cleared.before_step, "before_val_loss": _num(cleared.before_val)}


def spike_report(spike: LossSpike, run: Run) -> dict:
    """One spike event; ``peak_loss`` is the train loss peak inside the event's window."""
    loss = run.metric("train_loss")
    inside = loss[(loss["step"] >= spike.start_step) & (loss["step"] <= spike.end_step)]["value"]
    return {
        "metric": spike.metric, "start_step": spike.start_step, "peak_step": spike.peak_step,
        "end_step": spike.end_step, "peak_loss": _num(float(inside.max())) if len(inside) else None,
        "peak_value": _num(spike.peak_value), "baseline": _num(spike.baseline), "ratio": _num(spike.ratio),
        "recovered": spike.recovered, "onset_after_step": spike.onset_after_step,
    }


def similarity_report(sim: SimilarityReport) -> dict:
    """Run-level similarity: how exact the numbers are, the pairwise matrices, the trajectory."""
    def matrix(values) -> list[list[float | None]]:
        return [[_num(float(v)) for v in row] for row in values]

    return {
        "exact": sim.exact, "cosine_error_bound": sim.error_bound, "steps": list(sim.steps),
        "distance_matrix": matrix(sim.distance_matrix), "update_cosine_matrix": matrix(sim.update_cosine_matrix),
        "trajectory": [[float(x), float(y)] for x, y in sim.trajectory],
        "explained_variance": list(sim.explained_variance),
    }


def _similarity_fields(sim: SimilarityReport | None, step: int) -> dict:
    """Per-checkpoint similarity columns (null when similarity was not computed)."""
    row = next((c for c in sim.checkpoints if c.step == step), None) if sim is not None else None
    if row is None:
        return {"update_norm": None, "update_cosine": None, "distance_to_newest": None, "grad_cosine": None}
    return {"update_norm": _num(row.update_norm), "update_cosine": _num(row.update_cosine),
            "distance_to_newest": _num(row.distance_to_newest), "grad_cosine": _num(row.grad_cosine),
            "layer_distance_to_newest": {k: _num(v) for k, v in row.layer_distance_to_newest.items()}}


def analysis_report(run: Run, signals: RunSignals, similarity: SimilarityReport | None = None,
                    timing: StepTiming | None = None, layers: bool = False) -> dict:
    """The `analyze --json` document (``timing``: ``analyze_step_times(run)``, when the caller has it;
    ``layers``: add the per-layer view, issue 25)."""
    checkpoints = []
    for item in signals.checkpoints:
        ref, health = item.ref, item.health
        checkpoints.append({
            "step": ref.step, "path": str(ref.path), "format": ref.layout, "bytes": ref.size_bytes,
            "step_source": ref.step_source, "n_params": health.n_params, "finite": health.finite,
            "nonfinite_tensors": list(health.nonfinite_tensors), "weight_norm": _num(health.norm),
            "max_abs": _num(health.max_abs),
            "layer_norms": {layer: _num(norm) for layer, norm in health.layer_norms},
            "bytes_by_dtype": dict(health.bytes_by_dtype),
            "spike_contaminated": item.spike is not None,
            "spike": spike_report(item.spike, run) if item.spike is not None else None,
            "spike_cleared": _cleared_report(item.cleared, run) if item.cleared is not None else None,
            "mismatch": item.mismatch,
            "abnormal": item.abnormal,
            "val_loss": _num(item.val.value) if item.val else None,
            "val_loss_source": item.val.source if item.val else None,
            "val_loss_step": item.val.source_step if item.val else None,
            "val_loss_logged_at": item.val.logged_at if item.val else None,
            "val_loss_between": list(item.val.between) if item.val and item.val.between else None,
            "val_loss_stderr": _num(item.val.stderr) if item.val and item.val.stderr is not None else None,
            "lr": _num(item.lr) if item.lr is not None else None,
            "lr_source": None if item.lr is None else "optimizer state" if item.lr_saved else "logged",
            **_similarity_fields(similarity, ref.step),
        })
    return {
        "run": str(run.path), "name": run.name, "fingerprint": run.fingerprint,
        "checkpoints": checkpoints,
        "logs": [log_report(t) for t in run.logs],
        "spikes": [spike_report(s, run) for s in signals.spikes],
        "iterate_noise": _noise_report(signals),
        "timing": timing_report(timing if timing is not None else analyze_step_times(run)),
        "similarity": similarity_report(similarity) if similarity is not None else None,
        "merged_outputs": [str(p) for p in run.merged_outputs],
        "evaluator_hint": run.evaluator_hint,
        "notes": list(run.notes),
        "unreadable": unreadable_report(run),
        **({"layers": layers_report(signals.layers)} if layers and signals.layers is not None else {}),
    }


def layers_report(report: LayerReport) -> dict:
    """The ``layers`` record of `analyze --layers --json`: per-layer series (one value per checkpoint, null where
    none), flags with reasons, spike leads, and pre- or post-norm with what each flag kind means for it."""
    return {
        "steps": list(report.steps),
        "norm_placement": {"kind": report.placement.kind, "evidence": report.placement.evidence,
                           "meaning": {kind: report.meaning(kind) for kind in ("growth", "max_abs", "update_jump")}},
        "exact": report.exact, "update_error": report.update_error, "cosine_error": report.cosine_error,
        "layers": [_layer_series(layer) for layer in report.layers],
        "flags": [{"kind": f.kind, "layer": f.layer, "start_step": f.start_step, "end_step": f.end_step,
                   "previous_step": f.previous_step, "value": _num(f.value), "baseline": _num(f.baseline),
                   "excludes": f.excludes, "reason": f.reason, "meaning": report.meaning(f.kind)}
                  for f in report.flags],
        "abnormal_checkpoints": [{"step": step, "reason": why} for step, why in report.abnormal().items()],
        "spike_leads": [{"spike": {"metric": lead.spike.metric, "start_step": lead.spike.start_step,
                                   "end_step": lead.spike.end_step},
                         "first_hit_step": lead.first_hit_step,
                         "leaders": [{"layer": x.layer, "step": x.step, "lead_checkpoints": x.lead_checkpoints,
                                      "lead_steps": x.lead_steps, "ratio": _num(x.ratio)} for x in lead.leaders]}
                        for lead in report.leads],
    }


def _layer_series(layer: LayerSeries) -> dict:
    return {"name": layer.name, "block": layer.block, "group": layer.group, "tensors": list(layer.tensors),
            "exact": layer.exact, "rms": [_num(v) for v in layer.rms], "max_abs": [_num(v) for v in layer.max_abs],
            "relative_update": [_num(v) for v in layer.relative_update],
            "update_cosine": [_num(v) for v in layer.update_cosine],
            "qk_norm_product": [_num(v) for v in layer.qk_norm_product] or None}


def _noise_report(signals: RunSignals) -> dict | None:
    """Σ√v of the newest eligible checkpoint's Adam state and V at its LR (None without optimizer state)."""
    noise = signals.noise
    if noise is None:
        return None
    lr = signals.at(noise.step).lr
    return {"step": noise.step, "sqrt_v_sum": noise.sqrt_v_sum, "elements": noise.elements, "lr": _num(lr),
            "excess_nats": _num(noise.excess_at(lr)) if lr else None,
            "bias_correction": {"optimizer_steps": noise.adam_step, "steps_from": noise.adam_step_source or None,
                                "beta2": noise.beta2, "beta2_from": noise.beta2_source or None,
                                "factor": noise.bias_correction},
            "source": noise.source()}


def recommendation_report(rec: Recommendation, recipe: Recipe | None) -> dict:
    """The `recommend --json` document."""
    return {
        "method": rec.method,
        "summary": rec.summary,
        "checkpoints": [{"step": r.step, "path": str(r.path), "weight": w} for r, w in zip(rec.checkpoints, rec.weights)],
        "excluded": [{"step": d.step, "path": d.path, "reason": d.reason} for d in rec.decisions if not d.taken],
        "decisions": [{"step": d.step, "path": d.path, "taken": d.taken, "weight": d.weight, "reason": d.reason}
                      for d in rec.decisions],
        "evaluations": rec.evaluations,
        "evaluations_cached": rec.evaluations_cached,
        "iterate_noise_nats": _num(rec.iterate_noise),
        "predicted_gain_nats": _num(rec.predicted_gain),
        "basis": rec.basis,
        "basis_note": rec.basis_note,
        "stand_in_sampling_error_nats": _num(rec.stand_in_error),
        "score": _num(rec.score),
        "last_score": _num(rec.last_score),
        "settings": dict(rec.settings),
        "recipe": recipe_to_dict(recipe) if recipe is not None else None,
    }


def cooldown_doc(report: CooldownReport) -> dict:
    """The `recommend --cooldown --json` document (issue 24): a row per schedule and window, and the real decay.

    ``gap_to_decay_nats``: the row's loss minus the real decay's end (negative: the merge is lower).
    """
    def gap(value: float | None, end: float | None) -> float | None:
        return _num(value - end) if value is not None and end is not None else None

    rows = [{"schedule": r.schedule, "window": r.window, "unit": r.unit, "steps": list(r.steps),
             "weights": list(r.weights), "predicted_loss": _num(r.predicted_loss), "measured_loss": _num(r.measured_loss),
             "predicted_vs_stable_nats": _num(r.vs_stable), "predicted_gap_to_decay_nats": _num(r.vs_decay),
             "measured_gap_to_decay_nats": gap(r.measured_loss, report.decay_measured), "describe": r.describe}
            for r in report.rows]
    return {"rows": rows, "stable_step": report.stable_step, "stable_loss": _num(report.stable_loss),
            "stable_measured": _num(report.stable_measured), "decay_step": report.decay_step,
            "decay_loss": _num(report.decay_loss), "decay_measured": _num(report.decay_measured),
            "basis": report.basis}


def storage_report(est: StorageEstimate, measured: MeasuredOverhead | None = None,
                   count: ParamCount | None = None) -> dict:
    """The `storage --json` document (bytes, USD per month, seconds), with its arithmetic.

    Args:
        est: the estimate.
        measured: checkpoint stalls measured in a run's logs, if a run was given.
        count: the parameter count from a config.json, if one was given.
    """
    return {
        "params": est.params, "dtype": est.dtype, "optimizer": est.optimizer,
        "per_checkpoint_bytes": {"weights": est.weights_bytes, "optimizer": est.optimizer_bytes,
                                 "ema": est.ema_bytes, "total": est.per_checkpoint_bytes},
        # Side by side with the full state: what a checkpoint weighs without optimizer state.
        "weights_only_bytes": est.weights_only_bytes, "master_copy_bytes": est.master_bytes,
        "kept": est.kept, "kept_full_state": est.kept if est.kept_full is None else est.kept_full,
        "policy": est.policy, "policy_note": est.policy_note, "total_bytes": est.total_bytes,
        "monthly_cost": est.monthly_cost, "price_per_tb_month": est.price_per_tb_month,
        "write_seconds": est.write_seconds, "bandwidth_gbps": est.bandwidth_gbps,
        "step_time_s": est.step_time_s, "every_steps": est.every_steps,
        "asynchronous": est.asynchronous, "stall_seconds": est.stall_seconds,
        "overhead_fraction": _num(est.overhead_fraction), "chinchilla_tokens": est.chinchilla_tokens,
        "window": est.window, "window_bytes": est.window_bytes,
        "window_fits": None if est.window is None else est.kept >= est.window,
        "measured": None if measured is None else {
            "saves_seen": measured.saves_seen, "median_step_seconds": measured.median_step_seconds,
            "stall_seconds": measured.stall_seconds, "interval_steps": measured.interval_steps,
            "overhead_fraction": _num(measured.overhead_fraction)},
        "model": None if count is None else {
            "model_type": count.model_type, "total_params": count.total, "active_params": count.active,
            "embedding_params": count.embedding, "tied_embeddings": count.tied_embeddings},
        "arithmetic": list(est.arithmetic),
    }


def _forecast(f: Forecast) -> dict:
    return {"x": _num(f.x), "value": _num(f.value), "low": _num(f.low), "high": _num(f.high)}


def _compute_optimal(c: ComputeOptimal | None) -> dict | None:
    if c is None:
        return None
    return {"params": c.params, "tokens": _num(c.tokens), "optimal_tokens": c.optimal_tokens,
            "compute_flops": _num(c.compute_flops), "over_training_factor": _num(c.over_training_factor),
            "chinchilla_loss": _num(c.chinchilla_loss), "optimal_loss": _num(c.optimal_loss)}


def stop_report(sig: StopSignal, run: Run | None = None) -> dict:
    """The `stop --json` document: the fit, the forecasts and the plateau verdict.

    ``x`` values are in ``fit.x_unit`` (tokens or steps); an unreachable gain is null.
    """
    fit = sig.fit
    return {
        "run": str(run.path) if run is not None else None, "metric": sig.metric, "x_unit": fit.x_unit,
        "unreadable": unreadable_report(run) if run is not None else [],
        "x_seen": fit.x_last,
        "fit": {"formula": "L = E + B * x^-beta", "E": fit.e, "B": fit.b, "beta": fit.beta,
                "E_stderr": fit.e_stderr, "B_stderr": fit.b_stderr, "beta_stderr": fit.beta_stderr,
                "residual_std": fit.residual_std, "points": fit.points, "x_first": fit.x_first,
                "x_last": fit.x_last, "loss_at_x_seen": fit.loss_at(fit.x_last)},
        "forecasts": [{"factor": f.x / fit.x_last, "loss": _num(f.value), "low": _num(f.low),
                       "high": _num(f.high), "x": f.x} for f in sig.forecasts],
        "to_gain": {"delta": sig.gain_target, **_forecast(sig.x_for_gain),
                    "more": _num(sig.x_for_gain.value - fit.x_last)},
        "plateau": {"verdict": sig.plateau, "horizon": sig.horizon_label, "horizon_x": sig.horizon_x,
                    "gain": _num(sig.horizon_gain.value), "gain_low": _num(sig.horizon_gain.low),
                    "gain_high": _num(sig.horizon_gain.high), "threshold": sig.threshold},
        "verdict": sig.verdict,
        "compute_optimal": _compute_optimal(sig.compute_optimal),
    }
