"""HTTP to the Hub for the crawler: every request budgeted and retried; files read by range and resumed.

All traffic goes through huggingface_hub's own shared session (`get_session()`), so the listing pages
that the client requests by itself are covered too:

- `install()` gives that session a request hook that takes one request from the crawl's shared budget
  before anything is sent to the endpoint (retries included), gives requests without a timeout a
  default one, and turns a 429 into a pause for every worker.
- `with_retries()` is the retry wrapper the client lacks outside listings: 429 honoured (RateLimit
  `t=`, Retry-After), exponential back-off with jitter on 5xx, timeouts, connection errors and short
  bodies, a bounded number of tries; the last failure becomes a one-line `HubUnavailable`.
- `begin()` reads a file's first bytes (enough for a safetensors header, usually) with one ranged GET
  that also tells its size and sha256; `extend()` reads more of a long header; `finish()` fetches the
  rest. All of it lands in a `.part` file with a `.meta.json` sidecar, so a killed crawl resumes with
  `Range` and never fetches a byte range twice; the finished file is checked against the sha256.

Tokens stay inside huggingface_hub (`build_hf_headers`): nothing here logs or stores them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import (
    get_session,
    hf_raise_for_status,
    parse_ratelimit_headers,
    set_client_factory,
)
from huggingface_hub.utils._http import default_client_factory

from catalog.errors import BadWeights, WildzooError

log = logging.getLogger(__name__)
T = TypeVar("T")

# No request leaves for any host but the crawl's endpoint: with telemetry on, huggingface_hub's user agent
# (`build_hf_headers`) fetches an "agent harnesses" registry from its default endpoint (the real Hub) in every new
# process — outside the crawl's budget, and on a machine without internet access each loading thread of a
# fresh worker stalled on it (4 s of a 5 s header-only batch).
hf_constants.HF_HUB_DISABLE_TELEMETRY = True

CONNECT_TIMEOUT_S = 10.0
CHUNK = 1 << 20
SHA256 = re.compile(r"^[0-9a-f]{64}$")
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RATE_WAIT_S = 900.0  # a 429 asking for longer than this is treated as a failure of the request


class HubUnavailable(WildzooError):
    """A request that kept failing after every retry; the message says which and why."""


class ShortRead(OSError):
    """A body shorter than announced, a range answered from the wrong offset, or a checksum mismatch."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: `tries` attempts in all, back-off from `base_s` doubling up to `max_s`."""

    tries: int = 8
    base_s: float = 1.0
    max_s: float = 60.0
    timeout_s: float = 60.0

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Exponential back-off with jitter for the `attempt`-th failure (1-based): half fixed, half random."""
        ceiling = min(self.max_s, self.base_s * 2 ** (attempt - 1))
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


@dataclass(frozen=True)
class FileInfo:
    """What a resolve answer says about a file: its size, ETag (the sha256 for LFS files) and commit."""

    size: int
    etag: str | None
    commit: str | None = None

    @property
    def sha256(self) -> str | None:
        return self.etag if self.etag and SHA256.match(self.etag) else None


# ------------------------------------------------------------------------------------------------------
# The shared session: budget and timeouts for every request to the endpoint
# ------------------------------------------------------------------------------------------------------
_STATE: dict = {"coordinator": None, "origin": None, "timeout_s": 60.0}
_INSTALL = threading.Lock()  # a worker's loading threads install at once: the session is replaced only once


def request_kind(path: str) -> str:
    """The Hub's rate-limit bucket of a request path: `resolve` for file downloads, else `api`."""
    return "resolve" if "/resolve/" in path else "api"


def _origin(url: str) -> tuple[str, str, int | None]:
    u = urlsplit(url)
    return u.scheme, (u.hostname or "").lower(), u.port or {"http": 80, "https": 443}.get(u.scheme)


def _on_request(request: httpx2.Request) -> None:
    timeout = request.extensions.get("timeout")
    if isinstance(timeout, dict) and timeout.get("read") is None:
        t = _STATE["timeout_s"]
        request.extensions["timeout"] = {"connect": CONNECT_TIMEOUT_S, "read": t, "write": t, "pool": t}
    coord = _STATE["coordinator"]
    if coord is None or _origin(str(request.url)) != _STATE["origin"]:
        return  # a CDN the Hub redirected to is not counted by the Hub's limits
    wait = coord.reserve(request_kind(request.url.path))
    if wait > 0:
        log.debug("request budget: waiting %.1fs", wait)
        time.sleep(wait)


def _on_response(response: httpx2.Response) -> None:
    coord = _STATE["coordinator"]
    if coord is not None and response.status_code == 429 and _origin(str(response.url)) == _STATE["origin"]:
        coord.pause(request_kind(response.url.path), rate_limit_wait(response.headers) or 1.0)


def _client_factory() -> httpx2.Client:
    client = default_client_factory()
    hooks = client.event_hooks
    client.event_hooks = {"request": [*hooks.get("request", []), _on_request],
                          "response": [*hooks.get("response", []), _on_response]}
    return client


