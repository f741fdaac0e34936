"""Run identity (issue 21): a folder holding several runs is never read, nor averaged, as one.

Real runs made by Lightning 2.6 (two launches with different seeds into one folder: ``version_0`` and
``version_1``; a run resumed from its last checkpoint), Hugging Face output folders, and a flat folder
whose log starts over.
"""

from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from analysis.cli import main
from analysis.errors import InvalidArgument, SeveralRuns
from analysis.run import find_runs, open_run
from ckpt_factories import hf_checkpoint

L = pytest.importorskip("lightning")


class _Tiny(L.LightningModule):
    """A 4-16-1 regression net: a Lightning run in well under a second on a CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, index):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, index):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _data(seed: int) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _launch(root: Path, seed: int, max_steps: int = 60, ckpt_path: Path | None = None) -> None:
    """One ``trainer.fit``: CSVLogger into root/lightning_logs/version_N, a checkpoint every 10 steps, val every 10."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.seed_everything(seed, verbose=False)
        trainer = L.Trainer(max_steps=max_steps, logger=CSVLogger(root), default_root_dir=root, accelerator="cpu",
                            callbacks=[ModelCheckpoint(every_n_train_steps=10, save_top_k=-1)],
                            enable_progress_bar=False, enable_model_summary=False, val_check_interval=10,
                            check_val_every_n_epoch=None, log_every_n_steps=5, num_sanity_val_steps=0)
        trainer.fit(_Tiny(), _data(0), _data(1), ckpt_path=ckpt_path)


