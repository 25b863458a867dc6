"""The `crawl` command line: arguments, catalog settings, the summary, and the `hub` command's options.

Imports run one way: this module → `crawl.pipeline` → `crawl.worker` → the sources (`local`, `zoo`, `hub`) →
`crawl.source`; no source imports the command line."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pyarrow as pa

from catalog import tokenize as tk
from catalog.cli import WORKER_RESOURCES_HELP, Parser, resources_arg, run, setup_logging
from catalog.errors import WildzooError
from catalog.rayenv import ray_session
from catalog.safetensors_io import is_float_dtype
from catalog.schema import CatalogSpec
from catalog.store import Catalog, CatalogMissing
from crawl import budget, hub_http
from crawl.hub import (
    ANONYMOUS_LIMITS,
    HEADER_WINDOW,
    SORTS,
    HubOptions,
    Query,
    canonical_copies,
    enumerate_repos,
    existing_hashes,
    revisions,
    sweep_downloads,
)

log = logging.getLogger("crawl")


def common_arguments(p) -> None:
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
    common_arguments(p)
    p = sub.add_parser("zoo", help="Model Zoos layout (params.json, result.json, checkpoint_*/checkpoints)",
                       description="Catalog every checkpoint of Model Zoos trial folders with its properties.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    common_arguments(p)
    hub_arguments(sub.add_parser("hub", help="Hugging Face Hub repos", description=HUB_DESCRIPTION))
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


def repointed(summary: dict, changed: dict[str, tuple[str, str]]) -> None:
    """Count the models this crawl tokenized and the canonical-copy pass then re-pointed as what they are now."""
    by, statuses = summary["by_status"], summary.get("statuses", {})
    summary["failures"] = [f for f in summary["failures"] if f[0] not in changed]
    for mid, (_, reason) in sorted(changed.items()):
        if mid in statuses:
            by[statuses[mid]] -= 1
            by["skipped"] = by.get("skipped", 0) + 1
            statuses[mid] = "skipped"
            summary["failures"].append((mid, "skipped", reason))
    summary["by_status"] = {k: v for k, v in by.items() if v}
    summary["repointed"] = len(changed)


def print_summary(summary: dict, out=None) -> None:
    out = out or sys.stdout
    by = ", ".join(f"{k} {v}" for k, v in sorted(summary["by_status"].items())) or "nothing new"
    print(
        f"crawl: {summary['crawled']} model(s) crawled ({by}), {summary['already_done']} already in the catalog; "
        f"{summary['tokens']:,} tokens from {summary['bytes'] / 1e6:,.1f} MB in {summary['seconds']:.1f}s "
        f"→ {summary['catalog']}",
        file=out,
    )
    if summary.get("repointed"):
        print(f"  {summary['repointed']} copies of identical weights re-pointed to their canonical copy (most "
              "downloads, then the smallest id)", file=out)
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
        return crawl_hub(args)
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


# ------------------------------------------------------------------------------------------------------
# The hub command
# ------------------------------------------------------------------------------------------------------
HUB_DESCRIPTION = (
    "Catalog Hugging Face Hub repos chosen by search, author, tags, pipeline tag or trained dataset. "
    "One paged listing enumerates them; --header-only reads each safetensors header with an HTTP range "
    "request (no weights); otherwise weight files are downloaded (resumably) and tokenized. Requests share "
    "one budget per 5 minutes across all workers and are retried on 429/5xx/timeouts. HF_ENDPOINT and "
    "HF_TOKEN are honoured; the token is never printed or stored. Rerun with the same --catalog to resume."
)


# ------------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------------
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9, "T": 10**12}


def parse_amount(text: str) -> int:
    """'500', '2G', '1.5GB', '7B' (billions), '100M' -> an integer; argparse type for limits."""
    import argparse

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGBT]?)(?:I?B)?\s*", text.upper())
    if m is None:
        raise argparse.ArgumentTypeError(f"not an amount: {text!r} (examples: 500, 2G, 1.5GB, 7B)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def hub_arguments(p) -> None:
    """The `hub` subcommand's arguments (and the common ones)."""
    q = p.add_argument_group("which repos (one paged listing)")
    q.add_argument("--search", help="substring of the repo id")
    q.add_argument("--author", help="user or organization")
    q.add_argument("--filter", action="append", default=[], metavar="TAG",
                   help="tag the repo must carry, e.g. safetensors, transformers, image-classification (repeatable)")
    q.add_argument("--pipeline-tag", help="task, e.g. text-classification")
    q.add_argument("--dataset", action="append", default=[], metavar="NAME",
                   help="dataset the model was trained on (its dataset:NAME tag; repeatable)")
    q.add_argument("--sort", choices=SORTS, help="order of the listing (descending)")
    q.add_argument("--limit", type=int, help="at most this many repos")
    q.add_argument("--min-downloads", type=int, default=0, help="leave out repos with fewer downloads")
    d = p.add_argument_group("what to read")
    d.add_argument("--header-only", action="store_true",
                   help="tensor names, shapes and dtypes from HTTP range reads of each header; no weights, no tokens")
    d.add_argument("--allow-pickle", action="store_true",
                   help="also read repos that only have pytorch_model.bin (torch.load(weights_only=True))")
    d.add_argument("--max-bytes", type=parse_amount, metavar="N", help="skip models with more weight bytes (e.g. 2G)")
    d.add_argument("--max-params", type=parse_amount, metavar="N", help="skip models with more parameters (e.g. 1B)")
    d.add_argument("--download-dir", help="where weight files wait until their shard is committed "
                   "(default ~/.cache/wildzoo/hub-downloads; a killed crawl resumes from it)")
    d.add_argument("--header-window", type=int, default=HEADER_WINDOW, metavar="BYTES",
                   help=f"bytes fetched with each header (default {HEADER_WINDOW:,}: one request for almost every "
                   "file; 8 reads headers exactly with two requests)")
    n = p.add_argument_group("the Hub and politeness")
    n.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    n.add_argument("--anonymous", action="store_true", help="send no token even if HF_TOKEN or a login is set")
    n.add_argument("--requests-per-5min-api", type=int, default=ANONYMOUS_LIMITS["api"], metavar="N",
                   help="API calls per 5 minutes, shared by all workers (default 500: anonymous limit)")
    n.add_argument("--requests-per-5min-resolve", type=int, default=ANONYMOUS_LIMITS["resolve"], metavar="N",
                   help="file requests per 5 minutes, shared by all workers (default 3000: anonymous limit)")
    n.add_argument("--max-downloads", type=int, default=16, metavar="N",
                   help="weight downloads in flight at once, across all workers (default 16)")
    n.add_argument("--concurrency", type=int, default=16, metavar="N",
                   help="models each worker loads at once: its requests in flight (default 16; the Hub's "
                   "latency, not the cores, bounds a crawl)")
    n.add_argument("--rate-window", type=float, default=budget.WINDOW_S, metavar="S",
                   help=f"the length of the Hub's rate-limit window in seconds (default {budget.WINDOW_S:g}); "
                   "the --requests-per-5min budgets are per window of this length")
    n.add_argument("--retries", type=int, default=8, metavar="N", help="tries per request (default 8)")
    n.add_argument("--backoff", type=float, default=1.0, metavar="S", help="first back-off in seconds (doubles)")
    n.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds without data before a retry")
    common_arguments(p)


