"""Tensor roles, decided by explicit, ordered rules on name, shape and dtype.

Roles let the backbone embed what kind of layer a token comes from. The rules are written out
(first match wins) and tested on real layer names of BERT, GPT-2, ViT, ResNet and Llama checkpoints.
Names are split into dot-separated parts and matched as whole parts or part patterns, never as
loose substrings of the whole name (so "ln" does not match "kernel").
"""

from __future__ import annotations

import re

ROLES = (
    "norm_stat",  # BatchNorm running statistics and counters (buffers, not learned)
    "int",  # any integer or boolean tensor (indices, masks, counters)
    "position_embedding",
    "embedding",
    "attn_qkv",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_o",
    "conv",
    "norm",
    "bias",
    "linear",
    "vector",  # 1-D learned tensors that match no rule above (scales, gates, tokens)
    "other",
)

_NORM_STATS = {"running_mean", "running_var", "num_batches_tracked"}
_NORM = re.compile(r"^(ln|ln_\w+|ln\d+|\w*layer_?norm\w*|\w*_norm|norm\d*|bn\d*|batch_?norm\d*|rms_?norm|gn|group_?norm)$", re.I)
_POS_EMB = re.compile(r"^(wpe|pos_emb\w*|position_embeddings?|pos_embed(ding)?|positional_embedding|embed_positions)$", re.I)
_EMB = re.compile(r"^(wte|embed_tokens|tok_embeddings|word_embeddings|token_type_embeddings|\w*embeddings?|cls_token|mask_token|shared)$", re.I)
_QKV = re.compile(r"^(c_attn|qkv|qkv_proj|query_key_value|wqkv|Wqkv|in_proj)$", re.I)
_Q = re.compile(r"^(q|q_proj|query|wq|to_q)$", re.I)
_K = re.compile(r"^(k|k_proj|key|wk|to_k)$", re.I)
_V = re.compile(r"^(v|v_proj|value|wv|to_v)$", re.I)
_O = re.compile(r"^(o|o_proj|out_proj|wo|to_out|c_proj)$", re.I)
_ATTN_PARENT = re.compile(r"^(attn|attention|self_attn|self_attention|self|attention_block|mha|mixer)$", re.I)


def _parts(name: str) -> list[str]:
    return name.split(".")


def norm_modules(tensors: list[tuple[str, tuple[int, ...]]]) -> set[str]:
    """Modules that are normalization layers by their contents: running statistics, or a 1-D `weight`."""
    found = set()
    for name, shape in tensors:
        module, _, leaf = name.rpartition(".")
        if leaf in _NORM_STATS or (leaf == "weight" and len(shape) == 1):
            found.add(module)
    return found


def assign_roles(tensors: list[tuple[str, tuple[int, ...], str]]) -> list[str]:
    """Roles of all tensors of one model (some rules look at a tensor's siblings)."""
    norms = norm_modules([(n, s) for n, s, _ in tensors])
    return [role_of(n, s, d, norms) for n, s, d in tensors]


def role_of(name: str, shape: tuple[int, ...], dtype: str, norms: set[str] | None = None) -> str:
    """The role of one tensor. Rules in order; the first that matches decides.

    `norms` holds the modules known to be normalization layers from their siblings (see
    `norm_modules`); without it only the name decides whether a module is a norm.
    """
    parts = _parts(name)
    leaf = parts[-1]
    modules = parts[:-1]
    owner = modules[-1] if modules else ""
    # 1. buffers and non-float tensors
    if leaf in _NORM_STATS:
        return "norm_stat"
    if dtype.startswith(("I", "U")) or dtype == "BOOL":
        return "int"
    # 2. embeddings: the owning module (or the tensor itself, for parameters like cls_token) is named so
    if any(_POS_EMB.match(p) for p in (owner, leaf)):
        return "position_embedding"
    if _EMB.match(owner) or (not modules and _EMB.match(leaf)) or (_EMB.match(leaf) and leaf != "weight"):
        if leaf == "bias":
            return "bias"
        return "embedding" if len(shape) >= 2 else "vector"
    # 3. normalization layers: 1-D weight or bias of a module named like a norm
    module = layer_key(name) if modules else ""
    if len(shape) <= 1 and (any(_NORM.match(p) for p in modules[-2:]) or module in (norms or ())):
        return "norm"
    # 4. biases
    if leaf == "bias" or leaf.endswith("_bias"):
        return "bias"
    # 5. attention projections: a q/k/v/o-named module, or the fused in_proj_weight of nn.MultiheadAttention
    if leaf == "in_proj_weight":
        return "attn_qkv"
    if len(shape) == 2:
        in_attn = any(_ATTN_PARENT.match(p) for p in modules[:-1]) or "attention" in name.lower()
        if _QKV.match(owner):
            return "attn_qkv"
        if in_attn or owner.lower() in {"q_proj", "k_proj", "v_proj", "o_proj", "wq", "wk", "wv", "wo", "query", "key", "value"}:
            for pattern, role in ((_Q, "attn_q"), (_K, "attn_k"), (_V, "attn_v"), (_O, "attn_o")):
                if pattern.match(owner):
                    return role
            # BERT: attention.output.dense is the output projection
            if owner == "dense" and len(modules) >= 2 and modules[-2] == "output" and "attention" in modules:
                return "attn_o"
    # 6. by shape
    if len(shape) >= 3:
        return "conv"
    if len(shape) == 2:
        return "linear"
    if len(shape) <= 1:
        return "vector"
    return "other"


def layer_key(name: str) -> str:
    """The module a tensor belongs to (its name without the last part): tensors sharing it share a layer."""
    return name.rsplit(".", 1)[0] if "." in name else name


_LEAF_ORDER = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3, "num_batches_tracked": 4}


def natural_key(name: str) -> tuple:
    """Sort key that orders `layers.2` before `layers.10` and a module's weight before its bias."""
    module, _, leaf = name.rpartition(".")
    # numbers compared by (length, digits) without leading zeros: int() fails on runs of over 4,300 digits
    pieces = tuple((0, len(t.lstrip("0")), t.lstrip("0")) if t[0] in "0123456789" else (1, 0, t)
                   for t in re.split(r"([0-9]+)", module) if t)
    return pieces, _LEAF_ORDER.get(leaf, 9), leaf
