"""Property prediction from model features: the evaluation protocol of the field, plus robust heads.

Protocol (SANE, Unterthiner et al.): split by trained model 70/15/15 (no model's checkpoints on both
sides), closed-form ridge with the regularization chosen on the validation split among 17 values
1e3…1e-5, R² on the test split. Real populations hold diverged models (weights in the thousands) and
many near-chance ones, where a plain ridge on standardized features scores far below zero; so two
more heads are reported on the same features: an outlier-safe ridge (features squashed with
sign·log1p before standardizing) and gradient-boosted trees. Categorical properties (activation,
optimizer, …) are scored by accuracy with a logistic head and trees.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import r2_score

log = logging.getLogger(__name__)
ALPHAS = np.logspace(3, -5, 17)


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def group_split(groups: np.ndarray, seed: int = 0, fractions=(0.7, 0.15)) -> Split:
    """Indices split 70/15/15 by group: every checkpoint of one trained model lands on one side."""
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    n_train = int(round(fractions[0] * len(uniq)))
    n_val = int(round(fractions[1] * len(uniq)))
    side = {g: 0 if i < n_train else 1 if i < n_train + n_val else 2 for i, g in enumerate(uniq)}
    which = np.array([side[g] for g in groups])
    return Split(*(np.flatnonzero(which == k) for k in range(3)))


def squash(x: np.ndarray) -> np.ndarray:
    """sign·log1p(|x|): keeps order, tames weights in the thousands."""
    return np.sign(x) * np.log1p(np.abs(x))


class Standardizer:
    def __init__(self, x: np.ndarray) -> None:
        self.mu = x.mean(0)
        sd = x.std(0)
        self.sd = np.where(sd > 1e-12, sd, 1.0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.nan_to_num((x - self.mu) / self.sd, nan=0.0, posinf=0.0, neginf=0.0)


class RidgePath:
    """Closed-form ridge on centred data for many alphas from one eigendecomposition of the Gram matrix (the
    dual one when there are more features than samples): each alpha then costs two small products, not a
    fresh d×d or n×n solve (W, thousands of weights, paid ~2 s per property for 17 solves)."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.xm, self.ym = x.mean(0), y.mean()
        self.xc, yc = x - self.xm, y - self.ym
        n, d = self.xc.shape
        self.dual = d > n
        gram = self.xc @ self.xc.T if self.dual else self.xc.T @ self.xc
        self.lam, self.vec = np.linalg.eigh(gram)
        self.lam = np.clip(self.lam, 0.0, None)  # a Gram matrix is positive semi-definite: round-off is not
        self.proj = self.vec.T @ (yc if self.dual else self.xc.T @ yc)

    def fit(self, alpha: float) -> tuple[np.ndarray, float]:
        coef = self.vec @ (self.proj / (self.lam + alpha))
        w = self.xc.T @ coef if self.dual else coef
        return w, self.ym - self.xm @ w


def ridge_probe(x: np.ndarray, y: np.ndarray, s: Split, robust: bool = False) -> tuple[float, np.ndarray, float]:
    """(test R², test predictions, chosen alpha) of ridge with alpha chosen on the validation split."""
    if robust:
        x = squash(x)
    st = Standardizer(x[s.train])
    xt, xv, xs = st(x[s.train]), st(x[s.val]), st(x[s.test])
    path = RidgePath(xt, y[s.train])
    best = (-np.inf, ALPHAS[0])
    for a in ALPHAS:
        w, b = path.fit(a)
        score = r2_score(y[s.val], xv @ w + b)
        if score > best[0]:
            best = (score, a)
    w, b = path.fit(best[1])
    pred = xs @ w + b
    return float(r2_score(y[s.test], pred)), pred, float(best[1])


def trees_probe(x: np.ndarray, y: np.ndarray, s: Split, seed: int = 0) -> tuple[float, np.ndarray]:
    """(test R², predictions) of gradient-boosted trees trained on train+val (trees need no alpha)."""
    fit = np.concatenate([s.train, s.val])
    m = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, random_state=seed)
    m.fit(np.nan_to_num(x[fit]), y[fit])
    pred = m.predict(np.nan_to_num(x[s.test]))
    return float(r2_score(y[s.test], pred)), pred


def classify_probe(x: np.ndarray, labels: np.ndarray, s: Split, head: str, seed: int = 0) -> float:
    """Test accuracy of a logistic head (C chosen on val, squashed features) or of trees."""
    if head == "trees":
        fit = np.concatenate([s.train, s.val])
        m = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, random_state=seed)
        m.fit(np.nan_to_num(x[fit]), labels[fit])
        return float((m.predict(np.nan_to_num(x[s.test])) == labels[s.test]).mean())
    xq = squash(x)
    st = Standardizer(xq[s.train])
    best = (-1.0, 1.0)
    for c in (0.01, 0.1, 1.0, 10.0):
        m = LogisticRegression(C=c, max_iter=2000).fit(st(xq[s.train]), labels[s.train])
        acc = (m.predict(st(xq[s.val])) == labels[s.val]).mean()
        if acc > best[0]:
            best = (acc, c)
    m = LogisticRegression(C=best[1], max_iter=2000).fit(st(xq[s.train]), labels[s.train])
    return float((m.predict(st(xq[s.test])) == labels[s.test]).mean())


def trees_val(x: np.ndarray, y: np.ndarray, s: Split, seed: int = 0) -> float:
    """Validation R² of gradient-boosted trees trained on the train split alone: a score to choose by (a sweep's
    trials) that never sees the test split."""
    m = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, random_state=seed)
    m.fit(np.nan_to_num(x[s.train]), y[s.train])
    return float(r2_score(y[s.val], m.predict(np.nan_to_num(x[s.val]))))
