"""Iterate noise from a real AdamW state, and the log-only window it predicts (exact on known curves)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from analysis.merge.in_memory import average_state_dict
from analysis.checkpoints import detect_layout, open_checkpoint
from analysis.checkpoints.optim import SAVED_LR, metadata_learning_rate, saved_learning_rate
from analysis.evaluate import Evaluator
from analysis.selection import RecommendConfig, optimal_weights, recommend
from analysis.report import analysis_report, recommendation_report
from analysis.run import CheckpointRef, open_run
from analysis.signals import IterateNoise, assess_run, iterate_noise
from ckpt_factories import adam_run, dcp_checkpoint, hf_checkpoint, nanogpt_ckpt, sqrt_second_moments, trained
from conftest import REPO, rewrite_metrics, write_tiny_run


def _run_with_vals(root: Path, vals: list[float], lrs: list[float] | None = None) -> Path:
    """Twelve-or-so tiny checkpoints every 100 steps whose logged val losses (and LRs) are exactly given."""
    steps = [100 * (i + 1) for i in range(len(vals))]
    write_tiny_run(root, steps)
    lrs = lrs or [1e-3] * len(vals)
    rows = [row for s, v, lr in zip(steps, vals, lrs)   # in step order: a step going back reads as a restart
            for row in ({"step": s, "train_loss": 2.0, "lr": lr}, {"step": s, "val_loss": v})]
    (root / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def _with_noise(root: Path, excess_at_newest: float):
    """The run's signals with V set so that it is ``excess_at_newest`` nats at the newest LR."""
    signals = assess_run(open_run(root))
    lr = signals.checkpoints[-1].lr
    return replace(signals, noise=IterateNoise(signals.checkpoints[-1].ref.step, 4.0 * excess_at_newest / lr, 1000))


def _bias_corrected(sqrt_v_sum: float, steps: int, beta2: float = 0.999) -> float:
    """Σ√v with Adam's bias correction: each v over 1 − β2^t (issue 21)."""
    return sqrt_v_sum / math.sqrt(1.0 - beta2 ** steps)


def test_iterate_noise_is_lr_over_4_times_the_sum_of_root_second_moments(tmp_path: Path) -> None:
    root, sqrt_v_sum, elements = adam_run(tmp_path / "adam", [5, 10])
    heard: list[str] = []
    signals = assess_run(open_run(root), progress=lambda frac, msg: heard.append(msg))
    assert heard[-1] == "reading Adam second moments of step_10.pt"
    assert signals.noise is not None and signals.noise.step == 10
    assert signals.noise.sqrt_v_sum == pytest.approx(sqrt_v_sum, rel=1e-12)
    assert signals.noise.elements == elements == 6 * 5 + 5 + 5 * 3 + 3
    corrected = _bias_corrected(sqrt_v_sum, 10)   # AdamW's own step count, 10, from its state (issue 21)
    assert signals.noise.excess_at(1e-3) == pytest.approx(1e-3 * corrected / 4)
    report = analysis_report(open_run(root), signals)["iterate_noise"]
    assert report["excess_nats"] == pytest.approx(1e-3 * corrected / 4) and report["lr"] == 1e-3
    rec = recommendation_report(recommend(signals), None)
    assert rec["iterate_noise_nats"] == pytest.approx(1e-3 * corrected / 4)


def test_noise_comes_from_the_newest_checkpoint_that_saved_adam_state(tmp_path: Path) -> None:
    # The optimizer state every other save, weights-only checkpoints in between: the newest holds weights only.
    root, sqrt_v_sum, _ = adam_run(tmp_path / "adam", [4, 6, 8, 10], optimizer_at={4, 8})
    signals = assess_run(open_run(root))
    assert signals.noise is not None and signals.noise.step == 8
    assert signals.noise.sqrt_v_sum == pytest.approx(sqrt_v_sum, rel=1e-12)


def test_adam_state_from_the_first_half_of_the_run_gives_no_estimate(tmp_path: Path) -> None:
    # Second moments of step 4 of 10 measure early gradient noise, not the jitter of the newest checkpoints.
    root, _, _ = adam_run(tmp_path / "adam", [4, 6, 8, 10], optimizer_at={4})
    assert assess_run(open_run(root)).noise is None


