"""Normalization of weight tokens, both directions, in one place.

Tokens store raw values, so a new normalization needs no re-crawl: a `Normalizer` fitted on the training
split (`fit_normalizer`) says how values are standardized when read — per layer (μ, σ of tensor i over the
population: SANE's, for models whose tensors line up) or per tensor (its own `norm_mean`/`norm_std`: the
wild) — and how the statistics row every token carries (`STAT_NAMES`: its tensor's s(W), compressed with
asinh/log) is standardized. The forward pieces (`center_scale`, `raw_stat_features`) are what
`train.data` builds windows with; the inverse (`denormalize`, and `decoded_scale` for the statistics a
generator has: the decoded rows) is what rebuilding a model from tokens needs (train/behaviour.py,
train/sample.py).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog.errors import WildzooError
from catalog.store import Catalog

if TYPE_CHECKING:  # torch is imported where a tensor is de-normalized: reading windows needs none
    from torch import Tensor

    from train.data import ModelRef

log = logging.getLogger(__name__)


STAT_NAMES = ("asinh mean", "log std", "asinh q01", "asinh q25", "asinh q50", "asinh q75", "asinh q99",
              "log rms", "sparsity", "bias asinh mean", "bias log std", "asinh mean/std", "bias asinh mean/std")
# a decoded mean is rebuilt from mean/std (its error is then relative to the tensor's spread) where the std is not 0:
# decoded as asinh(mean), an error of 0.06 shifted a linear layer whose std is 0.04 by 1.5 std (bench/recon.py)
WEIGHT_STATS, BIAS_STATS = (0, 1, 11), (9, 10, 12)  # (asinh mean, log std, asinh mean/std) of the weight, the bias
N_STATS = len(STAT_NAMES)  # F: the statistics row every token carries (its tensor's s(W), compressed)
NORMS = ("auto", "per-tensor", "per-layer")
CLIP = 10.0  # normalized values beyond ±CLIP (diverged models) are clipped; their scale is in the statistics row
LOG_FLOOR = -20.0  # log of a std or rms of 0 (a constant or all-zero tensor)


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.clip(np.log(np.where(x > 0, x, 0.0)), LOG_FLOOR, 30.0)


def _ratio(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """asinh(mean / std), 0 where the std is 0 or missing (the mean is then decoded from asinh mean)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.nan_to_num(std) > 0, np.arcsinh(np.nan_to_num(mean) / np.nan_to_num(std, nan=1.0)), 0.0)


