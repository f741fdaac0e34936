"""Which layer and role a tensor plays, from its name alone.

Names from Hugging Face (GPT-2 ``transformer.h.3.attn.c_attn.weight``, Llama
``model.layers.3.self_attn.q_proj.weight``), nanoGPT (``transformer.h.3.attn.c_attn.weight``, the same
as GPT-2 but transposed), Megatron (``language_model.encoder.layers.3.self_attention.query_key_value.weight``),
torchtitan (``layers.3.attention.wq.weight``) and DeepSpeed (the same names under ``module.``) all put the
block index as the first all-digit part, and the role in the words after it. A layer here is a block and a
role group (``transformer.h.3 attn``): what the heatmap draws as one row.
"""

from __future__ import annotations

from dataclasses import dataclass

# Role of a tensor, from the words of its name (checked in this order: a norm inside attention is a norm).
_NORM = ("norm", "layernorm", "layer_norm", "ln", "ln_1", "ln_2", "ln_f", "rms_norm", "final_layernorm")
_EMBED = ("wte", "wpe", "embed_tokens", "tok_embeddings", "embeddings", "word_embeddings",
          "position_embeddings", "embed", "embedding")
_HEAD = ("lm_head", "output", "head", "score", "output_layer")
_FUSED = ("c_attn", "query_key_value", "qkv", "wqkv", "qkv_proj", "in_proj", "in_proj_weight", "w_pack")
_QUERY = ("q_proj", "wq", "query", "q", "q_lin")
_KEY = ("k_proj", "wk", "key", "k", "k_lin")
_VALUE = ("v_proj", "wv", "value", "v", "v_lin")
_ATTN = ("attn", "attention", "self_attn", "self_attention", "selfattention")
_MLP = ("mlp", "feed_forward", "ffn", "feedforward", "fc", "fc1", "fc2", "c_fc", "gate_proj", "up_proj", "down_proj",
        "w1", "w2", "w3", "dense_h_to_4h", "dense_4h_to_h", "intermediate", "experts")
# Group of a role: the heatmap's row within a block.
GROUPS = {"q": "attn", "k": "attn", "v": "attn", "qkv": "attn", "o": "attn", "mlp": "mlp", "norm": "norm",
          "embedding": "embedding", "head": "head", "other": "other"}


@dataclass(frozen=True, slots=True)
class TensorRole:
    """Where a tensor sits: its block (None outside the blocks), role, and the layer label it is drawn under."""

    block: int | None
    prefix: str      # the name up to the block index ("transformer.h.3"), "" outside the blocks
    role: str        # q, k, v, qkv (fused), o, mlp, norm, embedding, head, other

    @property
    def group(self) -> str:
        """attn, mlp, norm, embedding, head, other ("final norm" for a norm outside the blocks)."""
        if self.block is None and self.role == "norm":
            return "final norm"
        return GROUPS[self.role]

    @property
    def layer(self) -> str:
        """The label of the layer (block and group) the tensor belongs to."""
        return f"{self.prefix} {self.group}" if self.prefix else self.group


def tensor_role(name: str) -> TensorRole:
    """The block index, prefix and role of tensor ``name`` (see the module docstring for the layouts)."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    block = int(parts[index]) if index is not None else None
    prefix = ".".join(parts[:index + 1]) if index is not None else ""
    words = [p.lower() for p in (parts[index + 1:] if index is not None else parts)]
    return TensorRole(block, prefix, _role(words, block is None))


def _role(words: list[str], outside: bool) -> str:
    """Role from the (lower-cased) words after the block index; the last word (weight, bias) is ignored."""
    body = words[:-1] if len(words) > 1 else words
    if any(w in _NORM or "norm" in w or w.startswith("ln_") for w in body):
        return "norm"
    if outside and any(w in _EMBED for w in body):
        return "embedding"
    if outside and any(w in _HEAD for w in body):
        return "head"
    for role, names in (("qkv", _FUSED), ("q", _QUERY), ("k", _KEY), ("v", _VALUE)):
        if any(w in names for w in body):
            return role
    if any(w in _ATTN for w in body):
        return "o"        # the rest of attention: its output projection (c_proj, o_proj, wo, dense)
    if any(w in _MLP for w in body) or (not outside and "output" in body):   # BERT's output.dense is its MLP
        return "mlp"
    return "embedding" if any(w in _EMBED for w in body) else "other"


def fused_split_dim(name: str, shape: tuple[int, ...]) -> int | None:
    """The dimension along which a fused q/k/v weight holds q, k and v as three equal blocks, else None.

    GPT-2's Conv1D ``c_attn`` is (d, 3d): split along 1; nanoGPT's Linear ``c_attn`` is (3d, d): along 0.
    Megatron's and GPT-NeoX's ``query_key_value`` interleave q, k and v per head, so thirds would mix
    them: None there (their q·k product is not given), as for grouped-query fused layouts (not 3 equal parts).
    """
    role = tensor_role(name)
    if role.role != "qkv" or len(shape) != 2 or name.split(".")[-2].lower() == "query_key_value":
        return None
    if shape[1] == 3 * shape[0]:
        return 1
    if shape[0] == 3 * shape[1]:
        return 0
    return None
