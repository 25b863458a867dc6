"""`train probe`: property prediction for every feature set × head, with pictures.

Feature sets: s(W) (per-layer statistics, the baseline), W (flattened weights, small models only) and,
with a run, the backbone's embeddings. Each is scored on the same group split.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from catalog.errors import WildzooError
from catalog.store import Catalog
from train import probe
from train.features import Population, load_population, stats_features, weight_features

log = logging.getLogger(__name__)
NUMERIC_TARGETS = ("test_acc", "epoch", "ggap")
MAX_CLASSES = 12
TREES_MAX = 1500  # features beyond which trees are skipped (W: thousands of weights)
RIDGE_ONLY = ("backbone-mean",)  # feature sets scored with the ridge heads only (trees cost a minute per set)
NO_CLASSES = ("backbone",)  # hyperparameters are classified from `combined` (which holds it), not from it alone
# a backbone embedding enters the trees as its first principal components: a tree fit costs time in proportion to its
# features (the small flavour's 384 pooled latents: 8 s a fit, most of the probe), and 64 components keep ~98% of
# the embedding's variance on the README zoo
TREES_PCS = 64


def categorical_targets(pop: Population) -> dict[str, np.ndarray]:
    """Text properties worth classifying: 2…MAX_CLASSES classes, each seen at least 5 times."""
    out = {}
    for name, labels in pop.categorical.items():
        present = labels[labels != None]  # noqa: E711 (object array)
        values, counts = np.unique(present.astype(str), return_counts=True)
        if 2 <= len(values) <= MAX_CLASSES and counts.min() >= 5 and len(present) == len(labels):
            out[name] = labels.astype(str)
    return out


def feature_sets(cat: Catalog, pop: Population, embeddings: dict[str, np.ndarray] | np.ndarray | None = None,
                 behaviour: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """s(W), W (small models), `behaviour` (fingerprints, train/fingerprint.py) and `s(W)+behaviour` where every
    probed model has one, and with a run's embeddings: `backbone` (per-layer pooled), `backbone-mean` and
    `combined` (backbone ⊕ s(W) ⊕ behaviour, or backbone ⊕ s(W) without fingerprints)."""
    sets = {"s(W)": stats_features(cat, pop.model_ids)}
    w = weight_features(cat, pop.model_ids)
    if w is not None:
        sets["W"] = w
    if behaviour is not None:
        sets["behaviour"] = behaviour
        sets["s(W)+behaviour"] = np.concatenate([sets["s(W)"], behaviour], axis=1)
    if isinstance(embeddings, np.ndarray):
        embeddings = {"backbone": embeddings}
    for name, x in (embeddings or {}).items():
        sets[name] = x
    if embeddings and "backbone" in embeddings:  # the backbone block first (`trees_inputs` relies on it)
        sets["combined"] = np.concatenate([embeddings["backbone"], sets["s(W)"],
                                           *([behaviour] if behaviour is not None else [])], axis=1)
    return sets


def trees_inputs(sets: dict[str, np.ndarray], rows: np.ndarray, pcs: int = TREES_PCS) -> dict[str, np.ndarray]:
    """The feature sets as the trees see them: the backbone block (all of `backbone`, the first columns of
    `combined`) replaced by its first `pcs` principal components, fitted on `rows` (the models the trees train on;
    no labels). The ridge and logistic heads keep the whole embedding."""
    b = sets.get("backbone")
    if b is None or b.shape[1] <= pcs:
        return sets
    b = np.nan_to_num(b)
    mu = b[rows].mean(0)
    vt = np.linalg.svd(b[rows] - mu, full_matrices=False)[2]
    comps = (b - mu) @ vt[:pcs].T
    out = {**sets, "backbone": comps}
    if "combined" in sets:
        out["combined"] = np.concatenate([comps, sets["combined"][:, b.shape[1]:]], axis=1)
    return out


def run_probe(cat: Catalog | None, seed: int = 0, embeddings: dict[str, np.ndarray] | np.ndarray | None = None,
              pop: Population | None = None, sets: dict[str, np.ndarray] | None = None,
              categorical: bool = True, numeric: bool = True) -> tuple[list[dict], dict]:
    """Score every feature set and head on the split of `seed`: the numeric properties with `numeric`, the
    hyperparameters (classification) with `categorical`; returns (results, predictions for plots). `cat` may be
    None where `pop` and `sets` are given."""
    pop = pop or load_population(cat)
    if pop.dropped:
        log.info("probing the %d models of the most common architecture (%d others left out)",
                 len(pop.model_ids), pop.dropped)
    targets = {k: pop.numeric[k] for k in NUMERIC_TARGETS if k in pop.numeric} if numeric else {}
    classes = categorical_targets(pop) if categorical else {}
    if not targets and not classes and categorical and numeric:
        raise WildzooError("no properties to predict in this catalog (crawl a model zoo: python -m crawl zoo)")
    split = probe.group_split(pop.groups, seed)
    if min(len(split.train), len(split.val), len(split.test)) < 2:
        raise WildzooError(f"too few trained models ({len(np.unique(pop.groups))}) for a 70/15/15 split")
    sets = sets or feature_sets(cat, pop, embeddings)
    tree_sets = trees_inputs(sets, np.concatenate([split.train, split.val]))
    results, preds = [], {"true": {}, "pred": {}}
    for name, y in targets.items():
        ok = np.isfinite(y)
        s = probe.Split(*(idx[ok[idx]] for idx in (split.train, split.val, split.test)))
        if min(len(s.train), len(s.val), len(s.test)) < 2:
            continue
        preds["true"][name] = y[s.test]
        for fname, x in sets.items():
            heads = [("ridge", lambda x=x, y=y, s=s: probe.ridge_probe(x, y, s)[:2]),
                     ("ridge-robust", lambda x=x, y=y, s=s: probe.ridge_probe(x, y, s, robust=True)[:2])]
            if x.shape[1] <= TREES_MAX and fname not in RIDGE_ONLY:
                heads.append(("trees", lambda x=tree_sets[fname], y=y, s=s: probe.trees_probe(x, y, s, seed)))
            for head, fn in heads:
                r2, pred = fn()
                method = f"{fname} {head}"
                results.append({"property": name, "method": method, "metric": "R2", "value": r2,
                                "n_test": int(len(s.test)), "seed": seed})
                preds["pred"].setdefault(name, {})[method] = pred
    for name, labels in classes.items():
        for fname, x in sets.items():
            for head in ("logistic", "trees"):
                if x.shape[1] > TREES_MAX or fname in RIDGE_ONLY + NO_CLASSES:  # W: trees do not scale to it, its logistic
                    continue  # head costs minutes; the plain mean is a comparison, not a contender
                acc = probe.classify_probe(tree_sets[fname] if head == "trees" else x, labels, split, head, seed)
                results.append({"property": name, "method": f"{fname} {head}", "metric": "accuracy",
                                "value": acc, "n_test": int(len(split.test)), "seed": seed})
    preds["features"] = sets["s(W)"]
    preds["color"] = pop.numeric.get("test_acc")
    return results, preds


def _probe_part(part: tuple[int, bool, bool], pop: Population, sets: dict[str, np.ndarray],
                threads: int) -> tuple[tuple[int, bool, bool], tuple[list[dict], dict]]:
    """One part (seed, numeric, categorical) of `run_probes` (in a worker process where there are several), its BLAS
    and OpenMP (trees) held to `threads`."""
    from threadpoolctl import threadpool_limits

    seed, numeric, categorical = part
    with threadpool_limits(threads):
        return part, run_probe(None, seed, pop=pop, sets=sets, numeric=numeric, categorical=categorical)


def run_probes(cat: Catalog, seeds: list[int], embeddings: dict[str, np.ndarray] | None = None,
               pop: Population | None = None, behaviour: np.ndarray | None = None,
               jobs: int | None = None, sets: dict[str, np.ndarray] | None = None) -> tuple[list[dict], dict]:
    """`run_probe` on each split seed (the same splits for every method: paired); returns (results of every
    seed, predictions of the first seed). Hyperparameters (classification) are scored on the first seed only:
    the trees of every class cost minutes per seed. `sets`: the feature sets made already (else `feature_sets`).

    The parts (each seed's numeric properties, the first seed's hyperparameters) run in `jobs` processes (default:
    one per core, each with one thread): gradient-boosted trees on ~1,000 models keep two threads half idle, so
    two single-threaded fits side by side finish sooner. The results are in the order of one process."""
    pop = pop or load_population(cat)
    sets = sets or feature_sets(cat, pop, embeddings, behaviour)
    parts = [(seed, True, False) for seed in seeds] + [(seeds[0], False, True)]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(parts)))
    done: dict[tuple, tuple[list[dict], dict]] = {}
    log.info("probing split seeds %s (and hyperparameters on seed %d) in %d process(es)", ", ".join(map(str, seeds)),
             seeds[0], jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    if jobs == 1:
        work = (_probe_part(p, pop, sets, threads) for p in parts)
    else:
        from joblib import Parallel, delayed

        work = Parallel(n_jobs=jobs, return_as="generator_unordered")(
            delayed(_probe_part)(p, pop, sets, threads)
            for p in sorted(parts, key=lambda p: not p[2]))  # the longest part (hyperparameters) first
    for part, out in work:
        done[part] = out
        log.info("probed %s of split seed %d (%d/%d)", "properties" if part[1] else "hyperparameters", part[0],
                 len(done), len(parts))
    results: list[dict] = []
    for seed in seeds:  # a sequential run's order: seed 0's properties and hyperparameters, then the next seeds
        results += done[(seed, True, False)][0] + done.get((seed, False, True), ([], {}))[0]
    return results, done[(seeds[0], True, False)][1]


def summarize(results: list[dict], baseline: str = "s(W) trees") -> list[dict]:
    """Per property and method: mean, sd and n over seeds, and on how many seeds it beat `baseline`."""
    by: dict[tuple, dict[int, float]] = {}
    for r in results:
        by.setdefault((r["property"], r["metric"], r["method"]), {})[r.get("seed", 0)] = r["value"]
    out = []
    for (prop, metric, method), vals in by.items():
        base = by.get((prop, metric, baseline), {})
        v = np.array(list(vals.values()))
        wins = sum(1 for sd, x in vals.items() if sd in base and x > base[sd])
        out.append({"property": prop, "metric": metric, "method": method, "mean": float(v.mean()),
                    "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
                    "wins": wins if method != baseline else None})
    return out


def format_summary(summary: list[dict], methods: list[str] | None = None) -> str:
    """A method × property table of mean ± sd over seeds, with (wins/n) against s(W) trees."""
    methods = methods or list(dict.fromkeys(r["method"] for r in summary))
    props = list(dict.fromkeys((r["property"], r["metric"]) for r in summary))
    cell = {(r["property"], r["metric"], r["method"]): r for r in summary}

    def fmt(r: dict | None) -> str:
        if r is None:
            return "-"
        text = f"{r['mean']:.3f} ± {r['sd']:.3f}"
        return text + (f" ({r['wins']}/{r['n']})" if r["wins"] is not None and r["n"] > 1 else "")

    rows = [[fmt(cell.get((p, m, meth))) for p, m in props] for meth in methods]
    width = max(18, *(len(c) for row in rows for c in row))
    mw = max(12, *(len(m) for m in methods))
    head = [f"{p} ({'R²' if m == 'R2' else m})" for p, m in props]
    lines = [f"{'method':{mw}s} " + " ".join(f"{h:>{max(width, len(h))}s}" for h in head)]
    for meth, row in zip(methods, rows, strict=True):
        lines.append(f"{meth:{mw}s} " + " ".join(f"{c:>{max(width, len(h))}s}" for c, h in zip(row, head, strict=True)))
    return "\n".join(lines)


def save(results: list[dict], preds: dict, out: Path, summary: list[dict] | None = None) -> list[Path]:
    """probe.json (every seed's results and their summary) and the pictures: predicted vs true test accuracy
    per method (first seed); a 2-D map of s(W)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps({"results": results, "summary": summary or summarize(results)},
                                               indent=1))
    written = [out / "probe.json"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "test_acc" in preds["pred"]:
        methods = preds["pred"]["test_acc"]
        y = preds["true"]["test_acc"]
        cols = min(3, len(methods))
        rows = -(-len(methods) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
        seed0 = results[0].get("seed", 0)
        r2 = {r["method"]: r["value"] for r in results if r["property"] == "test_acc" and r.get("seed", 0) == seed0}
        for ax, (m, p) in zip(axes.flat, methods.items(), strict=False):
            ax.scatter(y, p, s=6, alpha=0.5)
            ax.plot([0, 1], [0, 1], "k--", lw=0.8)
            ax.set(title=f"{m}  R²={r2[m]:.3f}", xlabel="true test accuracy", ylabel="predicted",
                   xlim=(0, 1.02), ylim=(-0.1, 1.1))
        for ax in list(axes.flat)[len(methods):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "probe_test_acc.png", dpi=90)
        plt.close(fig)
        written.append(out / "probe_test_acc.png")
    x = probe.squash(preds["features"])
    x = probe.Standardizer(x)(x)
    u, sv, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    xy = u[:, :2] * sv[:2]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    color = preds["color"]
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=color if color is not None else "C0", s=6, cmap="viridis")
    if color is not None:
        fig.colorbar(sc, label="test accuracy")
    ax.set(title="s(W) features, first two principal components", xlabel="PC 1", ylabel="PC 2")
    fig.tight_layout()
    fig.savefig(out / "features_pca.png", dpi=90)
    plt.close(fig)
    written.append(out / "features_pca.png")
    return written
