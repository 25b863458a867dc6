"""Reconstruction of held-out models: train a flavour for a budget, print how well it rebuilds working models.

    python bench/recon.py [--catalog wildzoo-data/catalog] [--flavour small] [--epochs N] [--behaviour 0,1]
                          [--set key=value ...] [--workers 2]
    python bench/recon.py --ablate RUN        # the report and statistics ablation of a run trained already

For each behavioural-loss weight in --behaviour, one `train fit` (Ray Train, the same code as the CLI) into
bench/out/recon-<flavour>-b<weight>/, then its held-out reconstruction report (train.behaviour.reconstruction_report):
per-model MSE (median, mean) next to predicting zeros, R², and the accuracy the rebuilt models keep —
de-normalized with the decoded statistics (what generation has) and with the true ones, and (per-tensor
normalization) with one part of the statistics decoded at a time: where the decoded ones lose. `--set` changes any
TrainConfig field (`model.d_model=128`, `mask_prob=0.1`, ...). Nothing here is timed by tests: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ holds tokenize.py, which would shadow the standard library's module that torch imports
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]


def parse_sets(items: list[str]) -> dict:
    out: dict = {}
    for item in items:
        key, _, text = item.partition("=")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def held_out_report(catalog: str, run_dir: Path) -> dict:
    """The run's held-out reconstruction report (train.behaviour.reconstruction_report) with the statistics ablation:
    `kept_parts`, the accuracy kept with one part of the statistics decoded at a time, where the decoded ones lose."""
    from catalog.store import Catalog
    from train.behaviour import reconstruction_report
    from train.config import TrainConfig
    from train.embed import load_backbone
    from train.normalize import Normalizer
    from train.plan import make_plan
    from train.run import RunDir

    model, meta = load_backbone(RunDir.at(str(run_dir)))
    cat = Catalog.open(catalog)
    plan = make_plan(cat, TrainConfig.from_dict(meta["config"]), Normalizer.from_dict(meta["norm"]))
    return reconstruction_report(model, cat, list(plan.held), plan.norm, plan.archs, list(plan.arch_keys), ablation=True)


def ablation_line(rec: dict) -> str:
    kept = {"all true": rec["kept_true"], **rec["kept_parts"], "all decoded": rec["kept"]}
    return "kept with one part of the statistics decoded: " + ", ".join(f"{k} {v:.1%}" for k, v in kept.items())


def main() -> int:
    from train.__main__ import reconstruction_line, setup_logging
    from train.config import TrainConfig
    from train.fit import fit

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", default=str(ROOT / "wildzoo-data" / "catalog"))
    ap.add_argument("--flavour", default="small", choices=["debug", "small", "base"])
    ap.add_argument("--epochs", type=int, help="epochs (default: the flavour's)")
    ap.add_argument("--behaviour", default="0,1", help="behavioural-loss weights, comma-separated (default 0,1)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a TrainConfig field")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--ablate", metavar="RUN", help="only print the report and statistics ablation of this run folder "
                                                    "(no fit)")
    args = ap.parse_args()
    setup_logging(False)
    if args.ablate:
        rec = held_out_report(args.catalog, Path(args.ablate))
        print(reconstruction_line(rec))
        print(ablation_line(rec) if rec.get("kept_parts") else "no statistics ablation: no held-out model of a "
              "rebuildable architecture with accuracy >= 0.5, or statistics not decoded")
        return 0
    base = TrainConfig.flavour(args.flavour)
    base = TrainConfig.from_dict(parse_sets(args.set), base=base, where="--set")
    base = base.replace(workers=args.workers, **({"epochs": args.epochs} if args.epochs else {}))
    print(f"catalog {args.catalog}; flavour {args.flavour}: d_model {base.model.d_model}, d_latent {base.model.d_latent}, "
          f"{base.model.n_layers}+{base.model.n_layers} blocks, {base.epochs} epochs, {args.workers} worker(s), "
          f"norm {base.norm}, noise {base.noise}, mask {base.mask_prob}, gamma {base.gamma}; --set {args.set}")
    for w in [float(x) for x in args.behaviour.split(",")]:
        cfg = base.replace(behaviour=w)
        run = Path(args.out) / f"recon-{args.flavour}-b{w:g}"
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.time()
        s = fit(args.catalog, str(run), cfg, reconstruction=False)  # the report once, with its ablation, below
        seconds = time.time() - t0
        rec = held_out_report(args.catalog, run)
        print(f"behaviour {w:g}: fit {seconds:.0f}s, final loss {s['history'][-1]['loss']:.4f}")
        print("  " + reconstruction_line(rec), flush=True)  # MSE vs zeros, accuracy kept (decoded, true)
        if rec.get("kept_parts"):
            print("  " + ablation_line(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
