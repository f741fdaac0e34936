"""Field runs: runs made by the real libraries, the recommendation against the last checkpoint and a brute force.

For each framework a user trains with, a tiny model is trained here, by that framework's own code,
on the Python standard library's sources (the sample runs' corpus, ``sample_runs/tinygpt.py``):

- ``hf_trainer``: transformers' ``Trainer`` (``sample_runs/make_hf_run.py``), GPT-2, constant LR,
  weights only (``save_only_model``), eval at every save: the run of issue 21's harmful average.
- ``lightning``: Lightning's ``Trainer`` with ``CSVLogger`` and ``ModelCheckpoint`` every N steps, cosine LR.
- ``dcp``: a plain torch loop saving ``torch.distributed.checkpoint`` folders, a JSONL log, constant LR.
- ``nanogpt``: nanoGPT's ``train.py`` layout (its checkpoint dict, its stdout as ``train.log``, cosine
  LR with warmup), one ``ckpt_ITER.pt`` per save; ``nanogpt_single`` is the same run as nanoGPT
  leaves it by default: one ``out/ckpt.pt`` overwritten at every eval.

Then, for each run: ``python -m analysis recommend RUN -o recipe.yaml`` (the CLI, as a user runs it),
and every average is scored independently here (float32 weighted mean of the checkpoints' tensors,
loaded with the framework's own loader; mean cross-entropy in nats per byte on the corpus's test
split, never seen by training or by the recommender). Reported: the last checkpoint, the
recommendation, the best uniform average of a contiguous window of the newest ``--k`` checkpoints
(brute force), capture = (last − rec) / (last − best) and harm = rec worse than last.

    python benchmarks/field_runs.py --out benchmarks/results/field_runs.json --doc docs/field-benchmark.md

19 minutes on a 2-core machine under a load average of ~13 (other jobs); less when idle. Runs are trained into ``--work`` (a temporary folder by default).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "sample_runs"))

from tinygpt import GPT, GPTConfig, evaluate_loss, load_corpus  # noqa: E402

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Settings:
    """One size for every framework's run, small enough for ~5 minutes on 2 cores."""

    steps: int = 300
    save_every: int = 20
    log_every: int = 5
    batch_size: int = 16
    block_size: int = 64
    lr: float = 3e-3
    k: int = 10              # the brute force averages windows of the newest k checkpoints
    seed: int = 21


@dataclass
class FieldRun:
    """A trained run: its folder, its checkpoints (oldest first), and how to load and score one."""

    name: str
    made_by: str
    folder: Path
    checkpoints: list[tuple[int, Path]]
    load: Callable[[Path], StateDict]
    score: Callable[[StateDict], float]
    train_seconds: float


@dataclass
class Result:
    """One row of the table (losses: nats per byte on the test split)."""

    run: str
    made_by: str
    checkpoints: int
    last_step: int
    last: float
    rec_steps: list[int] = field(default_factory=list)
    rec_weights: list[float] = field(default_factory=list)
    rec: float | None = None
    best_steps: list[int] = field(default_factory=list)
    best: float | None = None
    capture: float | None = None
    harm: bool | None = None
    rec_minus_last: float | None = None
    note: str = ""
    train_seconds: float = 0.0


def _gpt_config(s: Settings) -> GPTConfig:
    return GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=s.block_size)


def _batches(data: np.ndarray, s: Settings, seed: int):
    """Random training windows, as nanoGPT's get_batch draws them."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.from_numpy(data.astype(np.int64))
    while True:
        ix = torch.randint(len(tokens) - s.block_size - 1, (s.batch_size,), generator=gen)
        yield (torch.stack([tokens[i:i + s.block_size] for i in ix]),
               torch.stack([tokens[i + 1:i + 1 + s.block_size] for i in ix]))


def _cosine_lr(step: int, s: Settings, warmup: int = 20) -> float:
    """nanoGPT's get_lr: linear warmup, cosine decay to a tenth."""
    if step < warmup:
        return s.lr * (step + 1) / (warmup + 1)
    ratio = (step - warmup) / max(1, s.steps - warmup)
    return s.lr / 10 + 0.5 * (1 + math.cos(math.pi * min(ratio, 1.0))) * (s.lr - s.lr / 10)


