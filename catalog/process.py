"""Turn one model's weights into catalog rows: tensors (roles, statistics, token positions) and tokens.

Works on any `Weights`: a validated safetensors model (memory-mapped) or an in-memory state dict.
Float tensors whose dtype converts exactly to float32 are tokenized; every other dtype the header
names (integers, bool, complex, sub-byte and scale formats) is cataloged without tokens or statistics,
and the `tokenized` column says which is which. Zero-size tensors are cataloged with no tokens and
null statistics.
Tokens are produced tensor by tensor as Arrow tables, so a caller can stream them to disk and a
model never needs to fit in memory at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa

from catalog import tokenize as tk
from catalog.roles import assign_roles, layer_key
from catalog.safetensors_io import TensorMeta, is_float_dtype, to_float32
from catalog.schema import CatalogSpec, tokens_schema
from catalog.stats import tensor_stats

TOKEN_SLICE = 1 << 16  # tokens per Arrow table yielded, bounding the size of each write
_EMPTY = np.empty(0, np.uint8)
_EMPTY_F32 = np.empty(0, np.float32)


def raw_bytes(stored: np.ndarray) -> np.ndarray:
    """A tensor's stored bytes as a flat uint8 view (zero-size tensors included), for hashing."""
    return np.ascontiguousarray(stored).reshape(-1).view(np.uint8)


class Weights(Protocol):
    """What the catalog needs from a model's weights."""

    @property
    def tensors(self) -> list[TensorMeta]: ...

    def stored(self, meta: TensorMeta) -> np.ndarray: ...


def repeat_string(value: str, n: int) -> pa.Array:
    """A string array of `n` copies of `value`, built without a Python loop."""
    data = value.encode()
    offsets = np.arange(n + 1, dtype=np.int32) * len(data)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data * n))


@dataclass
class ModelRecords:
    """Rows of one model, filled while its tokens are iterated (`tokens()` must be consumed first)."""

    model_id: str
    weights: Weights
    spec: CatalogSpec
    header_only: bool = False
    tensor_rows: list[dict] = field(default_factory=list)
    n_params: int = 0
    n_tokens: int = 0
    content_hash: str | None = None

    def __post_init__(self) -> None:
        self.metas = list(self.weights.tensors)
        names = [m.name for m in self.metas]
        shapes = [m.shape for m in self.metas]
        floats = [is_float_dtype(m.dtype) for m in self.metas]
        self.roles = assign_roles([(m.name, m.shape, m.dtype) for m in self.metas])
        layers: dict[str, int] = {}
        self.layer_idx = [layers.setdefault(layer_key(n), len(layers)) for n in names]
        self.plan = tk.plan(names, shapes, floats, self.spec.tokenization, self.spec.token_size)
        self.n_params = sum(m.numel for m in self.metas)
        self.n_tokens = 0 if self.header_only else sum(p.n_tokens for p in self.plan)

    def tokens(self) -> Iterator[pa.Table]:
        """Token tables in `token_idx` order; fills `tensor_rows` and `content_hash` as it goes."""
        spec, ts = self.spec, self.spec.token_size
        schema = tokens_schema(ts, spec.token_dtype)
        digest = hashlib.blake2b(digest_size=20)
        cache: dict[int, np.ndarray] = {}  # a bias packed into a later weight, converted once
        for i, meta in enumerate(self.metas):
            row = self._row(i, meta)
            self.tensor_rows.append(row)
            if self.header_only:
                continue
            # a zero-size tensor has no values to read: numpy cannot even build some of its shapes
            empty = meta.numel == 0
            stored = _EMPTY if empty else self.weights.stored(meta)
            digest.update(f"{meta.name}|{meta.dtype}|{meta.shape}".encode())
            digest.update(raw_bytes(stored))
            if not is_float_dtype(meta.dtype):
                self._release(meta)
                continue
            x = cache.pop(i, None)
            if x is None:
                x = _EMPTY_F32 if empty else to_float32(stored, meta.dtype)
            row.update(tensor_stats(x))
            p = self.plan[i]
            if p.packed_into is not None or p.n_tokens == 0:
                self._release(meta)
                continue
            bias = None
            if p.bias_idx is not None:
                b = self.metas[p.bias_idx]
                if p.bias_idx not in cache:  # converted once, reused for the bias's own statistics
                    cache[p.bias_idx] = to_float32(self.weights.stored(b), b.dtype)
                bias = cache[p.bias_idx]
            values = tk.tokenize(x, p.geometry, ts, bias)
            del x, stored
            self._release(meta)
            row_idx, n_valid = tk.positions(p.geometry, ts, spec.tokenization)
            for s in range(0, p.n_tokens, TOKEN_SLICE):
                e = min(s + TOKEN_SLICE, p.n_tokens)
                v = values[s:e].reshape(-1)
                if spec.token_dtype == "float16":
                    v = v.astype(np.float16)
                yield pa.Table.from_arrays(
                    [
                        repeat_string(self.model_id, e - s),
                        pa.array(np.arange(p.token_start + s, p.token_start + e, dtype=np.int64)),
                        pa.array(np.full(e - s, i, dtype=np.int32)),
                        pa.array(np.full(e - s, self.layer_idx[i], dtype=np.int32)),
                        pa.array(row_idx[s:e]),
                        pa.FixedSizeListArray.from_arrays(pa.array(v), ts),
                        pa.array(n_valid[s:e]),
                    ],
                    schema=schema,
                )
        if not self.header_only:
            self.content_hash = digest.hexdigest()

    def _release(self, meta: TensorMeta) -> None:
        if hasattr(self.weights, "release"):
            self.weights.release(meta)

    def _row(self, i: int, meta: TensorMeta) -> dict:
        p = self.plan[i]
        header_only = self.header_only
        return {
            "model_id": self.model_id,
            "tensor_idx": i,
            "name": meta.name,
            "role": self.roles[i],
            "dtype": meta.dtype,
            "shape": list(meta.shape),
            "n_params": meta.numel,
            "layer_idx": self.layer_idx[i],
            "token_start": None if header_only or p.geometry is None else p.token_start,
            "n_tokens": None if header_only else p.n_tokens,
            "packed_into": p.packed_into,
            "file": meta.file or None,
            # the tensor's values are in `tokens` (its dtype converts exactly to float32): not for
            # integer, bool, complex, sub-byte (F4, F6) or scale (F8_E8M0) dtypes, nor in header-only crawls
            "tokenized": not header_only and is_float_dtype(meta.dtype),
        }

    def consume(self) -> list[pa.Table]:
        """All token tables of the model, in memory (for models small enough to buffer)."""
        return list(self.tokens())
