"""Train a tiny byte-level GPT on CPU and write a run folder the way real trainers do.

The defaults, with the AdamW state kept in the last checkpoint, make the shipped sample run
(about three minutes on two CPU cores):

    .venv/bin/python sample_runs/make_sample_run.py --out sample_runs/stdlib-gpt --save-optimizer last

The run warms up, then trains at a constant learning rate (the regime in which averaging
recent checkpoints helps), and takes one LR excursion (``--spike-steps``: the LR is multiplied
by ``--spike-lr-mult`` for ``--spike-len`` steps), which causes a real loss spike and recovery;
a checkpoint is saved inside the recovery so a selection tool has something to leave out.
Every dynamic is a flag, so benchmarks can generate runs of other shapes (cosine or
warmup-stable-decay schedules, corrupted batches, a post-norm model, bf16 checkpoints).

Layout written (other code depends on it):

    DIR/checkpoints/step_{step:06d}.safetensors   state dict, metadata {"step", "tokens", "format": "pt"}
    DIR/metrics.jsonl    train rows {"step", "train_loss", "lr", "grad_norm", "step_time_ms", "tokens",
                         "wall_time"} every step; val rows {"step", "val_loss", "wall_time"} at every
                         eval step and every checkpoint step
    DIR/config.json      model config, hyper-parameters, events (spikes, corrupt batches), corpus
    DIR/data/val.bin, DIR/data/test.bin   the held-out bytes
    DIR/model.py, DIR/evaluate.py          a copy of tinygpt.py and the run's evaluator
    DIR/README.md        how the run was made

The checkpoint saved after N optimizer steps is step N, and so is the train row of the update
that produced it. The output head is tied to the token embedding and stored once, as
``transformer.wte.weight`` (see tinygpt.py).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tinygpt import GPT, Corpus, GPTConfig, evaluate_loss, load_corpus  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RECOVERY_BASELINE_STEPS = 50  # train rows before an excursion that define the pre-spike loss
RECOVERY_SMOOTHING_STEPS = 10  # trailing mean that must come back to that baseline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; the defaults are the shipped sample run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoints and metrics of an existing run")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--steps", type=int, default=2880)
    p.add_argument("--ckpt-every", type=int, default=120)
    p.add_argument("--eval-every", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--schedule", choices=("constant", "cosine", "wsd"), default="constant",
                   help="after warm-up: constant; cosine to 10%% of --lr; or warmup-stable-decay "
                        "(linear decay to 1%% of --lr over the last 20%% of steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--spike-steps", type=_int_list, default=[2395],
                   help="comma-separated first steps of LR excursions ('' for none)")
    p.add_argument("--spike-len", type=int, default=3, help="steps each excursion lasts")
    p.add_argument("--spike-lr-mult", type=float, default=10.0)
    p.add_argument("--corrupt-steps", type=_int_list, default=[],
                   help="comma-separated steps whose batch is uniform random bytes instead of text")
    p.add_argument("--norm", choices=("pre", "post"), default="pre")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of saved checkpoints")
    p.add_argument("--save-optimizer", choices=("none", "last", "all"), nargs="?", const="all", default="none",
                   help="which checkpoints are saved as step_N.pt holding the model and the AdamW state (nanoGPT "
                        "style) instead of step_N.safetensors: none, the last one (a resume file) or all "
                        "(the flag alone)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device to train on (cuda for the bigger benchmark runs)")
    p.add_argument("--stdlib", type=Path, default=None,
                   help="standard-library folder to build the corpus from (default: this Python's)")
    return p.parse_args(argv)


def _int_list(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def base_lr(step: int, args: argparse.Namespace) -> float:
    """The scheduled LR of update ``step`` (1-based), before any excursion."""
    if step <= args.warmup:
        return args.lr * step / args.warmup
    if args.schedule == "cosine":
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    decay_start = int(0.8 * args.steps)
    if args.schedule == "wsd" and step > decay_start:
        progress = (step - decay_start) / max(1, args.steps - decay_start)
        return args.lr * (1 - 0.99 * progress)
    return args.lr


def in_excursion(step: int, args: argparse.Namespace) -> bool:
    """True if update ``step`` runs at the multiplied LR of a spike."""
    return any(s <= step < s + args.spike_len for s in args.spike_steps)


def is_checkpoint_step(step: int, args: argparse.Namespace) -> bool:
    """Checkpoints every ``--ckpt-every`` steps and after the last step."""
    return step % args.ckpt_every == 0 or step == args.steps


def get_batch(train: np.ndarray, args: argparse.Namespace, gen: torch.Generator,
              step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of windows of the train split, or of random bytes at a ``--corrupt-steps`` step.

    Corrupt batches use their own generator, so adding one does not shift the data order of the rest.
    """
    b, t = args.batch_size, args.block_size
    starts = torch.randint(len(train) - t - 1, (b,), generator=gen)
    if step in args.corrupt_steps:
        noise = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        chunk = torch.randint(256, (b, t + 1), generator=noise)
    else:
        chunk = torch.stack([torch.from_numpy(train[s:s + t + 1].astype(np.int64)) for s in starts.tolist()])
    return chunk[:, :-1], chunk[:, 1:]


