"""`python -m crawl local|zoo|hub ...`: turn sources into catalog shards (see `--help`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from catalog import tokenize as tk
from catalog.cli import WORKER_RESOURCES_HELP, Parser, resources_arg, run, setup_logging
from catalog.errors import WildzooError
from catalog.safetensors_io import is_float_dtype
from catalog.schema import CatalogSpec
from catalog.store import Catalog, CatalogMissing

log = logging.getLogger("crawl")


def _common(p) -> None:
    p.add_argument("--catalog", required=True, help="catalog folder (created if missing) or s3://bucket/prefix")
    p.add_argument("--token-size", type=_token_size, default=None, metavar="N|auto",
                   help="values per token, fixed per catalog (default 256; `crawl zoo`: auto). auto: the widest row "
                   "of the first model (its bias column included), so every row is one token")
    p.add_argument("--tokenization", choices=["dense", "row"], default=None,
                   help="dense: flatten and chunk each tensor; row: SANE's one row per neuron "
                   "(default dense; `crawl zoo`: row)")
    p.add_argument("--token-dtype", choices=["float32", "float16"], default=None,
                   help="storage type of token values (float32, exact, by default)")
    p.add_argument("--workers", type=int, default=None, help="parallel crawl workers (default: one per CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="models per work unit (default: per source)")
    p.add_argument("--worker-resources", type=resources_arg, metavar="JSON", help=WORKER_RESOURCES_HELP % "crawler")
    p.add_argument("--retry-errors", action="store_true", help="crawl again the models that failed before")
    p.add_argument("--no-ray", action="store_true", help="run in this process without Ray (debugging)")
    p.add_argument("-v", "--verbose", action="store_true")


def _token_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


#: What a new catalog of each source gets when the command line leaves a setting out. Zoo populations line
#: up layer by layer, so SANE's row tokens (one output neuron per token) fit them; the wild gets dense tokens.
SOURCE_DEFAULTS = {"zoo": {"tokenization": "row", "token_size": "auto"}}
MAX_AUTO_TOKEN_SIZE = 4096


def widest_row(weights) -> int:
    """Values in the widest row of a model under row tokenization, its packed bias column included."""
    metas = list(weights.tensors)
    names, shapes = [m.name for m in metas], [m.shape for m in metas]
    floats = [is_float_dtype(m.dtype) for m in metas]
    plan = tk.plan(names, shapes, floats, "row", 1 << 20)
    return max((p.geometry.width for p in plan if p.geometry is not None and p.geometry.rows), default=1)


def resolve_auto(given: dict, source: str, rows: list[dict]) -> dict:
    """The catalog settings with `token_size = "auto"` replaced by the first model's widest row (capped)."""
    if given.get("token_size") != "auto":
        return given
    from crawl import zoo

    if source != "zoo":
        raise WildzooError("--token-size auto needs `crawl zoo` (it reads the first checkpoint); give a number")
    first = rows[0] if isinstance(rows[0].get("info"), str) else {**rows[0], "info": json.dumps(rows[0]["info"])}
    width = widest_row(zoo.load(first).weights)
    size = min(width, MAX_AUTO_TOKEN_SIZE)
    log.info("token size auto: %d (the widest row of %s%s)", size, rows[0]["model_id"],
             "" if width == size else f" is {width}: capped")
    return {**given, "token_size": size}


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
    from crawl import hub  # an ImportError here is a broken install: never hide the command behind it

    hub.add_arguments(sub.add_parser("hub", help="Hugging Face Hub repos", description=hub.DESCRIPTION))
    return parser


def _given(args) -> dict:
    """The catalog settings given on the command line, validated (a bad value is a one-line error)."""
    given = {k: v for k, v in (("token_size", args.token_size), ("tokenization", args.tokenization),
                               ("token_dtype", args.token_dtype)) if v is not None}
    try:
        CatalogSpec(**{k: v for k, v in given.items() if v != "auto"})  # auto is resolved when a catalog is made
    except ValueError as e:
        raise WildzooError(str(e)) from None
    return given


def open_catalog(args, rows: list[dict] | None = None) -> Catalog:
    """Open the catalog named on the command line (settings given must match), or create it with them
    (over the source's defaults; `auto` resolved from the first of `rows`)."""
    given = _given(args)
    try:
        cat = Catalog.open(args.catalog)
    except CatalogMissing:
        spec = resolve_auto({**SOURCE_DEFAULTS.get(args.source, {}), **given}, args.source, rows or [])
        log.info("new catalog %s: %s tokenization, token size %d", args.catalog, spec.get("tokenization", "dense"),
                 spec.get("token_size", 256))
        return Catalog.open(args.catalog, CatalogSpec(**spec), create=True)
    if given.get("token_size") == "auto":
        given = {k: v for k, v in given.items() if k != "token_size"}  # an existing catalog keeps its size
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
    catalog = open_catalog(args, rows)
    summary = pipeline.crawl(tasks.make_tasks(rows), catalog, options, workers=args.workers, batch_size=batch,
                             retry_errors=args.retry_errors, use_ray=not args.no_ray, resources=args.worker_resources)
    print_summary(summary)
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run(main, argv, prog="crawl")


if __name__ == "__main__":
    sys.exit(cli())
