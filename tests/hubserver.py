"""A loopback Hugging Face Hub for tests and benchmarks (stdlib only).

Serves model repos stored as plain folders, ``ROOT/<org>/<name>/<files...>``, with the JSON shapes, headers and
error codes that the real ``huggingface_hub`` client (2.x) parses: ``list_models`` (Link pagination, ``expand``),
``model_info`` (``blobs=true``), ``list_repo_tree``, ``paths-info``, ``safetensors-metadata`` and
``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` with Range support.

An optional ``ROOT/<org>/<name>/.hubmeta.json`` (never served) holds the repo's metadata: ``sha``, ``tags``,
``library_name``, ``pipeline_tag``, ``downloads``, ``likes``, ``gated`` (false, "auto", "manual"), ``private``,
``cardData``, ``createdAt``, ``lastModified``, ``trendingScore``; any other key is passed through to the model JSON.

Every request is logged (``server.log``, optional JSONL file); faults (429, 500, slow, cut-short and short bodies)
and a fixed-window quota can be injected, deterministically for a sequential client (seeded ``random.Random``).
A realistic network is two knobs: ``latency_s`` (every answer waits this long before its first byte, like a VM far
from the Hub) and ``bytes_per_s`` (each ``/resolve`` body is paced to this rate per connection). ``peak_inflight``
is the most requests the server was handling at once (each log entry has ``inflight``, counting itself).

    with HubServer(root, page_size=20) as hub:
        HfApi(endpoint=hub.url, token=False).list_models(author="acme")

Command line: ``python tests/hubserver.py --root DIR [--port P]`` prints ``HubServer serving DIR at URL``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import random
import shutil
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, parse_qsl, unquote, urlencode, urlsplit

#: Files stored with Git LFS on the real Hub (ETag = sha256, ``lfs`` block in listings).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npz")
META_FILE = ".hubmeta.json"
SKIP_DIRS = {".git", ".cache"}
FAULTS = ("429", "500", "slow", "cut", "short")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
LIST_FIELDS = {"_id", "id", "modelId", "likes", "trendingScore", "private", "downloads", "tags", "pipeline_tag",
               "library_name", "createdAt"}
FULL_FIELDS = LIST_FIELDS | {"author", "sha", "lastModified", "gated", "disabled", "siblings"}


# --------------------------------------------------------------------------------------------------------------
# Building repos
# --------------------------------------------------------------------------------------------------------------
def make_repo(root: str | Path, repo_id: str, files: dict[str, bytes | str | Path], **meta) -> Path:
    """Create (or overwrite) repo ``org/name`` under ``root``; return its folder.

    ``files`` maps repo paths (may contain ``/``) to bytes, text or a source file to copy. ``meta`` goes to
    ``.hubmeta.json`` (see the module docstring), e.g. ``make_repo(root, "a/b", {...}, tags=["x"], gated="auto")``.
    """
    org, _, name = repo_id.partition("/")
    if not org or not name or "/" in name:
        raise ValueError(f"repo_id must be 'org/name', got {repo_id!r}")
    repo_dir = Path(root) / org / name
    repo_dir.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        dest = repo_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, dest)
        else:
            dest.write_bytes(content.encode() if isinstance(content, str) else content)
    if meta:
        (repo_dir / META_FILE).write_text(json.dumps(meta, indent=1))
    return repo_dir


def fake_safetensors(spec: dict[str, tuple[str, list[int]]], metadata: dict | None = None, seed: int = 0) -> bytes:
    """A valid safetensors file with random bytes as data: ``spec`` = {name: (dtype, shape)}. No numpy needed."""
    rng, header, chunks, offset = random.Random(seed), {}, [], 0
    for name, (dtype, shape) in spec.items():
        n = DTYPE_BYTES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        chunks.append(rng.randbytes(n))
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


# --------------------------------------------------------------------------------------------------------------
# The repo store
# --------------------------------------------------------------------------------------------------------------
@dataclass
class RepoEntry:
    """One file of a repo, with the hashes the Hub reports."""

    path: str
    abspath: Path
    size: int
    blob_id: str  # git blob sha1 (of the LFS pointer for LFS files)
    sha256: str | None = None  # LFS files only
    pointer_size: int | None = None

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id

    def tree_json(self) -> dict:
        out = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.sha256:
            out["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return out


@dataclass
class Repo:
    """A repo as loaded from disk (immutable snapshot, rebuilt when the folder changes)."""

    repo_id: str
    files: dict[str, RepoEntry]
    meta: dict
    sha: str
    tags: list[str]
    safetensors: dict | None
    config: dict | None
    created_at: str
    last_modified: str
    dirs: set[str] = field(default_factory=set)

    @property
    def gated(self):
        return self.meta.get("gated", False) or False

    @property
    def private(self) -> bool:
        return bool(self.meta.get("private", False))

    def values(self) -> dict:
        """Every model-JSON field but ``siblings``; None where the real Hub would omit the field."""
        m = self.meta
        return {
            **m, "_id": hashlib.sha1(self.repo_id.encode()).hexdigest()[:24], "id": self.repo_id,
            "modelId": self.repo_id, "author": self.repo_id.split("/")[0], "sha": self.sha,
            "lastModified": self.last_modified, "createdAt": self.created_at, "private": self.private,
            "gated": self.gated, "disabled": bool(m.get("disabled", False)), "downloads": int(m.get("downloads", 0)),
            "downloadsAllTime": int(m.get("downloadsAllTime", m.get("downloads", 0))),
            "likes": int(m.get("likes", 0)), "trendingScore": m.get("trendingScore", 0), "tags": self.tags,
            "config": self.config, "safetensors": self.safetensors, "spaces": [],
            "usedStorage": sum(f.size for f in self.files.values()),
        }

    def model_json(self, fields: set[str] | None = None, blobs: bool = False) -> dict:
        """The JSON of /api/models[/{id}]: ``fields`` None means every field (model_info without expand)."""
        values = self.values()
        names = set(values) | {"siblings"} if fields is None else fields
        out = {}
        for name in sorted(names, key=lambda n: (n not in ("_id", "id"), n)):
            value = [_sibling_json(f, blobs) for f in self.files.values()] if name == "siblings" else values.get(name)
            if value is not None:
                out[name] = value
        return out


def _sibling_json(f: RepoEntry, blobs: bool) -> dict:
    if not blobs:
        return {"rfilename": f.path}
    out = {"rfilename": f.path, "size": f.size, "blobId": f.blob_id}
    if f.sha256:
        out["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
    return out


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _hash_file(path: Path, size: int, lfs: bool) -> tuple[str, str | None, int | None]:
    """(blob_id, sha256, pointer_size): git blob sha1 of the content, or of the LFS pointer for LFS files."""
    h = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    if not lfs:
        return h.hexdigest(), None, None
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{h.hexdigest()}\nsize {size}\n".encode()
    blob = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
    return blob, h.hexdigest(), len(pointer)


def read_safetensors_header(path: Path) -> dict | None:
    """The JSON header of a safetensors file, or None if it is not parseable."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > min(size - 8, 100_000_000):
                return None
            return json.loads(fh.read(n))
    except (OSError, struct.error, ValueError):
        return None