def save_checkpoint(model: GPT, optimizer: torch.optim.Optimizer | None, ckpt_dir: Path, step: int, tokens: int,
                    dtype: torch.dtype) -> None:
    """The state dict (contiguous copies in ``dtype``) as ``step_N.safetensors`` with step and tokens in the
    metadata; given the optimizer, as ``step_N.pt`` holding ``{"model", "optimizer", "step", "tokens"}``, as
    nanoGPT saves ``ckpt.pt`` (the moments are what lets ``recommend`` estimate the cost of iterate noise).
    """
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if optimizer is None:
        save_file(state, str(ckpt_dir / f"step_{step:06d}.safetensors"),
                  metadata={"step": str(step), "tokens": str(tokens), "format": "pt"})
    else:
        torch.save({"model": state, "optimizer": optimizer.state_dict(), "step": step, "tokens": tokens},
                   ckpt_dir / f"step_{step:06d}.pt")


def prepare_dir(out: Path, overwrite: bool) -> None:
    """Create the run folder; refuse to mix with an earlier run unless ``--overwrite``."""
    ckpt_dir = out / "checkpoints"
    earlier = (list(ckpt_dir.glob("step_*.safetensors")) + list(ckpt_dir.glob("step_*.pt"))
               + [p for p in [out / "metrics.jsonl"] if p.exists()])
    if earlier and not overwrite:
        sys.exit(f"{out} already holds a run ({len(earlier)} files); pass --overwrite to replace it")
    for path in earlier:
        path.unlink()
    (out / "data").mkdir(parents=True, exist_ok=True)
    ckpt_dir.mkdir(exist_ok=True)


def write_static_files(out: Path, corpus: Corpus, config: GPTConfig, args: argparse.Namespace, n_params: int) -> dict:
    """Everything known before training: held-out data, model code, evaluator, a first config.json."""
    corpus.val.tofile(out / "data" / "val.bin")
    corpus.test.tofile(out / "data" / "test.bin")
    shutil.copyfile(HERE / "tinygpt.py", out / "model.py")
    shutil.copyfile(HERE / "run_evaluate.py", out / "evaluate.py")
    run_config = {
        "model": vars(config),
        "n_params": n_params,
        "checkpoint": {"dtype": args.dtype, "tied_weights": {"lm_head.weight": "transformer.wte.weight"}},
        "training": {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "stdlib")},
        "command": command_line(args),
        "made_with": {"python": platform.python_version(), "torch": torch.__version__},
        "events": [],
        "corpus": corpus.description,
    }
    write_json(out / "config.json", run_config)
    return run_config