def test_no_optimizer_state_gives_no_estimate_and_the_val_band_decides(tiny_run: Path) -> None:
    signals = assess_run(open_run(tiny_run))
    assert signals.noise is None
    rec = recommend(signals)
    assert rec.iterate_noise is None and rec.predicted_gain is None
    assert "within noise" in rec.summary


def test_weights_minimise_the_predicted_loss_of_the_average(tmp_path: Path) -> None:
    # Val rises 0.008 nats per checkpoint of age k; V = 0.1 nats. The average with weights w is predicted at
    # Σ w_k (0.008 k − 0.1) + 0.1 Σ w_k², least at w_k = (c − 0.008 k) / 0.2 while positive: weights that fall
    # linearly with age over the newest 7 (c = 0.368 / 7), 0.2629 down to 0.0229, and the 8th would get
    # (c − 0.056) / 0.2 < 0. Predicted: −0.0662 nats; the best uniform window (the newest 5) only −0.0640.
    vals = [1.0 + 0.008 * age for age in range(11, -1, -1)]
    rec = recommend(_with_noise(_run_with_vals(tmp_path / "r", vals), 0.1))
    c = 0.368 / 7
    assert rec.method == "predicted"
    assert [r.step for r in rec.checkpoints] == [600, 700, 800, 900, 1000, 1100, 1200]
    assert rec.weights == pytest.approx(tuple((c - 0.008 * k) / 0.2 for k in range(6, -1, -1)), abs=1e-12)
    predicted = sum(w * (0.008 * k - 0.1) + 0.1 * w * w for k, w in enumerate(reversed(rec.weights)))
    assert rec.predicted_gain == pytest.approx(-predicted, abs=1e-12) == pytest.approx(0.0661943, abs=1e-7)
    assert rec.iterate_noise == pytest.approx(0.1)
    stop = next(d for d in rec.decisions if d.step == 500)
    assert stop.reason == ("Left out: the averaging window stops here, as the predicted weights give it none: its "
                           "logged val loss lies 0.0560 nats above the newest, and a checkpoint gets weight only "
                           "below its iterate noise (0.1000 nats at its LR) minus 0.0474, the cut at which the "
                           "weights sum to 1.")
    assert rec.summary.startswith("Predicted weights over 7 checkpoints (steps 600-1200; newest 0.263, oldest "
                                  "0.023): predicted 0.0662 nats below the last checkpoint alone")
    recipe = recommendation_report(rec, None)
    assert recipe["method"] == "predicted" and recipe["predicted_gain_nats"] == pytest.approx(rec.predicted_gain)


def test_evals_every_other_checkpoint_are_interpolated_and_give_the_same_weights(tmp_path: Path) -> None:
    # The run of the test above with an eval only at every second checkpoint (eval every 200, save every 100):
    # the interpolated val losses are the line's own values, so the weights must come out the same.
    vals = [1.0 + 0.008 * age for age in range(11, -1, -1)]
    every = recommend(_with_noise(_run_with_vals(tmp_path / "every", vals), 0.1))
    root = _run_with_vals(tmp_path / "sparse", vals)
    rewrite_metrics(root, lambda row: None if "val_loss" in row and row["step"] % 200 else row)
    signals = _with_noise(root, 0.1)
    assert [c.val.source if c.val else None for c in signals.checkpoints] == (
        [None, "logged"] + ["interpolated", "logged"] * 5)   # step 100 lies before the first eval
    sparse = recommend(signals)
    assert [r.step for r in sparse.checkpoints] == [r.step for r in every.checkpoints] == list(range(600, 1300, 100))
    assert sparse.weights == pytest.approx(every.weights, abs=1e-12)
    assert next(d.reason for d in sparse.decisions if d.step == 700).endswith(
        "interpolated between the evals at steps 600 and 800).")


