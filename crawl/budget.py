"""State that every worker of one Hub crawl shares: the request budget, download slots, content hashes.

`Coordinator` is a plain class (testable without Ray). A crawl on Ray runs one copy of it as a named
actor that every worker reaches by name; with `--no-ray` it lives in the process. Callers never block
inside it: `reserve` answers how long to wait, and the caller sleeps.

- Request budget: per kind of request (`api`, `resolve`), at most the number allowed in any window of the
  Hub's length (it counts per 5 minutes, in fixed windows): a sliding window over the moments requests were
  let go, so no fixed window can see more, whichever moment it starts at; a full budget is spent at once and
  then one request per request that leaves the window. A 429 pauses every worker for that kind.
- Download slots: at most `max_downloads` weight downloads in flight across all workers.
- Content hashes: of the models with the same weight files, the one that ranks first (`canonical_rank`:
  most downloads, then the smallest model id) is the canonical copy, whatever the order they arrive in.
  A claim by a lower-ranked copy returns the holder (a duplicate of it); a claim by a higher-ranked one
  takes the hash over. A holder that had already been tokenized is re-pointed after the crawl
  (`crawl.hub.canonical_copies`), so the catalog does not depend on which worker got there first.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 300.0  # the Hub's rate-limit window
KINDS = ("api", "resolve")
LEASE_S = 1800.0  # a download slot whose holder vanished (killed worker) is freed after this long
NAMESPACE = "wildzoo"


def canonical_rank(downloads: int | None, model_id: str) -> tuple[int, str]:
    """The order in which copies of the same weights are preferred: most downloads first, then the smallest
    model id (`repo_id@revision`: the repo id, then the revision). Smaller ranks first."""
    return (-(downloads or 0), model_id)


def slack_s(window_s: float) -> float:
    """Margin added to the window: a request let go at t may reach the Hub a little after an earlier one was
    delayed (a busy worker, a new connection); 2% of the window, at most 1 s."""
    return min(1.0, 0.02 * window_s)


@dataclass
class SlidingWindow:
    """At most `capacity` requests let go in any `window_s` (+ `slack_s`) seconds; `reserve` gives each request
    the moment it may be sent, in order."""

    capacity: int
    window_s: float = WINDOW_S
    let_go: deque = field(default_factory=deque)  # the moments of the last `capacity` requests, ascending

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("a request budget must allow at least one request per window")
        self.capacity = int(self.capacity)

    def reserve(self, now: float, not_before: float = 0.0) -> float:
        """Take the next place (not before `not_before`: a pause); returns the seconds until it may be sent."""
        at = max(now, not_before)
        if len(self.let_go) >= self.capacity:  # the request `capacity` places back must have left the window
            at = max(at, self.let_go[0] + self.window_s + slack_s(self.window_s))
            self.let_go.popleft()
        self.let_go.append(at)
        return at - now


class Coordinator:
    """Budget, download slots and the content-hash registry of one crawl (see the module docstring)."""

    def __init__(self, per_window: dict[str, int], max_downloads: int = 4, window_s: float = WINDOW_S) -> None:
        self.windows = {k: SlidingWindow(per_window[k], window_s) for k in KINDS}
        self.paused_until = dict.fromkeys(KINDS, 0.0)
        self.max_downloads = max(1, int(max_downloads))
        self.slots: dict[str, float] = {}
        self.hashes: dict[str, tuple[tuple, str]] = {}  # content hash -> (rank, model_id) of its holder
        self.taken_over: set[str] = set()  # hashes a better-ranked copy took from a holder (to re-point after)
        self.counts = dict.fromkeys(KINDS, 0)
        self.waited_s = 0.0
        self.rate_limited = 0
        self.bytes_downloaded = 0
        self._lock = threading.Lock()

    def reserve(self, kind: str) -> float:
        """Count one request of `kind`; returns how many seconds the caller must wait before sending it."""
        with self._lock:
            now = time.monotonic()
            wait = self.windows[kind].reserve(now, self.paused_until[kind])
            self.counts[kind] += 1
            self.waited_s += max(0.0, wait)
            return max(0.0, wait)

    def pause(self, kind: str, seconds: float) -> None:
        """The Hub answered 429: hold every request of `kind` for `seconds`."""
        with self._lock:
            self.rate_limited += 1
            self.paused_until[kind] = max(self.paused_until[kind], time.monotonic() + seconds)

    def acquire_download(self, holder: str) -> bool:
        """Take a download slot for `holder` if one is free (or already held)."""
        with self._lock:
            now = time.monotonic()
            self.slots = {h: t for h, t in self.slots.items() if now - t < LEASE_S}
            if holder in self.slots or len(self.slots) < self.max_downloads:
                self.slots[holder] = now
                return True
            return False

    def release_download(self, holder: str) -> None:
        with self._lock:
            self.slots.pop(holder, None)

    def add_bytes(self, nbytes: int) -> None:
        """Count body bytes received from the Hub (for the summary)."""
        with self._lock:
            self.bytes_downloaded += int(nbytes)

    def claim(self, content_hash: str, model_id: str, downloads: int | None = None) -> str | None:
        """Claim `content_hash` for `model_id`: None if it now holds it (first, or ranking before the holder),
        else the holder's model id (this model is a duplicate of it)."""
        rank = canonical_rank(downloads, model_id)
        with self._lock:
            held = self.hashes.get(content_hash)
            if held is None or rank <= held[0]:
                if held is not None and held[1] != model_id:
                    self.taken_over.add(content_hash)
                self.hashes[content_hash] = (rank, model_id)
                return None
            return held[1]

    def unclaim(self, content_hash: str, model_id: str) -> None:
        """Forget a claim whose model failed, so a later copy of the same weights is crawled instead."""
        with self._lock:
            if self.hashes.get(content_hash, (None, None))[1] == model_id:
                del self.hashes[content_hash]

    def takeovers(self) -> list[str]:
        """Hashes whose holder a better-ranked copy displaced during this crawl."""
        with self._lock:
            return sorted(self.taken_over)

    def seed(self, claims: dict[str, tuple[str, int | None]]) -> int:
        """Holders already in the catalog (content hash -> (model_id, downloads)); returns how many are known."""
        with self._lock:
            for h, (m, downloads) in claims.items():
                rank = canonical_rank(downloads, m)
                if h not in self.hashes or rank < self.hashes[h][0]:
                    self.hashes[h] = (rank, m)
            return len(self.hashes)

    def export(self) -> dict:
        """What this coordinator counted, for another to take over (`absorb`): requests by kind, how long ago the
        requests still in each window were let go, pauses left, bytes and rate-limit answers."""
        with self._lock:
            now = time.monotonic()
            return {"counts": dict(self.counts), "ago": {k: [now - t for t in w.let_go] for k, w in self.windows.items()},
                    "paused_for": {k: max(0.0, t - now) for k, t in self.paused_until.items()},
                    "rate_limited": self.rate_limited, "waited_s": self.waited_s, "bytes": self.bytes_downloaded}

    def absorb(self, state: dict) -> None:
        """Take over another coordinator's counts (`export`): its requests count in this one's windows."""
        with self._lock:
            now = time.monotonic()
            for k in KINDS:
                self.counts[k] += state["counts"][k]
                w = self.windows[k]
                w.let_go = deque(sorted([now - a for a in state["ago"][k]] + list(w.let_go))[-w.capacity:])
                self.paused_until[k] = max(self.paused_until[k], now + state["paused_for"][k])
            self.rate_limited += state["rate_limited"]
            self.waited_s += state["waited_s"]
            self.bytes_downloaded += state["bytes"]

    def stats(self) -> dict:
        with self._lock:
            return {
                "requests": dict(self.counts),
                "rate_limited": self.rate_limited,
                "waited_s": round(self.waited_s, 2),
                "bytes_downloaded": self.bytes_downloaded,
            }