class RepoStore:
    """Reads repos from ``root/<org>/<name>``; caches each by a signature of its files' sizes and mtimes."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._cache: dict[str, tuple[tuple, Repo]] = {}
        self._lock = threading.Lock()

    def repo_ids(self) -> list[str]:
        ids = []
        for org in sorted(os.scandir(self.root), key=lambda e: e.name) if self.root.is_dir() else []:
            if org.is_dir() and not org.name.startswith("."):
                ids += [f"{org.name}/{d.name}" for d in sorted(os.scandir(org.path), key=lambda e: e.name)
                        if d.is_dir() and not d.name.startswith(".")]
        return ids

    def all(self) -> list[Repo]:
        return [r for r in (self.get(i) for i in self.repo_ids()) if r is not None]

    def get(self, repo_id: str) -> Repo | None:
        parts = repo_id.split("/")
        if len(parts) != 2 or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            return None
        repo_dir = self.root / parts[0] / parts[1]
        if not repo_dir.is_dir():
            return None
        listing = []
        for dirpath, dirnames, filenames in os.walk(repo_dir):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for name in filenames:
                p = Path(dirpath) / name
                st = p.stat()
                listing.append((p.relative_to(repo_dir).as_posix(), st.st_size, st.st_mtime_ns, st.st_mtime))
        signature = tuple(sorted(listing))
        with self._lock:
            cached = self._cache.get(repo_id)
        if cached and cached[0] == signature:
            return cached[1]
        repo = self._load(repo_id, repo_dir, signature)
        with self._lock:
            self._cache[repo_id] = (signature, repo)
        return repo

    def _load(self, repo_id: str, repo_dir: Path, signature: tuple) -> Repo:
        meta, files, dirs, mtimes = {}, {}, set(), []
        for rel, size, _, mtime in signature:
            if rel == META_FILE:
                meta = json.loads((repo_dir / rel).read_text() or "{}")
                continue
            lfs = rel.lower().endswith(LFS_SUFFIXES)
            files[rel] = RepoEntry(rel, repo_dir / rel, size, *_hash_file(repo_dir / rel, size, lfs))
            parts = rel.split("/")
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
            mtimes.append(mtime)
        sha = meta.get("sha") or hashlib.sha1(
            "".join(f"{f.path}\0{f.blob_id}\n" for f in files.values()).encode()).hexdigest()
        params: dict[str, int] = {}
        for f in files.values():
            if f.path.endswith(".safetensors"):
                for name, t in (read_safetensors_header(f.abspath) or {}).items():
                    if name != "__metadata__" and isinstance(t, dict):
                        params[t["dtype"]] = params.get(t["dtype"], 0) + math.prod(t["shape"])
        config = None
        if "config.json" in files:
            try:
                raw = json.loads(files["config.json"].abspath.read_text())
                config = {k: raw[k] for k in ("architectures", "model_type") if k in raw}
            except (OSError, ValueError):
                config = None
        card = meta.get("cardData") or {}
        derived = [meta.get("library_name"), "safetensors" if params else None,
                   "pytorch" if any(p.endswith((".bin", ".pt", ".pth")) for p in files) else None,
                   (config or {}).get("model_type"), meta.get("pipeline_tag"),
                   *[f"dataset:{d}" for d in _as_list(card.get("datasets"))],
                   *[f"base_model:{b}" for b in _as_list(card.get("base_model"))],
                   *[f"license:{lic}" for lic in _as_list(card.get("license"))], "region:us"]
        tags = list(dict.fromkeys([*meta.get("tags", []), *[t for t in derived if t]]))
        now = time.time()
        return Repo(
            repo_id=repo_id, files=files, meta=meta, sha=sha, tags=tags,
            safetensors={"parameters": params, "total": sum(params.values())} if params else None,
            config=config, created_at=meta.get("createdAt") or _iso(min(mtimes, default=now)),
            last_modified=meta.get("lastModified") or _iso(max(mtimes, default=now)), dirs=dirs,
        )


def _as_list(v) -> list:
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


# --------------------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------------------
class HubError(Exception):
    """An error answer: status, X-Error-Code and JSON {"error": message}."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes = b""
    file: tuple[Path, int, int] | None = None  # (path, start, length) streamed instead of body

    @property
    def length(self) -> int:
        return self.file[2] if self.file else len(self.body)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "wildzoo-hubserver/1"
    timeout = 120
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid the 40 ms delayed-ACK stall

    def setup(self):
        super().setup()
        with self.server.hub._lock:
            self.server.hub._conns.add(self.connection)

    def finish(self):
        with self.server.hub._lock:
            self.server.hub._conns.discard(self.connection)
        super().finish()

    def do_GET(self):  # noqa: N802
        self.server.hub._handle(self, "GET")

    def do_HEAD(self):  # noqa: N802
        self.server.hub._handle(self, "HEAD")

    def do_POST(self):  # noqa: N802
        self.server.hub._handle(self, "POST")

    def log_message(self, format, *args):  # silence stderr; the hub keeps its own log
        pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the listen backlog: socketserver's 5 drops the SYNs of a burst of new connections
    # (each then waits out a 1 s TCP retransmission), which a real Hub front end never does


