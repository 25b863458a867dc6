"""The `hub` source: Hugging Face Hub repos, enumerated by one paged listing and read by HTTP ranges.

Stages, each a plain function:
- enumerate: `HfApi.list_models(..., expand=[...])` pages through the Hub; every repo becomes a task row
  (`model_id = repo_id@sha`) carrying what the listing told (files, config, card, tags, counts) as JSON.
- precheck: decisions that need no request (no weights, pickles, gated without a token, limits from the
  listing's parameter counts) become `skipped` rows with the reason.
- load (in a worker): each weight file's first bytes come with one ranged GET that also tells the file's
  size and sha256 (its ETag). Header-only stops there; a full crawl fetches the rest of each file into a
  persistent download folder (resumable, verified) and parses it like a local model. Identical files
  under different repos share a content hash and are tokenized once.

Every request passes the crawl's shared budget and retry wrapper (`crawl.hub_http`, `crawl.budget`).
The token is read by huggingface_hub itself (`HF_TOKEN` or a saved login); it is never an option, a row,
or a log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.errors import BadWeights, WildzooError
from catalog.roles import natural_key
from catalog.safetensors_io import (
    DTYPES,
    SafetensorsModel,
    TensorMeta,
    header_length,
    parse_header,
    safe_filename,
)
from catalog.statedict import load_pickled
from crawl import budget, hub_http
from crawl.budget import canonical_rank
from crawl.source import PICKLE_NAMES, PICKLE_SUFFIXES, Loaded, config_fields, config_properties

log = logging.getLogger(__name__)

EXPAND = ["sha", "siblings", "safetensors", "config", "tags", "library_name", "pipeline_tag", "downloads",
          "likes", "cardData", "gated", "private", "disabled", "lastModified"]
SORTS = ("downloads", "likes", "created_at", "last_modified", "trending_score")
ANONYMOUS_LIMITS = {"api": 500, "resolve": 3000}  # the Hub's limits per 5 minutes without a token
HEADER_WINDOW = 100_000  # bytes read with a header: huggingface_hub's own choice (97% of headers fit)
SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})$")
PREFERRED_STEMS = ("model", "pytorch_model", "diffusion_pytorch_model", "adapter_model")


# ------------------------------------------------------------------------------------------------------
# Options (picklable: they travel to Ray workers; never a token)
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HubOptions:
    """What a worker needs to load hub models."""

    endpoint: str
    download_dir: str
    coordinator: str | None = None
    header_only: bool = False
    allow_pickle: bool = False
    anonymous: bool = False
    max_bytes: int | None = None
    max_params: int | None = None
    header_window: int = HEADER_WINDOW
    concurrency: int = 16  # models each worker loads at once (its requests in flight)
    tries: int = 8
    backoff_s: float = 1.0
    timeout_s: float = 60.0

    def to_options(self) -> dict:
        return asdict(self)

    @classmethod
    def from_options(cls, options: dict) -> HubOptions:
        return cls(**{k: options[k] for k in cls.__dataclass_fields__ if k in options})

    @property
    def policy(self) -> hub_http.RetryPolicy:
        return hub_http.RetryPolicy(tries=self.tries, base_s=self.backoff_s, timeout_s=self.timeout_s)

    @property
    def token(self) -> bool | None:
        """What huggingface_hub is told: False sends none; None lets it find HF_TOKEN or a saved login."""
        return False if self.anonymous else None


# ------------------------------------------------------------------------------------------------------
# Enumerate: the listing, and what each repo's row says
# ------------------------------------------------------------------------------------------------------
def _groups(names: list[str], ext: str) -> dict[tuple[str, int], list[str]]:
    """Files ending in `ext` grouped into sets: (stem, shard count) -> names; incomplete shard sets dropped."""
    groups: dict[tuple[str, int], list[str]] = {}
    for n in names:
        if not n.endswith(ext):
            continue
        base = n[: -len(ext)]
        m = SHARD.match(base)
        key = (m["stem"], int(m["n"])) if m else (base, 1)
        groups.setdefault(key, []).append(n)
    return {k: sorted(v) for k, v in groups.items() if len(v) == k[1]}


def _choose(groups: dict[tuple[str, int], list[str]]) -> list[str]:
    def rank(key: tuple[str, int]) -> tuple:
        stem = key[0]
        return (PREFERRED_STEMS.index(stem) if stem in PREFERRED_STEMS else len(PREFERRED_STEMS), stem, key[1])

    return groups[min(groups, key=rank)]


def pick_weight_files(names: list[str]) -> tuple[str, list[str], str | None]:
    """(kind, files, reason) for a repo's file list: `safetensors` or `pickle` files at the top level, or
    `none` with the reason. Variants (`model.fp16.safetensors`) and stale shard sets are left out."""
    top = [n for n in names if "/" not in n]
    st = _groups(top, ".safetensors")
    if st:
        return "safetensors", _choose(st), None
    pickles = [n for n in top if n.endswith(PICKLE_SUFFIXES) and (n in PICKLE_NAMES or n.startswith("pytorch_model"))]
    if pickles:
        bins = _groups(pickles, ".bin")
        return "pickle", _choose(bins) if bins else sorted(pickles)[:1], None
    nested = sorted({n.split("/", 1)[0] + "/" for n in names if "/" in n and n.endswith(".safetensors")})
    if nested:
        return "none", [], f"weights only in subfolders ({', '.join(nested[:4])}); top-level files are crawled"
    formats = sorted({n.rsplit(".", 1)[-1] for n in top if n.endswith((".gguf", ".onnx", ".h5", ".msgpack", ".ckpt"))})
    found = f" (found {', '.join(formats)})" if formats else ""
    return "none", [], f"no weight files (*.safetensors or pytorch_model.bin) in the repo{found}"


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def _tagged(tags: list[str], prefix: str) -> list[str]:
    return [t[len(prefix):] for t in tags if t.startswith(prefix) and ":" not in t[len(prefix):]]


def task_row(m) -> dict:
    """The task of one listed repo (a `huggingface_hub.ModelInfo` from an expanded listing)."""
    names = [s.rfilename for s in (m.siblings or [])]
    kind, files, reason = pick_weight_files(names)
    card = m.card_data.to_dict() if m.card_data is not None else {}
    st = m.safetensors
    info = {
        "sha": m.sha,
        "weights": {"kind": kind, "files": files, "reason": reason},
        "gated": m.gated or False,
        "private": bool(m.private),
        "disabled": bool(getattr(m, "disabled", False)),
        "library_name": m.library_name,
        "pipeline_tag": m.pipeline_tag,
        "tags": list(m.tags or []),
        "downloads": m.downloads,
        "likes": m.likes,
        "card": {k: card.get(k) for k in ("license", "datasets", "base_model") if card.get(k) is not None},
        "config": m.config or {},
        "params": dict(st.parameters) if st is not None else None,
        "total_params": int(st.total) if st is not None else None,
    }
    return {"model_id": f"{m.id}@{m.sha}", "source": "hub", "path": None, "repo_id": m.id, "revision": m.sha,
            "info": info}


@dataclass(frozen=True)
class Query:
    """Which repos to list: the filters the current huggingface_hub `list_models` supports."""

    search: str | None = None
    author: str | None = None
    filters: tuple[str, ...] = ()
    pipeline_tag: str | None = None
    datasets: tuple[str, ...] = ()
    sort: str | None = None
    limit: int | None = None
    min_downloads: int = 0

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in asdict(self).items() if v not in (None, (), 0)]
        return ", ".join(parts) or "no filters"


def list_tasks(query: Query, endpoint: str, token: bool | None) -> list[dict]:
    """Task rows of every repo the query matches: one paged, expanded listing (no per-model calls)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    listing = api.list_models(
        search=query.search, author=query.author, filter=list(query.filters) or None,
        trained_dataset=list(query.datasets) or None, pipeline_tag=query.pipeline_tag, sort=query.sort,
        limit=query.limit, expand=EXPAND,
    )
    rows = []
    for m in listing:
        if (m.downloads or 0) < query.min_downloads:
            if query.sort == "downloads":
                break  # sorted by downloads, descending: nothing further qualifies
            continue
        if not m.sha:
            log.warning("%s: the listing gave no commit sha; skipped", m.id)
            continue
        rows.append(task_row(m))
    return rows