class Handle:
    """Synchronous access to a Coordinator, in this process or as a Ray actor."""

    def __init__(self, target, remote: bool) -> None:
        self._target, self._remote = target, remote

    def __getattr__(self, name: str):
        method = getattr(self._target, name)
        if not self._remote:
            return method

        def call(*args, **kwargs):
            import ray

            return ray.get(method.remote(*args, **kwargs))

        return call


_LOCAL: dict[str, Coordinator] = {}
_HANDLES: dict[str, Handle] = {}
_CONNECT = threading.Lock()  # one handle per name, whichever of a worker's threads asks first


def start(name: str, per_window: dict[str, int], max_downloads: int, use_ray: bool,
          window_s: float = WINDOW_S) -> Handle:
    """Create the crawl's coordinator: a named Ray actor (Ray must be initialized) or an in-process one."""
    if use_ray:
        import ray

        actor_cls = ray.remote(num_cpus=0, max_concurrency=64)(Coordinator)
        actor = actor_cls.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote(
            per_window, max_downloads, window_s
        )
        handle = Handle(actor, remote=True)
    else:
        _LOCAL[name] = Coordinator(per_window, max_downloads, window_s)
        handle = Handle(_LOCAL[name], remote=False)
    _HANDLES[name] = handle
    return handle


def connect(name: str) -> Handle:
    """The coordinator called `name`: in this process if it lives here, else the Ray actor."""
    with _CONNECT:
        if name not in _HANDLES:
            if name in _LOCAL:
                _HANDLES[name] = Handle(_LOCAL[name], remote=False)
            else:
                import ray

                _HANDLES[name] = Handle(ray.get_actor(name, namespace=NAMESPACE), remote=True)
        return _HANDLES[name]


def stop(name: str) -> None:
    """Forget (and, on Ray, end) the coordinator called `name`."""
    handle = _HANDLES.pop(name, None)
    if _LOCAL.pop(name, None) is None and handle is not None:
        import ray

        try:
            ray.kill(handle._target)
        except Exception:  # the actor is gone already (Ray shut down)
            pass