class HubServer:
    """Loopback Hub serving ``root``. Use as a context manager (or ``start()``/``stop()``); ``url`` is its endpoint.

    Fault knobs (plain attributes, changeable while running): ``p429``, ``p500``, ``p_slow``, ``p_cut`` (full
    Content-Length, connection closed after half the body), ``p_short`` (body and Content-Length halved while
    Content-Range / X-Linked-Size still announce the full size), ``slow_seconds``, ``retry_after`` (seconds put in
    Retry-After and RateLimit t=), ``fault_kinds`` (subset of {"api", "resolve"}), ``fault_path_contains``,
    ``max_consecutive_faults`` (a request, keyed by method+path+query, never fails more than K times in a row).
    ``schedule_fault()`` queues deterministic faults. ``quota={"api": (n, window_s), "resolve": (...)}`` enforces a
    fixed-window rate limit with the Hub's RateLimit headers.
    """

    def __init__(self, root: str | Path, port: int = 0, *, page_size: int = 20, tree_page_size: int = 1000,
                 tokens: set[str] | None = None, gated_tokens: set[str] | None = None,
                 log_path: str | Path | None = None, seed: int = 0, p429: float = 0.0, p500: float = 0.0,
                 p_slow: float = 0.0, p_cut: float = 0.0, p_short: float = 0.0, slow_seconds: float = 0.5,
                 retry_after: int = 1, fault_kinds: tuple[str, ...] = ("api", "resolve"),
                 fault_path_contains: str | None = None, max_consecutive_faults: int | None = None,
                 quota: dict[str, tuple[int, float]] | None = None, latency_s: float = 0.0,
                 bytes_per_s: float | None = None):
        self.store = RepoStore(root)
        self.root = Path(root)
        self.port = port
        self.page_size, self.tree_page_size = page_size, tree_page_size
        self.tokens = set(tokens) if tokens is not None else None
        self.gated_tokens = set(gated_tokens or ())
        self.log_path = Path(log_path) if log_path else None
        self.rng = random.Random(seed)
        self.p429, self.p500, self.p_slow, self.p_cut, self.p_short = p429, p500, p_slow, p_cut, p_short
        self.slow_seconds, self.retry_after = slow_seconds, retry_after
        self.fault_kinds, self.fault_path_contains = set(fault_kinds), fault_path_contains
        self.max_consecutive_faults = max_consecutive_faults
        self.quota = dict(quota or {})
        self.latency_s, self.bytes_per_s = latency_s, bytes_per_s
        self.inflight = self.peak_inflight = 0
        self._lock = threading.Lock()
        self._log: list[dict] = []
        self._streaks: dict[tuple, int] = {}
        self._scheduled: list[dict] = []
        self._windows: dict[str, tuple[float, int]] = {}
        self._conns: set[socket.socket] = set()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubServer:
        self._httpd = _Server(("127.0.0.1", self.port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hubserver",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop the open keep-alive connections (a stopped hub answers nothing)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            with self._lock:
                conns, self._conns = list(self._conns), set()
            for conn in conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request log -----------------------------------------------------------------------------------------
    @property
    def log(self) -> list[dict]:
        """A copy of the request log: dicts with method, path, query, range, status, bytes_sent, kind, auth, fault."""
        with self._lock:
            return list(self._log)

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()

    def count(self, kind: str | None = None, method: str | None = None, path_contains: str | None = None,
              status: int | None = None) -> int:
        """Number of logged requests matching every given criterion."""
        return sum(1 for r in self.log if (kind is None or r["kind"] == kind)
                   and (method is None or r["method"] == method)
                   and (path_contains is None or path_contains in r["path"])
                   and (status is None or r["status"] == status))

    def bytes_sent(self, path_contains: str | None = None, kind: str | None = None) -> int:
        """Body bytes sent, summed over the matching logged requests."""
        return sum(r["bytes_sent"] for r in self.log if (path_contains is None or path_contains in r["path"])
                   and (kind is None or r["kind"] == kind))

    def _record(self, rec: dict) -> None:
        with self._lock:
            self._log.append(rec)
            if self.log_path:
                with open(self.log_path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")

    # -- faults ----------------------------------------------------------------------------------------------
    def schedule_fault(self, fault: str, times: int = 1, *, kind: str | None = None, method: str | None = None,
                       path_contains: str | None = None) -> None:
        """The next ``times`` matching requests get ``fault`` (one of FAULTS), ignoring probabilities and limits."""
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}")
        with self._lock:
            self._scheduled.append({"fault": fault, "left": times, "kind": kind, "method": method,
                                    "path_contains": path_contains})

    def clear_faults(self) -> None:
        """Drop scheduled faults, set every fault probability to 0 and forget the streaks."""
        with self._lock:
            self._scheduled.clear()
            self._streaks.clear()
        self.p429 = self.p500 = self.p_slow = self.p_cut = self.p_short = 0.0

    def _pick_fault(self, method: str, path: str, query: str, kind: str) -> tuple[str | None, bool]:
        """(fault, slow) for this request. Body faults only apply to GET; the caller drops them for errors."""
        with self._lock:
            for s in self._scheduled:
                if s["left"] > 0 and s["kind"] in (None, kind) and s["method"] in (None, method) \
                        and (s["path_contains"] is None or s["path_contains"] in path) \
                        and (s["fault"] not in ("cut", "short") or method == "GET"):
                    s["left"] -= 1
                    return (None, True) if s["fault"] == "slow" else (s["fault"], False)
            self._scheduled = [s for s in self._scheduled if s["left"] > 0]
            if kind not in self.fault_kinds or (self.fault_path_contains and self.fault_path_contains not in path):
                return None, False
            draw, slow = self.rng.random(), self.rng.random() < self.p_slow
            fault, acc = None, 0.0
            for name, p in (("429", self.p429), ("500", self.p500), ("cut", self.p_cut), ("short", self.p_short)):
                acc += p
                if draw < acc:
                    fault = name
                    break
            if fault in ("cut", "short") and method != "GET":
                fault = None
            if fault and self.max_consecutive_faults is not None \
                    and self._streaks.get((method, path, query), 0) >= self.max_consecutive_faults:
                fault = None
            return fault, slow

    def _rate_headers(self, kind: str) -> tuple[dict, bool]:
        """(RateLimit headers, over_quota) for the fixed-window quota of ``kind``, counting this request."""
        if kind not in self.quota:
            return {}, False
        limit, window = self.quota[kind]
        now = time.monotonic()
        with self._lock:
            start, used = self._windows.get(kind, (now, 0))
            if now - start >= window:
                start, used = now, 0
            used += 1
            self._windows[kind] = (start, used)
        name = "api" if kind == "api" else "resolvers"
        reset = max(0, math.ceil(start + window - now))
        return {"RateLimit": f'"{name}";r={max(0, limit - used)};t={reset}',
                "RateLimit-Policy": f'"fixed window";"{name}";q={limit};w={int(window)}'}, used > limit

    # -- request handling ------------------------------------------------------------------------------------
    def _handle(self, h: _Handler, method: str) -> None:
        with self._lock:
            self.inflight += 1
            self.peak_inflight = max(self.peak_inflight, self.inflight)
            inflight = self.inflight
        try:
            self._handle_one(h, method, inflight)
        finally:
            with self._lock:
                self.inflight -= 1

    def _handle_one(self, h: _Handler, method: str, inflight: int) -> None:
        url = urlsplit(h.path)
        path, query = unquote(url.path), url.query
        kind = "api" if url.path.startswith("/api/") else "resolve" if "/resolve/" in url.path else "other"
        auth = h.headers.get("Authorization")
        rec = {"t": time.time(), "method": method, "path": path, "query": query, "range": h.headers.get("Range"),
               "status": None, "bytes_sent": 0, "kind": kind, "auth": auth is not None, "fault": None,
               "inflight": inflight}
        body_in = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if method == "POST" else b""
        rate, over = self._rate_headers(kind)
        fault, slow = self._pick_fault(method, path, query, kind)
        if slow:
            rec["fault"] = "slow"
            time.sleep(self.slow_seconds)
        if self.latency_s:
            time.sleep(self.latency_s)
        try:
            if over:
                fault = None
                t = int(rate["RateLimit"].rsplit("t=", 1)[1])
                rec["over_quota"] = True
                raise HubError(429, "You have exceeded our rate limit.", headers={"Retry-After": str(t)})
            if fault in ("429", "500"):
                rec["fault"] = fault
                if fault == "429":
                    name = "api" if kind == "api" else "resolvers"
                    raise HubError(429, "Too Many Requests (injected)", headers={
                        "Retry-After": str(self.retry_after), "RateLimit": f'"{name}";r=0;t={self.retry_after}',
                        "RateLimit-Policy": f'"fixed window";"{name}";q=500;w=300'})
                raise HubError(500, "Internal Error (injected)")
            token = self._check_token(auth)
            resp = self._route(method, url.path, query, h, token, body_in)
        except HubError as e:
            headers = {**e.headers, **({"X-Error-Code": e.code} if e.code else {}), "X-Error-Message": e.message}
            resp = Response(e.status, {"Content-Type": "application/json", **headers},
                            json.dumps({"error": e.message}).encode())
            fault = None if fault in ("cut", "short") else fault
        except Exception as e:  # a bug here must not hang the client
            resp = Response(500, {"Content-Type": "application/json"}, json.dumps({"error": repr(e)}).encode())
        resp.headers.update({k: v for k, v in rate.items() if k not in resp.headers})
        if fault in ("cut", "short") and resp.status < 300:
            rec["fault"] = fault
        elif fault in ("cut", "short"):
            fault = None
        with self._lock:  # consecutive faults of this request, for max_consecutive_faults
            key = (method, path, query)
            self._streaks[key] = self._streaks.get(key, 0) + 1 if fault else 0
        self._send(h, method, resp, fault, rec)

    def _send(self, h: _Handler, method: str, resp: Response, fault: str | None, rec: dict) -> None:
        """Write the response. The request is logged just before its last byte leaves, so a client that has read
        a whole answer always finds it in the log; on a disconnect the in-memory entry gets the real byte count."""
        length = resp.length
        planned = 0 if method == "HEAD" else length // 2 if fault in ("cut", "short") else length
        rec.update(status=resp.status, bytes_sent=planned)
        logged, sent = False, 0
        try:
            h.send_response(resp.status)
            for k, v in resp.headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(planned if fault == "short" else length))
            if planned == 0:
                self._record(rec)
                logged = True
            h.end_headers()
            paced = self.bytes_per_s if rec["kind"] == "resolve" else None
            t0 = time.monotonic()
            for chunk in _chunks(resp, planned, 1 << 18 if paced else 1 << 20):
                if sent + len(chunk) == planned and not logged:  # hold back the last byte until logged
                    h.wfile.write(chunk[:-1])
                    sent += len(chunk) - 1
                    self._record(rec)
                    logged, chunk = True, chunk[-1:]
                h.wfile.write(chunk)
                sent += len(chunk)
                if paced and (ahead := sent / paced - (time.monotonic() - t0)) > 0:
                    h.wfile.flush()
                    time.sleep(ahead)  # the body is no faster than the connection's bandwidth
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True
            rec["bytes_sent"], rec["error"] = sent, "client disconnected"
        if fault == "cut":
            h.close_connection = True
        if not logged:
            rec["bytes_sent"] = sent
            self._record(rec)

    def _check_token(self, auth: str | None) -> str | None:
        """The bearer token (None if absent); 401 if the server has an accepted set and this one is not in it."""
        if not auth:
            return None
        token = auth.split(" ", 1)[1].strip() if " " in auth else auth.strip()
        if self.tokens is not None and token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def _route(self, method: str, raw_path: str, query: str, h: _Handler, token: str | None, body: bytes) -> Response:
        seg = [unquote(s) for s in raw_path.strip("/").split("/")]
        params = parse_qs(query, keep_blank_values=True)
        if seg[:2] == ["api", "models"]:
            if len(seg) == 2 and method in ("GET", "HEAD"):
                return self._list_models(params, query, h, token)
            if len(seg) >= 4:
                repo = self._repo(f"{seg[2]}/{seg[3]}", token)
                rest = seg[4:]
                if not rest and method in ("GET", "HEAD"):
                    return self._model_info(repo, "main", params)
                if len(rest) == 2 and rest[0] == "revision":
                    return self._model_info(repo, rest[1], params)
                if len(rest) >= 2 and rest[0] == "tree":
                    return self._tree(repo, rest[1], "/".join(rest[2:]), params, query, raw_path, h)
                if len(rest) == 2 and rest[0] == "paths-info" and method == "POST":
                    return self._paths_info(repo, rest[1], body)
                if len(rest) >= 2 and rest[0] == "safetensors-metadata":
                    return self._safetensors_metadata(repo, "/".join(rest[1:]), token)
        elif len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            repo = self._repo(f"{seg[0]}/{seg[1]}", token)
            return self._resolve(repo, seg[3], "/".join(seg[4:]), token, h.headers.get("Range"))
        raise HubError(404, "Not Found")

    # -- endpoints -------------------------------------------------------------------------------------------
    def _repo(self, repo_id: str, token: str | None) -> Repo:
        repo = self.store.get(repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if repo.private and token is None:
            raise HubError(401, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _check_rev(repo: Repo, rev: str) -> None:
        if rev not in ("main", "refs/heads/main", repo.sha):
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _check_gated(self, repo: Repo, token: str | None) -> None:
        if repo.gated and token not in self.gated_tokens:
            msg = f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated."
            raise HubError(401 if token is None else 403, msg, "GatedRepo")

    def _json(self, obj, headers: dict | None = None) -> Response:
        body = json.dumps(obj, separators=(",", ":")).encode()
        return Response(200, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, body)

    def _next_link(self, h: _Handler, path: str, query: str, offset: int) -> dict:
        items = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "cursor"]
        cursor = base64.urlsafe_b64encode(json.dumps({"o": offset}).encode()).decode().rstrip("=")
        host = h.headers.get("Host") or f"127.0.0.1:{self.port}"
        return {"Link": f'<http://{host}{path}?{urlencode([*items, ("cursor", cursor)])}>; rel="next"'}

    @staticmethod
    def _cursor(params: dict) -> int:
        raw = params.get("cursor", [""])[0]
        if not raw:
            return 0
        try:
            return int(json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))["o"])
        except (ValueError, KeyError, TypeError) as e:
            raise HubError(400, "Invalid cursor") from e

    def _list_models(self, params: dict, query: str, h: _Handler, token: str | None) -> Response:
        first = {k: v[0] for k, v in params.items()}
        expand = params.get("expand", []) + params.get("expand[]", [])
        if expand and any(first.get(k) == "true" for k in ("full", "config", "cardData")):
            raise HubError(400, "expand cannot be combined with full, config or cardData")
        repos = [r for r in self.store.all() if not r.private or token is not None]
        search, author = first.get("search", "").lower(), first.get("author", "").lower()
        if search:
            repos = [r for r in repos if search in r.repo_id.lower()]
        if author:
            repos = [r for r in repos if r.repo_id.split("/")[0].lower() == author]
        for f in params.get("filter", []):
            repos = [r for r in repos if f in r.tags or f == r.meta.get("library_name")]
        if "pipeline_tag" in first:
            repos = [r for r in repos if r.meta.get("pipeline_tag") == first["pipeline_tag"]]
        if "gated" in first:
            repos = [r for r in repos if bool(r.gated) == (first["gated"] == "true")]
        if "num_parameters" in first:
            lo, hi = _param_range(first["num_parameters"])
            repos = [r for r in repos if r.safetensors and lo <= r.safetensors["total"] <= hi]
        sort = first.get("sort")
        if sort:
            if sort not in ("downloads", "likes", "lastModified", "createdAt", "trendingScore", "id"):
                raise HubError(400, f"Invalid sort: {sort}")
            if sort != "id":
                repos.sort(key=lambda r: r.values()[sort], reverse=True)  # stable: ties stay in id order
        limit = int(first["limit"]) if first.get("limit") else None
        total = len(repos) if limit is None else min(len(repos), limit)
        offset = self._cursor(params)
        end = min(total, offset + self.page_size)
        if expand:
            fields = set(expand) | {"_id", "id"}
        else:
            fields = set(FULL_FIELDS if first.get("full") == "true" else LIST_FIELDS)
            fields |= {"config"} if first.get("config") == "true" else set()
            fields |= {"cardData"} if first.get("cardData") == "true" else set()
        page = [r.model_json(fields) for r in repos[offset:end]]
        headers = self._next_link(h, "/api/models", query, end) if end < total else {}
        return self._json(page, headers)

    def _model_info(self, repo: Repo, rev: str, params: dict) -> Response:
        self._check_rev(repo, rev)
        expand = params.get("expand", []) + params.get("expand[]", [])
        blobs = params.get("blobs", ["false"])[0] == "true"
        return self._json(repo.model_json(set(expand) | {"_id", "id"} if expand else None, blobs=blobs))

    def _dir_json(self, repo: Repo, d: str) -> dict:
        oid = hashlib.sha1(f"{repo.sha}:{d}".encode()).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": d}

    def _tree(self, repo: Repo, rev: str, sub: str, params: dict, query: str, raw_path: str,
              h: _Handler) -> Response:
        self._check_rev(repo, rev)
        sub = sub.strip("/")
        if sub and sub not in repo.dirs:
            raise HubError(404, f"{sub} does not exist on {rev}", "EntryNotFound")
        recursive = params.get("recursive", ["false"])[0] == "true"
        expand = params.get("expand", ["false"])[0] == "true"
        prefix = f"{sub}/" if sub else ""
        entries = []
        for d in sorted(repo.dirs):
            if d.startswith(prefix) and (recursive or "/" not in d[len(prefix):]):
                entries.append(self._dir_json(repo, d))
        for f in repo.files.values():
            if f.path.startswith(prefix) and (recursive or "/" not in f.path[len(prefix):]):
                entries.append(f.tree_json())
                if expand:
                    entries[-1]["lastCommit"] = {"id": repo.sha, "title": "Upload", "date": repo.last_modified}
                    entries[-1]["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False},
                                                         "pickleImportScan": None}
        entries.sort(key=lambda e: e["path"])
        offset = self._cursor(params)
        page_size = min(self.tree_page_size, 50) if expand else self.tree_page_size
        end = min(len(entries), offset + page_size)
        headers = self._next_link(h, raw_path, query, end) if end < len(entries) else {}
        return self._json(entries[offset:end], headers)

    def _paths_info(self, repo: Repo, rev: str, body: bytes) -> Response:
        self._check_rev(repo, rev)
        out = []
        for p in parse_qs(body.decode(), keep_blank_values=True).get("paths", []):
            p = p.strip("/")
            if p in repo.files:
                out.append(repo.files[p].tree_json())
            elif p in repo.dirs:
                out.append(self._dir_json(repo, p))
        return self._json(out)

    def _safetensors_metadata(self, repo: Repo, filename: str, token: str | None) -> Response:
        """GET /api/models/{id}/safetensors-metadata/{index}: every shard header in one answer (main only)."""
        self._check_gated(repo, token)
        if filename not in repo.files:
            raise HubError(404, f"Entry not found: {filename}", "EntryNotFound")
        index = json.loads(repo.files[filename].abspath.read_text())
        headers = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            base = filename.rsplit("/", 1)[0] + "/" if "/" in filename else ""
            f = repo.files.get(base + shard)
            headers[shard] = read_safetensors_header(f.abspath) if f else None
        return self._json({"index": {k: v for k, v in index.items() if k != "weight_map"}, "headers": headers})

    def _resolve(self, repo: Repo, rev: str, filename: str, token: str | None, range_header: str | None) -> Response:
        self._check_rev(repo, rev)
        self._check_gated(repo, token)
        f = repo.files.get(filename)
        if f is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": repo.sha})
        headers = {
            "Content-Type": "application/octet-stream" if f.sha256 else "text/plain; charset=utf-8",
            "Accept-Ranges": "bytes", "ETag": f'"{f.etag}"', "X-Repo-Commit": repo.sha,
            "X-Linked-Etag": f'"{f.etag}"', "X-Linked-Size": str(f.size),
        }
        rng = _parse_range(range_header, f.size)
        if rng is None:
            return Response(200, headers, file=(f.abspath, 0, f.size))
        start, end = rng
        headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        return Response(206, headers, file=(f.abspath, start, end - start + 1))


