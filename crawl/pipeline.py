"""The crawl as a pipeline: tasks → (skip done) → CrawlWorker actors → summary.

Ray only schedules (a pool of plain actors, `WorkerPool`): every stage is a plain function or callable class over
a `pyarrow.Table`.
A local Ray is started on demand with explicit limits; with `RAY_ADDRESS` set the crawl attaches to
that cluster instead.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import pyarrow as pa

from catalog.rayenv import ray_session
from catalog.store import Catalog, crawl_stamp
from crawl.tasks import dedupe, skip_done
from crawl.worker import CrawlWorker

log = logging.getLogger(__name__)


def crawl(
    tasks: pa.Table,
    catalog: Catalog,
    options: dict | None = None,
    workers: int | None = None,
    batch_size: int = 8,
    retry_errors: bool = False,
    use_ray: bool = True,
    worker: type[CrawlWorker] = CrawlWorker,
    resources: dict[str, float] | None = None,
    done: dict[str, str] | pa.Table | None = None,
    pool: WorkerPool | None = None,
) -> dict:
    """Crawl `tasks` into `catalog`; returns a summary (counts by status, failures with reasons).

    `worker` is the callable class the actors run (a subclass in the fault tests); `resources`, custom Ray
    resources each actor needs (a cluster's crawler nodes); `pool`, workers started ahead (`start_pool`, while
    the caller lists the tasks; it is stopped here)."""
    t0 = time.time()
    stamp = pool.stamp if pool is not None else crawl_stamp()
    options = options or {}
    removed = catalog.clean()
    if removed:
        log.info("removed %d leftover file(s) of an interrupted crawl", removed)
    todo = skip_done(dedupe(tasks), catalog.current_models(("model_id", "status")) if done is None else done,
                     retry_errors)
    skipped_done = tasks.num_rows - todo.num_rows
    log.info("%d model(s) to crawl, %d already in the catalog", todo.num_rows, skipped_done)
    results = []
    if pool is not None:
        results = _run_pool(pool, todo, batch_size)
    elif todo.num_rows and use_ray:
        results = _run_ray(todo, catalog, options, workers, batch_size, stamp, worker, resources or {})
    elif todo.num_rows:
        crawler = worker(catalog.uri, options, stamp)
        progress = Progress(todo.num_rows)
        for s in range(0, todo.num_rows, batch_size):
            results.append(crawler(todo.slice(s, batch_size)))
            progress.update(results[-1])
    rows = pa.concat_tables(results).to_pylist() if results else []
    counts = Counter(r["status"] for r in rows)
    return {
        "catalog": catalog.uri,
        "already_done": skipped_done,
        "crawled": len(rows),
        "by_status": dict(counts),
        "tokens": sum(r["n_tokens"] or 0 for r in rows),
        "bytes": sum(r["total_bytes"] or 0 for r in rows),
        "failures": [(r["model_id"], r["status"], r["error"]) for r in rows if r["status"] in ("error", "skipped")],
        "statuses": {r["model_id"]: r["status"] for r in rows},
        "seconds": round(time.time() - t0, 2),
    }


def _run_ray(todo: pa.Table, catalog: Catalog, options: dict, workers: int | None, batch_size: int, stamp: str,
             worker: type[CrawlWorker], resources: dict[str, float]) -> list[pa.Table]:
    import ray

    with ray_session():
        n = workers or max(1, int(ray.available_resources().get("CPU", 1)))
        pool = WorkerPool(worker, {"catalog_uri": catalog.uri, "options": options, "stamp": stamp},
                          min(n, -(-todo.num_rows // batch_size)), resources)
        return _run_pool(pool, todo, batch_size)


def start_pool(catalog: Catalog, options: dict, workers: int | None = None,
               resources: dict[str, float] | None = None, worker: type[CrawlWorker] = CrawlWorker) -> WorkerPool:
    """Crawl workers started ahead of the crawl (Ray must be up): one per CPU, or `workers`."""
    import ray

    n = workers or max(1, int(ray.available_resources().get("CPU", 1)))
    return WorkerPool(worker, {"catalog_uri": catalog.uri, "options": options, "stamp": crawl_stamp()}, n, resources)


def _run_pool(pool: WorkerPool, todo: pa.Table, batch_size: int) -> list[pa.Table]:
    """Every batch of `todo` through the pool (stopped at the end), with progress."""
    blocks = [todo.slice(s, batch_size) for s in range(0, todo.num_rows, batch_size)]
    results, progress = [], Progress(todo.num_rows)
    try:
        for batch in pool.map(blocks):
            results.append(batch)
            progress.update(batch)
    finally:
        pool.stop()
    return results


class _Actor:
    """The Ray actor around a crawl worker (a plain callable class): one per core."""

    def __init__(self, worker: type[CrawlWorker], kwargs: dict) -> None:
        self.worker = worker(**kwargs)

    def run(self, batch: pa.Table) -> pa.Table:
        return self.worker(batch)


class WorkerPool:
    """`n` crawl-worker actors (one CPU each, plus `resources`), each given up to `queued` batches at once so it
    never waits between them. A batch whose actor died (its process or its node) goes to another actor: a
    batch's shards are named by their content, so one committed before the death is written again, not twice.

    Plain actors, not Ray Data's actor pool: on a 2-core machine Ray Data's executor and its helper actors cost
    3.5 s before the first batch (1.2 s for two plain actors), a crawl's whole budget on a small hub query."""

    def __init__(self, worker: type[CrawlWorker], kwargs: dict, n: int, resources: dict[str, float] | None = None,
                 queued: int = 2, max_deaths: int | None = None) -> None:
        import ray

        self._cls = ray.remote(_Actor).options(num_cpus=1, resources=resources or None, max_restarts=0)
        self._args = (worker, kwargs)
        self.stamp = kwargs.get("stamp")
        self.queued = queued
        self.actors = [self._cls.remote(*self._args) for _ in range(max(1, n))]
        self.deaths, self.max_deaths = 0, max_deaths if max_deaths is not None else 3 * max(1, n)

    def map(self, blocks: list[pa.Table]):
        """Each block's summary table, in the order they finish."""
        import ray
        from ray.exceptions import RayActorError

        todo = list(range(len(blocks)))[::-1]  # popped from the end: first blocks first
        inflight: dict = {}  # object ref -> (actor, block index)
        while todo or inflight:
            for actor in list(self.actors):
                while todo and sum(a is actor for a, _ in inflight.values()) < self.queued:
                    i = todo.pop()
                    inflight[actor.run.remote(blocks[i])] = (actor, i)
            done, _ = ray.wait(list(inflight), num_returns=1)
            actor, i = inflight.pop(done[0])
            try:
                yield ray.get(done[0])
            except RayActorError as e:
                self._lost(actor, e)
                todo.append(i)

    def _lost(self, actor, error: Exception) -> None:
        """An actor died: its batches go to the others; a new actor replaces it only if none is left."""
        self.deaths += 1
        if self.deaths > self.max_deaths:
            raise RuntimeError(f"{self.deaths} crawl workers died; the last: {error}") from None
        log.warning("a crawl worker died (%s); its batch goes to another worker", str(error).splitlines()[0][:200])
        if actor in self.actors:
            self.actors.remove(actor)
        if not self.actors:
            self.actors.append(self._cls.remote(*self._args))

    def stop(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


class Progress:
    """A progress line at most every 2 s (and at the end): models by status, bytes, rate, ETA."""

    def __init__(self, total: int, t0: float | None = None, every_s: float = 2.0) -> None:
        self.total, self.t0, self.every_s = total, t0 or time.time(), every_s
        self.done, self.bytes, self.last = 0, 0, 0.0
        self.statuses: Counter = Counter()

    def update(self, batch: pa.Table) -> None:
        """Count a batch of summary rows (status, total_bytes) and log if it is time."""
        self.done += batch.num_rows
        self.statuses.update(batch.column("status").to_pylist())
        self.bytes += sum(b or 0 for b in batch.column("total_bytes").to_pylist())
        now = time.time()
        if self.done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = max(now - self.t0, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        by = ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items()))
        log.info("crawled %d/%d models (%s), %.1f MB, %.1f models/s, %.1f MB/s, ETA %.0fs", self.done, self.total,
                 by, self.bytes / 1e6, rate, self.bytes / 1e6 / elapsed, eta)