@pytest.fixture(scope="module")
def two_launches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Lightning launched twice, seeds 1 and 2, into one folder: version_0 and version_1."""
    root = tmp_path_factory.mktemp("two_launches")
    _launch(root, seed=1)
    _launch(root, seed=2)
    return root


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Lightning fit to step 30, then fit again to 60 from the last checkpoint (Lightning writes version_1)."""
    root = tmp_path_factory.mktemp("resumed")
    _launch(root, seed=1, max_steps=30)
    last = max((root / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    _launch(root, seed=1, max_steps=60, ckpt_path=last)
    return root


def _csv_val(metrics_csv: Path) -> dict[int, float]:
    """val_loss by step, as Lightning's CSVLogger wrote it."""
    with metrics_csv.open() as handle:
        return {int(r["step"]): float(r["val_loss"]) for r in csv.DictReader(handle) if r.get("val_loss")}


def test_two_lightning_launches_are_refused_naming_both_issue21(two_launches: Path) -> None:
    with pytest.raises(SeveralRuns, match="holds 2 runs") as caught:
        open_run(two_launches)
    message = str(caught.value)
    assert "'version_0'" in message and "'version_1'" in message and "--run NAME" in message
    assert str(two_launches / "lightning_logs" / "version_1") in message
    runs = find_runs(two_launches)
    assert [(r.name, r.steps) for r in runs] == [("version_0", (10, 20, 30, 40, 50, 60)),
                                                 ("version_1", (10, 20, 30, 40, 50, 60))]
    assert [r.logs for r in runs] == [(r.path / "metrics.csv",) for r in runs]


def test_version_folder_opens_alone_with_its_own_val_issue21(two_launches: Path) -> None:
    folder = two_launches / "lightning_logs" / "version_1"
    run = open_run(folder)
    assert [c.step for c in run.checkpoints] == [10, 20, 30, 40, 50, 60]
    assert all(c.path.is_relative_to(folder) for c in run.checkpoints)
    assert [t.path for t in run.logs] == [folder / "metrics.csv"]
    logged = run.metric("val_loss")
    assert dict(zip(logged["step"].tolist(), logged["value"].tolist())) == pytest.approx(_csv_val(folder / "metrics.csv"))
    other = _csv_val(two_launches / "lightning_logs" / "version_0" / "metrics.csv")
    assert set(logged["value"].tolist()).isdisjoint(other.values())


def test_run_name_picks_one_and_unknown_name_is_refused_issue21(two_launches: Path) -> None:
    run = open_run(two_launches, run_name="version_0")
    assert all("version_0" in c.path.parts for c in run.checkpoints) and len(run.checkpoints) == 6
    with pytest.raises(InvalidArgument, match="no run named 'version_9'.*'version_0', 'version_1'"):
        open_run(two_launches, run_name="version_9")


def test_recommend_run_option_keeps_to_that_run_issue21(two_launches: Path, tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "recipe.yaml"
    assert main(["recommend", str(two_launches), "--run", "version_1", "-o", str(recipe)]) == 0
    paths = [Path(e["path"]) for e in yaml.safe_load(recipe.read_text())["checkpoints"]]
    assert paths, recipe.read_text()
    version_1 = two_launches / "lightning_logs" / "version_1"
    assert all((p if p.is_absolute() else (recipe.parent / p).resolve()).is_relative_to(version_1) for p in paths)
    assert "version_0" not in recipe.read_text()


def test_analyze_folder_of_two_runs_exits_2_on_one_line_issue21(two_launches: Path, capsys) -> None:
    assert main(["analyze", str(two_launches), "--no-similarity"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "version_0" in err and "version_1" in err and "--run" in err
    assert main(["analyze", str(two_launches), "--run", "version_0", "--no-similarity", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["step"] for c in doc["checkpoints"]] == [10, 20, 30, 40, 50, 60]


def test_resumed_lightning_run_stays_one_run_issue21(resumed: Path) -> None:
    runs = find_runs(resumed)
    assert len(runs) == 1 and runs[0].steps == (10, 20, 30, 40, 50, 60)
    assert "resumed in version_1" in runs[0].reason
    run = open_run(resumed)
    assert [c.step for c in run.checkpoints] == [10, 20, 30, 40, 50, 60]
    assert len(run.logs) == 2
    assert max(run.metric("val_loss")["step"]) > 30   # the resumed part's val is there too


def test_relaunch_from_scratch_after_the_first_is_not_a_resume_issue21(tmp_path: Path) -> None:
    """version_1 saves after version_0's last step but from another seed's weights: a jump, two runs."""
    _launch(tmp_path, seed=1, max_steps=30)
    _launch(tmp_path, seed=2, max_steps=60)
    later = tmp_path / "lightning_logs" / "version_1" / "checkpoints"
    for ckpt in list(later.glob("*.ckpt")):
        step = int(ckpt.stem.split("step=")[1])
        if step <= 30:
            ckpt.unlink()   # as if it had only kept its saves after step 30
    assert [r.name for r in find_runs(tmp_path)] == ["version_0", "version_1"]


def test_two_hf_output_folders_are_two_runs_issue21(tmp_path: Path) -> None:
    for name, seed in (("out_a", 0), ("out_b", 1)):
        for step in (10, 20):
            hf_checkpoint(tmp_path / name / f"checkpoint-{step}", step, seed=seed + step)
        (tmp_path / name / "trainer_state.json").write_text(json.dumps(
            {"global_step": 20, "log_history": [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.5}]}))
    runs = find_runs(tmp_path)
    assert [(r.name, r.steps) for r in runs] == [("out_a", (10, 20)), ("out_b", (10, 20))]
    with pytest.raises(SeveralRuns, match="'out_a'.*'out_b'"):
        open_run(tmp_path)
    run = open_run(tmp_path / "out_b")
    assert [c.step for c in run.checkpoints] == [10, 20]
    assert all(c.path.parent == tmp_path / "out_b" for c in run.checkpoints)


def test_flat_folder_whose_log_starts_over_is_never_one_run_issue21(tmp_path: Path) -> None:
    rows = [{"step": s, "train_loss": 3.0 - 0.02 * s} for s in range(0, 51, 5)]
    rows += [{"step": s, "train_loss": 5.0 - 0.01 * s} for s in range(0, 51, 5)]   # another launch
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for seed in (1, 2):
        torch.manual_seed(seed)
        for step in (25, 50):
            save_file({"w": torch.randn(8, 8)}, str(tmp_path / f"seed{seed}_step{step}.safetensors"))
    with pytest.raises(SeveralRuns, match="metrics.jsonl starts over.*'seed1_step\\*.safetensors' \\(2 checkpoints.*'seed2_step\\*"):
        open_run(tmp_path)
    run = open_run(tmp_path, run_name="seed2_step*.safetensors")
    assert [c.path.name for c in run.checkpoints] == ["seed2_step25.safetensors", "seed2_step50.safetensors"]
    assert run.logs == () and any("holds several runs" in n for n in run.notes)


def test_log_starting_over_without_repeated_checkpoints_is_refused_issue21(tmp_path: Path) -> None:
    rows = [{"step": s, "train_loss": 3.0 - 0.02 * s} for s in range(0, 51, 5)]
    rows += [{"step": s, "train_loss": 5.0 - 0.01 * s} for s in range(0, 51, 5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    save_file({"w": torch.randn(8, 8)}, str(tmp_path / "step_50.safetensors"))
    with pytest.raises(SeveralRuns, match="metrics.jsonl starts over at step 0"):
        open_run(tmp_path)


def test_log_resumed_past_step_0_stays_one_run_issue21(tmp_path: Path) -> None:
    rows = [{"step": s, "train_loss": 3.0 - 0.02 * s} for s in range(0, 51, 5)]
    rows += [{"step": s, "train_loss": 3.0 - 0.02 * s} for s in range(30, 101, 5)]   # resumed from step 30
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for step in (50, 100):
        save_file({"w": torch.full((8, 8), step / 100)}, str(tmp_path / f"step_{step}.safetensors"))
    run = open_run(tmp_path)
    assert [c.step for c in run.checkpoints] == [50, 100] and len(run.logs) == 1


def test_app_offers_the_runs_of_a_folder_and_shows_the_chosen_one_issue21(
        two_launches: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    from conftest import REPO
    monkeypatch.setenv("CKPT_SELECT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CKPT_SELECT_RUN", str(two_launches))
    monkeypatch.delenv("CKPT_SELECT_ROOT", raising=False)
    at = AppTest.from_file(str(REPO / "app" / "streamlit_app.py"), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    assert "holds 2 runs" in at.error[0].value   # never one run of 12 checkpoints
    assert "Choose one of this folder's runs in the sidebar" in at.info[0].value
    choice = at.selectbox(key="run_in_folder")
    versions = [two_launches / "lightning_logs" / f"version_{i}" for i in (0, 1)]
    assert choice.options == [f"version_{i} (6 checkpoints)" for i in (0, 1)]
    choice.set_value(str(versions[1])).run()
    assert not at.exception, at.exception
    assert not at.error and at.title[0].value == "version_1"
    assert at.selectbox(key="run_in_folder").value == str(versions[1])   # the folder's runs stay offered
    overlay = at.multiselect(key="overlay_pick")
    assert str(versions[0]) in overlay.options
    overlay.set_value([str(versions[0])]).run()
    assert not at.exception, at.exception
    traces = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    assert any("version_0" in (t.get("name") or "") for t in traces), [t.get("name") for t in traces]


def test_logs_stop_and_storage_take_the_run_too_issue21(two_launches: Path, capsys) -> None:
    version_1 = two_launches / "lightning_logs" / "version_1"
    assert main(["logs", str(two_launches), "--run", "version_1", "--json"]) == 0
    assert [d["path"] for d in json.loads(capsys.readouterr().out)["logs"]] == [str(version_1 / "metrics.csv")]
    assert main(["storage", "--run", str(two_launches), "--params", "1e6"]) == 2
    assert "holds 2 runs" in capsys.readouterr().err
    assert main(["storage", "--run", str(two_launches), "--run-name", "version_1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] > 0
    assert main(["stop", str(two_launches)]) == 2
    assert "version_0" in capsys.readouterr().err
