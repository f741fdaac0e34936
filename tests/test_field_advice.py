"""The advice is right on runs the real libraries write (issue 21).

- Lightning 2.6 (CSVLogger + ModelCheckpoint): each checkpoint gets the eval Lightning logged for it,
  written at step N - 1, exactly, not an interpolation.
- The HF Trainer: each checkpoint gets the eval at its save step; a GPT-2 run at constant LR, weights
  only, short enough that its val loss still falls steeply: the recommended merge, scored with the
  Trainer's own ``evaluate()``, is no worse than the last checkpoint; only the newest trainer_state.json
  is read; nothing leaks from torch or transformers into ``analyze``.
- Adam's bias correction of the iterate noise, against an independent computation on a real AdamW state.
- nanoGPT's one ``out/ckpt.pt`` overwritten at every eval: the advice says so.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from analysis import cli
from analysis.checkpoints import detect_layout
from analysis.report import analysis_report
from analysis.run import CheckpointRef, open_run
from analysis.selection import recommend
from analysis.signals import assess_run, iterate_noise
from ckpt_factories import ByteChunks, byte_tokenizer, nanogpt_ckpt, stdlib_bytes
from conftest import REPO

CONTEXT = 64
HF_STEPS = 60
EVERY = 10
LR = 3e-3
NANOGPT_LOG = REPO.parent / "shared" / "real_logs" / "nanogpt" / "LorenMak_seem3650_layers7_heads4.txt"


# --- Lightning: the eval logged at N - 1 belongs to the checkpoint saved at N --------------------------------

@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-step Lightning run on CPU: CSVLogger, a checkpoint and a validation every 10 steps."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    class Regressor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

        def training_step(self, batch, index):
            loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, index):
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    root = tmp_path_factory.mktemp("lightning") / "run"
    torch.manual_seed(0)
    x = torch.randn(640, 8)
    y = x.sum(1, keepdim=True).sin() + 0.1 * torch.randn(640, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(max_steps=60, val_check_interval=10, check_val_every_n_epoch=None, accelerator="cpu",
                            logger=CSVLogger(root, name="lightning_logs"), log_every_n_steps=5, num_sanity_val_steps=0,
                            callbacks=[ModelCheckpoint(every_n_train_steps=10, save_top_k=-1)],
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(Regressor(), DataLoader(TensorDataset(x[:512], y[:512]), batch_size=8, shuffle=True),
                    DataLoader(TensorDataset(x[512:], y[512:]), batch_size=64))
    return root


def test_issue21_each_lightning_checkpoint_gets_the_eval_lightning_logged_for_it(lightning_run: Path) -> None:
    with (lightning_run / "lightning_logs" / "version_0" / "metrics.csv").open() as f:
        logged = {int(row["step"]): float(row["val_loss"]) for row in csv.DictReader(f) if row["val_loss"]}
    assert sorted(logged) == [9, 19, 29, 39, 49, 59]   # Lightning's own convention: N - 1
    signals = assess_run(open_run(lightning_run))
    assert [c.ref.step for c in signals.checkpoints] == [10, 20, 30, 40, 50, 60]
    for item in signals.checkpoints:
        assert item.val.value == logged[item.ref.step - 1]   # exact: the CSV row, no interpolation
        assert (item.val.source, item.val.logged_at, item.val.between) == ("logged", item.ref.step - 1, None)
    assert "logged for this checkpoint (the log writes it at step 49)" in signals.at(50).val.describe()


def test_issue21_analyze_json_names_the_step_lightning_wrote_the_eval_at(lightning_run: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["analyze", str(lightning_run), "--json", "--no-similarity"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)["checkpoints"]
    assert [(r["step"], r["val_loss_source"], r["val_loss_logged_at"]) for r in rows] == [
        (s, "logged", s - 1) for s in range(10, 70, 10)]
    assert err == ""


# --- The HF Trainer: GPT-2 at constant LR, weights only, still falling steeply -------------------------------

def _trainer(model, output_dir: Path, **kwargs):
    """A Trainer over the run's split: train on the first 180 kB, evaluate on the next 20 kB."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    data = stdlib_bytes(200_000)
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=8, learning_rate=LR,
                             lr_scheduler_type="constant", per_device_eval_batch_size=32, report_to=[], use_cpu=True,
                             seed=0, dataloader_num_workers=0, disable_tqdm=True, **kwargs)
    return Trainer(model=model, args=args, train_dataset=ByteChunks(data[:180_000], CONTEXT),
                   eval_dataset=ByteChunks(data[180_000:], CONTEXT),
                   processing_class=byte_tokenizer(), data_collator=default_data_collator)


