"""Builders of tiny, real checkpoints in every layout CkptSelect reads (shared by the checkpoint tests).

Everything is written with the libraries that write these files in real runs
(torch.save, safetensors, transformers.save_pretrained, torch.distributed.checkpoint),
never by hand, except the deliberately broken and malicious files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn


class TinyGPT(nn.Module):
    """A two-block model with the parameter kinds real LMs have (embedding, norms, biases, head)."""

    def __init__(self, vocab: int = 16, dim: int = 8) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.h = nn.ModuleList(nn.ModuleDict({"ln": nn.LayerNorm(dim), "fc": nn.Linear(dim, 2 * dim)}) for _ in range(2))
        self.lm_head = nn.Linear(dim, vocab, bias=False)


def trained(seed: int = 0) -> tuple[TinyGPT, torch.optim.Optimizer]:
    """A TinyGPT after one AdamW step with nanoGPT's decay / no-decay parameter groups."""
    torch.manual_seed(seed)
    model = TinyGPT()
    params = dict(model.named_parameters())
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}])
    loss = model.lm_head(model.h[1]["ln"](model.wte(torch.arange(4)))).square().mean()
    loss = loss + sum(block["fc"].weight.sum() + block["fc"].bias.sum() for block in model.h)
    loss.backward()
    opt.step()
    return model, opt


def plain_state_dict(path: Path, seed: int = 0, prefix: str = "", legacy: bool = False) -> dict[str, torch.Tensor]:
    """A bare state dict (``prefix`` simulates DDP ``module.`` or torch.compile ``_orig_mod.``)."""
    sd = {prefix + k: v for k, v in trained(seed)[0].state_dict().items()}
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    return sd


def nanogpt_ckpt(path: Path, seed: int = 0, iter_num: int = 250) -> dict:
    """nanoGPT's train.py checkpoint of a compiled model."""
    model, opt = trained(seed)
    ckpt = {"model": {"_orig_mod." + k: v for k, v in model.state_dict().items()}, "optimizer": opt.state_dict(),
            "model_args": {"n_layer": 2, "n_embd": 8, "vocab_size": 16, "bias": True},
            "iter_num": iter_num, "best_val_loss": torch.tensor(2.5), "config": {"learning_rate": 6e-4, "dataset": "shakespeare"}}
    torch.save(ckpt, path)
    return ckpt


def lightning_ckpt(path: Path, seed: int = 0, global_step: int = 300) -> dict:
    """A Lightning checkpoint with ModelCheckpoint and an EMA callback state."""
    model, opt = trained(seed)
    sd = model.state_dict()
    ckpt = {"epoch": 3, "global_step": global_step, "pytorch-lightning_version": "2.4.0",
            "state_dict": {"model." + k: v for k, v in sd.items()},
            "optimizer_states": [opt.state_dict()], "lr_schedulers": [{"last_epoch": global_step}],
            "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
                              "best_model_score": torch.tensor(1.75), "monitor": "val_loss", "best_model_path": "/runs/best.ckpt"},
                          "EMA": {"ema_state_dict": {k: v * 0.5 for k, v in sd.items()}}},
            "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}}}
    torch.save(ckpt, path)
    return ckpt


def timm_ckpt(path: Path, seed: int = 0) -> dict:
    model, opt = trained(seed)
    sd = model.state_dict()
    ckpt = {"epoch": 5, "arch": "tinygpt", "state_dict": sd, "state_dict_ema": {k: v + 1 for k, v in sd.items()},
            "optimizer": opt.state_dict(), "version": 2, "metric": 0.81}
    torch.save(ckpt, path)
    return ckpt


def fairseq_ckpt(path: Path, seed: int = 0) -> dict:
    sd = trained(seed)[0].state_dict()
    ckpt = {"model": sd, "args": None, "cfg": {"common": {"seed": seed}},
            "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "num_updates": 1000}],
            "extra_state": {"epoch": 2}}
    torch.save(ckpt, path)
    return ckpt