def command_line(args: argparse.Namespace) -> str:
    """The command as it was given, for config.json and the README."""
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", "sample_runs/make_sample_run.py", *sys.argv[1:]])


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def train(args: argparse.Namespace) -> None:
    """Train, logging every step and writing checkpoints and val rows on schedule."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: the bigger GPU runs train 5x faster
    out: Path = args.out
    prepare_dir(out, args.overwrite)
    corpus = load_corpus(args.stdlib)
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                       block_size=args.block_size, norm=args.norm)
    model = GPT(config).to(args.device)
    run_config = write_static_files(out, corpus, config, args, model.num_params())
    # Built from named parameters when its state is saved, so the state dict names them (torch >= 2.6).
    params = model.named_parameters() if args.save_optimizer != "none" else model.parameters()
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed + 1)
    tokens, started, train_rows = 0, time.time(), []
    with open(out / "metrics.jsonl", "w") as log:
        for step in range(1, args.steps + 1):
            row = train_step(model, optimizer, corpus.train, args, gen, step)
            tokens += args.batch_size * args.block_size
            row.update(tokens=tokens, wall_time=time.time())
            train_rows.append(row)
            log.write(json.dumps(row) + "\n")
            if is_checkpoint_step(step, args):
                keep_state = args.save_optimizer == "all" or (args.save_optimizer == "last" and step == args.steps)
                save_checkpoint(model, optimizer if keep_state else None, out / "checkpoints", step, tokens,
                                DTYPES[args.dtype])
            if step % args.eval_every == 0 or is_checkpoint_step(step, args):
                val = evaluate_loss(model, corpus.val)
                log.write(json.dumps({"step": step, "val_loss": val, "wall_time": time.time()}) + "\n")
                print(f"step {step:5d}  train {row['train_loss']:.4f}  val {val:.4f}  lr {row['lr']:.2e}  "
                      f"{time.time() - started:6.1f}s", flush=True)
            log.flush()
    run_config["events"] = describe_events(train_rows, args)
    run_config["train_seconds"] = round(time.time() - started, 1)
    write_json(out / "config.json", run_config)
    write_readme(out, run_config)


def train_step(model: GPT, optimizer: torch.optim.Optimizer, train_data: np.ndarray, args: argparse.Namespace,
               gen: torch.Generator, step: int) -> dict:
    """One AdamW update with gradient clipping at 1.0; returns the train row (pre-clip grad norm)."""
    t0 = time.perf_counter()
    lr = base_lr(step, args) * (args.spike_lr_mult if in_excursion(step, args) else 1.0)
    for group in optimizer.param_groups:
        group["lr"] = lr
    x, y = (t.to(args.device) for t in get_batch(train_data, args, gen, step))
    _, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return {"step": step, "train_loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
            "step_time_ms": (time.perf_counter() - t0) * 1000}


def pre_spike_mean(losses: np.ndarray, first: int) -> float | None:
    """Mean train loss of the RECOVERY_BASELINE_STEPS updates before step ``first`` (losses[i] is step i + 1)."""
    before = losses[max(0, first - 1 - RECOVERY_BASELINE_STEPS):first - 1]
    return float(before.mean()) if len(before) else None


def recovery_step(losses: np.ndarray, first: int) -> int | None:
    """First step after an excursion starting at ``first`` whose trailing RECOVERY_SMOOTHING_STEPS mean
    train loss is back at the pre-spike mean; None if the run ends first."""
    baseline = pre_spike_mean(losses, first)
    if baseline is None:
        return None
    for i in range(first - 1 + RECOVERY_SMOOTHING_STEPS, len(losses)):
        if losses[i - RECOVERY_SMOOTHING_STEPS + 1:i + 1].mean() <= baseline:
            return i + 1
    return None


def describe_events(train_rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """What each excursion and corrupt batch did, and which checkpoints were saved during a recovery.

    A checkpoint counts as inside a spike from the excursion's first step up to (not including)
    the recovery step: its weights were updated at the raised LR and the loss is not back yet.
    """
    losses = np.array([r["train_loss"] for r in train_rows])
    ckpt_steps = [s for s in range(1, args.steps + 1) if is_checkpoint_step(s, args)]
    events = []
    for first in (s for s in args.spike_steps if s <= args.steps):   # an excursion past the end never ran
        recovered = recovery_step(losses, first)
        end = recovered if recovered is not None else args.steps + 1
        window = losses[first - 1:end - 1]
        events.append({
            "kind": "lr_excursion", "steps": list(range(first, min(first + args.spike_len, args.steps + 1))),
            "lr_mult": args.spike_lr_mult, "pre_spike_train_loss": pre_spike_mean(losses, first),
            "peak_train_loss": float(window.max()), "peak_step": first + int(window.argmax()),
            "recovered_by_step": recovered,
            "checkpoints_inside": [s for s in ckpt_steps if first <= s < end],
        })
    for step in (s for s in args.corrupt_steps if s <= args.steps):
        events.append({"kind": "corrupt_batch", "steps": [step], "what": "a batch of uniform random bytes",
                       "train_loss": float(losses[step - 1])})
    return events


def write_readme(out: Path, run_config: dict) -> None:
    """A README saying how the run was made; measure_averages.py adds the averaging results."""
    t, m, c = run_config["training"], run_config["model"], run_config["corpus"]
    spikes = [e for e in run_config["events"] if e["kind"] == "lr_excursion"]
    spike_text = "\n".join(
        f"- LR x{e['lr_mult']:g} at steps {e['steps'][0]}-{e['steps'][-1]}: train loss "
        f"{e['pre_spike_train_loss']:.3f} -> {e['peak_train_loss']:.3f} (step {e['peak_step']}), "
        f"back to the pre-spike mean by step {e['recovered_by_step']}; checkpoints saved inside the "
        f"recovery: {e['checkpoints_inside'] or 'none'}" for e in spikes) or "- none"
    schedule = {"constant": "constant", "cosine": "cosine decay to 10% of the peak",
                "wsd": "stable, then linear decay to 1% over the last 20% of steps"}[t["schedule"]]
    saved = {"none": f"`step_N.safetensors`, {t['dtype']} weights",
             "last": f"`step_N.safetensors`, {t['dtype']} weights, but for the last, `step_{t['steps']:06d}.pt`, "
                     "which holds the AdamW state too (a nanoGPT-style resume file)",
             "all": f"`step_N.pt`, {t['dtype']} weights and the AdamW state (nanoGPT style)"}[t["save_optimizer"]]
    text = f"""# {out.name}: a tiny byte-level GPT trained on CPython's standard library

