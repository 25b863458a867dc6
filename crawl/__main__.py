"""`python -m crawl local|zoo|hub ...`: turn sources into catalog shards (see `--help`)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from catalog.cli import Parser, run, setup_logging
from catalog.errors import WildzooError
from catalog.schema import CatalogSpec
from catalog.store import Catalog, CatalogMissing

log = logging.getLogger("crawl")


def _common(p) -> None:
    p.add_argument("--catalog", required=True, help="catalog folder (created if missing) or s3://bucket/prefix")
    p.add_argument("--token-size", type=int, default=None, help="values per token (default 256; fixed per catalog)")
    p.add_argument("--tokenization", choices=["dense", "row"], default=None,
                   help="dense: flatten and chunk each tensor; row: SANE's one row per neuron (default dense)")
    p.add_argument("--token-dtype", choices=["float32", "float16"], default=None,
                   help="storage type of token values (float32, exact, by default)")
    p.add_argument("--workers", type=int, default=None, help="parallel crawl workers (default: one per CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="models per work unit (default: per source)")
    p.add_argument("--retry-errors", action="store_true", help="crawl again the models that failed before")
    p.add_argument("--no-ray", action="store_true", help="run in this process without Ray (debugging)")
    p.add_argument("-v", "--verbose", action="store_true")


def build_parser() -> Parser:
    parser = Parser(prog="python -m crawl", description="Crawl model weights into a wildzoo catalog.")
    sub = parser.add_subparsers(dest="source", required=True, parser_class=Parser)
    p = sub.add_parser("local", help="model folders in Hugging Face layout, folders of them, or the HF cache",
                       description="Catalog local models: each PATH is a model folder (config.json + *.safetensors, "
                       "sharded with an index json), a folder searched recursively for them, or the HF cache.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read pytorch_model.bin / *.pt (with torch.load(weights_only=True))")
    p.add_argument("--header-only", action="store_true", help="catalog tensor names and shapes only; no tokens")
    _common(p)
    p = sub.add_parser("zoo", help="Model Zoos layout (params.json, result.json, checkpoint_*/checkpoints)",
                       description="Catalog every checkpoint of Model Zoos trial folders with its properties.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    _common(p)
    try:
        from crawl import hub
    except ImportError:  # the hub source is optional in a minimal install
        hub = None
    if hub is not None:
        hub.add_arguments(sub.add_parser("hub", help="Hugging Face Hub repos", description=hub.DESCRIPTION))
    return parser


def _given(args) -> dict:
    """The catalog settings given on the command line, validated (a bad value is a one-line error)."""
    given = {k: v for k, v in (("token_size", args.token_size), ("tokenization", args.tokenization),
                               ("token_dtype", args.token_dtype)) if v is not None}
    try:
        CatalogSpec(**given)
    except ValueError as e:
        raise WildzooError(str(e)) from None
    return given


def open_catalog(args) -> Catalog:
    """Open the catalog named on the command line (settings given must match), or create it with them."""
    given = _given(args)
    try:
        cat = Catalog.open(args.catalog)
    except CatalogMissing:
        return Catalog.open(args.catalog, CatalogSpec(**given), create=True)
    cat.check(given)
    return cat


def print_summary(summary: dict, out=None) -> None:
    out = out or sys.stdout
    by = ", ".join(f"{k} {v}" for k, v in sorted(summary["by_status"].items())) or "nothing new"
    print(
        f"crawl: {summary['crawled']} model(s) crawled ({by}), {summary['already_done']} already in the catalog; "
        f"{summary['tokens']:,} tokens from {summary['bytes'] / 1e6:,.1f} MB in {summary['seconds']:.1f}s "
        f"→ {summary['catalog']}",
        file=out,
    )
    fails = summary["failures"]
    for mid, status, reason in fails[:20]:
        print(f"  {status}: {mid}: {reason}", file=out)
    if len(fails) > 20:
        print(f"  ... and {len(fails) - 20} more (SELECT model_id, error FROM models WHERE status <> 'ok')", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    _given(args)  # bad settings are reported before any work
    from crawl import local, pipeline, tasks, zoo

    if args.source == "local":
        rows, warnings = local.find_models(args.paths)
        options = {"allow_pickle": args.allow_pickle, "header_only": args.header_only}
        batch = args.batch_size or 4
    elif args.source == "zoo":
        rows, warnings = zoo.find_checkpoints(args.paths)
        options, batch = {}, args.batch_size or 64
    else:
        from crawl import hub

        return hub.main(args)
    if not rows:
        raise WildzooError("no models found in " + ", ".join(args.paths))
    for w in warnings:
        log.warning(w)
    if args.batch_size is not None and args.batch_size < 1 or args.workers is not None and args.workers < 1:
        raise WildzooError("--batch-size and --workers must be at least 1")
    catalog = open_catalog(args)
    summary = pipeline.crawl(tasks.make_tasks(rows), catalog, options, workers=args.workers, batch_size=batch,
                             retry_errors=args.retry_errors, use_ray=not args.no_ray)
    print_summary(summary)
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run(main, argv, prog="crawl")


if __name__ == "__main__":
    sys.exit(cli())