def raw_stat_features(cols: dict[str, np.ndarray], bias: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """(n, F) compressed statistics of n tensors from their `tensors` columns (mean, std, q01…q99, l2,
    n_params, sparsity); `bias` (mean, std of each one's packed bias, NaN where none) fills the bias columns.
    Missing values become 0. asinh and log keep order and tame diverged models."""
    n = len(cols["mean"])
    rms = cols["l2"] / np.sqrt(np.maximum(cols["n_params"], 1))
    parts = [np.arcsinh(cols["mean"]), _log(cols["std"]), *(np.arcsinh(cols[q]) for q in
             ("q01", "q25", "q50", "q75", "q99")), _log(rms), cols["sparsity"]]
    if bias is None:
        bias = {"mean": np.full(n, np.nan), "std": np.full(n, np.nan)}
    has = np.isfinite(bias["mean"])
    parts += [np.where(has, np.arcsinh(np.nan_to_num(bias["mean"])), 0.0),
              np.where(has, _log(np.nan_to_num(bias["std"])), 0.0), _ratio(cols["mean"], cols["std"]),
              np.where(has, _ratio(bias["mean"], bias["std"]), 0.0)]
    return np.nan_to_num(np.stack(parts, axis=1), nan=0.0, posinf=0.0, neginf=0.0)


@dataclass(frozen=True)
class Normalizer:
    """How token values are normalized when read (tokens store raw values) and how the statistics row is scaled.

    - `per-tensor` (the wild: layers of different models do not line up): each tensor standardized with its
      own mean and std; the scale survives only in the statistics row.
    - `per-layer` (SANE's, for populations whose tensors line up by position and shape): every model's
      tensor `i` standardized with the same μ and σ, medians over the training split (robust to diverged
      models), so values keep their scale relative to the population.
    In both, the statistics row (`STAT_NAMES`) is standardized per feature over the training split.
    """

    mode: str = "per-tensor"
    layer: dict[int, tuple[float, float]] = dataclass_field(default_factory=dict)  # tensor_idx -> (μ, σ)
    stats_mu: tuple[float, ...] = (0.0,) * N_STATS
    stats_sd: tuple[float, ...] = (1.0,) * N_STATS
    reason: str = ""  # why `auto` chose this mode

    def to_dict(self) -> dict:
        return {"mode": self.mode, "layer": {str(k): list(v) for k, v in self.layer.items()},
                "stats_mu": list(self.stats_mu), "stats_sd": list(self.stats_sd), "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        if len(d["stats_mu"]) != N_STATS:
            raise WildzooError(f"this run's tokens carry a statistics row of {len(d['stats_mu'])} numbers, this "
                               f"wildzoo's of {N_STATS} ({', '.join(STAT_NAMES)}): train it again in a new folder")
        return cls(d["mode"], {int(k): (float(v[0]), float(v[1])) for k, v in d.get("layer", {}).items()},
                   tuple(d["stats_mu"]), tuple(d["stats_sd"]), d.get("reason", ""))

    @functools.cached_property
    def layer_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(μ, σ) indexed by tensor_idx (0 and 1 where the training split had no such tensor), built once."""
        n = max(self.layer, default=-1) + 1
        mu, sd = np.zeros(n), np.ones(n)
        for i, (m, v) in self.layer.items():
            mu[i], sd[i] = m, v
        return mu, sd

    def scale_stats(self, raw: np.ndarray) -> np.ndarray:
        return ((raw - np.asarray(self.stats_mu)) / np.asarray(self.stats_sd)).astype(np.float32)

    def unscale_stats(self, z: np.ndarray) -> np.ndarray:
        return z * np.asarray(self.stats_sd) + np.asarray(self.stats_mu)


STAT_COLS = ("mean", "std", "q01", "q25", "q50", "q75", "q99", "l2", "n_params", "sparsity")


def fit_normalizer(cat: Catalog, refs: list[ModelRef], mode: str = "auto") -> Normalizer:
    """The normalization of `mode` fitted on the tensors of `refs` (the training split).

    `auto` is `per-layer` when every model of `refs` has the same sequence of tensor shapes, else `per-tensor`.
    """
    if mode not in NORMS:
        raise WildzooError(f"norm must be one of {', '.join(NORMS)}, got {mode!r}")
    con = duckdb.connect(":memory:")
    ten = pa.concat_tables([pq.read_table(p, filesystem=cat.fs, columns=["model_id", "tensor_idx", "shape",
                                          "packed_into", *STAT_COLS]) for p in cat.files("tensors")])
    con.register("ten", ten)
    con.register("chosen", pa.table({"model_id": [r.model_id for r in refs]}))
    t = con.sql("""SELECT t.* FROM ten t JOIN chosen USING (model_id) ORDER BY model_id, tensor_idx""").to_arrow_table()
    sigs = con.execute("""SELECT count(DISTINCT sig) FROM (SELECT string_agg(array_to_string(shape, 'x'), ','
                      ORDER BY tensor_idx) AS sig FROM ten JOIN chosen USING (model_id) GROUP BY model_id)""").fetchone()[0]
    aligned = sigs == 1
    layer: dict[int, tuple[float, float]] = {}
    off = 0.0
    if aligned:
        rows = con.execute("""SELECT tensor_idx, median(mean), median(std) FILTER (std > 0) FROM ten JOIN chosen
                              USING (model_id) WHERE std IS NOT NULL GROUP BY tensor_idx""").fetchall()
        layer = {int(i): (float(m or 0.0), float(s) if s and s > 0 else 1.0) for i, m, s in rows}
        off = _off_scale(t, layer)
    why = "layouts differ"
    if mode == "auto":
        mode = "per-layer" if aligned and off <= MAX_OFF_SCALE else "per-tensor"
        if aligned:
            why = (f"tensors line up; per-layer statistics would leave {off:.0%} of the training tensors at a mean "
                   f"square above {OFF_SCALE:g}" + (" (scales differ by orders of magnitude across models)"
                                                    if mode == "per-tensor" else ""))
    elif mode == "per-layer" and not aligned:
        raise WildzooError(f"norm per-layer needs models whose tensors line up (same shapes in the same order); "
                           f"the training split holds {sigs} layouts: use per-tensor")
    if mode != "per-layer":
        layer = {}
    con.close()
    cols = {c: t.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in STAT_COLS}
    raw = raw_stat_features(cols)
    keep = np.isfinite(cols["std"])
    raw = raw[keep] if keep.any() else raw
    mu, sd = raw.mean(0), raw.std(0)
    # the bias features reuse the weight's scaling (they are the same kind of number)
    mu[list(BIAS_STATS)], sd[list(BIAS_STATS)] = mu[list(WEIGHT_STATS)], sd[list(WEIGHT_STATS)]
    sd = np.where(sd > 1e-6, sd, 1.0)
    log.info("normalization %s (%s)", mode, why)
    return Normalizer(mode, layer, tuple(float(x) for x in mu), tuple(float(x) for x in sd), reason=why)


OFF_SCALE = 10.0  # a normalized tensor whose mean square is above this is off the unit scale
MAX_OFF_SCALE = 0.1  # `auto` takes per-layer only when at most this fraction of training tensors would be off scale


def _off_scale(t: pa.Table, layer: dict[int, tuple[float, float]]) -> float:
    """The fraction of the training tensors (rows of `t`) whose mean square after per-layer normalization,
    ((mean − μ)² + std²) / σ², is above OFF_SCALE (below is harmless: a near-constant tensor, such as biases
    at their initial value, normalizes to near zero)."""
    idx = t.column("tensor_idx").to_numpy()
    mean = t.column("mean").to_numpy(zero_copy_only=False).astype(np.float64)
    std = t.column("std").to_numpy(zero_copy_only=False).astype(np.float64)
    ok = np.isfinite(mean) & np.isfinite(std) & np.isin(idx, list(layer))
    if not ok.any():
        return 0.0
    mu = np.array([layer[int(i)][0] for i in idx[ok]])
    sd = np.array([layer[int(i)][1] for i in idx[ok]])
    ms = ((mean[ok] - mu) ** 2 + std[ok] ** 2) / sd ** 2
    return float((ms > OFF_SCALE).mean())


def column_stat(t: pa.Table, name: str, default: float) -> np.ndarray:
    x = t.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
    bad = ~np.isfinite(x) | (x <= 0 if name.endswith("std") else np.zeros(len(x), dtype=bool))
    return np.where(bad, default, x).astype(np.float32)


def center_scale(t: pa.Table, norm: Normalizer, idx_col: str, mean_col: str, std_col: str) -> tuple[np.ndarray, np.ndarray]:
    """(μ, σ) per token row: the tensor's own (per-tensor) or its layer's over the population (per-layer)."""
    if norm.mode == "per-layer":
        mu_of, sd_of = norm.layer_arrays
        idx = t.column(idx_col).fill_null(-1).to_numpy().astype(np.int64)
        known = (idx >= 0) & (idx < len(mu_of))
        idx = np.where(known, idx, 0)
        return np.where(known, mu_of[idx], 0.0).astype(np.float32), np.where(known, sd_of[idx], 1.0).astype(np.float32)
    return column_stat(t, mean_col, 0.0), column_stat(t, std_col, 1.0)


# the inverse: from normalized token values back to raw weights


def denormalize(values: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Raw weights (B, T, S) from normalized token values: value · σ + μ of the token's tensor, and of its
    packed bias in the bias column (`n_valid − 1` of tokens with `has_bias`)."""
    import torch

    S = values.shape[-1]
    cols = torch.arange(S, device=values.device)
    bias_col = batch["has_bias"][..., None] & (cols == (batch["n_valid"] - 1)[..., None])  # (B, T, S)
    mu = torch.where(bias_col, batch["bmu"][..., None], batch["mu"][..., None])
    sd = torch.where(bias_col, batch["bsd"][..., None], batch["sd"][..., None])
    return values.float() * sd + mu


def decoded_scale(recon_stats: Tensor, batch: dict[str, Tensor], norm: Normalizer | None) -> dict[str, Tensor]:
    """What de-normalizing needs (`mu`, `sd`, `bmu`, `bsd`, (B, T)) as a generator has it: from the decoded
    statistics rows (B, T, F) (standardized, `STAT_NAMES`) where normalization was per tensor,
    averaged over the tokens of each tensor of a window (one tensor = one layer index `l` and role) — every token
    decodes its tensor's row, and their mean is closer than any one of them; per layer, μ and σ are the
    population's and need nothing decoded."""
    import torch

    out = {k: batch[k] for k in ("mu", "sd", "bmu", "bsd")}
    if norm is None or norm.mode == "per-layer":
        return out
    z = recon_stats.double() * torch.tensor(norm.stats_sd, dtype=torch.float64) + torch.tensor(norm.stats_mu,
                                                                                               dtype=torch.float64)
    real = (batch["n_valid"] > 0).double()  # (B, T)
    key = batch["l"] * 1024 + batch["role"]  # one tensor: its layer index and role (a dense bias shares the layer)
    same = (key[:, :, None] == key[:, None, :]).double() * real[:, None, :]  # (B, T, T)
    pooled = (same @ z) / same.sum(-1, keepdim=True).clamp_min(1.0)  # (B, T, F)

    def scale(x: Tensor) -> Tensor:  # a std of 0 is stored as LOG_FLOOR; its tensor was normalized with σ = 1
        return torch.where(x > LOG_FLOOR + 1, x.clamp(max=30.0).exp(), torch.ones_like(x))

    for (m, s, r), (mu, sd) in ((WEIGHT_STATS, ("mu", "sd")), (BIAS_STATS, ("bmu", "bsd"))):
        spread = scale(pooled[..., s])
        # the mean relative to the spread where there is one (its error then scales with the tensor), else absolute
        mean = torch.where(pooled[..., s] > LOG_FLOOR + 1, torch.sinh(pooled[..., r]) * spread, torch.sinh(pooled[..., m]))
        out[mu], out[sd] = mean.float(), spread.float()
    return out