# ------------------------------------------------------------------------------------------------------
# Precheck and metadata: plain functions of a task's info
# ------------------------------------------------------------------------------------------------------
def metadata_fields(info: dict) -> dict:
    """`models` columns that the listing tells: config, card data, tags, counts."""
    tags = list(info.get("tags") or [])
    card = info.get("card") or {}
    licenses = _as_list(card.get("license")) or _tagged(tags, "license:")
    bases = _as_list(card.get("base_model")) or _tagged(tags, "base_model:")
    return {
        **config_fields(info.get("config") or {}),
        "library": info.get("library_name"),
        "pipeline_tag": info.get("pipeline_tag"),
        "tags": tags,
        "license": licenses[0] if licenses else None,
        "downloads": info.get("downloads"),
        "likes": info.get("likes"),
        "base_model": ",".join(bases) if bases else None,
        "datasets": _as_list(card.get("datasets")) or _tagged(tags, "dataset:"),
        "n_params": info.get("total_params"),
    }


def estimated_bytes(params: dict | None) -> int | None:
    """Weight bytes implied by the listing's parameter counts per dtype (None if it gave none)."""
    if not params:
        return None
    return int(sum(n * DTYPES.get(d, (4,))[0] for d, n in params.items()))


def precheck(info: dict, opts: HubOptions, has_token: bool) -> tuple[str, str] | None:
    """('skipped', reason) for a model that needs no request to be decided, else None."""
    w = info["weights"]
    if info.get("disabled"):
        return "skipped", "the repo is disabled on the Hub"
    if w["kind"] == "none":
        return "skipped", w["reason"]
    if w["kind"] == "pickle":
        if not opts.allow_pickle:
            return "skipped", f"only pickled weights ({w['files'][0]}); pass --allow-pickle to read them safely"
        if opts.header_only:
            return "skipped", f"pickled weights ({w['files'][0]}) have no header to read; crawl without --header-only"
        if len(w["files"]) > 1:
            return "skipped", f"sharded pickled weights ({len(w['files'])} files) are not supported"
    if info.get("gated") and not has_token:
        return "skipped", f"gated repo ({info['gated']}): set HF_TOKEN to a token that has accepted its conditions"
    n = info.get("total_params")
    if opts.max_params is not None and n is not None and n > opts.max_params:
        return "skipped", f"{n:,} parameters exceed --max-params {opts.max_params:,}"
    est = estimated_bytes(info.get("params"))
    if opts.max_bytes is not None and est is not None and est > opts.max_bytes:
        return "skipped", f"about {est:,} bytes of weights exceed --max-bytes {opts.max_bytes:,}"
    return None