def test_the_evaluator_scores_the_predicted_weights_first_and_keeps_them_when_best(tmp_path: Path) -> None:
    # The same run as above; the evaluator scores an average by its distance to the predicted-weights average,
    # so no other candidate can beat them: the search must try them first and keep them, with their reasons.
    vals = [1.0 + 0.008 * age for age in range(11, -1, -1)]
    signals = _with_noise(_run_with_vals(tmp_path / "r", vals), 0.1)
    logs_only = recommend(signals)
    target = average_state_dict(list(logs_only.checkpoints), list(logs_only.weights))
    scored: list[dict[str, torch.Tensor]] = []

    def distance(state: dict[str, torch.Tensor]) -> float:
        scored.append(state)
        return sum(float((state[k].double() - target[k].double()).abs().sum()) for k in target)

    rec = recommend(signals, evaluator=Evaluator(distance, "distance"))
    assert rec.method == "predicted" and rec.checkpoints == logs_only.checkpoints
    assert rec.weights == pytest.approx(logs_only.weights, abs=1e-12)
    assert rec.score == pytest.approx(0.0, abs=1e-9) and rec.last_score > 1e-3
    assert distance(scored[1]) == pytest.approx(0.0, abs=1e-9)   # call 0 is the last checkpoint alone
    assert rec.evaluations == len(scored) - 1 <= 2 * 12
    assert rec.summary.startswith("Predicted weights over 7 checkpoints (steps 600-1200): distance scores 0.0000")
    assert next(d.reason for d in rec.decisions if d.step == 500).startswith(
        "Left out: the averaging window stops here, as the predicted weights give it none")


def test_a_checkpoint_whose_val_stands_out_gets_no_weight_and_says_why(tmp_path: Path) -> None:
    # Flat val but for step 1000, 0.04 nats up (4 %: not a spike, but more than its V of 0.01 can pay for).
    vals = [1.0] * 12
    vals[9] = 1.04
    rec = recommend(_with_noise(_run_with_vals(tmp_path / "r", vals), 0.01))
    assert 1000 not in [r.step for r in rec.checkpoints] and len(rec.checkpoints) == 11
    assert rec.weights == pytest.approx((1 / 11,) * 11)
    reason = next(d.reason for d in rec.decisions if d.step == 1000)
    assert reason.startswith("Left out: the predicted weights give it none: its logged val loss lies 0.0400 nats "
                             "above the newest")


def test_no_noise_keeps_the_newest_alone_and_a_flat_curve_averages_everything(tmp_path: Path) -> None:
    rising = [1.0 + 0.008 * age for age in range(7, -1, -1)]
    alone = recommend(_with_noise(_run_with_vals(tmp_path / "rising", rising), 1e-6))
    assert [r.step for r in alone.checkpoints] == [800] and alone.weights == (1.0,)
    assert alone.summary.startswith("Keep the last checkpoint (step 800) alone: the next older one was left out "
                                    "because the predicted weights give it none")
    flat = recommend(_with_noise(_run_with_vals(tmp_path / "flat", [1.0] * 8), 0.05))
    assert [r.step for r in flat.checkpoints] == [100 * i for i in range(1, 9)]
    assert flat.weights == pytest.approx((0.125,) * 8)


def test_predicted_weights_stop_at_an_lr_decay_and_scale_noise_with_each_lr(tmp_path: Path) -> None:
    # LR falls from 1.2e-3 to 1e-3 for the newest four (within 2x: one regime); 3e-3 before is another regime.
    lrs = [3e-3] * 4 + [1.2e-3] * 4 + [1e-3] * 4
    rec = recommend(_with_noise(_run_with_vals(tmp_path / "decay", [1.0] * 12, lrs), 0.05))
    assert [r.step for r in rec.checkpoints] == [500, 600, 700, 800, 900, 1000, 1100, 1200]
    stop = next(d for d in rec.decisions if d.step == 400)
    assert "x the newest checkpoint's" in stop.reason
    # Flat val, V = 0.06 at 1.2e-3 and 0.05 at 1e-3: w = (c + V) / (2V) with 4 (c + 0.06) / 0.12 + 4 (c + 0.05) / 0.1 = 1,
    # so c = -3 / 73.33: the older, noisier checkpoints carry more jitter to cancel and get more weight.
    c = -3 / (4 / 0.12 + 4 / 0.1)
    expected = (((c + 0.06) / 0.12,) * 4) + (((c + 0.05) / 0.1,) * 4)
    assert rec.weights == pytest.approx(expected, abs=1e-12)
    predicted = sum(w * -v + w * w * v for w, v in zip(expected, [0.06] * 4 + [0.05] * 4))
    assert rec.predicted_gain == pytest.approx(-predicted, abs=1e-12)