def _endpoint(args) -> str:
    from huggingface_hub import constants

    url = (args.endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise WildzooError(f"--endpoint must be an http(s) URL, got {url!r}")
    return url


def _default_download_dir(catalog_uri: str) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha1(os.path.abspath(catalog_uri).encode() if "://" not in catalog_uri else catalog_uri.encode())
    return os.path.join(base, "wildzoo", "hub-downloads", key.hexdigest()[:12])


def options_from_args(args) -> tuple[Query, HubOptions, dict[str, int]]:
    """Validated query, worker options and budget from the command line (one-line errors)."""
    for flag, value in (("--limit", args.limit), ("--max-downloads", args.max_downloads),
                        ("--retries", args.retries), ("--requests-per-5min-api", args.requests_per_5min_api),
                        ("--requests-per-5min-resolve", args.requests_per_5min_resolve),
                        ("--header-window", args.header_window), ("--batch-size", args.batch_size),
                        ("--workers", args.workers), ("--concurrency", args.concurrency)):
        if value is not None and value < 1:
            raise WildzooError(f"{flag} must be at least 1")
    if args.min_downloads < 0 or args.backoff < 0 or args.timeout <= 0 or args.rate_window <= 0:
        raise WildzooError("--min-downloads and --backoff must be >= 0, --timeout and --rate-window > 0")
    query = Query(args.search, args.author, tuple(args.filter), args.pipeline_tag, tuple(args.dataset), args.sort,
                  args.limit, args.min_downloads)
    opts = HubOptions(
        endpoint=_endpoint(args), download_dir=os.path.abspath(args.download_dir or _default_download_dir(args.catalog)),
        header_only=args.header_only, allow_pickle=args.allow_pickle, anonymous=args.anonymous,
        max_bytes=args.max_bytes, max_params=args.max_params, header_window=max(8, args.header_window),
        tries=args.retries, backoff_s=args.backoff, timeout_s=args.timeout, concurrency=args.concurrency,
    )
    per_window = {"api": args.requests_per_5min_api, "resolve": args.requests_per_5min_resolve}
    return query, opts, per_window


def crawl_hub(args) -> int:
    """`python -m crawl hub`: list, crawl on Ray (or in this process with --no-ray), summarize.

    The catalog is read and the Hub listed in a thread while Ray starts (seconds on a laptop); the listing's
    requests are counted by a coordinator of this process, whose count the crawl's coordinator takes over."""
    query, opts, per_window = options_from_args(args)
    if not args.verbose:
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per request otherwise
    catalog = open_catalog(args)
    use_ray = not args.no_ray
    name = f"wildzoo-hub-{uuid.uuid4().hex[:12]}"
    listing_budget = budget.Coordinator(per_window, args.max_downloads, args.rate_window)
    hub_http.install(listing_budget, opts.endpoint, opts.timeout_s)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="wildzoo-listing") as ahead:
            listing = ahead.submit(read_and_list, catalog, query, opts)
            with ray_session() if use_ray else contextlib.nullcontext():
                crawl_listed(args, catalog, opts, per_window, name, listing, listing_budget)
    finally:
        hub_http.uninstall()
    return 0


