"""Per-model feature matrices and targets read from a catalog, for probes.

- `stats_features`: s(W), the per-layer statistics of Unterthiner et al. (mean, variance and the
  0/25/50/75/100 percentiles of every float tensor), concatenated in tensor order.
- `weight_features`: W, every weight of the model flattened (only for small models).
Models are aligned by architecture: features are built for the models sharing the most common
layout (the sequence of tensor shapes), since layers of different architectures do not line up.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from catalog.errors import WildzooError
from catalog.query import connect
from catalog.store import Catalog

log = logging.getLogger(__name__)
STAT_FEATURES = ("mean", "var", "min", "q25", "q50", "q75", "max")
MAX_W_FEATURES = 200_000


@dataclass
class Population:
    """Models of one architecture with their group (trained model) and properties."""

    model_ids: list[str]
    groups: np.ndarray  # the trained model each checkpoint belongs to (splits keep groups together)
    numeric: dict[str, np.ndarray]  # property -> values (NaN where missing)
    categorical: dict[str, np.ndarray]  # property -> labels (None where missing)
    signature: str
    dropped: int  # models of other architectures


def load_population(cat: Catalog, properties: list[str] | None = None) -> Population:
    """The largest architecture group of `ok` models and their properties."""
    con = connect(cat, tables=("models", "tensors", "properties"))
    sigs = con.execute(
        """SELECT m.model_id, coalesce(m.repo_id, m.model_id) AS grp,
                  string_agg(t.dtype || ':' || array_to_string(t.shape, 'x'), ',' ORDER BY t.tensor_idx) AS sig
           FROM models m JOIN tensors t USING (model_id)
           WHERE m.status = 'ok' GROUP BY ALL ORDER BY m.model_id"""
    ).fetchall()
    if not sigs:
        raise WildzooError(f"catalog {cat.uri} has no crawled models to probe")
    top, _ = Counter(s for _, _, s in sigs).most_common(1)[0]
    chosen = [(m, g) for m, g, s in sigs if s == top]
    ids = [m for m, _ in chosen]
    pos = {m: i for i, m in enumerate(ids)}
    con.execute("CREATE TEMP TABLE chosen (model_id VARCHAR)")
    con.executemany("INSERT INTO chosen VALUES (?)", [[m] for m in ids])
    rows = con.execute(
        "SELECT p.model_id, p.name, p.value, p.text FROM properties p JOIN chosen USING (model_id)"
    ).fetchall()
    numeric: dict[str, np.ndarray] = {}
    categorical: dict[str, np.ndarray] = {}
    for mid, name, value, text in rows:
        if properties and name not in properties:
            continue
        if value is not None and text is None:
            numeric.setdefault(name, np.full(len(ids), np.nan))[pos[mid]] = value
        elif text is not None:
            categorical.setdefault(name, np.full(len(ids), None, dtype=object))[pos[mid]] = text
    return Population(ids, np.array([g for _, g in chosen]), numeric, categorical, top, len(sigs) - len(ids))


def stats_features(cat: Catalog, model_ids: list[str]) -> np.ndarray:
    """s(W): `[n_models, n_float_tensors * 7]`, in the order of `model_ids`."""
    con = connect(cat, tables=("tensors",))
    con.execute("CREATE TEMP TABLE chosen (model_id VARCHAR, i INTEGER)")
    con.executemany("INSERT INTO chosen VALUES (?, ?)", [[m, i] for i, m in enumerate(model_ids)])
    cols = ", ".join("std * std" if c == "var" else c for c in STAT_FEATURES)
    table = con.sql(
        f"""SELECT c.i, {cols} FROM tensors t JOIN chosen c USING (model_id)
            WHERE t.std IS NOT NULL ORDER BY c.i, t.tensor_idx"""
    ).fetchnumpy()
    idx = table.pop("i")
    values = np.stack([np.asarray(v, dtype=np.float64) for v in table.values()], axis=1)
    per_model = np.bincount(idx, minlength=len(model_ids))
    if per_model.min() != per_model.max():
        raise WildzooError("models of one architecture have different numbers of float tensors")
    return values.reshape(len(model_ids), -1)


def weight_features(cat: Catalog, model_ids: list[str]) -> np.ndarray | None:
    """W: every float weight flattened, `[n_models, n_params]`; None when models are too big for it."""
    con = connect(cat, tables=("models", "tokens"))
    n_tok = con.execute("SELECT max(n_tokens) FROM models WHERE model_id = ?", [model_ids[0]]).fetchone()[0]
    if not n_tok or n_tok * cat.spec.token_size > MAX_W_FEATURES:
        return None
    con.execute("CREATE TEMP TABLE chosen (model_id VARCHAR, i INTEGER)")
    con.executemany("INSERT INTO chosen VALUES (?, ?)", [[m, i] for i, m in enumerate(model_ids)])
    t = con.sql(
        'SELECT c.i, t."values" FROM tokens t JOIN chosen c USING (model_id) ORDER BY c.i, t.token_idx'
    ).to_arrow_table()
    flat = t.column("values").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    # padding positions are identical (zero) across a population of one architecture: harmless features
    return flat.reshape(len(model_ids), -1)
