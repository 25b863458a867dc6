"""The crawl stage that does the work: load each model of a batch of tasks, write its rows to shards.

`CrawlWorker` is a plain callable over a `pyarrow.Table` of tasks (testable without Ray); Ray Data
runs copies of it in parallel. A source whose loading waits on the network (the Hub: `concurrency` in the
options) loads up to that many models of a batch at once in threads, and the worker tokenizes each as soon
as it is loaded, in the order they arrive: requests stay in flight while the core tokenizes. Nothing one model's files hold can fail the batch: whatever goes wrong
for a model (a malformed header, a conversion error, a value its rows cannot hold), it becomes a
`models` row with `status='error'` and a one-line reason, and every other model of the batch lands.
A model's rows are checked against the catalog schemas before they join the shard, so a shard's
commit never meets a row it cannot write.
"""

from __future__ import annotations

import datetime as dt
import logging
import traceback
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed

import pyarrow as pa

from catalog.errors import BadWeights, WildzooError
from catalog.process import ModelRecords
from catalog.schema import MODELS, PROPERTIES, TENSORS
from catalog.store import Catalog, Shard, crawl_stamp

log = logging.getLogger(__name__)

BUFFER_BYTES = 256 << 20  # tokens buffered per shard before it is committed
STREAM_BYTES = 128 << 20  # a model with more token bytes than this streams into a shard of its own