@pytest.fixture(scope="module")
def hf_weights_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``output_dir`` of a 60-step GPT-2 Trainer run at a constant LR, weights only (save_only_model), eval every 10."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("hf_constant") / "output"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(GPT2LMHeadModel(config), root, max_steps=HF_STEPS, eval_strategy="steps", eval_steps=EVERY,
                 save_steps=EVERY, save_only_model=True, logging_steps=5).train()
    return root


def _trainer_eval_loss(root: Path, state: dict[str, torch.Tensor], tmp_path: Path) -> float:
    """The Trainer's own ``evaluate()`` of GPT-2 weights, on the run's eval split."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(root / f"checkpoint-{HF_STEPS}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(_trainer(model, tmp_path / "eval").evaluate()["eval_loss"])


def test_issue21_hf_evals_belong_to_the_save_step_and_one_trainer_state_is_read(hf_weights_only: Path) -> None:
    run = open_run(hf_weights_only)
    assert [t.path for t in run.logs] == [hf_weights_only / f"checkpoint-{HF_STEPS}" / "trainer_state.json"]
    history = json.loads(run.logs[0].path.read_text())["log_history"]
    evals = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    signals = assess_run(run)
    assert [(c.ref.step, c.val.value, c.val.source, c.val.logged_at) for c in signals.checkpoints] == [
        (s, evals[s], "logged", None) for s in range(EVERY, HF_STEPS + 1, EVERY)]
    assert signals.noise is None   # weights only: the val band decides


def test_issue21_on_a_steeply_falling_loss_the_advice_is_no_worse_than_the_last_checkpoint(
        hf_weights_only: Path, tmp_path: Path) -> None:
    signals = assess_run(open_run(hf_weights_only))
    vals = [c.val.value for c in signals.checkpoints]
    assert all(a > b for a, b in zip(vals, vals[1:]))   # still falling at every eval
    rec = recommend(signals)
    states = {r.step: load_file(r.path / "model.safetensors") for r in rec.checkpoints}
    merged = {name: sum(w * states[r.step][name].double() for r, w in zip(rec.checkpoints, rec.weights)).float()
              for name in states[rec.checkpoints[-1].step]}
    last = load_file(hf_weights_only / f"checkpoint-{HF_STEPS}" / "model.safetensors")
    merged_loss = _trainer_eval_loss(hf_weights_only, merged, tmp_path)
    last_loss = _trainer_eval_loss(hf_weights_only, last, tmp_path)
    assert last_loss == pytest.approx(vals[-1], abs=1e-4)   # the Trainer scores its own eval again
    assert merged_loss <= last_loss + 1e-6
    assert [r.step for r in rec.checkpoints] == [HF_STEPS] and "still falls" in rec.summary
    # The window of the old rule (steps 30-60, noise from the median |Δval|) is what this guards against.
    old = {n: sum(load_file(hf_weights_only / f"checkpoint-{s}" / "model.safetensors")[n] for s in (30, 40, 50, 60)) / 4
           for n in last}
    assert _trainer_eval_loss(hf_weights_only, old, tmp_path) > last_loss


def _exact_update_cosines(states: list[dict[str, torch.Tensor]]) -> list[float]:
    """cos(θ_k − θ_(k−1), θ_(k−1) − θ_(k−2)) over every floating tensor, in float64, for k = 2, 3, ..."""
    flat = [torch.cat([s[n].double().flatten() for n in sorted(s) if s[n].is_floating_point()]) for s in states]
    deltas = [b - a for a, b in zip(flat, flat[1:])]
    return [float(torch.nn.functional.cosine_similarity(new, old, dim=0)) for old, new in zip(deltas, deltas[1:])]


def test_issue21_a_run_still_travelling_one_way_gets_the_guard_at_once_its_noise(hf_weights_only: Path) -> None:
    """Consecutive updates of the constant-LR Trainer run point the same way (cosine > 0, from the sketch pass,
    as the full weights give it): the falling-loss guard then acts at 1 x the trend noise, and says why."""
    from analysis.selection.eligibility import choose_window, drift_cosine
    from analysis.selection.recommendation import RecommendConfig

    signals = assess_run(open_run(hf_weights_only))
    states = [load_file(c.ref.path / "model.safetensors") for c in signals.checkpoints]
    exact = _exact_update_cosines(states)
    sketched = [c.update_cosine for c in signals.checkpoints]
    assert sketched[:2] == [None, None]
    assert sketched[2:] == pytest.approx(exact, abs=0.02)
    eligible = [c for c in signals.checkpoints if c.eligible]
    assert drift_cosine(eligible) == pytest.approx(statistics.median(exact[-5:]), abs=0.02)
    assert drift_cosine(eligible) > 0
    window = choose_window(eligible, RecommendConfig())
    assert window.drift == pytest.approx(drift_cosine(eligible)) and window.size == 1
    assert "while the weights still travel one way (median cosine of consecutive updates +" in window.why_stop


def test_issue21_a_run_whose_updates_alternate_keeps_the_guard_at_twice_its_noise(sample_run: Path) -> None:
    """The bundled run (2,880 steps, near its minimum): consecutive updates point apart (median cosine ≤ 0),
    so without Adam's state the val band's guard keeps its 2 x margin; the cosines match the full weights."""
    from dataclasses import replace

    from analysis.selection.eligibility import choose_window, drift_cosine
    from analysis.selection.recommendation import RecommendConfig

    signals = assess_run(open_run(sample_run))
    newest = signals.checkpoints[-4:]
    states = [torch.load(c.ref.path, weights_only=True, map_location="cpu") for c in newest]
    states = [s.get("model", s) for s in states]
    assert [c.update_cosine for c in newest[2:]] == pytest.approx(_exact_update_cosines(states), abs=0.05)
    eligible = [c for c in replace(signals, noise=None).checkpoints if c.eligible]
    assert drift_cosine(eligible) <= 0
    window = choose_window(eligible, RecommendConfig())
    assert window.drift is None and (window.why_stop is None or "2 x its noise" in window.why_stop)


def test_issue21_analyze_lists_one_log_and_no_library_warnings(hf_weights_only: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["analyze", str(hf_weights_only), "--no-similarity"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].endswith(f"{HF_STEPS // EVERY} checkpoints, 1 logs, 0 spikes")
    assert sum(line.lstrip().startswith("log ") for line in out.splitlines()) == 1
    assert err == "" and "Warning" not in out


# --- Adam's bias correction -----------------------------------------------------------------------------------

def _adamw_checkpoint(path: Path, steps: int, drop_step: bool = False) -> tuple[dict, float]:
    """A nanoGPT-style .pt with a real AdamW state after ``steps`` steps (β2 0.999); returns it and the LR."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(16, 12)).pow(2).mean().backward()
        optimizer.step()
    state = optimizer.state_dict()
    if drop_step:
        for entry in state["state"].values():
            entry.pop("step")
    torch.save({"model": model.state_dict(), "optimizer": state, "iter_num": steps}, path)
    return state, 1e-3