def _chunks(resp: Response, n: int, size: int = 1 << 20):
    """The first ``n`` body bytes of ``resp``, in chunks of at most ``size`` bytes."""
    if resp.file is None:
        if n:
            yield resp.body[:n]
        return
    path, start, _ = resp.file
    with open(path, "rb") as fh:
        fh.seek(start)
        while n > 0 and (chunk := fh.read(min(n, size))):
            n -= len(chunk)
            yield chunk


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Inclusive (start, end) of a single ``bytes=`` range; None to serve the whole file; 416 if unsatisfiable."""
    if not header or not header.strip().lower().startswith("bytes=") or "," in header:
        return None
    a, _, b = header.split("=", 1)[1].strip().partition("-")
    try:
        if a.strip() == "":
            start, end = max(0, size - int(b)), size - 1
        else:
            start, end = int(a), min(int(b), size - 1) if b.strip() else size - 1
    except ValueError:
        return None
    if start >= size or start > end:
        raise HubError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, end


def _param_range(spec: str) -> tuple[float, float]:
    """'min:6B,max:128B' -> (6e9, 1.28e11)."""
    units = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
    lo, hi = 0.0, math.inf
    for part in spec.split(","):
        key, _, val = part.partition(":")
        val = val.strip().upper()
        num = float(val.rstrip("KMBT") or 0) * units[val[-1] if val and val[-1] in "KMBT" else ""]
        lo, hi = (num, hi) if key.strip() == "min" else (lo, num)
    return lo, hi


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve a folder of <org>/<name> repos as a loopback Hugging Face Hub.")
    ap.add_argument("--root", required=True, help="folder holding <org>/<name>/ repo folders")
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    ap.add_argument("--page-size", type=int, default=20, help="models per /api/models page")
    ap.add_argument("--log", help="append one JSON line per request to this file")
    ap.add_argument("--url-file", help="write the server URL to this file once listening")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--p429", type=float, default=0.0)
    ap.add_argument("--p500", type=float, default=0.0)
    ap.add_argument("--p-slow", type=float, default=0.0)
    ap.add_argument("--p-cut", type=float, default=0.0)
    ap.add_argument("--p-short", type=float, default=0.0)
    ap.add_argument("--retry-after", type=int, default=1)
    ap.add_argument("--max-consecutive-faults", type=int, default=None)
    ap.add_argument("--quota-api", help="N/SECONDS fixed-window limit on /api calls, e.g. 500/300")
    ap.add_argument("--quota-resolve", help="N/SECONDS fixed-window limit on /resolve calls")
    ap.add_argument("--token", action="append", help="accepted token (repeatable); default: any token")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="wait before answering every request")
    ap.add_argument("--mbps", type=float, default=None, help="MB/s per connection for file bodies (default: no cap)")
    a = ap.parse_args(argv)
    quota = {k: (int(v.split("/")[0]), float(v.split("/")[1]))
             for k, v in (("api", a.quota_api), ("resolve", a.quota_resolve)) if v}
    hub = HubServer(a.root, a.port, page_size=a.page_size, log_path=a.log, seed=a.seed, p429=a.p429, p500=a.p500,
                    p_slow=a.p_slow, p_cut=a.p_cut, p_short=a.p_short, retry_after=a.retry_after,
                    max_consecutive_faults=a.max_consecutive_faults, quota=quota,
                    tokens=set(a.token) if a.token else None, latency_s=a.latency_ms / 1000,
                    bytes_per_s=a.mbps * 1e6 if a.mbps else None).start()
    if a.url_file:
        Path(a.url_file).write_text(hub.url)
    print(f"HubServer serving {a.root} at {hub.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