def install(coordinator, endpoint: str, timeout_s: float = 60.0) -> None:
    """Route every request huggingface_hub sends to `endpoint` through `coordinator`'s budget (idempotent)."""
    origin = _origin(endpoint)
    with _INSTALL:
        if _STATE["coordinator"] is coordinator and _STATE["origin"] == origin:
            return
        _STATE.update(coordinator=coordinator, origin=origin, timeout_s=timeout_s)
        set_client_factory(_client_factory)


def uninstall() -> None:
    """Give huggingface_hub its default session back (the driver does this when the crawl ends)."""
    with _INSTALL:
        _STATE.update(coordinator=None, origin=None)
        set_client_factory(default_client_factory)


# ------------------------------------------------------------------------------------------------------
# Retries
# ------------------------------------------------------------------------------------------------------
def rate_limit_wait(headers) -> float | None:
    """Seconds a 429 asks to wait: RateLimit `t=` when nothing remains, else Retry-After; None if neither."""
    info = parse_ratelimit_headers(headers)
    if info is not None and info.remaining == 0:
        return float(info.reset_in_seconds) + 0.1
    value = headers.get("Retry-After", "").strip()
    return float(value) + 0.1 if value.isdigit() else None


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def retry_wait(exc: BaseException, attempt: int, policy: RetryPolicy) -> float | None:
    """How long to wait before trying again after `exc`, or None if it is not worth another try."""
    status = _status(exc)
    if status == 429:
        wait = rate_limit_wait(exc.response.headers)
        return policy.backoff(attempt) if wait is None else wait
    if status is not None:
        return policy.backoff(attempt) if status in RETRY_STATUSES else None
    if isinstance(exc, httpx2.TimeoutException | httpx2.NetworkError | httpx2.RemoteProtocolError | ShortRead):
        return policy.backoff(attempt)
    return None


def describe(exc: BaseException) -> str:
    """A short reason for an error row (the first line of the message; never any header)."""
    status = _status(exc)
    if status is not None:
        return f"HTTP {status}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy, sleep=time.sleep) -> T:
    """`fn()`, tried up to `policy.tries` times on transient failures; other errors propagate unchanged."""
    for attempt in range(1, policy.tries + 1):
        try:
            return fn()
        except Exception as e:
            wait = retry_wait(e, attempt, policy)
            if wait is None:
                raise
            if attempt == policy.tries or wait > MAX_RATE_WAIT_S:
                raise HubUnavailable(f"{what}: gave up after {attempt} tries ({describe(e)})") from None
            log.info("%s: %s, retry %d/%d in %.1fs", what, describe(e), attempt, policy.tries - 1, wait)
            sleep(wait)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------------