def read_and_list(catalog: Catalog, query: Query, opts: HubOptions):
    """(the catalog's current models, the listing's task rows)."""
    t0 = time.time()
    current = catalog.current_models(("model_id", "repo_id", "status", "content_hash", "downloads"))  # once
    log.info("catalog read in %.1fs: %d models", time.time() - t0, current.num_rows)
    t0 = time.time()
    rows = enumerate_repos(query, opts)
    if not rows:
        raise WildzooError(f"no models on {opts.endpoint} match {query.describe()}")
    log.info("listed %d repos in %.1fs", len(rows), time.time() - t0)
    return current, rows


def crawl_listed(args, catalog: Catalog, opts: HubOptions, per_window: dict[str, int], name: str, listing,
                 listing_budget: budget.Coordinator) -> None:
    """The hub crawl on a running Ray (or none, `--no-ray`): workers, the listing's result, budget, pipeline,
    summary. `listing`: a future of `read_and_list`."""
    from crawl import pipeline, tasks

    use_ray, pool = not args.no_ray, None
    try:
        options = replace(opts, coordinator=name).to_options()
        # the coordinator, then the workers start (about a second each on 2 cores: the coordinator first, as it
        # takes one of the processes Ray started ahead) while the catalog is read and the Hub listed
        coord = budget.start(name, per_window, args.max_downloads, use_ray, args.rate_window)
        pool = pipeline.start_pool(catalog, options, args.workers, args.worker_resources) if use_ray else None
        current, rows = listing.result()
        coord.absorb(listing_budget.export())
        hub_http.install(coord, opts.endpoint, opts.timeout_s)
        holders, unfinished = existing_hashes(current)
        coord.seed(holders)
        del holders
        changed = revisions(rows, current)
        done = current.select(["model_id", "status"])
        del current
        batch = args.batch_size or 4 * opts.concurrency  # a worker's loads overlap within its batch
        summary = pipeline.crawl(tasks.make_tasks(rows), catalog, options, workers=args.workers, batch_size=batch,
                                 retry_errors=args.retry_errors, use_ray=use_ray, resources=args.worker_resources,
                                 done=done, pool=pool)
        pool = None
        repointed(summary, canonical_copies(catalog, unfinished | set(coord.takeovers())))
        sweep_downloads(opts.download_dir, pa.concat_arrays([done.column("model_id").combine_chunks(),
                                                            pa.array(list(summary["statuses"]), pa.string())]))
        print_summary(summary)
        _print_requests(coord.stats(), len(rows), changed)
    finally:
        if pool is not None:  # the crawl never started (no repo matched, a listing error)
            pool.stop()
        hub_http.uninstall()
        budget.stop(name)


def _print_requests(stats: dict, listed: int, changed: dict[str, int], out=None) -> None:
    """The Hub's side of the summary: requests by kind (every worker's), bytes, rate limiting."""
    out = out or sys.stdout
    req = stats["requests"]
    per = (req["api"] + req["resolve"]) / max(1, listed)
    print(f"hub: {listed} repos listed ({changed['new']} new, {changed['updated']} updated: a new revision, "
          f"{changed['unchanged']} unchanged); {req['api']} API + {req['resolve']} file requests ({per:.2f} per repo), "
          f"{stats['bytes_downloaded'] / 1e6:,.1f} MB downloaded, {stats['rate_limited']} rate-limit answer(s), "
          f"{stats['waited_s']:.0f}s waited for the budget", file=out)
