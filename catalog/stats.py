"""Per-tensor statistics: the features of Unterthiner et al. (the baseline every weight-space method
must beat) and the statistics training normalizes tokens with.

Moments are accumulated in float64 over fixed-size chunks, so memory stays bounded on huge tensors.
Quantiles are exact at every size (numpy's default, linear interpolation between order statistics): one
partial sort (`np.partition`, O(n)) of a float32 copy, so a tensor costs one more copy of itself. A strided
sample is not an approximation of a row-major table's quantiles: it lands on a few columns only.
"""

from __future__ import annotations

import numpy as np

STAT_COLUMNS = ("mean", "std", "min", "max", "q01", "q25", "q50", "q75", "q99", "l2", "sparsity")
QUANTILES = (0.01, 0.25, 0.50, 0.75, 0.99)
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
    qs = [float("nan")] * len(QUANTILES) if np.isnan(lo) else quantiles(flat, QUANTILES)  # NaN: as np.quantile
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


def quantiles(flat: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """Exact quantiles of a 1-D array without NaN, equal to `np.quantile(flat.astype(np.float64), qs)`.

    Only the order statistics the quantiles need are found (`np.partition` at those ranks); they are
    interpolated in float64 the way numpy does, so a float32 tensor needs one float32 copy, not a float64 one."""
    n = flat.size
    pos = [q * (n - 1) for q in qs]
    ranks = sorted({r for p in pos for r in (int(np.floor(p)), min(int(np.floor(p)) + 1, n - 1))})
    part = np.partition(flat, ranks)
    out = []
    for p in pos:
        i = int(np.floor(p))
        a, b, t = float(part[i]), float(part[min(i + 1, n - 1)]), p - i
        diff = b - a
        out.append(b - diff * (1 - t) if t >= 0.5 else a + diff * t)  # numpy's _lerp
    return out