# Ranged reads
# ------------------------------------------------------------------------------------------------------
def _etag(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    return value[2:].strip('"') if value.startswith("W/") else value.strip('"')


def file_info(response: httpx2.Response) -> FileInfo:
    """Size, ETag and commit of the file behind a resolve answer (the Hub's own headers win over a CDN's)."""
    hub = response.history[0] if response.history else response
    etag = _etag(hub.headers.get("X-Linked-Etag") or hub.headers.get("ETag"))
    size = None
    if response.status_code == 206 and "/" in response.headers.get("Content-Range", ""):
        total = response.headers["Content-Range"].rsplit("/", 1)[1]
        size = int(total) if total.isdigit() else None
    if size is None and hub.headers.get("X-Linked-Size", "").isdigit():
        size = int(hub.headers["X-Linked-Size"])
    if size is None and response.status_code == 200 and response.headers.get("Content-Length", "").isdigit():
        size = int(response.headers["Content-Length"])
    if size is None:
        raise ShortRead("the answer does not tell the file's size (no Content-Range or Content-Length)")
    return FileInfo(size, etag, hub.headers.get("X-Repo-Commit"))


def _range_start(response: httpx2.Response) -> int:
    m = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    if m is None:
        raise ShortRead("206 answer without a Content-Range")
    return int(m.group(1))


def _raise_for_status(r: httpx2.Response) -> None:
    """huggingface_hub's typed errors for a (streamed) answer; its small error body is read first."""
    if r.status_code >= 400:
        r.read()
    hf_raise_for_status(r)


def read_range(url: str, start: int, end: int, headers: dict, timeout_s: float) -> tuple[bytes, FileInfo]:
    """Bytes `start..end` (inclusive, clamped to the file) and the file's identity; one GET.

    The body is streamed and cut at `end`, so a server that ignores `Range` costs a closed connection,
    not a whole file in memory.
    """
    with get_session().stream("GET", url, headers={**headers, "Range": f"bytes={start}-{end}"},
                              timeout=timeout_s) as r:
        if r.status_code == 416:
            raise BadWeights(f"{url.rsplit('/', 1)[-1]}: file is shorter than {start + 1} bytes")
        _raise_for_status(r)
        info = file_info(r)
        whole = r.status_code == 200  # the server ignored the range: its answer starts at byte 0
        skip = start if whole else 0
        if r.status_code == 206 and _range_start(r) != start:
            raise ShortRead(f"asked for bytes from {start}, got {_range_start(r)}")
        want, buf = skip + end - start + 1, bytearray()
        for chunk in r.iter_bytes():
            buf += chunk
            if whole and len(buf) >= want:
                break  # the rest of the file is not wanted
    body = bytes(buf[skip:want])
    if not body and start < info.size:
        raise ShortRead("empty body")
    return body, info


def read_prefix(url: str, nbytes: int, headers: dict, policy: RetryPolicy, have: bytes = b"",
                info: FileInfo | None = None) -> tuple[bytes, FileInfo]:
    """At least the first `nbytes` bytes (fewer only if the file is shorter), continuing from `have`."""
    buf = have
    while info is None or len(buf) < min(nbytes, info.size):
        start = len(buf)
        chunk, info = with_retries(lambda s=start: read_range(url, s, nbytes - 1, headers, policy.timeout_s),
                                   f"GET {url.rsplit('/', 1)[-1]} bytes {start}-{nbytes - 1}", policy)
        buf += chunk
    return buf, info


# ------------------------------------------------------------------------------------------------------
# Resumable downloads
# ------------------------------------------------------------------------------------------------------
def _meta_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".meta.json")


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def known_info(dest: Path) -> FileInfo | None:
    """The sidecar's record of a file this folder has started or finished downloading, if any."""
    try:
        return FileInfo(**json.loads(_meta_path(dest).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def begin(url: str, dest: Path, headers: dict, window: int, policy: RetryPolicy) -> tuple[FileInfo, bytes, int]:
    """Start (or find) the download of `dest`: (file info, its first bytes, bytes fetched by this call).

    A finished file or a `.part` with its sidecar costs no request. Otherwise one ranged GET of the first
    `window` bytes starts the `.part` file: the same bytes serve to check the header before the rest
    of the file is fetched, so nothing is downloaded twice.
    """
    info = known_info(dest)
    for have in (dest, _part_path(dest)):
        if info is not None and have.is_file():
            with open(have, "rb") as f:
                return info, f.read(window), 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    _part_path(dest).unlink(missing_ok=True)  # a part without its sidecar cannot be verified: start over
    body, info = read_prefix(url, window, headers, policy)
    _write_atomic(_meta_path(dest), json.dumps(asdict(info)).encode())
    _write_atomic(_part_path(dest), body)
    return info, body, len(body)


def extend(url: str, dest: Path, nbytes: int, info: FileInfo, headers: dict, policy: RetryPolicy) -> tuple[bytes, int]:
    """The first `nbytes` of a started download, fetching what its `.part` lacks; (bytes, bytes fetched)."""
    part = _part_path(dest)
    source = dest if dest.is_file() else part
    have = source.read_bytes()[:nbytes] if source.is_file() else b""
    if len(have) >= min(nbytes, info.size):
        return have, 0
    buf, _ = read_prefix(url, nbytes, headers, policy, have, info)
    with open(part, "ab") as f:
        f.write(buf[len(have):])
    return buf, len(buf) - len(have)


def _stream_rest(url: str, part: Path, offset: int, headers: dict, timeout_s: float, count: list[int]) -> None:
    """Append the file from `offset` to `part` (one GET, written as it arrives so a failure keeps it)."""
    with get_session().stream("GET", url, headers={**headers, "Range": f"bytes={offset}-"}, timeout=timeout_s) as r:
        _raise_for_status(r)
        if r.status_code == 200:
            offset = 0  # the server ignored the range: take the whole file
        elif _range_start(r) != offset:
            raise ShortRead(f"asked for bytes from {offset}, got {_range_start(r)}")
        with open(part, "r+b") as f:
            f.seek(offset)
            f.truncate()
            for chunk in r.iter_bytes():  # as received: a cut connection keeps everything that arrived
                f.write(chunk)
                count[0] += len(chunk)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * CHUNK):
            h.update(chunk)
    return h.hexdigest()


def finish(url: str, dest: Path, info: FileInfo, headers: dict, policy: RetryPolicy) -> int:
    """Fetch what `.part` lacks, verify size and sha256, move it into place; returns bytes fetched."""
    part, count = _part_path(dest), [0]
    if dest.is_file():
        return 0

    def step() -> None:
        size = part.stat().st_size if part.is_file() else 0
        if not part.is_file():
            part.write_bytes(b"")
        if size > info.size:
            part.unlink()
            raise ShortRead(f"{dest.name}: {size:,} bytes on disk, more than the file's {info.size:,}")
        if size < info.size:
            _stream_rest(url, part, size, headers, policy.timeout_s, count)
            size = part.stat().st_size
        if size != info.size:
            raise ShortRead(f"{dest.name}: got {size:,} of {info.size:,} bytes")
        if info.sha256 and _sha256(part) != info.sha256:
            part.unlink()
            raise ShortRead(f"{dest.name}: sha256 does not match the Hub's")

    with_retries(step, f"GET {dest.name}", policy)
    os.replace(part, dest)
    return count[0]