def _gpt_score(test: np.ndarray, s: Settings) -> Callable[[StateDict], float]:
    config = _gpt_config(s)
    return lambda sd: evaluate_loss({k.removeprefix("_orig_mod."): v.float() for k, v in sd.items()}, test, config)


# --- the four frameworks ------------------------------------------------------------------------------

def make_hf_trainer(root: Path, corpus, s: Settings) -> FieldRun:
    """transformers' Trainer through sample_runs/make_hf_run.py: GPT-2, constant LR, weights only."""
    import transformers
    from safetensors.torch import load_file
    folder = root / "hf_trainer"
    started = time.time()
    subprocess.run([sys.executable, str(REPO / "sample_runs" / "make_hf_run.py"), "--out", str(folder), "--overwrite",
                    "--schedule", "constant_with_warmup", "--warmup", "0", "--lr", str(s.lr), "--steps", str(s.steps),
                    "--ckpt-every", str(s.save_every), "--log-every", str(s.log_every),
                    "--batch-size", str(s.batch_size), "--block-size", str(s.block_size), "--seed", str(s.seed),
                    "--save-only-model"], check=True, cwd=REPO)
    seconds = time.time() - started
    config = transformers.AutoConfig.from_pretrained(folder / "model_config")
    checkpoints = sorted((int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*"))

    def score(sd: StateDict) -> float:
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.load_state_dict(sd, strict=False)   # the tied lm_head is not stored
        model.tie_weights()
        return _hf_loss(model, corpus.test, s.block_size)

    return FieldRun("hf_trainer", f"transformers {transformers.__version__} Trainer", folder, checkpoints,
                    lambda p: load_file(str(p / "model.safetensors")), score, seconds)


@torch.no_grad()
def _hf_loss(model, data: np.ndarray, block: int) -> float:
    """Mean next-byte cross-entropy over every non-overlapping window (the model shifts the labels)."""
    model.eval()
    n = len(data) // block
    tokens = torch.from_numpy(data[:n * block].astype(np.int64)).view(n, block)
    losses = [model(input_ids=tokens[i:i + 64], labels=tokens[i:i + 64]).loss.item() * len(tokens[i:i + 64])
              for i in range(0, n, 64)]
    return sum(losses) / n


def make_lightning(root: Path, corpus, s: Settings) -> FieldRun:
    """Lightning's Trainer: CSVLogger, ModelCheckpoint every save_every steps, val at the same interval."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = GPT(_gpt_config(s))

        def training_step(self, batch, batch_idx):
            _, loss = self.model(*batch)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            _, loss = self.model(*batch)
            self.log("val_loss", loss)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=s.lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _cosine_lr(step, s) / s.lr)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    folder = root / "lightning"
    train = _window_dataset(corpus.train, s, s.steps * s.batch_size, random=True)
    val = _window_dataset(corpus.val, s, None, random=False)
    torch.manual_seed(s.seed)
    saver = ModelCheckpoint(every_n_train_steps=s.save_every, save_top_k=-1, filename="{epoch}-{step}")
    trainer = L.Trainer(max_steps=s.steps, val_check_interval=s.save_every, callbacks=[saver],
                        logger=CSVLogger(folder), log_every_n_steps=s.log_every, accelerator="cpu", devices=1,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    started = time.time()
    trainer.fit(Module(), torch.utils.data.DataLoader(train, batch_size=s.batch_size),
                torch.utils.data.DataLoader(val, batch_size=128))
    seconds = time.time() - started
    checkpoints = sorted((int(p.stem.split("step=")[1]), p) for p in folder.rglob("*.ckpt"))

    def load(path: Path) -> StateDict:
        return {k.removeprefix("model."): v for k, v in torch.load(path, weights_only=True)["state_dict"].items()}

    return FieldRun("lightning", f"lightning {L.__version__} Trainer", folder, checkpoints, load,
                    _gpt_score(corpus.test, s), seconds)


def _window_dataset(data: np.ndarray, s: Settings, count: int | None, random: bool):
    """(x, y) windows: ``count`` random ones (training) or every non-overlapping one (validation)."""
    tokens = torch.from_numpy(data.astype(np.int64))
    if random:
        gen = torch.Generator().manual_seed(s.seed)
        starts = torch.randint(len(tokens) - s.block_size - 1, (count,), generator=gen)
    else:
        starts = torch.arange(0, len(tokens) - s.block_size - 1, s.block_size)
    x = torch.stack([tokens[i:i + s.block_size] for i in starts])
    y = torch.stack([tokens[i + 1:i + 1 + s.block_size] for i in starts])
    return torch.utils.data.TensorDataset(x, y)


def make_dcp(root: Path, corpus, s: Settings) -> FieldRun:
    """A plain torch loop saving torch.distributed.checkpoint folders and a JSONL log; constant LR."""
    import torch.distributed.checkpoint as dcp
    folder = root / "dcp"
    folder.mkdir(parents=True)
    torch.manual_seed(s.seed)
    model = GPT(_gpt_config(s))
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr)
    started = time.time()
    with (folder / "metrics.jsonl").open("w") as log, warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "torch.distributed is disabled ... single process": as intended
        for step, (x, y) in zip(range(1, s.steps + 1), _batches(corpus.train, s, s.seed)):
            _, loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % s.log_every == 0:
                log.write(json.dumps({"step": step, "train_loss": round(loss.item(), 5), "lr": s.lr}) + "\n")
            if step % s.save_every == 0:
                log.write(json.dumps({"step": step, "val_loss": round(evaluate_loss(model, corpus.val), 5)}) + "\n")
                dcp.save({"model": model.state_dict()}, checkpoint_id=folder / f"step_{step}")
    seconds = time.time() - started

    def load(path: Path) -> StateDict:
        state = {"model": GPT(_gpt_config(s)).state_dict()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=path)
        return state["model"]

    checkpoints = sorted((int(p.name.split("_")[1]), p) for p in folder.glob("step_*"))
    return FieldRun("dcp", f"torch {torch.__version__} distributed.checkpoint", folder, checkpoints, load,
                    _gpt_score(corpus.test, s), seconds)


def make_nanogpt(root: Path, corpus, s: Settings) -> list[FieldRun]:
    """nanoGPT's train.py, reduced to what it writes: its checkpoint dict, its stdout lines, cosine LR.

    Two runs of one training: ``nanogpt`` keeps one ``ckpt_ITER.pt`` per save (the change CkptSelect
    asks for); ``nanogpt_single`` is what train.py leaves: ``out/ckpt.pt``, overwritten at each eval.
    """
    folder, single = root / "nanogpt", root / "nanogpt_single"
    (folder / "out").mkdir(parents=True)
    (single / "out").mkdir(parents=True)
    torch.manual_seed(s.seed)
    config = _gpt_config(s)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.1)
    lines, best_val = [], 1e9
    started = time.time()
    for it, (x, y) in zip(range(0, s.steps + 1), _batches(corpus.train, s, s.seed)):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(it, s)
        if it % s.save_every == 0 and it > 0:
            val, train = evaluate_loss(model, corpus.val), evaluate_loss(model, corpus.train[:65536])
            lines.append(f"step {it}: train loss {train:.4f}, val loss {val:.4f}")
            best_val = min(best_val, val)
            lines.append(f"saving checkpoint to {folder / 'out'}")
            ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "model_args": asdict(config),
                    "iter_num": it, "best_val_loss": best_val, "config": {"learning_rate": s.lr}}
            torch.save(ckpt, folder / "out" / f"ckpt_{it}.pt")
            torch.save(ckpt, single / "out" / "ckpt.pt")
        if it == s.steps:
            break
        tick = time.time()
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if it % s.log_every == 0:
            lines.append(f"iter {it}: loss {loss.item():.4f}, time {(time.time() - tick) * 1000:.2f}ms, mfu -100.00%")
    seconds = time.time() - started
    for target in (folder, single):
        (target / "train.log").write_text("\n".join(lines) + "\n")

    def load(path: Path) -> StateDict:
        return torch.load(path, weights_only=True)["model"]

    score = _gpt_score(corpus.test, s)
    made_by = "nanoGPT train.py layout (this repo's loop)"
    checkpoints = sorted((int(p.stem.split("_")[1]), p) for p in (folder / "out").glob("ckpt_*.pt"))
    return [FieldRun("nanogpt", made_by + ", one file per save", folder, checkpoints, load, score, seconds),
            FieldRun("nanogpt_single", made_by + ", ckpt.pt overwritten", single,
                     [(s.steps, single / "out" / "ckpt.pt")], load, score, 0.0)]


# --- judging ------------------------------------------------------------------------------------------

def average(states: list[StateDict], weights: list[float]) -> StateDict:
    """The float32 weighted mean, computed here, independently of CkptSelect's merge."""
    total = sum(weights)
    return {k: sum(w / total * sd[k].float() for sd, w in zip(states, weights)) for k in states[-1]}


def recommend(run: FieldRun, work: Path) -> tuple[list[Path], list[float], str]:
    """What ``python -m analysis recommend RUN -o recipe.yaml`` chose: paths and weights, or the error line."""
    recipe = work / f"{run.name}.recipe.yaml"
    done = subprocess.run([sys.executable, "-m", "analysis", "recommend", str(run.folder), "-o", str(recipe)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        return [], [], (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]
    doc = yaml.safe_load(recipe.read_text())
    paths = [(recipe.parent / c["path"]).resolve() for c in doc["checkpoints"]]
    return paths, [float(c["weight"]) for c in doc["checkpoints"]], done.stdout.strip().splitlines()[0]


def judge(run: FieldRun, work: Path, k: int) -> Result:
    """Last vs recommendation vs the best contiguous window of the newest ``k`` checkpoints."""
    states = {step: run.load(path) for step, path in run.checkpoints[-k:]}
    steps = list(states)
    last = run.score(states[steps[-1]])
    result = Result(run.name, run.made_by, len(run.checkpoints), steps[-1], round(last, 5),
                    train_seconds=round(run.train_seconds, 1))
    windows = {(i, j): run.score(average([states[t] for t in steps[i:j + 1]], [1.0] * (j - i + 1)))
               for i in range(len(steps)) for j in range(i, len(steps))}
    (i, j), best = min(windows.items(), key=lambda item: item[1])
    result.best_steps, result.best = steps[i:j + 1], round(best, 5)
    paths, weights, note = recommend(run, work)
    result.note = note
    if paths:
        by_path = {path.resolve(): step for step, path in run.checkpoints}
        result.rec_steps = [by_path.get(p, -1) for p in paths]
        result.rec_weights = [round(w, 4) for w in weights]
        rec = run.score(average([run.load(p) for p in paths], weights))
        result.rec, result.rec_minus_last = round(rec, 5), round(rec - last, 5)
        result.harm = rec > last
        result.capture = round((last - rec) / (last - best), 3) if last - best > 1e-6 else None
    return result


# --- reporting ----------------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _steps(steps: list[int]) -> str:
    if not steps:
        return "–"
    return f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}–{steps[-1]} ({len(steps)})"


def table(results: list[Result]) -> str:
    """The markdown table of the doc page."""
    rows = ["| run | made by | ckpts | last (step) | recommendation (steps) | best window (steps) | capture | harm |",
            "|---|---|---:|---|---|---|---:|---|"]
    for r in results:
        harm = "–" if r.harm is None else (f"**yes** (+{r.rec_minus_last:.4f})" if r.harm else "no")
        rows.append(f"| `{r.run}` | {r.made_by} | {r.checkpoints} | {_fmt(r.last)} ({r.last_step}) | "
                    f"{_fmt(r.rec)} ({_steps(r.rec_steps)}) | {_fmt(r.best)} ({_steps(r.best_steps)}) | "
                    f"{_fmt(r.capture, 2)} | {harm} |")
    return "\n".join(rows)


def write_doc(path: Path, doc: dict) -> None:
    """docs/field-benchmark.md: the table, the machine, the date, how to rerun, what each row says."""
    results = [Result(**r) for r in doc["results"]]
    harmed = [r.run for r in results if r.harm]
    notes = "\n".join(f"- `{r.run}`: {r.note}" for r in results)
    summary = (f"On runs made by transformers, Lightning, torch DCP and nanoGPT's layout, the recommendation vs the last "
               f"checkpoint and the best average: harmful on {len(harmed)} of {len(results)} runs as measured.")
    path.write_text(f"""# Field benchmark: runs made by the real libraries

{summary}

Measured {doc['date']} on {doc['machine']} ({doc['threads']}), **a machine shared with other jobs while it ran**
(times are under load), CkptSelect at commit `{doc['commit']}`. Each run trains a tiny model ({doc['settings']['steps']}
steps, a checkpoint every {doc['settings']['save_every']}) on the Python standard library's sources with the
framework's own code; losses are nats per byte on the corpus's test split, which neither training nor the
recommender saw. The recommendation is `python -m analysis recommend RUN -o recipe.yaml` (no evaluator); every
average is recomputed here in float32 from the checkpoints. Best window: the best uniform average of a contiguous
window of the newest {doc['settings']['k']} checkpoints (brute force). Capture = (last − rec) / (last − best);
harm = the recommendation scores worse than the last checkpoint.

{table(results)}

What `recommend` printed first for each run:

{notes}

These numbers are measured as CkptSelect stood at that commit, with issue 21's open bugs (run identity, the
Lightning eval alignment, the val band on a falling loss, DeepSpeed/Megatron readers) fixed or not as they
were then. Rerun after a change ({doc['total_minutes']:.0f} minutes here, on the shared machine above):

    python benchmarks/field_runs.py --out benchmarks/results/field_runs.json --doc docs/field-benchmark.md
""")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "field_runs.json")
    p.add_argument("--doc", type=Path, help="also write the docs page (docs/field-benchmark.md)")
    p.add_argument("--work", type=Path, help="where the runs are trained (default: a temporary folder, removed)")
    p.add_argument("--only", nargs="*", help="frameworks to run (hf_trainer lightning dcp nanogpt)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    settings = Settings()
    started = time.time()
    work = args.work or Path(tempfile.mkdtemp(prefix="field-runs-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus()
    makers = {"hf_trainer": make_hf_trainer, "lightning": make_lightning, "dcp": make_dcp, "nanogpt": make_nanogpt}
    results = []
    try:
        for name, make in makers.items():
            if args.only and name not in args.only:
                continue
            made = make(work / "runs", corpus, settings)
            for run in made if isinstance(made, list) else [made]:
                results.append(judge(run, work, settings.k))
                print(json.dumps(asdict(results[-1])), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    doc = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit.strip(),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                      f"torch {torch.__version__}", "threads": "1 torch thread per run",
           "settings": asdict(settings), "total_minutes": round((time.time() - started) / 60, 1),
           "results": [asdict(r) for r in results]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(results))
    if args.doc:
        write_doc(args.doc, doc)


if __name__ == "__main__":
    main()
