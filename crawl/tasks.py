"""The crawl's unit of work: one row per model to fetch, as a `pyarrow.Table`.

Every source (local folders, model zoos, the Hub) enumerates into this table; `skip_done` drops the
models a catalog already holds, which is what makes a rerun resume.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

TASKS = pa.schema(
    [
        ("model_id", pa.string()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("repo_id", pa.string()),
        ("revision", pa.string()),
        ("info", pa.string()),  # source-specific JSON (hub metadata, zoo epoch, ...)
    ]
)


def make_tasks(rows: list[dict]) -> pa.Table:
    """A task table from dicts; `info` may be given as a dict."""
    norm = []
    for r in rows:
        r = dict(r)
        if not isinstance(r.get("info"), str | type(None)):
            r["info"] = json.dumps(r["info"], sort_keys=True, default=str)
        norm.append(r)
    return pa.Table.from_pylist(norm, schema=TASKS)


def skip_done(tasks: pa.Table, done: dict[str, str] | pa.Table, retry_errors: bool = False) -> pa.Table:
    """Tasks whose model the catalog does not hold yet (with `retry_errors`, failed ones are redone).

    `done`: {model_id: status}, or a table with `model_id` and `status` columns (a large catalog's current rows,
    never turned into Python objects)."""
    if isinstance(done, pa.Table):
        if retry_errors:
            done = done.filter(pc.not_equal(done.column("status"), "error"))
        ids = done.column("model_id").combine_chunks()
    else:
        ids = pa.array([m for m, s in done.items() if not (retry_errors and s == "error")], pa.string())
    if not len(ids):
        return tasks
    return tasks.filter(pc.invert(pc.is_in(tasks["model_id"], ids)))


def dedupe(tasks: pa.Table) -> pa.Table:
    """Keep the first task of each model_id (the same folder reached through two paths)."""
    seen: set[str] = set()
    keep = []
    for m in tasks.column("model_id").to_pylist():
        keep.append(m not in seen)
        seen.add(m)
    return tasks.filter(pa.array(keep))
