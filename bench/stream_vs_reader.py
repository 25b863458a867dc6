"""The Ray Data stream against the previous data path: does streaming change what the backbone learns?

    python bench/stream_vs_reader.py [--catalog wildzoo-data/catalog] [--flavour debug] [--epochs 8] [--seeds 3]

The same fit (flavour, epochs, held-out split) runs from the two paths, several seeds each: the stream
(`train.stream`: units of whole models read by Ray Data tasks, a bounded local shuffle in each worker) and the
path it replaced (`ReaderWindows` below, given to `fit(source=…)`: each rank reads its models whole from Parquet,
every epoch's windows shuffled globally). Prints per epoch the training loss and the held-out reconstruction error relative to
predicting zeros (mean ± sd over seeds) of each path, their difference, and the noise (sd of the difference of
two means); then the largest |difference| / noise over epochs. Prints figures; not a test.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds tokenize.py, which would shadow the standard library's module (logging imports it): off the path
# before anything else is imported
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


class ReaderWindows:
    """The path the stream replaced: each rank reads its share of the models whole from Parquet once, and every
    epoch draws their windows at random offsets and shuffles them all (a global shuffle, no Ray Data), `steps`
    batches of them, collated like the stream's."""

    def __init__(self, plan, cfg, rank: int, world: int, steps: int) -> None:
        from catalog.store import Catalog
        from train.data import read_models

        mine = sorted(plan.train, key=lambda r: r.model_id)[rank::world]
        self.tokens = read_models(Catalog.open(plan.catalog), mine, plan.norm, plan.archs)
        self.window, self.batch_size, self.views, self.seed = cfg.model.window, cfg.batch_size, cfg.views, cfg.seed
        self.rank, self.steps = rank, steps

    def epoch(self, epoch: int, permute: float, device):
        """`steps` collated batches on `device`, in an order seeded by the run's seed, the epoch and the rank."""
        from train.stream import collate

        rng = np.random.default_rng([self.seed, epoch, self.rank])
        model, start = self.tokens.windows(self.window, rng, self.views)
        order = rng.permutation(len(model))
        for b in range(min(self.steps, len(order) // self.batch_size)):
            take = order[b * self.batch_size: (b + 1) * self.batch_size]
            arrays = self.tokens.batch(model[take], start[take], self.window)
            arrays["unit_key"] = model[take].astype(np.int64)
            seed = self.seed * 1_000_003 + epoch * 1009 + self.rank
            yield {k: v.to(device) for k, v in collate(arrays, permute, seed).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--catalog", default=str(ROOT / "wildzoo-data" / "catalog"))
    ap.add_argument("--flavour", default="debug", choices=("debug", "small", "base"))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from catalog.rayenv import ensure_ray
    from train.config import TrainConfig
    from train.fit import fit

    base = getattr(TrainConfig, a.flavour)().replace(epochs=a.epochs)
    ensure_ray(base.workers * base.cpus_per_worker + math.ceil(base.data_cpus))
    curves: dict[str, list[list[dict]]] = {"stream": [], "reader": []}
    seconds: dict[str, float] = {"stream": 0.0, "reader": 0.0}
    with tempfile.TemporaryDirectory(prefix="wildzoo-stream-vs-reader-") as tmp:
        for seed in range(a.seeds):
            for path in ("stream", "reader"):
                t = time.perf_counter()
                s = fit(a.catalog, f"{tmp}/{path}-{seed}", base.replace(seed=seed), reconstruction=False, quiet=True,
                        source=ReaderWindows if path == "reader" else None)
                seconds[path] += time.perf_counter() - t
                curves[path].append(s["history"])
                print(f"  seed {seed} {path}: final loss {s['history'][-1]['loss']:.4f}, "
                      f"held-out {s['history'][-1].get('val_rel_mse', math.nan):.4f}", flush=True)
    print(f"\n{a.flavour} flavour, {a.epochs} epochs, {a.seeds} seeds per path, catalog {a.catalog}; "
          f"{seconds['stream'] / a.seeds:.0f}s per stream fit, {seconds['reader'] / a.seeds:.0f}s per reader fit")
    worst = {}
    for metric in ("loss", "val_rel_mse"):
        s = np.array([[h[metric] for h in run] for run in curves["stream"]])  # (seeds, epochs)
        r = np.array([[h[metric] for h in run] for run in curves["reader"]])
        if not np.isfinite(s).all():
            continue
        diff = s.mean(0) - r.mean(0)
        noise = np.sqrt(s.var(0, ddof=1) / len(s) + r.var(0, ddof=1) / len(r))
        print(f"\n{metric}: {'epoch':>5} {'stream':>17} {'reader':>17} {'difference':>10} {'noise':>8}")
        for e in range(s.shape[1]):
            print(f"{'':{len(metric) + 1}} {e + 1:>5} {s[:, e].mean():>9.4f} ± {s[:, e].std(ddof=1):.4f} "
                  f"{r[:, e].mean():>9.4f} ± {r[:, e].std(ddof=1):.4f} {diff[e]:>+10.4f} {noise[e]:>8.4f}")
        worst[metric] = float(np.max(np.abs(diff) / np.maximum(noise, 1e-12)))
    print("\nlargest |stream − reader| / noise over epochs: "
          + ", ".join(f"{k} {v:.2f}" for k, v in worst.items())
          + " (within noise: below about 2, the 95% band of a difference of two means)")


if __name__ == "__main__":
    main()
