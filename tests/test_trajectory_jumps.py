"""A relaunch with a new init into the same folder, step numbers continuing, is never averaged with the first run (issue 21).

The runs are trained here by a plain torch loop in nanoGPT's layout (``ckpt_{step}.pt`` dicts with ``model``,
``optimizer``, ``iter_num``; a JSONL log of train and val loss): a byte-level bigram LM on the standard
library's sources, AdamW at constant LR, a checkpoint and a val loss every 100 steps.

- ``relaunched``: run A trains steps 1-500 (seed 1); run B starts again from a fresh init (seed 2), its step
  counter continuing at 501 (a trainer state resumed without the weights) and saves 600-1000 in the same folder.
- ``resumed``: run A trains to 500, is reloaded from ``ckpt_500.pt`` (weights and Adam state) and continues to
  1000 in the same folder: one trajectory, one run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from analysis.cli import main
from analysis.run import open_run
from analysis.run_groups import TRAJECTORY_JUMP_FACTOR, trajectory_jumps
from analysis.selection import recommend
from analysis.signals import assess_run
from ckpt_factories import stdlib_bytes

EVERY = 100
DATA = stdlib_bytes(200_000)
TRAIN, VAL = DATA[:180_000], DATA[180_000:]


class Bigram(nn.Module):
    """Next byte from the current one: an embedding, a tanh layer, a norm and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(256, 32)
        self.fc = nn.Linear(32, 32)
        self.ln = nn.LayerNorm(32)
        self.head = nn.Linear(32, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(torch.tanh(self.fc(self.wte(x)))))


def _loss(model: Bigram, data: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(data[index]), data[index + 1])


class Trainer:
    """One launch: a model, its AdamW, and the folder it saves into."""

    def __init__(self, root: Path, seed: int) -> None:
        torch.manual_seed(seed)
        self.root, self.model = root, Bigram()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-3, weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(seed + 100)

    def resume(self, path: Path) -> None:
        """Weights and Adam state from a checkpoint, as nanoGPT's ``init_from='resume'`` does."""
        ckpt = torch.load(path, weights_only=True)
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])

    def train(self, first: int, last: int) -> None:
        """Steps ``first..last`` (inclusive), a checkpoint and a val loss every ``EVERY`` steps."""
        rows = []
        for step in range(first, last + 1):
            index = torch.randint(len(TRAIN) - 1, (256,), generator=self.gen)
            loss = _loss(self.model, TRAIN, index)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            rows.append({"step": step, "train/loss": loss.item()})
            if step % EVERY == 0:
                with torch.no_grad():
                    val = _loss(self.model, VAL, torch.arange(0, len(VAL) - 1, 7))
                rows.append({"step": step, "val/loss": float(val)})
                torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "iter_num": step},
                           self.root / f"ckpt_{step}.pt")
        with (self.root / "log.jsonl").open("a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def relaunched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run A (seed 1) saves 100-500; run B, a fresh init (seed 2), continues the step count and saves 600-1000."""
    root = tmp_path_factory.mktemp("relaunched")
    Trainer(root, seed=1).train(1, 500)
    Trainer(root, seed=2).train(501, 1000)
    return root


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run A saves 100-500, is reloaded from ckpt_500.pt and continues to 1000 in the same folder."""
    root = tmp_path_factory.mktemp("resumed")
    Trainer(root, seed=1).train(1, 500)
    again = Trainer(root, seed=3)
    again.resume(root / "ckpt_500.pt")
    again.train(501, 1000)
    return root


def test_rule_judges_each_interval_by_its_neighbours_issue21() -> None:
    """Issue 21: a distance over 4x its neighbours' (scaled to its step gap) is a jump; a longer gap is not."""
    steps = [100, 200, 300, 400, 600]
    assert trajectory_jumps(steps, [1.0, 0.8, 0.7, 1.3]) == []             # 200 steps may move twice as far
    jumps = trajectory_jumps(steps, [1.0, 0.8, 9.0, 0.6])
    assert [(j.before_step, j.after_step) for j in jumps] == [(300, 400)]
    assert jumps[0].ratio == pytest.approx(9.0 / 0.8) and jumps[0].ratio > TRAJECTORY_JUMP_FACTOR
    assert trajectory_jumps([100, 200], [50.0]) == []                      # no neighbour, no verdict
    assert trajectory_jumps(steps, [1.0, None, 9.0, None]) == []           # unknown neighbours explain nothing
    # A weight spike keeps the weights it hit (cosine near 1): a layer flag (issue 25), never another run.
    assert trajectory_jumps(steps, [1.0, 0.8, 9.0, 0.6], [0.99, 0.99, 0.97, 0.99]) == []
    assert len(trajectory_jumps(steps, [1.0, 0.8, 9.0, 0.6], [0.99, 0.99, 0.02, 0.99])) == 1


def test_relaunch_with_new_init_is_never_averaged_across_issue21(relaunched: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """Issue 21: steps 100-500 of run A and 600-1000 of a fresh init B: the recipe keeps to B and says why."""
    run = open_run(relaunched)
    assert [c.step for c in run.checkpoints] == list(range(100, 1001, 100))   # one folder, steps continue
    signals = assess_run(run)
    older = [c for c in signals.checkpoints if c.ref.step <= 500]
    assert all(c.mismatch is not None and "another run" in c.mismatch and "step 500 to step 600" in c.mismatch
               for c in older)
    assert "cosine 0.0" in older[0].mismatch   # unrelated weights: a new init
    # B's first save is not a "spike in weight space": the layer flags compare B's saves only.
    assert all(c.mismatch is None and c.abnormal is None for c in signals.checkpoints if c.ref.step >= 600)
    rec = recommend(signals)
    assert min(r.step for r in rec.checkpoints) >= 600
    recipe = tmp_path / "recipe.yaml"
    assert main(["recommend", str(relaunched), "-o", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert min(c["step"] for c in yaml.safe_load(recipe.read_text())["checkpoints"]) >= 600
    assert "another run" in out and "relaunch" in out


def test_resume_on_the_same_trajectory_stays_one_run_issue21(resumed: Path) -> None:
    """Issue 21: a genuine resume (weights and Adam state reloaded) has no jump; every checkpoint stays eligible."""
    signals = assess_run(open_run(resumed))
    assert [c.ref.step for c in signals.checkpoints] == list(range(100, 1001, 100))
    assert all(c.mismatch is None for c in signals.checkpoints)