@given(cost=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=12),
       noise=st.lists(st.floats(1e-4, 1.0), min_size=12, max_size=12), seed=st.integers(0, 2 ** 32 - 1))
def test_optimal_weights_are_feasible_and_beat_any_other_weights(cost: list[float], noise: list[float],
                                                                 seed: int) -> None:
    c, v = np.array(cost), np.array(noise[:len(cost)])
    weights, _ = optimal_weights(c, v)
    assert np.all(weights >= 0.0) and weights.sum() == pytest.approx(1.0)
    best = weights @ c + (weights ** 2) @ v
    others = np.random.default_rng(seed).dirichlet(np.ones(len(c)), size=64)
    assert np.all(others @ c + (others ** 2) @ v >= best - 1e-12)


def test_predicted_window_cannot_reach_past_a_checkpoint_without_val(tmp_path: Path) -> None:
    root = _run_with_vals(tmp_path / "gap", [1.0] * 8)
    rewrite_metrics(root, lambda r: None if "val_loss" in r and r["step"] <= 500 else r)
    rec = recommend(_with_noise(root, 0.05))
    assert [r.step for r in rec.checkpoints] == [600, 700, 800]
    assert "no val loss or LR was logged for step 500 to judge it by" in rec.decisions[4].reason


def test_without_a_logged_lr_each_checkpoint_takes_the_lr_its_optimizer_state_was_saved_at(tmp_path: Path) -> None:
    # nanoGPT prints no LR: the schedule (1e-3, then 1e-4 from step 7) is only in each .pt's param groups.
    # The LR regime still stops at the decay, and V is still scaled to each checkpoint's own LR.
    def schedule(step: int) -> float:
        return 1e-3 if step <= 6 else 1e-4

    root, sqrt_v_sum, _ = adam_run(tmp_path / "adam", [2, 4, 6, 8, 10], lr_at=schedule, log_lr=False)
    assert open_run(root).metric("lr").empty
    with open_checkpoint(root / "ckpt" / "step_10.pt") as handle:
        assert float(handle.metadata()[SAVED_LR]) == 1e-4
    signals = assess_run(open_run(root))
    assert [(c.ref.step, c.lr, c.lr_saved) for c in signals.checkpoints] == [
        (2, 1e-3, True), (4, 1e-3, True), (6, 1e-3, True), (8, 1e-4, True), (10, 1e-4, True)]
    rec = recommend(signals)
    assert rec.iterate_noise == pytest.approx(1e-4 * _bias_corrected(sqrt_v_sum, 10) / 4, rel=1e-12)
    # With a V (1 nat) that outweighs the val lag, the weights reach back to the decay and stop there.
    loud = recommend(replace(signals, noise=IterateNoise(10, 4.0 / 1e-4, 1000)))
    assert [r.step for r in loud.checkpoints] == [8, 10] and loud.method == "predicted"
    assert "it was saved at LR 0.001, 10.0 x the newest checkpoint's 0.0001" in next(
        d.reason for d in loud.decisions if d.step == 6)
    doc = analysis_report(open_run(root), signals)
    assert [c["lr_source"] for c in doc["checkpoints"]] == ["optimizer state"] * 5
    assert doc["checkpoints"][-1]["lr"] == 1e-4
    text = subprocess.run([sys.executable, "-m", "analysis", "analyze", str(root), "--no-similarity"], check=True,
                          capture_output=True, text=True, cwd=REPO).stdout
    assert "lr 0.0001   *" in text and "* LR read from the checkpoint's optimizer state" in text