def content_hash(etags: list[str | None]) -> str | None:
    """One hash for a model's weight files, from their sha256s (the Hub's ETags): equal files, equal hash."""
    if not etags or any(e is None for e in etags):
        return None
    return hashlib.sha256("\n".join(sorted(etags)).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------------
# Load one model (runs in a worker)
# ------------------------------------------------------------------------------------------------------
@dataclass
class HeaderWeights:
    """Tensors described by safetensors headers alone; there are no values to read (header-only)."""

    tensors: list[TensorMeta]
    total_bytes: int

    def stored(self, meta: TensorMeta) -> np.ndarray:
        raise WildzooError("header-only crawl: tensor values were not downloaded")


def header_weights(files: list[tuple[str, int, list[TensorMeta]]]) -> HeaderWeights:
    """HeaderWeights from (file name, file size, tensors) per weight file; a name in two files is an error."""
    seen: dict[str, str] = {}
    for name, _, metas in files:
        for t in metas:
            if t.name in seen:
                raise BadWeights(f"tensor {t.name!r} appears in both {seen[t.name]} and {name}")
            seen[t.name] = name
    tensors = sorted((t for _, _, metas in files for t in metas), key=lambda t: natural_key(t.name))
    return HeaderWeights(tensors, sum(size for _, size, _ in files))


@dataclass
class HubLoaded(Loaded):
    """A loaded hub model; `release()` deletes its downloaded files once its shard is committed."""

    folder: Path | None = None

    def release(self) -> None:
        if self.folder is not None:
            remove_folder(self.folder)


def model_folder(download_dir: str, model_id: str) -> Path:
    """Where one model's files are downloaded: DIR/<org>--<name>/<sha>/."""
    repo_id, _, sha = model_id.rpartition("@")
    parts = [safe_filename(p) for p in repo_id.split("/")]
    return Path(download_dir) / "--".join(parts) / safe_filename(sha)


def remove_folder(folder: Path) -> None:
    """Delete one model's download folder, and its repo's folder once empty."""
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()  # the repo's folder, once no revision is left in it
    except OSError:
        pass


@dataclass
class _Context:
    """Per-model state of a load: where things go and how requests are made."""

    task: dict
    opts: HubOptions
    folder: Path
    headers: dict
    coordinator: object | None
    fetched: int = 0
    files: list[tuple[str, hub_http.FileInfo, bytes]] = field(default_factory=list)

    def url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.task["repo_id"], name, revision=self.task["revision"], endpoint=self.opts.endpoint)


