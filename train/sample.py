"""`train sample`: new models generated from a trained backbone's latent space, and checked not to be copies.

Anchors are training models of one known architecture (train/behaviour.py): the top K by a property, or any
SQL selection over the catalog. Each anchor is encoded whole (its tokens fit one window); new latents are
sampled; the decoder turns them into normalized tokens and a statistics row, which de-normalize them
(`decoded_scale`: what a generator has, never the anchors' true statistics); the tokens are laid out as the
architecture's tensors and written as a Hugging Face-layout folder (`config.json` naming the architecture,
`model.safetensors`). No fine-tuning and no data-dependent repair.

Methods:
- `kde` (the published one, SANE): a kernel density around the anchors' latents — an anchor picked at random
  plus Gaussian noise of Scott's bandwidth per token position (σ of the anchors' latents at that position ×
  K^(-1/(L+4)), × `bandwidth`). It mostly returns an anchor plus noise. The bandwidth trades accuracy for
  novelty; it is not chosen on any labeled data: every bandwidth asked for (default ×0.25, ×0.5 and ×1, Scott's
  own) is sampled and reported as a configuration of its own, `kde×b`.
- `interp`: mixes anchors: the latents of two anchors interpolated, λ uniform in [0.25, 0.75].
- `gauss`: a Gaussian over whole-model latents (the anchors' mean and their covariance, rank K − 1), so every
  sample draws on every anchor.

The report (`DIR/report.md`, `DIR/report.png`) scores every sample on the held-out digits test split next to
the anchors, random initializations of the architecture, the best training model and "anchor + Gaussian
noise" models whose noise is tuned to each method's mean accuracy; and gives each model's L2 distance to its
nearest training model in normalized weight space (every tensor divided by its population standard
deviation over the training models) — the check that separates generation from memorization (Zeng et al.,
arXiv 2506.07998): an anchor is at distance 0 from itself, so it is measured to its nearest *other* one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catalog.errors import WildzooError
from catalog.query import connect
from catalog.store import Catalog
from train.behaviour import (
    Arch,
    arch_properties,
    build_arch,
    input_shape,
    model_archs,
)
from train.data import ModelRef, list_models, split_models, tiled_batches
from train.normalize import Normalizer, decoded_scale, denormalize

log = logging.getLogger(__name__)
METHODS = ("kde", "interp", "gauss")
BANDWIDTHS = (0.25, 0.5, 1.0)  # kde: multiples of Scott's bandwidth, each reported on its own
CHANCE_CLASSES = 10  # the digits
NOISE_STEPS = 14  # bisection steps of the anchor + noise baseline


def pick_anchors(cat: Catalog, train_refs: list[ModelRef], arch_of: dict[str, str], k: int, where: str | None,
                 prop: str) -> tuple[list[ModelRef], str]:
    """(anchors, architecture key): training models of one known architecture, the top `k` by `prop` or those
    `where` selects (SQL: a query whose first column is model_id, or a condition on the `models` view)."""
    usable = {r.model_id: r for r in train_refs if r.model_id in arch_of}
    if not usable:
        raise WildzooError(f"catalog {cat.uri} has no training model of an architecture wildzoo can rebuild "
                           "(the lab zoo's CNN and MLP, the Model Zoos CNN (s))")
    con = connect(cat)
    if where:
        sql = where if where.lstrip().lower().startswith(("select", "with")) else \
            f"SELECT model_id FROM models WHERE {where}"
        try:
            ids = [str(r[0]) for r in con.execute(sql).fetchall()]
        except Exception as e:  # DuckDB's errors: a user's SQL
            raise WildzooError(f"--where: {str(e).splitlines()[0]}") from None
    else:
        rows = con.execute("SELECT model_id, value FROM properties WHERE name = ? AND value IS NOT NULL "
                           "ORDER BY value DESC, model_id", [prop]).fetchall()
        if not rows:
            raise WildzooError(f"no model of {cat.uri} has the numeric property {prop!r} to pick anchors by "
                               f"(--property, or --where)")
        ids = [m for m, _ in rows]
    ids = [m for m in ids if m in usable]
    if not ids:
        raise WildzooError("the anchor selection holds no training model of a known architecture")
    key = max(sorted({arch_of[m] for m in ids}), key=lambda a: sum(arch_of[m] == a for m in ids))
    chosen = [usable[m] for m in ids if arch_of[m] == key]
    chosen = chosen[:k] if not where else chosen
    if len(chosen) < 2:
        raise WildzooError(f"{len(chosen)} anchor(s) of architecture {key}: sampling needs at least 2")
    return chosen, key


def sample_latents(z: torch.Tensor, n: int, method: str, gen: torch.Generator, bandwidth: float = 1.0,
                   ) -> tuple[torch.Tensor, list[list[int]]]:
    """`n` new latents (n, T, L) from the anchors' latents `z` (K, T, L), and the anchors each one draws on."""
    K, _, L = z.shape
    if method == "kde":
        pick = torch.randint(K, (n,), generator=gen)
        h = z.std(0, unbiased=True) * K ** (-1.0 / (L + 4)) * bandwidth  # (T, L), Scott's rule per token
        out = z[pick] + h * torch.randn((n, *z.shape[1:]), generator=gen)
        return out, [[int(j)] for j in pick]
    if method == "interp":
        out, used = [], []
        for _ in range(n):
            i, j = torch.randperm(K, generator=gen)[:2].tolist()
            lam = 0.25 + 0.5 * float(torch.rand((), generator=gen))
            out.append((1 - lam) * z[i] + lam * z[j])
            used.append([i, j])
        return torch.stack(out), used
    if method == "gauss":
        mu = z.mean(0)
        w = torch.randn((n, K), generator=gen) / math.sqrt(max(K - 1, 1))
        return mu + torch.einsum("nk,ktl->ntl", w, z - mu), [list(range(K))] * n
    raise WildzooError(f"unknown method {method!r} (one of {', '.join(METHODS)})")


