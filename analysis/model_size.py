"""Parameter counts from a Hugging Face ``config.json``, without building the model.

Storage is ``parameters x bytes per parameter``, so the count must be right: it is
computed from the architecture fields, tensor by tensor, the way each family's
transformers implementation lays out its weights (a test builds tiny models of
every family with transformers and compares ``sum(p.numel())``). Knowing the
tensor shapes also gives the size of Adafactor's factored moments (rows + columns
per matrix instead of rows x columns).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelConfigError

# model_type -> layout defaults; every type but gpt2 and gpt_neox is counted with llama's layout.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # tie_word_embeddings defaults of each transformers config class (checked on 5.23).
    "llama": {"tie": False}, "mistral": {"tie": False}, "qwen2": {"tie": False, "qkv_bias": True},
    "qwen3": {"tie": False, "qk_norm": True}, "gemma": {"tie": True}, "gemma2": {"tie": True, "norms": 4},
    "mixtral": {"tie": False}, "gpt2": {"tie": True}, "gpt_neox": {"tie": False},
}


@dataclass(frozen=True, slots=True)
class ParamCount:
    """Parameters of a model, counted from its architecture."""

    model_type: str
    total: int                     # every parameter stored in a checkpoint
    active: int                    # used per token (differs from total for mixture-of-experts)
    embedding: int                 # input embedding (+ positions); the untied output head is extra
    factored_elements: int         # Adafactor second-moment elements: rows + cols per matrix, numel per vector
    tied_embeddings: bool


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a ``config.json`` (or the folder holding one).

    Args:
        path: the file, or a model folder with a ``config.json``.

    Returns:
        The config as a dict.

    Raises:
        ModelConfigError: missing file or not a JSON object.
    """
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelConfigError(path, "no such file") from None
    except (OSError, ValueError) as e:
        raise ModelConfigError(path, f"not a readable JSON config ({e})") from e
    if not isinstance(data, dict):
        raise ModelConfigError(path, "not a JSON object")
    return data


def count_parameters(config: dict[str, Any] | str | Path, path: Path | None = None) -> ParamCount:
    """Count a model's parameters from its config (a dict, or a path to ``config.json``).

    Args:
        config: the config dict, or a path to the file / its folder.
        path: where the dict came from, named in error messages.

    Returns:
        A :class:`ParamCount` with total and per-token (active) parameters.

    Raises:
        ModelConfigError: unknown model type or a missing architecture field (named).
    """
    if not isinstance(config, dict):
        path = Path(config).expanduser().resolve()
        config = load_config(path)
    # Multimodal configs (e.g. Gemma 3, Llama 4) nest the language model under text_config.
    config = config.get("text_config", config) if "vocab_size" not in config else config
    model_type = _model_type(config, path)
    fields = _Fields(config, path)
    tensors = _gpt2(fields) if model_type == "gpt2" else (
        _neox(fields) if model_type == "gpt_neox" else _llama_like(fields, model_type))
    return _summarise(model_type, tensors, fields)


def _model_type(config: dict[str, Any], path: Path | None) -> str:
    """The family: ``model_type``, else guessed from the field names (GPT-2 uses ``n_embd``).

    A named type this module does not know is refused rather than counted as llama: other
    layouts (shared experts, latent attention) would be miscounted without a word.
    """
    model_type = str(config.get("model_type", "")).lower()
    if model_type in _FAMILY_DEFAULTS:
        return model_type
    if model_type:
        raise ModelConfigError(path, f"model_type {model_type!r} is not one CkptSelect can count "
                                     f"(known: {', '.join(sorted(_FAMILY_DEFAULTS))}). Hint: pass --params N.")
    if "n_embd" in config:
        return "gpt2"
    return "mixtral" if "num_local_experts" in config else "llama"


class _Fields:
    """Reads config fields, naming the file and the field when one is missing."""

    def __init__(self, config: dict[str, Any], path: Path | None) -> None:
        self.config, self.path = config, path

    def need(self, *names: str) -> int:
        for name in names:
            if self.config.get(name) is not None:
                return int(self.config[name])
        raise ModelConfigError(self.path, f"missing field {names[0]!r} needed to count parameters")

    def get(self, name: str, default: Any) -> Any:
        value = self.config.get(name)
        return default if value is None else value


# A tensor entry: (name, shape, how many of it, whether every token uses it).
_Tensor = tuple[str, tuple[int, ...], int, bool]