def _coordinator(opts: HubOptions):
    """This crawl's shared coordinator, with huggingface_hub's session routed through its budget."""
    if opts.coordinator is None:
        return None
    coord = budget.connect(opts.coordinator)
    hub_http.install(coord, opts.endpoint, opts.timeout_s)
    return coord


def _has_token(opts: HubOptions) -> bool:
    """Whether huggingface_hub will send a token (its own lookup; the value is never looked at here)."""
    if opts.anonymous:
        return False
    from huggingface_hub.utils import get_token

    return get_token() is not None


def load(task: dict, options: dict) -> Loaded:
    """Load one hub model for the catalog: skipped, header-only or fully downloaded (see the module doc).

    Whatever was fetched for the model stays in its download folder until the row is committed
    (`release()`), so a crawl killed before the commit fetches none of it again.
    """
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers

    opts = HubOptions.from_options(options)
    info = json.loads(task["info"])
    model = metadata_fields(info)
    props = config_properties(task["model_id"], info.get("config") or {})
    verdict = precheck(info, opts, _has_token(opts))
    if verdict is not None:
        return Loaded(model, None, props, *verdict)
    ctx = _Context(task, opts, model_folder(opts.download_dir, task["model_id"]),
                   build_hf_headers(token=opts.token), _coordinator(opts))
    try:
        return _load(ctx, info, model, props)
    except HfHubHTTPError as e:
        status = hub_http._status(e)
        code = e.response.headers.get("X-Error-Code") if e.response is not None else None
        reason = f"HTTP {status}{f' {code}' if code else ''} on {_where(e)}"
        if status in (401, 403):
            return HubLoaded(model, None, props, "skipped", f"access refused ({reason}): gated or private repo",
                             folder=ctx.folder)
        return HubLoaded(model, None, props, "error", reason, folder=ctx.folder)
    except WildzooError as e:  # broken weights, a request that kept failing: an error row with the listing's data
        return HubLoaded(model, None, props, "error", str(e)[:2000], folder=ctx.folder)
    finally:
        if ctx.coordinator is not None and ctx.fetched:
            ctx.coordinator.add_bytes(ctx.fetched)


def _load(ctx: _Context, info: dict, model: dict, props: list[dict]) -> Loaded:
    """The requests of `load`: first bytes of every file, checks, duplicates, then the download."""
    opts, task, claimed = ctx.opts, ctx.task, None
    try:
        for name in info["weights"]["files"]:
            ctx.files.append((name, *_begin(ctx, safe_filename(name))))
        chash = content_hash([fi.etag for _, fi, _ in ctx.files])
        model.update(content_hash=chash, total_bytes=sum(fi.size for _, fi, _ in ctx.files))
        if info["weights"]["kind"] == "safetensors":
            weights, exact = _safetensors(ctx)
        else:
            weights, exact = None, None
        reason = _over_limits(opts, exact, model["total_bytes"])
        if reason is None and chash is not None and ctx.coordinator is not None:
            duplicate = ctx.coordinator.claim(chash, task["model_id"], info.get("downloads"))
            claimed = None if duplicate is not None else chash
            if duplicate is not None:
                reason = f"duplicate of {duplicate} (identical weight files)"
                model["duplicate_of"] = duplicate
        if reason is not None:
            model["n_params"] = exact or model["n_params"]
            return HubLoaded(model, None, props, "skipped", reason, folder=ctx.folder)
        if not opts.header_only:
            weights = _download(ctx, info["weights"]["kind"])
            if exact is None and (reason := _over_limits(opts, sum(t.numel for t in weights.tensors), 0)):
                return HubLoaded(model, None, props, "skipped", reason, folder=ctx.folder)  # a header past the window
        return HubLoaded(model, weights, props, folder=ctx.folder)
    except BaseException:
        if claimed is not None and ctx.coordinator is not None:
            ctx.coordinator.unclaim(claimed, task["model_id"])  # a later copy of these weights may stand in
        raise