def test_issue21_iterate_noise_divides_v_by_adams_bias_correction(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    state, lr = _adamw_checkpoint(path, 60)
    # Independently: Adam's own bias-corrected second moment, v / (1 - β2^t), with t each parameter's step.
    expected = sum(float((s["exp_avg_sq"].double() / (1 - 0.999 ** float(s["step"]))).sqrt().sum())
                   for s in state["state"].values())
    raw = sum(float(s["exp_avg_sq"].double().sqrt().sum()) for s in state["state"].values())
    noise = iterate_noise(CheckpointRef(60, path, detect_layout(path), (path,), 0))
    assert noise.excess_at(lr) == pytest.approx(lr * expected / 4, rel=1e-9)
    assert noise.sqrt_v_sum == pytest.approx(raw, rel=1e-9)
    assert expected / raw == pytest.approx(1 / math.sqrt(1 - 0.999 ** 60)) == pytest.approx(4.14, abs=0.01)
    assert (noise.adam_step, noise.adam_step_source, noise.beta2, noise.beta2_source) == (
        60, "optimizer state", 0.999, "optimizer state")
    assert "bias-corrected for 60 optimizer steps (from the optimizer state) at β2 0.999" in noise.describe(lr)


def test_issue21_without_a_saved_step_the_checkpoint_step_is_used_and_said(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    state, lr = _adamw_checkpoint(path, 60, drop_step=True)
    noise = iterate_noise(CheckpointRef(60, path, detect_layout(path), (path,), 0))
    assert (noise.adam_step, noise.adam_step_source) == (60, "checkpoint step")
    raw = sum(float(s["exp_avg_sq"].double().sqrt().sum()) for s in state["state"].values())
    assert noise.excess_at(lr) == pytest.approx(lr * raw / math.sqrt(1 - 0.999 ** 60) / 4, rel=1e-9)


def test_issue21_the_json_and_the_note_name_the_step_count_used(tmp_path: Path) -> None:
    root = tmp_path / "run"
    (root / "ckpt").mkdir(parents=True)
    for steps in (50, 60):
        _adamw_checkpoint(root / "ckpt" / f"step_{steps}.pt", steps)
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": 1.0 + 1.0 / s, "lr": 1e-3}) + "\n"
                                                for s in (50, 60)))
    run = open_run(root)
    signals = assess_run(run)
    report = analysis_report(run, signals)["iterate_noise"]
    assert report["bias_correction"]["optimizer_steps"] == 60 and report["bias_correction"]["steps_from"] == "optimizer state"
    assert report["bias_correction"]["factor"] == pytest.approx(1 / math.sqrt(1 - 0.999 ** 60))
    assert "bias-corrected for 60 optimizer steps" in recommend(signals).basis_note


