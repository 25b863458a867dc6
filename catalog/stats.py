"""Per-tensor statistics: the features of Unterthiner et al. (the baseline every weight-space method
must beat) and the statistics training normalizes tokens with.

Moments are accumulated in float64 over fixed-size chunks, so memory stays bounded on huge tensors.
Quantiles are exact up to `EXACT_QUANTILE_LIMIT` values and taken on an evenly strided sample above it.
"""

from __future__ import annotations

import numpy as np

STAT_COLUMNS = ("mean", "std", "min", "max", "q01", "q25", "q50", "q75", "q99", "l2", "sparsity")
QUANTILES = (0.01, 0.25, 0.50, 0.75, 0.99)
EXACT_QUANTILE_LIMIT = 1 << 22
CHUNK = 1 << 22


def tensor_stats(x: np.ndarray) -> dict[str, float | None]:
    """Statistics of a float32 tensor; `sparsity` is the fraction of exact zeros. Empty → all None.

    Values from the wild may hold inf and NaN: their statistics are inf or NaN, without warnings."""
    flat = x.reshape(-1)
    if flat.size == 0:
        return dict.fromkeys((*STAT_COLUMNS, "norm_mean", "norm_std"))
    with np.errstate(all="ignore"):
        return _stats(flat)


def _stats(flat: np.ndarray) -> dict[str, float]:
    n = flat.size
    mean = 0.0
    m2 = 0.0
    sumsq = 0.0
    lo, hi = np.inf, -np.inf
    zeros = 0
    seen = 0
    for start in range(0, n, CHUNK):
        c = flat[start : start + CHUNK].astype(np.float64)
        k = c.size
        cmean = float(c.mean())
        d = c - cmean
        cm2 = float(np.dot(d, d))
        # Chan et al.'s pairwise combination of (count, mean, M2)
        delta = cmean - mean
        total = seen + k
        mean += delta * k / total
        m2 += cm2 + delta * delta * seen * k / total
        seen = total
        sumsq += float(np.dot(c, c))
        lo, hi = float(np.minimum(lo, c.min())), float(np.maximum(hi, c.max()))  # NaN propagates
        zeros += int(k - np.count_nonzero(c))
    sample = flat if n <= EXACT_QUANTILE_LIMIT else flat[:: -(-n // EXACT_QUANTILE_LIMIT)]
    qs = np.quantile(sample.astype(np.float64), QUANTILES)
    std = float(np.sqrt(m2 / n))
    out = {
        "mean": mean,
        "std": std,
        "min": lo,
        "max": hi,
        "q01": float(qs[0]),
        "q25": float(qs[1]),
        "q50": float(qs[2]),
        "q75": float(qs[3]),
        "q99": float(qs[4]),
        "l2": float(np.sqrt(sumsq)),
        "sparsity": zeros / n,
    }
    # Training standardizes tokens per tensor; a constant tensor (std 0) is centred, not scaled.
    out["norm_mean"] = mean
    out["norm_std"] = std if np.isfinite(std) and std > 0 else 1.0
    return out
