"""Train a tiny byte-level language model with the real Hugging Face ``Trainer``: a run CkptSelect did not write.

The selection benchmark's other runs come from this project's own trainer (``make_sample_run.py``),
whose logs, checkpoint layout and optimizer the recommender was developed against. This one lets
``transformers.Trainer`` do everything a user's run does: its schedulers (linear decay to zero by
default, cosine with a floor, warmup-stable-decay), its AdamW defaults (beta2 0.999, clipping at 1.0),
loss logged as the mean of each ``--log-every`` window, ``checkpoint-N/`` folders with
``model.safetensors`` and ``optimizer.pt``, eval losses only in ``trainer_state.json``. The model is
a GPT-2 or a Llama (rotary, grouped-query attention, untied head) from a config, trained on the
same standard-library bytes and splits as the sample runs; nothing is downloaded.

    .venv/bin/python sample_runs/make_hf_run.py --out /tmp/hf-run --model llama --schedule cosine_with_min_lr

Layout written:

    DIR/checkpoint-N/      what the Trainer writes (weights, config, optimizer.pt, scheduler.pt,
                           trainer_state.json with every logged row, rng_state.pth, training_args.bin)
    DIR/config.json        how the run was made: n_params, hyper-parameters, events (none), train_seconds
    DIR/model_config/      the model's config.json, for the evaluator
    DIR/data/val.bin, DIR/data/test.bin   the held-out bytes (val is the Trainer's eval set)
    DIR/evaluate.py        the run's evaluator (``evaluate`` on val, ``evaluate_test`` on test)
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tinygpt import load_corpus  # noqa: E402

SCHEDULES = ("linear", "cosine_with_min_lr", "constant_with_warmup", "warmup_stable_decay")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; every dynamic a benchmark varies is a flag."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="run directory (the Trainer's output_dir)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run")
    p.add_argument("--model", choices=("gpt2", "llama"), default="gpt2")
    p.add_argument("--schedule", choices=SCHEDULES, default="linear", help="the Trainer's lr_scheduler_type")
    p.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="floor of cosine_with_min_lr and warmup_stable_decay, as a fraction of --lr")
    p.add_argument("--decay-fraction", type=float, default=0.2, help="warmup_stable_decay: share of steps decaying")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=2880)
    p.add_argument("--ckpt-every", type=int, default=96, help="save_steps and eval_steps")
    p.add_argument("--log-every", type=int, default=10, help="logging_steps: the train loss is this window's mean")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per optimizer step")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient_accumulation_steps (batch is split)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--seed", type=int, default=21)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--save-only-model", action="store_true",
                   help="checkpoints hold the weights only (no optimizer.pt): the Trainer's save_only_model")
    return p.parse_args(argv)


def model_config(args: argparse.Namespace):
    """A GPT-2 (tied head, learned positions) or a Llama (untied head, rotary, 2 key-value heads)."""
    from transformers import GPT2Config, LlamaConfig

    if args.model == "gpt2":
        return GPT2Config(vocab_size=256, n_positions=args.block_size, n_embd=args.n_embd, n_layer=args.n_layer,
                          n_head=args.n_head, bos_token_id=0, eos_token_id=0)
    return LlamaConfig(vocab_size=256, hidden_size=args.n_embd, intermediate_size=round(args.n_embd * 8 / 3),
                       num_hidden_layers=args.n_layer, num_attention_heads=args.n_head,
                       num_key_value_heads=max(1, args.n_head // 2), max_position_embeddings=args.block_size,
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)


class Chunks(torch.utils.data.Dataset):
    """Non-overlapping ``block`` -byte sequences of ``data``, each its own labels (the model shifts them)."""

    def __init__(self, data: np.ndarray, block: int) -> None:
        self.data = torch.from_numpy(data.astype(np.int64))
        self.block = block

    def __len__(self) -> int:
        return len(self.data) // self.block

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        chunk = self.data[index * self.block:(index + 1) * self.block]
        return {"input_ids": chunk, "labels": chunk}


def scheduler_kwargs(args: argparse.Namespace) -> dict:
    """The Trainer's lr_scheduler_kwargs for the schedules that take any."""
    if args.schedule == "cosine_with_min_lr":
        return {"min_lr_rate": args.min_lr_ratio}
    if args.schedule == "warmup_stable_decay":
        return {"num_decay_steps": round(args.steps * args.decay_fraction), "min_lr_ratio": args.min_lr_ratio}
    return {}


def prepare_dir(out: Path, overwrite: bool) -> None:
    """An empty run folder; an existing run only with ``--overwrite``."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            sys.exit(f"{out} is not empty (use --overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def train(args: argparse.Namespace) -> None:
    """Write the run folder: held-out splits, model config and evaluator first, then the Trainer's checkpoints,
    then ``config.json`` last (its ``train_seconds`` marks a finished run for the benchmark)."""
    import transformers
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    prepare_dir(args.out, args.overwrite)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    corpus = load_corpus()
    (args.out / "data").mkdir()
    corpus.val.tofile(args.out / "data" / "val.bin")
    corpus.test.tofile(args.out / "data" / "test.bin")
    config = model_config(args)
    config.save_pretrained(args.out / "model_config")
    shutil.copy(HERE / "hf_run_evaluate.py", args.out / "evaluate.py")
    transformers.set_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    training = TrainingArguments(
        output_dir=str(args.out), max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type=args.schedule,
        lr_scheduler_kwargs=scheduler_kwargs(args), warmup_steps=args.warmup, weight_decay=args.weight_decay,
        per_device_train_batch_size=args.batch_size // args.grad_accum, gradient_accumulation_steps=args.grad_accum,
        per_device_eval_batch_size=64, eval_strategy="steps", eval_steps=args.ckpt_every,
        save_strategy="steps", save_steps=args.ckpt_every, logging_steps=args.log_every, seed=args.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, report_to=[], disable_tqdm=True,
        save_only_model=args.save_only_model)
    started = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=training, train_dataset=Chunks(corpus.train, args.block_size),
                eval_dataset=Chunks(corpus.val, args.block_size), data_collator=default_data_collator).train()
    run_config = {
        "made_by": f"transformers {transformers.__version__} Trainer, torch {torch.__version__}",
        "command": shlex.join([sys.executable, *sys.argv]),
        "model": config.to_dict(), "n_params": n_params,
        "hyper": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "events": [],   # nothing injected: this run's dynamics are the scheduler's
        "corpus": {k: v for k, v in corpus.description.items() if not k.endswith("_files")},
        "train_seconds": round(time.time() - started, 1), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    (args.out / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")


if __name__ == "__main__":
    train(parse_args())