# --- nanoGPT: one ckpt.pt, overwritten at every save -----------------------------------------------------------

@pytest.mark.skipif(not NANOGPT_LOG.is_file(), reason="the real nanoGPT logs (../shared/real_logs) are absent")
def test_issue21_nanogpts_single_checkpoint_says_the_saves_were_overwritten(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "nanogpt"
    (root / "out").mkdir(parents=True)
    shutil.copy(NANOGPT_LOG, root / "train.log")   # 1000 iters, "saving checkpoint" after the evals at 250-1000
    nanogpt_ckpt(root / "out" / "ckpt.pt", iter_num=1000)
    signals = assess_run(open_run(root))
    assert signals.logged_saves == (250, 500, 750, 1000)
    rec = recommend(signals)
    assert [r.step for r in rec.checkpoints] == [1000]
    assert rec.summary == ("Keep the only checkpoint (step 1000): the logs show 4 saves (steps 250, 500, 750, 1000) "
                           "but one file is kept, each save having overwritten the one before, so there is nothing "
                           "to average.")
    assert "ckpt_{iter}.pt" in rec.basis_note and "next older" not in rec.summary + rec.basis_note
    assert rec.predicted_gain in (None, 0.0)
    assert cli.main(["analyze", str(root), "--no-similarity"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint time not separable: every save coincided with an eval" in out and "checkpoint 0.0%" not in out