Made by `sample_runs/make_sample_run.py` (training loop: {run_config['train_seconds']:.0f} s of wall time on {t['threads']} CPU threads):

```
{run_config['command']}
```

- Model: {m['n_layer']} layers, {m['n_head']} heads, width {m['n_embd']}, context {m['block_size']} bytes,
  {m['norm']}-norm, {run_config['n_params']:,} parameters (the head is tied to `transformer.wte.weight`).
- Data: {c['train_bytes']:,} bytes from {c['train_files']} standard-library `*.py` files (Python's own
  sources; no download). Validation and test are disjoint sets of whole held-out files,
  {c['val_bytes']:,} bytes each, shipped in `data/val.bin` and `data/test.bin`.
- Training: {t['steps']} AdamW steps (betas 0.9/0.95, weight decay {t['weight_decay']}), batch {t['batch_size']} x {t['block_size']} bytes,
  gradient clipping at 1.0, LR {t['lr']:g} with {t['warmup']} warm-up steps, then {schedule}.
  Seed {t['seed']}.
- Logs: `metrics.jsonl` has a train row per step and a `val_loss` row every {t['eval_every']} steps and at
  every checkpoint. Checkpoints every {t['ckpt_every']} steps in `checkpoints/`: {saved}.
- Evaluator: `evaluate.py` (`evaluate` on val, `evaluate_test` on test; nats/byte, lower is better).

## The loss spike

An LR excursion (the LR multiplied for a few steps) makes a real loss spike and recovery:

{spike_text}

Weights saved during the recovery still carry the spike; a selection should leave them out.
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    train(parse_args())