def _flattened_dcp(folder: Path, lr: float) -> float:
    """A DCP folder as torchtitan saves one: torch's flattened optimizer state dict, whose param groups
    keep each parameter's ``lr`` as a small pickled blob. Returns the reference Σ√v."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    model, optimizer = trained(3)
    for group in optimizer.param_groups:
        group["lr"] = lr
    flat = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": get_model_state_dict(model), "optimizer": flat}, checkpoint_id=str(folder), no_dist=True)
    return sqrt_second_moments(optimizer.state_dict())[0]


def test_a_torchtitan_style_dcp_checkpoint_gives_its_saved_lr_and_noise(tmp_path: Path) -> None:
    sqrt_v_sum = _flattened_dcp(tmp_path / "step-40", 2.5e-4)
    ref = CheckpointRef(40, tmp_path / "step-40", "dcp", (), 0)
    with open_checkpoint(ref.path, ref.layout) as handle:
        assert metadata_learning_rate(handle.metadata()) == 2.5e-4
    noise = iterate_noise(ref)
    assert noise is not None and noise.sqrt_v_sum == pytest.approx(sqrt_v_sum, rel=1e-12)


def test_a_damaged_lr_blob_loses_the_lr_not_the_checkpoint(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from analysis.checkpoints.dcp import read_metadata

    folder = tmp_path / "step-40"
    _flattened_dcp(folder, 2.5e-4)
    metadata = read_metadata(folder)
    key = next(k for k in metadata.state_dict_metadata if k.endswith(".lr"))
    item = metadata.storage_data[MetadataIndex(key)]
    with (folder / item.relative_path).open("r+b") as f:   # zero the first parameter's lr blob
        f.seek(item.offset)
        f.write(bytes(item.length))
    with open_checkpoint(folder, "dcp") as handle:
        assert SAVED_LR not in handle.metadata() and len(handle.tensors()) > 0


@pytest.mark.parametrize(("groups", "expected"), [
    ([{"params": [], "lr": 1.0}, {"params": [0, 1], "lr": torch.tensor(2e-4, dtype=torch.float64)}], 2e-4),   # empty groups skipped
    ([{"params": [0], "lr": 3e-4}, {"params": [1], "lr": 3e-3}], 3e-4),                 # the first group's
    ([{"params": [0], "lr": float("nan")}], None), ([{"params": [0], "lr": True}], None),
    ([{"params": [0], "lr": 0.0}], None), ([{"params": [0]}], None), ("groups", None), ([], None),
])
def test_the_saved_lr_is_the_first_parameter_groups_finite_positive_lr(groups: object, expected: float | None) -> None:
    assert saved_learning_rate({"state": {}, "param_groups": groups}) == expected


@given(st.text(max_size=40))
def test_free_text_metadata_never_gives_a_bad_lr(text: str) -> None:
    lr = metadata_learning_rate({SAVED_LR: text})
    assert lr is None or (math.isfinite(lr) and lr > 0)


def test_a_logged_lr_wins_over_the_optimizer_state_and_weights_only_checkpoints_have_none(tmp_path: Path) -> None:
    logged = assess_run(open_run(adam_run(tmp_path / "logged", [4, 8])[0]))
    assert [(c.lr, c.lr_saved) for c in logged.checkpoints] == [(1e-3, False), (1e-3, False)]
    root, _, _ = adam_run(tmp_path / "bare", [4, 6, 8], optimizer_at={8}, log_lr=False)
    signals = assess_run(open_run(root))
    assert [(c.lr, c.lr_saved) for c in signals.checkpoints] == [(None, False), (None, False), (1e-3, True)]
    assert analysis_report(open_run(root), signals)["checkpoints"][0]["lr_source"] is None


@pytest.mark.parametrize("layout", ["nanogpt", "dcp", "hf"])
def test_iterate_noise_reads_second_moments_from_every_layout_that_saves_them(tmp_path: Path, layout: str) -> None:
    if layout == "nanogpt":
        path = tmp_path / "ckpt.pt"
        state = nanogpt_ckpt(path)["optimizer"]
    elif layout == "dcp":
        path = tmp_path / "dcp"
        dcp_checkpoint(path)
        state = trained(0)[1].state_dict()
    else:
        path = tmp_path / "checkpoint-100"
        hf_checkpoint(path, 100)
        state = torch.load(path / "optimizer.pt", weights_only=True)
    expected, elements = sqrt_second_moments(state)
    noise = iterate_noise(CheckpointRef(100, path, detect_layout(path), (path,), 0))
    assert noise is not None and noise.sqrt_v_sum == pytest.approx(expected, rel=1e-12)
    assert noise.elements == elements


def test_no_estimate_when_adam_covers_only_part_of_the_model(tmp_path: Path) -> None:
    # Matrices trained by another optimizer (Muon-style), Adam on the biases only: the jitter of most
    # weights is unknown, so V would be badly low; the val band decides instead.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    adam = torch.optim.AdamW([p for n, p in model.named_parameters() if n.endswith("bias")])
    model(torch.randn(3, 16)).sum().backward()
    adam.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": adam.state_dict()}, path)
    assert iterate_noise(CheckpointRef(1, path, detect_layout(path), (path,), 0)) is None


def _train_tiny(out: Path, *save_optimizer: str) -> None:
    """The sample-run trainer on a 40-step, one-layer model with checkpoints at steps 20 and 40."""
    subprocess.run([sys.executable, str(REPO / "sample_runs" / "make_sample_run.py"), "--out", str(out),
                    "--steps", "40", "--ckpt-every", "20", "--eval-every", "20", "--warmup", "10", "--n-layer", "1",
                    "--n-embd", "16", "--block-size", "16", "--batch-size", "4", "--spike-steps", "", "--threads", "1",
                    *save_optimizer], check=True, capture_output=True)


@pytest.mark.slow
def test_trainer_saves_adam_state_that_recommend_reads_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _train_tiny(out, "--save-optimizer")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000020.pt", "step_000040.pt"]
    saved = torch.load(out / "checkpoints" / "step_000040.pt", weights_only=True)
    names = [n for g in saved["optimizer"]["param_groups"] for n in g["param_names"]]
    assert "transformer.wte.weight" in names
    sqrt_v_sum, _ = sqrt_second_moments(saved["optimizer"])
    doc = json.loads(subprocess.run([sys.executable, "-m", "analysis", "recommend", str(out), "--json"], check=True,
                                    capture_output=True, text=True, cwd=REPO).stdout)
    beta2 = saved["optimizer"]["param_groups"][0]["betas"][1]
    assert doc["iterate_noise_nats"] == pytest.approx(3e-3 * _bias_corrected(sqrt_v_sum, 40, beta2) / 4, rel=1e-9)
    assert doc["checkpoints"][-1]["path"].endswith("step_000040.pt")
    text = subprocess.run([sys.executable, "-m", "analysis", "analyze", str(out)], check=True, capture_output=True,
                          text=True, cwd=REPO).stdout
    assert f"iterate noise {doc['iterate_noise_nats']:.4f} nats at LR 0.003" in text


@pytest.mark.slow
def test_trainer_can_keep_adam_state_with_the_last_checkpoint_only(tmp_path: Path) -> None:
    # The bundled sample run's shape: weights-only safetensors, and a nanoGPT-style resume file at the end.
    out = tmp_path / "run"
    _train_tiny(out, "--save-optimizer", "last")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000020.safetensors", "step_000040.pt"]
    saved = torch.load(out / "checkpoints" / "step_000040.pt", weights_only=True)
    signals = assess_run(open_run(out))
    assert [c.eligible for c in signals.checkpoints] == [True, True]   # one run, two formats, the same tensors
    assert signals.noise is not None and signals.noise.step == 40
    assert signals.noise.sqrt_v_sum == pytest.approx(sqrt_second_moments(saved["optimizer"])[0], rel=1e-12)


def test_a_run_that_logs_no_val_loss_gets_predicted_weights_from_its_train_loss(tmp_path: Path) -> None:
    # The HF Trainer's default: no eval, the optimizer state saved. The train loss since the checkpoint before
    # stands in for the val loss; the weights, reasons, JSON and text say so.
    root, sqrt_v_sum, _ = adam_run(tmp_path / "adam", list(range(10, 130, 10)))
    rewrite_metrics(root, lambda row: None if "val_loss" in row else row)
    signals = assess_run(open_run(root))
    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    newest = signals.checkpoints[-1]
    assert newest.val.source == "train" and newest.val.between == (110, 120)
    assert newest.val.value == pytest.approx(np.mean([r["train_loss"] for r in rows if 110 < r["step"] <= 120]))
    assert recommend(signals).iterate_noise == pytest.approx(1e-3 * _bias_corrected(sqrt_v_sum, 120) / 4)
    # This toy's jitter is tiny next to its batch-to-batch loss; with a V worth averaging for, several are taken.
    rec = recommend(replace(signals, noise=IterateNoise(120, 4.0 * 0.5 / 1e-3, 1000)))
    assert rec.method == "predicted" and len(rec.checkpoints) > 2 and "logged train losses lie" in rec.summary
    assert all("(train loss " in d.reason and d.reason.endswith("the run logs no val loss).") for d in rec.decisions if d.taken)
    done = subprocess.run([sys.executable, "-m", "analysis", "recommend", str(root)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "(From logged train losses (the run logs no val loss), LRs and the optimizer's second moments" in done.stdout
    analyzed = json.loads(subprocess.run([sys.executable, "-m", "analysis", "analyze", str(root), "--json"],
                                         capture_output=True, text=True, cwd=REPO, timeout=120).stdout)
    assert analyzed["checkpoints"][-1]["val_loss_source"] == "train"
    assert analyzed["checkpoints"][-1]["val_loss_between"] == [110, 120]
    # Ten rows per interval: each mean's sampling error, in the JSON and, with the iterate noise, in the note.
    inside = np.array([r["train_loss"] for r in rows if 110 < r["step"] <= 120])
    stderr = np.median(np.abs(np.diff(inside))) / 0.9539 / np.sqrt(len(inside))
    assert analyzed["checkpoints"][-1]["val_loss_stderr"] == pytest.approx(stderr, rel=1e-9)
    errors = [c.val.stderr for c in signals.checkpoints[-8:]]   # the newest eight, as the note takes them
    assert rec.stand_in_error == pytest.approx(np.median(errors))
    assert recommendation_report(rec, None)["stand_in_sampling_error_nats"] == pytest.approx(np.median(errors))
    assert (f"Each checkpoint's train-loss mean carries about {np.median(errors):.4f} nats of sampling error from "
            f"the batches it met, against 0.5000 nats of iterate noise at the newest LR") in rec.basis_note
    text = subprocess.run([sys.executable, "-m", "analysis", "analyze", str(root), "--no-similarity"],
                          capture_output=True, text=True, cwd=REPO, timeout=120).stdout
    assert f"step      120  train {newest.val.value:.4f}" in text and "stands in" in text


def test_the_recommendation_says_how_it_was_chosen_and_what_would_choose_better(tmp_path: Path,
                                                                                 tiny_run: Path) -> None:
    vals = [1.0 + 0.008 * age for age in range(11, -1, -1)]
    root = _run_with_vals(tmp_path / "r", vals)
    predicted = recommend(_with_noise(root, 0.1))
    assert predicted.basis == "predicted"
    assert predicted.basis_note.startswith("From logged val losses, LRs and the optimizer's second moments")
    asked = recommend(_with_noise(root, 0.1), RecommendConfig(method="ema"))
    assert asked.basis == "predicted" and "The ema weights over that window were asked for" in asked.basis_note
    # No Adam state: the val band, a heuristic, and the note names what is missing and both ways to do better.
    band = recommend(assess_run(open_run(tiny_run)))
    assert band.basis == "val band"
    assert "kept Adam's second moments (exp_avg_sq)" in band.basis_note
    assert "keep the optimizer state with the newest checkpoint" in band.basis_note and "--eval" in band.basis_note
    # Adam state but no LR anywhere for the newest checkpoint: the noise cannot be put in nats.
    bare = adam_run(tmp_path / "bare", [4, 6, 8], optimizer_at={4}, log_lr=False)[0]
    no_lr = recommend(assess_run(open_run(bare)))
    assert no_lr.basis in ("val band", "default")
    assert "Adam's second moments were read (step 4) but the newest checkpoint's LR is in neither" in no_lr.basis_note
    assert no_lr.basis_note.endswith("To do better, log the LR for predicted weights, or pass --eval FILE.py:FUNC "
                                     "to measure candidate averages.")
    assert recommend(assess_run(open_run(tiny_run)), RecommendConfig(window=3)).basis == "window"
    evaluated = recommend(assess_run(open_run(tiny_run)), RecommendConfig(max_evals=4),
                          Evaluator(lambda state: float(state["layer.bias"].float().abs().mean()), "bias"))
    assert evaluated.basis == "evaluator" and evaluated.basis_note.startswith("Measured: the evaluator scored 4 ")
    doc = recommendation_report(band, None)
    assert doc["basis"] == "val band" and doc["basis_note"] == band.basis_note