def _llama_like(f: _Fields, model_type: str) -> list[_Tensor]:
    """Llama, Mistral, Qwen2/3, Gemma/Gemma2 and Mixtral-style mixture-of-experts decoders."""
    d = _FAMILY_DEFAULTS.get(model_type, {})
    h, layers, vocab = f.need("hidden_size"), f.need("num_hidden_layers"), f.need("vocab_size")
    heads = f.need("num_attention_heads")
    kv = int(f.get("num_key_value_heads", heads))
    head_dim = int(f.get("head_dim", h // heads))
    inter = f.need("intermediate_size")
    bias = bool(f.get("attention_bias", False))
    qkv_bias = d.get("qkv_bias", False) or bias
    out = [("embed", (vocab, h), 1, True)]
    layer = [("q", (heads * head_dim, h), layers, True), ("k", (kv * head_dim, h), layers, True),
             ("v", (kv * head_dim, h), layers, True), ("o", (h, heads * head_dim), layers, True),
             ("norms", (h,), layers * d.get("norms", 2), True)]
    if qkv_bias:
        layer += [("q_bias", (heads * head_dim,), layers, True), ("kv_bias", (kv * head_dim,), 2 * layers, True)]
    if bias:
        layer.append(("o_bias", (h,), layers, True))
    if d.get("qk_norm"):
        layer.append(("qk_norm", (head_dim,), 2 * layers, True))
    experts = int(f.get("num_local_experts", 0))
    if experts:
        top_k = f.need("num_experts_per_tok")
        layer.append(("router", (experts, h), layers, True))
        # Every expert is stored; only top_k of them are active per token.
        layer += [("expert_mlp", (inter, h), 3 * layers * top_k, True),
                  ("expert_mlp_idle", (inter, h), 3 * layers * (experts - top_k), False)]
    else:
        layer.append(("mlp", (inter, h), 3 * layers, True))
    out += layer + [("final_norm", (h,), 1, True)]
    return out + _head(f, d, vocab, h)


def _head(f: _Fields, d: dict[str, Any], vocab: int, h: int) -> list[_Tensor]:
    """The output projection, absent when it shares the input embedding's weights."""
    return [] if _tied(f, d) else [("lm_head", (vocab, h), 1, True)]


def _tied(f: _Fields, d: dict[str, Any]) -> bool:
    return bool(f.get("tie_word_embeddings", d.get("tie", False)))


def _gpt2(f: _Fields) -> list[_Tensor]:
    """GPT-2: learned positions, fused qkv with biases, LayerNorm with bias, 4x MLP."""
    h, layers, vocab = f.need("n_embd", "hidden_size"), f.need("n_layer", "num_hidden_layers"), f.need("vocab_size")
    positions = f.need("n_positions", "max_position_embeddings")
    inner = int(f.get("n_inner", 4 * h))
    out = [("embed", (vocab, h), 1, True), ("positions", (positions, h), 1, True)]
    out += [("c_attn", (h, 3 * h), layers, True), ("c_attn_bias", (3 * h,), layers, True),
            ("c_proj", (h, h), layers, True), ("c_fc", (h, inner), layers, True), ("c_fc_bias", (inner,), layers, True),
            ("mlp_proj", (inner, h), layers, True), ("h_biases", (h,), 2 * layers, True),
            ("ln", (h,), 4 * layers, True), ("ln_f", (h,), 2, True)]
    return out + _head(f, _FAMILY_DEFAULTS["gpt2"], vocab, h)


def _neox(f: _Fields) -> list[_Tensor]:
    """GPT-NeoX / Pythia: fused qkv, LayerNorm with bias, untied output head by default."""
    h, layers, vocab = f.need("hidden_size"), f.need("num_hidden_layers"), f.need("vocab_size")
    inter = int(f.get("intermediate_size", 4 * h))
    bias = bool(f.get("attention_bias", True))
    out = [("embed", (vocab, h), 1, True), ("qkv", (3 * h, h), layers, True), ("dense", (h, h), layers, True),
           ("h_to_4h", (inter, h), layers, True), ("4h_to_h", (h, inter), layers, True),
           ("mlp_biases", (inter + h,), layers, True), ("ln", (h,), 4 * layers, True), ("final_ln", (h,), 2, True)]
    if bias:
        out.append(("attn_biases", (4 * h,), layers, True))
    return out + _head(f, _FAMILY_DEFAULTS["gpt_neox"], vocab, h)


def _summarise(model_type: str, tensors: list[_Tensor], f: _Fields) -> ParamCount:
    """Totals over the tensor list."""
    total = active = embedding = factored = 0
    for name, shape, count, used in tensors:
        numel = count * _prod(shape)
        total += numel
        active += numel if used else 0
        embedding += numel if name in ("embed", "positions") else 0
        factored += count * (sum(shape) if len(shape) == 2 else _prod(shape))
    tied = not any(name == "lm_head" for name, *_ in tensors)
    return ParamCount(model_type, total, active, embedding, factored, tied)


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out