def _flat(arch: Arch, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """(G, P) every parameter of G models, in the network's state-dict order."""
    names = list(arch.net.state_dict())
    return torch.cat([params[k].reshape(params[k].shape[0], -1) for k in names], 1)


def _unflat(arch: Arch, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for k, v in arch.net.state_dict().items():
        out[k] = flat[:, at: at + v.numel()].reshape(len(flat), *v.shape)
        at += v.numel()
    return out


def _accuracy(arch: Arch, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """Test accuracy (G,) of G models given as flat parameters (G, P), run vmapped (`train.fingerprint._run`)."""
    from train.fingerprint import _run

    accs = [(torch.nan_to_num(_run(arch.net, _unflat(arch, flat[b: b + chunk]), x)).argmax(-1) == y).float().mean(-1)
            for b in range(0, len(flat), chunk)]
    return torch.cat(accs).numpy() if accs else np.zeros(0)


def _weights(cat: Catalog, refs: list[ModelRef], arch: Arch) -> torch.Tensor:
    """(M, P) the exact weights of `refs` (rebuilt from their tokens), in the network's state-dict order."""
    from train.fingerprint import _read_weights

    by_shard: dict[str, list[str]] = {}
    for r in refs:
        by_shard.setdefault(r.shard, []).append(r.model_id)
    found = _read_weights(cat, by_shard)
    rows = []
    shapes = [tuple(v.shape) for v in arch.net.state_dict().values()]
    for r in refs:
        tensors = [np.asarray(t, dtype=np.float32) for t in found[r.model_id].values()]
        floats = [t for t in tensors if t.ndim >= 1]
        if [t.shape for t in floats] != shapes:
            raise WildzooError(f"model {r.model_id} does not have the tensors of architecture {arch.key}")
        rows.append(np.concatenate([t.reshape(-1) for t in floats]))
    return torch.from_numpy(np.stack(rows))


def _scales(arch: Arch, train_w: torch.Tensor) -> torch.Tensor:
    """(P,) each parameter's tensor's population standard deviation over the training models."""
    out, at = [], 0
    for v in arch.net.state_dict().values():
        block = train_w[:, at: at + v.numel()]
        out.append(torch.full((v.numel(),), float(block.std()) or 1.0))
        at += v.numel()
    return torch.cat(out)


def nearest(flat: torch.Tensor, train_w: torch.Tensor, scale: torch.Tensor, exclude: list[int] | None = None,
            ) -> np.ndarray:
    """L2 distance (G,) of each model to its nearest training model in normalized weight space; `exclude[g]`:
    a training row model g may not match (itself, for an anchor)."""
    a, b = (flat / scale).double(), (train_w / scale).double()
    d = torch.cdist(a, b)
    if exclude is not None:
        d[torch.arange(len(a)), torch.tensor(exclude)] = math.inf
    return torch.nan_to_num(d.min(1).values, nan=math.inf).numpy()


def noisy_anchors(arch: Arch, anchor_w: torch.Tensor, scale: torch.Tensor, target: float, x, y,
                  gen: torch.Generator, copies: int) -> tuple[torch.Tensor, float]:
    """Anchor + Gaussian noise models (`copies` per anchor) with σ (in population-σ units) bisected so that
    their mean accuracy is `target`; (their flat weights, σ)."""
    eps = torch.randn((copies, *anchor_w.shape), generator=gen).reshape(-1, anchor_w.shape[1])
    base = anchor_w.repeat(copies, 1)
    lo, hi = 0.0, 4.0
    for _ in range(NOISE_STEPS):
        mid = (lo + hi) / 2
        acc = _accuracy(arch, base + mid * scale * eps, x, y).mean()
        lo, hi = (mid, hi) if acc > target else (lo, mid)
    sigma = (lo + hi) / 2
    return base + sigma * scale * eps, sigma


def write_folder(path: Path, arch: Arch, params: dict[str, torch.Tensor], props: dict[str, Any],
                 extra: dict[str, Any]) -> None:
    """A Hugging Face-layout folder: config.json (architecture, and the `wildzoo` table of properties that
    `crawl local` catalogs) + model.safetensors; written under a temporary name and renamed whole."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: params[k].detach().contiguous().clone() for k in arch.net.state_dict()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    kind = str(arch_properties(arch.key)["model::type"])
    cfg = {"architectures": [f"WildzooZoo{kind.replace('-', '')}"], "model_type": "wildzoo-zoo",
           "wildzoo": props, **extra}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if path.exists():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)


def sample(catalog: str, run_uri: str, out: str, anchors: int = 10, where: str | None = None, n: int = 10,
           methods: tuple[str, ...] = METHODS, prop: str = "test_acc", seed: int = 0,
           bandwidths: tuple[float, ...] = BANDWIDTHS) -> dict[str, Any]:
    """Generate `n` models per method from the anchors, write them and the report under `out`; a summary."""
    from train.config import TrainConfig
    from train.embed import load_backbone
    from train.run import RunDir
    from zoo.data import load_digits_split

    t0 = time.time()
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise WildzooError(f"--method: {', '.join(bad) or 'none given'}: choose from {', '.join(METHODS)}")
    if n < 1 or anchors < 2:
        raise WildzooError("--n must be >= 1 and --anchors >= 2")
    if not bandwidths or min(bandwidths) <= 0:
        raise WildzooError("--bandwidth: give one or more values > 0")
    configs = [(f"kde×{b:g}" if m == "kde" else m, m, b) for m in methods for b in (bandwidths if m == "kde" else (1.0,))]
    cat = Catalog.open(catalog)
    run = RunDir.at(run_uri)
    model, meta = load_backbone(run)
    S = model.cfg.token_size
    if S != cat.spec.token_size:
        raise WildzooError(f"run {run.uri} reads tokens of {S} values; catalog {cat.uri} has {cat.spec.token_size}")
    cfg = TrainConfig.from_dict(meta["config"])
    norm = Normalizer.from_dict(meta["norm"])
    refs = list_models(cat)
    seeds = meta.get("split", {}).get("seeds") or [cfg.split_seed]
    train_refs, _ = split_models(cat, refs, seeds) if cfg.holdout else (refs, [])
    arch_of = model_archs(cat, [r.model_id for r in train_refs])
    chosen, key = pick_anchors(cat, train_refs, arch_of, anchors, where, prop)
    arch = build_arch(key, S)
    if arch is None:
        raise WildzooError(f"architecture {key} cannot be rebuilt from tokens of {S} values")
    window = model.cfg.window
    if max(r.n_tokens for r in chosen) > window:
        raise WildzooError(f"the anchors have {max(r.n_tokens for r in chosen)} tokens, more than the run's window "
                           f"of {window}: sampling needs whole models in one window")
    log.info("sampling %d model(s) by %s from %d anchors of architecture %s", n, ", ".join(methods), len(chosen), key)
    index = {r.model_id: i for i, r in enumerate(chosen)}
    parts = list(tiled_batches(cat, chosen, window, len(chosen), norm=norm, archs={r.model_id: 0 for r in chosen}))
    ids, which, arrays = parts[0]
    order = np.argsort([index[ids[m]] for m in which])
    batch = {k: torch.from_numpy(np.ascontiguousarray(v[order])) for k, v in arrays.items()}
    _, _, x_test, y_test = load_digits_split(input_shape(key)[1])  # digits at the architecture's input size
    gen = torch.Generator().manual_seed(seed)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    train_arch = [r for r in train_refs if arch_of.get(r.model_id) == key]
    train_w = _weights(cat, train_arch, arch)
    scale = _scales(arch, train_w)
    row_of = {r.model_id: i for i, r in enumerate(train_arch)}
    anchor_w = train_w[[row_of[r.model_id] for r in chosen]]
    with torch.no_grad():
        z = model.eval().encode(batch)  # (K, T, L)
        rows: list[dict[str, Any]] = []
        sets: dict[str, dict[str, np.ndarray]] = {}
        struct = {k: v[:1] for k, v in batch.items()}  # one architecture: every anchor's window has one layout
        for label, method, bandwidth in configs:
            latents, used = sample_latents(z, n, method, gen, bandwidth)
            shape = {k: v.expand(n, *v.shape[1:]) for k, v in struct.items()}
            dec = model.decode(latents, shape).float()
            scales = decoded_scale(dec[..., S:], shape, norm)
            raw = denormalize(dec[..., :S], {**shape, **scales})
            params = arch.params(raw)
            flat = _flat(arch, params)
            acc = _accuracy(arch, flat, x_test, y_test)
            dist = nearest(flat, train_w, scale)
            sets[label] = {"acc": acc, "dist": dist}
            for i in range(n):
                name = f"{label.replace('×', '-')}-{i:03d}"
                props = {**arch_properties(key), "test_acc": float(acc[i]), "generated": 1,
                         "nearest_train_l2": float(dist[i])}
                write_folder(root / "samples" / name, arch, {k: v[i] for k, v in params.items()}, props,
                             {"wildzoo_method": label, "wildzoo_anchors": [chosen[j].model_id for j in used[i]],
                              "wildzoo_run": meta["run_id"]})
                rows.append({"sample": name, "method": label, "test_acc": float(acc[i]), "nearest_l2": float(dist[i]),
                             "anchors": [chosen[j].model_id for j in used[i]]})
    anchor_acc = _accuracy(arch, anchor_w, x_test, y_test)
    sets["anchors"] = {"acc": anchor_acc,
                       "dist": nearest(anchor_w, train_w, scale, [row_of[r.model_id] for r in chosen])}
    train_acc = _accuracy(arch, train_w, x_test, y_test)
    best = int(np.argmax(train_acc))
    sets["best training model"] = {"acc": train_acc[best:best + 1],
                                   "dist": nearest(train_w[best:best + 1], train_w, scale, [best])}
    sets["random init"] = random_inits(arch, key, n, seed, train_w, scale, x_test, y_test)
    noise: dict[str, float] = {}
    for label, _, _ in configs:
        target = float(sets[label]["acc"].mean())
        flat, sigma = noisy_anchors(arch, anchor_w, scale, target, x_test, y_test, gen,
                                    copies=max(1, -(-n // len(chosen))))
        noise[label] = sigma
        sets[f"anchor + noise ({label})"] = {"acc": _accuracy(arch, flat, x_test, y_test),
                                              "dist": nearest(flat, train_w, scale)}
    summary = report(root, sets, [c[0] for c in configs], key, len(chosen), len(train_arch), n, noise, meta["run_id"])
    (root / "samples.json").write_text(json.dumps(rows, indent=1) + "\n")
    return {"samples": len(rows), "methods": [c[0] for c in configs], "anchors": len(chosen), "arch": key, "sets": summary,
            "out": str(root), "seconds": time.time() - t0}


def random_inits(arch: Arch, key: str, n: int, seed: int, train_w, scale, x, y) -> dict[str, np.ndarray]:
    """Freshly initialized networks of the architecture (the zoo's own initializations, in turn)."""
    from zoo.grid import INIT_TYPES
    from zoo.models import build_model

    flats = []
    for i in range(n):
        torch.manual_seed(seed * 7919 + i)
        net = build_model({**arch_properties(key), "model::dropout": 0.0,
                           "model::init_type": INIT_TYPES[i % len(INIT_TYPES)]})
        flats.append(torch.cat([v.detach().reshape(-1).float() for v in net.state_dict().values()]))
    flat = torch.stack(flats)
    return {"acc": _accuracy(arch, flat, x, y), "dist": nearest(flat, train_w, scale)}


def report(root: Path, sets: dict[str, dict[str, np.ndarray]], methods, key: str, k: int, n_train: int, n: int,
           noise: dict[str, float], run_id: str) -> list[dict[str, Any]]:
    """DIR/report.md and DIR/report.png: accuracy and distance to the nearest training model of every set."""
    anchors = float(sets["anchors"]["acc"].mean())
    chance = 1.0 / CHANCE_CLASSES
    table = []
    for name, s in sets.items():
        acc, dist = s["acc"], s["dist"]
        table.append({"set": name, "n": int(len(acc)), "acc_mean": float(acc.mean()), "acc_sd": float(acc.std()),
                      "of_anchors": float(acc.mean() / anchors) if anchors > 0 else math.nan,
                      "x_chance": float(acc.mean() / chance), "dist_mean": float(dist.mean()),
                      "dist_sd": float(dist.std())})
    lines = [f"# train sample: run {run_id}, architecture {key}", "",
             f"{k} anchors (training models), {n} sample(s) per method, {n_train} training models of the "
             f"architecture; accuracy on the held-out digits test split (chance {chance:.2f}); distance: L2 to "
             f"the nearest training model in normalized weight space (each tensor / its population σ; an anchor "
             f"to its nearest other one). No fine-tuning, no repair.", "",
             "| set | n | accuracy | of anchors' mean | × chance | distance to nearest training model |",
             "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['set']} | {r['n']} | {r['acc_mean']:.3f} ± {r['acc_sd']:.3f} | {r['of_anchors']:.1%} | "
                     f"{r['x_chance']:.1f} | {r['dist_mean']:.2f} ± {r['dist_sd']:.2f} |")
    lines += ["", "Anchor + noise: each anchor plus Gaussian noise, σ (in population-σ units per tensor) bisected "
              "until their mean accuracy equals the method's: " + ", ".join(f"{m} σ = {s:.3f}" for m, s in
                                                                          noise.items()) + ".", ""]
    for m in methods:
        ms = next(r for r in table if r["set"] == m)
        nz = next(r for r in table if r["set"] == f"anchor + noise ({m})")
        gap = ms["dist_mean"] - nz["dist_mean"]
        verdict = ("about as far from the training models as" if abs(gap) <= 0.05 * nz["dist_mean"] else
                   "farther from the training models than" if gap > 0 else "closer to the training models than")
        verdict += " anchor + noise of the same accuracy"
        lines.append(f"- `{m}`: {ms['acc_mean']:.3f} accuracy ({ms['of_anchors']:.1%} of the anchors', "
                     f"{ms['x_chance']:.1f}× chance), distance {ms['dist_mean']:.2f} vs {nz['dist_mean']:.2f}: {verdict}.")
    (root / "report.md").write_text("\n".join(lines) + "\n")
    _plot(root / "report.png", sets)
    return table


def _plot(path: Path, sets: dict[str, dict[str, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in sets.items():
        ax.scatter(s["dist"], s["acc"], label=name, s=18, alpha=0.8)
    ax.set(xlabel="L2 distance to the nearest training model (normalized weights)",
           ylabel="accuracy, digits test split", title="generated models: accuracy vs novelty")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
