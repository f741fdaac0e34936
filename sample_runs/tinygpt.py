"""A tiny byte-level GPT and its corpus: the model behind CkptSelect's shipped sample runs.

Everything here is plain PyTorch so a run folder can carry a verbatim copy of this file
(``model.py``) and be evaluated years later without CkptSelect installed. The corpus is
CPython's own standard library, which every Python install carries, so training needs no
download; the held-out splits are shipped as bytes with each run, so evaluating does not
depend on which Python version happens to be installed.

State-dict keys follow nanoGPT (``transformer.wte.weight``, ``transformer.h.0.attn.c_attn.weight``,
...). The output head is tied to the token embedding and has no parameter of its own: the
logits are ``F.linear(x, transformer.wte.weight)``, so the tied matrix is stored exactly once,
under ``transformer.wte.weight``, and a state dict saves with safetensors as is.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Parts of the standard library that are not ordinary source text: test suites (a lot of
# deliberately odd code), installed third-party packages, and generated codec tables.
# The standard library's own test suites: never trained on, so ``lib_tests_split`` can hold them out.
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
EXCLUDED_DIRS = TEST_DIRS | {"site-packages", "encodings", "__pycache__"}
# A byte that never occurs in Python source: marks file boundaries in the concatenated corpus.
SEPARATOR = b"\x00"


@dataclass
class GPTConfig:
    """Shape of the model; saved in each run's ``config.json`` so the evaluator can rebuild it."""

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 128
    vocab_size: int = 256
    dropout: float = 0.0
    norm: Literal["pre", "post"] = "pre"  # "post" exists so benchmarks can make a less stable run


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on the fused SDPA kernel (no explicit mask buffer)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    """The usual 4x-wide GELU feed-forward layer."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One transformer block; pre-norm (GPT-2) by default, post-norm (original Transformer) on request.

    Post-norm keeps the same parameters and key names, only the order changes, so both variants
    share every tool that reads the checkpoints.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x))
        return self.ln_2(x + self.mlp(x))


class GPT(nn.Module):
    """Token + learned position embeddings, a stack of blocks, a final LayerNorm, a tied head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "wpe": nn.Embedding(config.block_size, config.n_embd),
            "drop": nn.Dropout(config.dropout),
            "h": nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            "ln_f": nn.LayerNorm(config.n_embd),
        })
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance
        # independent of depth at initialisation.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the mean cross-entropy (nats) when targets are given."""
        _, t = idx.shape
        assert t <= self.config.block_size, f"sequence of {t} > block_size {self.config.block_size}"
        pos = torch.arange(t, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = F.linear(self.transformer.ln_f(x), self.transformer.wte.weight)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def num_params(self) -> int:
        """Number of parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())


@dataclass
class Corpus:
    """The three splits as uint8 arrays, and which files went where (for ``config.json``)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    description: dict = field(default_factory=dict)


def stdlib_files(stdlib_dir: Path) -> list[Path]:
    """The ``*.py`` files of the standard library, sorted by relative path, minus EXCLUDED_DIRS."""
    files = (p for p in stdlib_dir.rglob("*.py") if p.is_file())
    kept = (p for p in files if not EXCLUDED_DIRS.intersection(p.relative_to(stdlib_dir).parts[:-1]))
    return sorted(kept, key=lambda p: p.relative_to(stdlib_dir).as_posix())


def _holdout_order(relpath: str) -> str:
    """A shuffle key that depends only on the file's name, so the split is the same on every machine."""
    return hashlib.sha1(relpath.encode()).hexdigest()


def _take_files(candidates: list[tuple[str, bytes]], n_bytes: int) -> tuple[list[str], bytes]:
    """Pop whole files off ``candidates`` until ``n_bytes`` are collected; cut the result to exactly that."""
    names, parts = [], []
    while candidates and sum(map(len, parts)) < n_bytes:
        name, text = candidates.pop(0)
        names.append(name)
        parts.append(text + SEPARATOR)
    return names, b"".join(parts)[:n_bytes]


def load_corpus(stdlib_dir: Path | None = None, val_bytes: int = 65536, test_bytes: int = 65536,
                max_holdout_file_bytes: int = 16384) -> Corpus:
    """Build train / val / test from the standard library's sources, deterministically.

    Val and test are disjoint sets of whole held-out FILES (picked in the order of a hash of
    their path among files no larger than ``max_holdout_file_bytes``, so each split spans
    several modules rather than one big one), cut to exactly ``val_bytes`` / ``test_bytes``.
    The rest of a cut file is dropped, not trained on: no held-out text leaks into train.
    Train is every remaining file, in path order, joined with SEPARATOR.
    """
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    files = [(p.relative_to(root).as_posix(), p.read_bytes()) for p in stdlib_files(root)]
    candidates = sorted((f for f in files if 0 < len(f[1]) <= max_holdout_file_bytes),
                        key=lambda f: _holdout_order(f[0]))
    val_names, val = _take_files(candidates, val_bytes)
    test_names, test = _take_files(candidates, test_bytes)
    held_out = set(val_names) | set(test_names)
    train = SEPARATOR.join(text for name, text in files if name not in held_out)
    description = {
        "source": f"*.py files of the CPython standard library at {root}",
        "excluded_dirs": sorted(EXCLUDED_DIRS),
        "separator": SEPARATOR.hex(),
        "train_files": len(files) - len(held_out), "train_bytes": len(train),
        "val_files": val_names, "val_bytes": len(val),
        "test_files": test_names, "test_bytes": len(test),
    }
    return Corpus(_as_array(train), _as_array(val), _as_array(test), description)


def lib_tests_split(stdlib_dir: Path | None = None, n_bytes: int = 1 << 20,
                     max_file_bytes: int = 16384) -> tuple[list[str], np.ndarray]:
    """A held-out split much bigger than ``load_corpus``'s test: whole files of the standard library's
    own test suites (``test/``, ``tests/``, ``idle_test/``), which EXCLUDED_DIRS keeps out of training.

    Benchmarks use it to measure a choice of checkpoints more surely than 64 KiB can: it is Python by
    the same authors, though test code rather than library code, so its scores are its own. Files are
    picked as the val and test splits' are (hash order, no file over ``max_file_bytes``) and joined
    with SEPARATOR; the result is cut to ``n_bytes``.
    """
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    files = ((p.relative_to(root).as_posix(), p) for p in root.rglob("*.py") if p.is_file())
    tests = [(name, path.read_bytes()) for name, path in files
             if TEST_DIRS.intersection(name.split("/")[:-1]) and "site-packages" not in name.split("/")]
    candidates = sorted((f for f in tests if 0 < len(f[1]) <= max_file_bytes), key=lambda f: _holdout_order(f[0]))
    names, data = _take_files(candidates, n_bytes)
    if len(data) < n_bytes:
        raise ValueError(f"the test suites under {root} hold {len(data):,} bytes of such files, not {n_bytes:,}")
    return names, _as_array(data)


def _as_array(data: bytes) -> np.ndarray:
    """A writable uint8 copy (torch.from_numpy warns on the read-only view of a bytes object)."""
    return np.frombuffer(data, dtype=np.uint8).copy()


def eval_windows(data: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of every non-overlapping ``block_size`` window of ``data``: a fixed set,
    so the same weights always get the same score."""
    n = (len(data) - 1) // block_size
    tokens = torch.from_numpy(data[: n * block_size + 1].astype(np.int64))
    return tokens[:-1].view(n, block_size), tokens[1:].view(n, block_size)


def as_model(model_or_state_dict: nn.Module | dict[str, torch.Tensor], config: GPTConfig | None) -> GPT:
    """A float32 GPT from either a model or a state dict (any float dtype, e.g. bf16 checkpoints)."""
    if isinstance(model_or_state_dict, nn.Module):
        return model_or_state_dict
    if config is None:
        raise ValueError("a state dict needs its GPTConfig to be evaluated")
    model = GPT(config)
    # load_state_dict copies into the float32 parameters, which upcasts bf16/fp16 inputs.
    model.load_state_dict(model_or_state_dict, strict=True)
    return model


@torch.no_grad()
def evaluate_loss(model_or_state_dict: nn.Module | dict[str, torch.Tensor], data: np.ndarray,
                  config: GPTConfig | None = None, batch_size: int = 128) -> float:
    """Mean cross-entropy in nats per byte over every non-overlapping window of ``data``.

    The windows are fixed and the model runs in eval mode, so the value is deterministic: the
    trainer logs it as ``val_loss`` and a run's ``evaluate.py`` recomputes it from a checkpoint.
    """
    model = as_model(model_or_state_dict, config)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x, y = eval_windows(data, model.config.block_size)
    total = 0.0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        _, loss = model(xb, yb)
        total += loss.item() * yb.numel()
    model.train(was_training)
    return total / y.numel()