SUMMARY = pa.schema(
    [
        ("model_id", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("n_tensors", pa.int64()),
        ("n_tokens", pa.int64()),
        ("total_bytes", pa.int64()),
    ]
)


def model_row(task: dict, **fields) -> dict:
    """A complete `models` row: the task's identity, what the source told, what the crawl measured."""
    row = dict.fromkeys(MODELS.names)
    row.update({k: task.get(k) for k in ("model_id", "source", "repo_id", "revision", "path")})
    row.update({k: v for k, v in fields.items() if k in row})
    row["crawled_at"] = dt.datetime.now(dt.timezone.utc)
    return row


def one_line(reason: str, limit: int = 2000) -> str:
    """A failure reason as one line of valid UTF-8 (it is stored in the catalog and printed)."""
    text = " ".join(str(reason).split()) or "unknown error"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


def _first_unfit(values: list, type_: pa.DataType) -> int:
    for i, v in enumerate(values):
        try:
            pa.array([v], type=type_)
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            return i
    return 0


def check_rows(table: str, rows: list[dict], schema: pa.Schema) -> None:
    """Raise `BadWeights` naming the row and column of the first value that `schema` cannot hold.

    Run on each model's rows before they join a shard: a shard's commit converts the rows of all its
    models at once, so one unfit value would otherwise lose the whole batch.
    """
    for f in schema:
        values = [r.get(f.name) for r in rows]
        try:
            pa.array(values, type=f.type)
        except (pa.ArrowException, OverflowError, TypeError, ValueError) as e:
            i = _first_unfit(values, f.type)
            who = rows[i].get("name") if table == "tensors" else rows[i].get("model_id")
            what = f" for tensor {who!r}" if table == "tensors" else ""
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise BadWeights(f"{table} row{what}: column {f.name} ({f.type}) cannot hold "
                             f"{values[i]!r:.100} ({detail})") from None


def checked(model: dict, tensors: list[dict], properties: list[dict]) -> None:
    """Check one model's `models`, `tensors` and `properties` rows against the catalog schemas."""
    check_rows("models", [model], MODELS)
    check_rows("tensors", tensors, TENSORS)
    check_rows("properties", properties, PROPERTIES)


def load_task(task: dict, options: dict):
    """Dispatch a task to its source's loader (imported lazily: each source has its own dependencies)."""
    source = task["source"]
    if source == "local":
        from crawl import local

        return local.load(task, allow_pickle=options.get("allow_pickle", False))
    if source == "zoo":
        from crawl import zoo

        return zoo.load(task)
    if source == "hub":
        from crawl import hub

        return hub.load(task, options)
    raise WildzooError(f"unknown source {source!r}")


class CrawlWorker:
    """Callable over a batch of tasks; writes shards to the catalog and returns one summary row per model."""

    def __init__(self, catalog_uri: str, options: dict | None = None, stamp: str | None = None) -> None:
        self.catalog = Catalog.open(catalog_uri)
        self.options = options or {}
        self.stamp = stamp or crawl_stamp()  # the crawl's: shard ids are decided by content (catalog.store.Shard)
        self.header_only = bool(self.options.get("header_only", False))
        self.concurrency = max(1, int(self.options.get("concurrency") or 1))
        self._releases: list = []  # callables freeing committed models' resources (downloaded files)

    def __call__(self, batch: pa.Table) -> pa.Table:
        # one crawl worker per core: multi-threaded BLAS inside a worker only contends (4x slower stats on 2 cores)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1):
            return self._batch(batch)

    def _batch(self, batch: pa.Table) -> pa.Table:
        summary = []
        shard = self._shard()
        for task, loading in self._loads(batch.to_pylist()):
            row = self._one(task, shard, loading)
            summary.append({k: row.get(k) for k in SUMMARY.names})
            if shard.token_bytes > BUFFER_BYTES:
                shard.commit()
                self._release()
                shard = self._shard()
        if shard.n_models:
            shard.commit()
        self._release()
        return pa.Table.from_pylist(summary, schema=SUMMARY)

    def _loads(self, tasks: list[dict]) -> Iterator[tuple[dict, Future | None]]:
        """(task, its load) in the order loads finish: with `concurrency` > 1 up to that many run at once in
        threads; else each is loaded when its turn comes (None)."""
        if self.concurrency == 1 or len(tasks) == 1:
            yield from ((t, None) for t in tasks)
            return
        with ThreadPoolExecutor(min(self.concurrency, len(tasks)), thread_name_prefix="wildzoo-load") as pool:
            futures = {pool.submit(load_task, t, self.options): t for t in tasks}
            try:
                for f in as_completed(futures):
                    yield futures[f], f
            finally:
                for f in futures:
                    f.cancel()

    def _shard(self, model_id: str | None = None) -> Shard:
        return self.catalog.new_shard(self.stamp, self.options, model_id)

    def _release(self) -> None:
        """Let sources free what their models held (downloaded files) once the models are committed."""
        for release in self._releases:
            try:
                release()
            except OSError as e:
                log.warning("could not free a committed model's files: %s", e)
        self._releases = []

    def _one(self, task: dict, shard: Shard, loading: Future | None = None) -> dict:
        try:
            loaded = load_task(task, self.options) if loading is None else loading.result()
            if callable(getattr(loaded, "release", None)):
                self._releases.append(loaded.release)
            if loaded.weights is None:
                row = model_row(task, **loaded.model, status=loaded.status, error=loaded.error)
                checked(row, [], loaded.properties)
                shard.add(row, [], loaded.properties)
                return row
            return self._records(task, loaded, shard)
        except WildzooError as e:
            reason = str(e)
        except Exception as e:  # one model's unexpected failure must not stop the crawl
            log.debug("model %s failed:\n%s", task["model_id"], traceback.format_exc())
            reason = f"{type(e).__name__}: {e}"
        # only the task's own identity (already Arrow strings) and the reason: a row that always fits
        row = model_row(task, status="error", error=one_line(reason))
        shard.add(row, [], [])
        return row

    def _records(self, task: dict, loaded, shard: Shard) -> dict:
        spec = self.catalog.spec
        rec = ModelRecords(task["model_id"], loaded.weights, spec, header_only=self.header_only)
        big = rec.n_tokens * spec.token_size * 4 > STREAM_BYTES
        target = self._shard(task["model_id"]) if big else shard
        try:
            if big:
                target.stream_tokens(rec.tokens())
                tables = ()
            else:
                tables = rec.consume()
            status = "header_only" if self.header_only else "ok"
            fields = {
                "n_params": rec.n_params,
                "n_tensors": len(rec.tensor_rows),
                "n_tokens": rec.n_tokens,
                "total_bytes": getattr(loaded.weights, "total_bytes", None),
                "status": status,
            }
            if rec.content_hash is not None and not loaded.model.get("content_hash"):
                fields["content_hash"] = rec.content_hash  # a source's own hash (the Hub's file sha256s) wins
            row = model_row(task, **{**loaded.model, **fields})
            checked(row, rec.tensor_rows, loaded.properties)
        except BaseException:
            if big:
                target.abort()
            raise
        target.add(row, rec.tensor_rows, loaded.properties, tables)
        if big:
            target.commit()
        return row