def hf_model(seed: int = 0):
    """A tiny Llama (hidden 16, 2 layers), random weights, nothing downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def hf_checkpoint(folder: Path, step: int, seed: int = 0, safe: bool = True, shard: bool = False) -> dict[str, torch.Tensor]:
    """A Trainer ``checkpoint-N/`` folder: weights, trainer_state.json, optimizer.pt, scheduler.pt."""
    model = hf_model(seed)
    model.save_pretrained(folder, safe_serialization=safe, max_shard_size="20KB" if shard else "5GB")
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    decay = [p for n, p in model.named_parameters() if "norm" not in n and "bias" not in n]
    rest = [p for n, p in model.named_parameters() if "norm" in n or "bias" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}])
    model(torch.arange(4)[None]).logits.square().mean().backward()
    opt.step()
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(json.dumps({
        "global_step": step, "epoch": step / 100, "best_metric": 1.5, "num_input_tokens_seen": step * 512,
        "log_history": [{"step": step, "loss": 2.0, "epoch": step / 100}], "max_steps": 1000}))
    assert names
    return saved


def dcp_checkpoint(folder: Path, seed: int = 0, step: int = 40) -> dict[str, torch.Tensor]:
    """A torch.distributed.checkpoint folder written in one process (model + optimizer + step)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    model, opt = trained(seed)
    sd = model.state_dict()
    names = {id(p): n for n, p in model.named_parameters()}
    optim = {"state": {names[id(p)]: dict(s) for p, s in opt.state.items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": sd, "optimizer": optim, "train_state": {"step": torch.tensor(step)}},
                 checkpoint_id=str(folder), no_dist=True)
    return sd


class Evil:
    """Runs a command when unpickled (if anything were ever to unpickle it unsafely)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvilWriter:
    """Writes a file when unpickled, through builtins.exec."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def hf_bin_sharded(folder: Path, step: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """pytorch_model-0000N-of-0000M.bin shards + pytorch_model.bin.index.json, as transformers 4.x wrote them
    (transformers 5 saves safetensors only, so the shards are written with torch.save in its layout)."""
    model = hf_model(seed)
    model.config.save_pretrained(folder)
    sd = model.state_dict()
    names = list(sd)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        shard = f"pytorch_model-{i:05d}-of-{len(halves):05d}.bin"
        torch.save({n: sd[n].clone() for n in part}, folder / shard)
        weight_map.update({n: shard for n in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": 1.0, "log_history": []}))
    return sd


def adam_run(root: Path, steps: list[int], optimizer_at: set[int] | None = None,
             lr_at: Callable[[int], float] = lambda step: 1e-3, log_lr: bool = True) -> tuple[Path, float, int]:
    """A run of nanoGPT-style ``.pt`` checkpoints holding a real AdamW state (only at ``optimizer_at``'s
    steps when given, the weights alone elsewhere); returns (root, Σ√v, elements) of the newest that holds it.

    Step s runs at ``lr_at(s)``, set on the param groups before the step as nanoGPT does (so a checkpoint's
    optimizer state holds the LR of its own step); ``log_lr=False`` leaves the LR out of the logs, as
    nanoGPT's stdout does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    optimizer = torch.optim.AdamW(model.named_parameters(), lr=1e-3)
    (root / "ckpt").mkdir(parents=True)
    rows, done = [], 0
    for step in steps:
        while done < step:
            done += 1
            for group in optimizer.param_groups:
                group["lr"] = lr_at(done)
            loss = model(torch.randn(8, 6)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            rows.append({"step": done, "train_loss": loss.item()} | ({"lr": lr_at(done)} if log_lr else {}))
        rows.append({"step": step, "val_loss": 1.0 + 1.0 / step})
        saved = {"model": model.state_dict()}
        if optimizer_at is None or step in optimizer_at:
            saved["optimizer"] = optimizer.state_dict()
            moments = sqrt_second_moments(optimizer.state_dict())
        torch.save(saved, root / "ckpt" / f"step_{step}.pt")
    (root / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, *moments


def sqrt_second_moments(optimizer_state: dict) -> tuple[float, int]:
    """(Σ√exp_avg_sq, elements) of a torch optimizer state dict, computed directly: the reference for V."""
    moments = [s["exp_avg_sq"] for s in optimizer_state["state"].values()]
    return sum(float(m.double().sqrt().sum()) for m in moments), sum(m.numel() for m in moments)


def byte_tokenizer():
    """A Hugging Face fast tokenizer whose token ids are the text's UTF-8 bytes (vocab 256, no merges).

    Built from the ``tokenizers`` library's parts, nothing downloaded: GPT-2's byte-level alphabet with
    each byte's character given the byte's own value as its id.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char_of = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    tokenizer = Tokenizer(models.BPE(vocab={char_of[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


LLAMA_TEXT = "def average(values):\n    return sum(values) / len(values)\n" * 12


def tied_llama_run(root: Path, tokenizer: bool = True) -> Path:
    """A run of one ``checkpoint-5/``: a tiny Llama with tied embeddings (rotary buffers, lm_head not saved)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=48, tie_word_embeddings=True,
                         bos_token_id=0, eos_token_id=0)
    folder = root / "checkpoint-5"
    LlamaForCausalLM(config).save_pretrained(folder)
    if tokenizer:
        byte_tokenizer().save_pretrained(folder)
    (root / "val.txt").write_text(LLAMA_TEXT)
    return root


def stdlib_bytes(count: int) -> torch.Tensor:
    """The first ``count`` bytes of the standard library's a*-d* modules: local text, nothing downloaded."""
    lib = Path(json.__file__).parent.parent
    text = b"".join(p.read_bytes() for p in sorted(lib.glob("[a-d]*.py")))[:count]
    return torch.tensor(list(text), dtype=torch.long)


class ByteChunks(torch.utils.data.Dataset):
    """Consecutive ``context``-byte chunks of ``data`` as causal-LM examples (labels = inputs), for a Trainer."""

    def __init__(self, data: torch.Tensor, context: int) -> None:
        self.data, self.context = data, context

    def __len__(self) -> int:
        return len(self.data) // self.context

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        chunk = self.data[index * self.context:(index + 1) * self.context]
        return {"input_ids": chunk, "labels": chunk}