def _where(e) -> str:
    """The file a failed request was for (never the query string or headers)."""
    url = str(e.response.request.url) if e.response is not None and e.response.request is not None else ""
    return url.split("/resolve/", 1)[-1].split("/", 1)[-1] or "the Hub"


def _begin(ctx: _Context, name: str) -> tuple[hub_http.FileInfo, bytes]:
    """The file's identity and first bytes: from the download folder, or one ranged GET."""
    info, prefix, fetched = hub_http.begin(ctx.url(name), ctx.folder / name, ctx.headers, ctx.opts.header_window,
                                           ctx.opts.policy)
    ctx.fetched += fetched
    return info, prefix


def _safetensors(ctx: _Context) -> tuple[HeaderWeights | None, int | None]:
    """Headers parsed and checked (size from the Hub, so truncation shows) before any weight byte is fetched.

    Header-only reads the rest of a long header; a full crawl checks what the first bytes hold and reads
    the rest with the file. Returns the header weights (header-only) and the exact parameter count if known.
    """
    parsed, complete = [], True
    for name, fi, prefix in ctx.files:
        n = header_length(prefix[:8], fi.size)
        if len(prefix) < 8 + n:
            if not ctx.opts.header_only:
                complete = False
                continue
            prefix, fetched = hub_http.extend(ctx.url(name), ctx.folder / name, 8 + n, fi, ctx.headers,
                                              ctx.opts.policy)
            ctx.fetched += fetched
        metas, _ = parse_header(prefix[8 : 8 + n], fi.size, name)
        parsed.append((name, fi.size, metas))
    weights = header_weights(parsed)
    exact = sum(t.numel for t in weights.tensors) if complete else None
    return (weights if ctx.opts.header_only else None), exact


def _over_limits(opts: HubOptions, n_params: int | None, total_bytes: int) -> str | None:
    """The reason a model exceeds --max-params / --max-bytes, or None."""
    if opts.max_params is not None and n_params is not None and n_params > opts.max_params:
        return f"{n_params:,} parameters exceed --max-params {opts.max_params:,}"
    if opts.max_bytes is not None and total_bytes > opts.max_bytes:
        return f"{total_bytes:,} bytes of weight files exceed --max-bytes {opts.max_bytes:,}"
    return None


def _download(ctx: _Context, kind: str):
    """Fetch the rest of every weight file (within the crawl's download slots) and open the weights."""
    holder = f"{os.getpid()}:{ctx.task['model_id']}"
    while ctx.coordinator is not None and not ctx.coordinator.acquire_download(holder):
        time.sleep(0.2)
    try:
        for name, fi, _ in ctx.files:
            ctx.fetched += hub_http.finish(ctx.url(name), ctx.folder / name, fi, ctx.headers, ctx.opts.policy)
    finally:
        if ctx.coordinator is not None:
            ctx.coordinator.release_download(holder)
    names = [name for name, _, _ in ctx.files]
    if kind == "pickle":
        return load_pickled(ctx.folder / names[0])
    return SafetensorsModel.open(ctx.folder, names)


