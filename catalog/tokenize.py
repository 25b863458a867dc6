"""The two tokenizations and their exact inverse (DESIGN §4).

- dense: flatten a tensor in row-major order and cut it into consecutive chunks of `token_size`;
  only a tensor's last token is padded. `row_idx` (k) is the chunk's index within its tensor.
- row (SANE): view a tensor as `[out, -1]` (1-D and scalar tensors as one row), append its bias as a
  last column, and split each row into chunks; each row's last chunk is padded. `row_idx` (k) is
  the row (output neuron or channel) a token belongs to.

Tokens hold raw float32 values; `n_valid` counts the real entries. Positions are (n, l, k) =
(`token_idx`, `layer_idx`, `row_idx`). Tokenizing costs one copy of the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """How one tensor (with its packed bias, if any) is laid out in tokens."""

    rows: int
    width: int  # values per row, the packed bias column included
    chunks: int  # tokens per row

    @property
    def n_tokens(self) -> int:
        return self.rows * self.chunks


def geometry(shape: tuple[int, ...], tokenization: str, token_size: int, with_bias: bool = False) -> Geometry:
    """Token layout of a tensor of `shape`; `with_bias` appends one column (row tokenization only)."""
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if tokenization == "dense":
        rows, width = 1, numel
    elif tokenization == "row":
        rows, width = (shape[0], numel // shape[0] if shape[0] else 0) if len(shape) >= 2 else (1, numel)
        width += int(with_bias)
    else:
        raise ValueError(f"unknown tokenization {tokenization!r}")
    chunks = -(-width // token_size) if width and rows else 0
    return Geometry(rows, width, chunks)


def bias_pairs(names: list[str], shapes: list[tuple[int, ...]], tokenizable: list[bool]) -> dict[int, int]:
    """Row tokenization packs `X.bias` into `X.weight` when the weight is ≥2-D with one row per bias entry.

    Returns {bias index: weight index}.
    """
    index = {n: i for i, n in enumerate(names)}
    pairs = {}
    for i, name in enumerate(names):
        if not name.endswith(".bias") or not tokenizable[i] or len(shapes[i]) != 1:
            continue
        w = index.get(name[: -len("bias")] + "weight")
        if w is not None and tokenizable[w] and len(shapes[w]) >= 2 and shapes[w][0] == shapes[i][0]:
            pairs[i] = w
    return pairs


@dataclass(frozen=True)
class TensorTokens:
    """Where one tensor's tokens sit in its model's sequence."""

    token_start: int | None
    geometry: Geometry | None
    packed_into: int | None = None  # a bias carried by this tensor index's rows
    bias_idx: int | None = None  # the bias this tensor carries in its last column

    @property
    def n_tokens(self) -> int:
        return self.geometry.n_tokens if self.geometry else 0


def plan(
    names: list[str], shapes: list[tuple[int, ...]], tokenizable: list[bool], tokenization: str, token_size: int
) -> list[TensorTokens]:
    """Token positions of every tensor of a model, in order. Non-float tensors get no tokens."""
    pairs = bias_pairs(names, shapes, tokenizable) if tokenization == "row" else {}
    carried = {w: b for b, w in pairs.items()}
    out, start = [], 0
    for i, shape in enumerate(shapes):
        if i in pairs:
            out.append(TensorTokens(None, None, packed_into=pairs[i]))
        elif not tokenizable[i]:
            out.append(TensorTokens(None, None))
        else:
            g = geometry(shape, tokenization, token_size, with_bias=i in carried)
            out.append(TensorTokens(start, g, bias_idx=carried.get(i)))
            start += g.n_tokens
    return out


def tokenize(x: np.ndarray, g: Geometry, token_size: int, bias: np.ndarray | None = None) -> np.ndarray:
    """Tokens `[n_tokens, token_size]` (float32, zero-padded) of float32 tensor `x`, bias appended."""
    # np.zeros takes fresh zeroed pages from the allocator, which is cheaper than filling the padding
    # afterwards with a strided second pass
    out = np.zeros((g.rows, g.chunks * token_size), dtype=np.float32)
    if bias is None:
        out[:, : g.width] = x.reshape(g.rows, g.width)
    else:
        out[:, : g.width - 1] = x.reshape(g.rows, g.width - 1)
        out[:, g.width - 1] = bias
    return out.reshape(g.n_tokens, token_size)


def positions(g: Geometry, token_size: int, tokenization: str) -> tuple[np.ndarray, np.ndarray]:
    """(`row_idx`, `n_valid`) of each token of a tensor laid out as `g`."""
    j = np.arange(g.n_tokens, dtype=np.int64)
    last = g.width - (g.chunks - 1) * token_size
    n_valid = np.where(j % g.chunks == g.chunks - 1, last, token_size).astype(np.int32)
    row_idx = j if tokenization == "dense" else j // g.chunks
    return row_idx, n_valid


def detokenize(
    tokens: np.ndarray, shape: tuple[int, ...], g: Geometry, with_bias: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Inverse of `tokenize`: the tensor (float32, `shape`) and its packed bias, from its tokens."""
    if g.n_tokens == 0:  # an empty tensor has no tokens
        return np.zeros(shape, np.float32), (np.zeros(g.rows, np.float32) if with_bias else None)
    block = tokens.reshape(g.rows, -1)[:, : g.width]
    if with_bias:
        return block[:, :-1].reshape(shape).copy(), block[:, -1].copy()
    return block.reshape(shape).copy(), None
