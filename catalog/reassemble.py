"""Tokens back to tensors: the exact inverse of tokenization, read from a catalog.

Weight generation stands on this: tokens reassembled in `token_idx` order give every float tensor
back bit-for-bit as float32.
"""

from __future__ import annotations

import numpy as np

from catalog import tokenize as tk
from catalog.errors import WildzooError
from catalog.query import connect
from catalog.store import Catalog


def tensors_from_tokens(tensor_rows: list[dict], values: np.ndarray, tokenization: str, token_size: int) -> dict:
    """{name: float32 array} from a model's `tensors` rows and its token values `[n_tokens, token_size]`."""
    by_idx = {r["tensor_idx"]: r for r in tensor_rows}
    carried = {r["packed_into"]: r["tensor_idx"] for r in tensor_rows if r.get("packed_into") is not None}
    out = {}
    for r in tensor_rows:
        if not r.get("n_tokens") or r.get("token_start") is None:
            continue
        shape = tuple(r["shape"])
        bias_idx = carried.get(r["tensor_idx"])
        g = tk.geometry(shape, tokenization, token_size, with_bias=bias_idx is not None)
        start = r["token_start"]
        w, b = tk.detokenize(values[start : start + g.n_tokens], shape, g, with_bias=bias_idx is not None)
        out[r["name"]] = w
        if b is not None:
            out[by_idx[bias_idx]["name"]] = b
    return out


def model_tensors(catalog: Catalog | str, model_id: str) -> dict[str, np.ndarray]:
    """Every tokenized tensor of one catalog model, rebuilt from its tokens."""
    cat = catalog if isinstance(catalog, Catalog) else Catalog.open(catalog)
    con = connect(cat, tables=("tensors", "tokens"))
    rows = con.sql("SELECT * FROM tensors WHERE model_id = ? ORDER BY tensor_idx", params=[model_id]).to_arrow_table()
    if rows.num_rows == 0:
        raise WildzooError(f"model {model_id!r} has no tensors in {cat.uri}")
    toks = con.sql(
        'SELECT token_idx, "values" FROM tokens WHERE model_id = ? ORDER BY token_idx', params=[model_id]
    ).to_arrow_table()
    idx = toks.column("token_idx").to_numpy()
    if len(idx) and not np.array_equal(idx, np.arange(len(idx))):
        raise WildzooError(f"model {model_id!r}: token_idx is not 0..{len(idx) - 1} (duplicated or missing tokens)")
    flat = toks.column("values").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    values = flat.astype(np.float32, copy=False).reshape(len(idx), cat.spec.token_size)
    return tensors_from_tokens(rows.to_pylist(), values, cat.spec.tokenization, cat.spec.token_size)