def enumerate_repos(query: Query, opts: HubOptions) -> list[dict]:
    """The listing, retried as a whole at most once (huggingface_hub already retries each page 5 times)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return hub_http.with_retries(lambda: list_tasks(query, opts.endpoint, opts.token),
                                     f"listing models on {opts.endpoint}", replace(opts.policy, tries=2))
    except HfHubHTTPError as e:
        message = e.response.headers.get("X-Error-Message") if e.response is not None else None
        raise WildzooError(f"listing models on {opts.endpoint} failed: {hub_http.describe(e)}"
                           f"{f' ({message})' if message else ''}") from None


def existing_hashes(current) -> tuple[dict[str, tuple[str, int | None]], set[str]]:
    """From a catalog's current rows (`Catalog.current_models` with model_id, content_hash, status, downloads):
    content hash -> (model_id, downloads) of the canonical copy of each weights it holds, and the hashes held by
    several copies (a crawl killed before it re-pointed them: `canonical_copies` finishes them)."""
    held = current.filter(pc.and_(pc.is_in(current.column("status"), pa.array(["ok", "header_only"])),
                                  pc.is_valid(current.column("content_hash"))))
    out: dict[str, tuple[str, int | None]] = {}
    several: set[str] = set()
    for mid, h, d in zip(*(held.column(c).to_pylist() for c in ("model_id", "content_hash", "downloads")), strict=True):
        if h in out:
            several.add(h)
            if canonical_rank(d, mid) >= canonical_rank(out[h][1], out[h][0]):
                continue
        out[h] = (mid, d)
    return out, several


def revisions(listed: list[dict], current) -> dict[str, int]:
    """How the listing compares with the catalog: repos `new` to it, `updated` (a revision it does not hold:
    a new model row; the old revision's rows stay) and `unchanged` (this revision is in the catalog)."""
    held = pc.is_in(pa.array([r["model_id"] for r in listed], pa.string()), current.column("model_id").combine_chunks())
    known = pc.is_in(pa.array([r["repo_id"] for r in listed], pa.string()), current.column("repo_id").combine_chunks())
    unchanged = pc.sum(held).as_py() or 0
    updated = pc.sum(pc.and_(pc.invert(held), known)).as_py() or 0
    return {"new": len(listed) - unchanged - updated, "updated": updated, "unchanged": unchanged}


def canonical_copies(catalog, hashes: set[str] | None = None) -> dict[str, tuple[str, str]]:
    """Re-point copies of the same weights to their canonical copy (`budget.canonical_rank`); returns the rows
    changed: model_id -> (status before, reason now).

    Within a crawl, a copy that ranks before the one already tokenized takes its hash over (`Coordinator.claim`),
    and a later crawl may list a better copy of weights the catalog holds: then two copies hold tokens. This
    pass, run after every hub crawl, keeps the first-ranked holder; every other holder becomes a `skipped`
    duplicate of it (its tensors and tokens removed: they are the canonical copy's), and duplicates that
    pointed to a former holder point to the canonical copy. Idempotent: a killed pass is finished by the next.
    `hashes` limits it to those content hashes (the ones a crawl saw taken over); empty: nothing to do."""
    if hashes is not None and not hashes:
        return {}
    t = catalog.current_models(("model_id", "source", "content_hash", "status", "duplicate_of", "downloads"))
    if hashes is not None:
        t = t.filter(pc.is_in(t.column("content_hash"), pa.array(sorted(hashes), pa.string())))
    groups: dict[str, list[dict]] = {}
    for r in t.to_pylist():
        if r["content_hash"] and r["source"] == "hub" and (r["status"] in ("ok", "header_only") or r["duplicate_of"]):
            groups.setdefault(r["content_hash"], []).append(r)
    changes: dict[str, dict[str, dict]] = {}  # shard -> model_id -> new row
    drops: dict[str, set[str]] = {}
    before: dict[str, str] = {}
    for rows in groups.values():
        holders = [r for r in rows if r["status"] in ("ok", "header_only")]
        if not holders:
            continue
        best = min(holders, key=lambda r: canonical_rank(r["downloads"], r["model_id"]))["model_id"]
        for r in rows:
            if r["model_id"] == best or (r["status"] == "skipped" and r["duplicate_of"] == best):
                continue
            if r["status"] in ("ok", "header_only"):
                drops.setdefault(r["shard"], set()).add(r["model_id"])
            before[r["model_id"]] = r["status"]
            changes.setdefault(r["shard"], {})[r["model_id"]] = {
                "status": "skipped", "error": f"duplicate of {best} (identical weight files)", "duplicate_of": best,
                "n_tensors": None, "n_tokens": None}
    for shard in sorted(set(changes) | set(drops)):
        catalog.rewrite_shard(shard, changes.get(shard, {}), drops.get(shard, set()))
    return {m: (before[m], u["error"]) for c in changes.values() for m, u in c.items()}


def sweep_downloads(download_dir: str, done: pa.Array) -> int:
    """Delete download folders of models the catalog holds (left by a worker killed after its commit); `done`:
    the model ids committed."""
    root = Path(download_dir)
    if not root.is_dir():
        return 0
    folders = {f"{repo.name.replace('--', '/', 1)}@{rev.name}": rev for repo in root.iterdir() if repo.is_dir()
               for rev in repo.iterdir()}
    held = [m for m, h in zip(folders, pc.is_in(pa.array(list(folders), pa.string()), done).to_pylist(), strict=True)
            if h]
    for mid in held:
        remove_folder(folders[mid])
    return len(held)
