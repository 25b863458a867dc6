"""`python -m train probe|...`: what is learned from a catalog (see `--help`)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from catalog.cli import Parser, run, setup_logging
from catalog.errors import WildzooError
from catalog.store import Catalog

log = logging.getLogger("train")


def build_parser() -> Parser:
    parser = Parser(prog="python -m train", description="Train, evaluate and use weight-space backbones.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser(
        "probe",
        help="predict model properties (R² per property and method)",
        description="Predict properties (test accuracy, epoch, generalization gap, hyperparameters) from "
        "model features with ridge (alpha chosen on a validation split), an outlier-safe ridge and "
        "gradient-boosted trees, split by trained model 70/15/15. Baselines: per-layer statistics s(W) "
        "and flattened weights W.",
    )
    p.add_argument("--catalog", required=True)
    p.add_argument("--run", help="a trained backbone run: adds its embeddings as a feature set")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--out", help="folder for probe.json and pictures (default: CATALOG/_reports/probe)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("-v", "--verbose", action="store_true")
    return parser


def probe_command(args) -> int:
    from train.evaluate import format_results, run_probe, save

    cat = Catalog.open(args.catalog)
    if args.run:
        raise WildzooError("backbone embeddings are not available yet: probe the baselines without --run")
    from catalog.query import connect
    from train.features import load_population

    n, ok, tokens = connect(cat, tables=("models",)).execute(
        "SELECT count(*), count(*) FILTER (status = 'ok'), coalesce(sum(n_tokens), 0) FROM models").fetchone()
    pop = load_population(cat)
    results, preds = run_probe(cat, seed=args.seed, pop=pop)
    if args.out:
        out = Path(args.out)
    elif "://" in cat.uri:
        out = Path("wildzoo-reports") / "probe"
    else:
        out = Path(cat.root) / "_reports" / "probe"
    written = save(results, preds, out)
    if args.format == "json":
        json.dump([{k: r[k] for k in ("property", "method", "metric", "value")} for r in results], sys.stdout,
                  indent=1)
        print()
    else:
        print(f"catalog {cat.uri}: {n} models ({ok} ok), {tokens:,} tokens; probed {len(pop.model_ids)} models "
              f"from {len(set(pop.groups))} trained models, split 70/15/15 by trained model\n")
        print(format_results(results))
        print(f"\nsaved {', '.join(str(p) for p in written)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    if args.command == "probe":
        return probe_command(args)
    raise WildzooError(f"unknown command {args.command}")


def cli(argv: Sequence[str] | None = None) -> int:
    return run(main, argv, prog="train")


if __name__ == "__main__":
    sys.exit(cli())
