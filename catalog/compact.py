"""`catalog compact`: merge a catalog's small shards into large ones, atomically.

Weeks of crawling leave thousands of small shards (a batch of models each), and every query opens all of
them. Compaction merges consecutive small shards (in shard order, that is crawl order) into shards of about
`target_bytes` of Parquet (held in memory while merged), sorted by model id in row groups of 16k rows, so that
training's reader of a few models skips the rest of a large shard, all four tables together (a model's rows stay in one shard, as training's reader
expects), keeping only what readers see: each model's current `models` row (`Catalog.current_models`), and
the tensors, tokens and properties of the models whose current row it is — rows a retry or a re-pointed copy
replaced are dropped.

Atomic for readers, safe to kill: the merged shard's tables are written first (uncommitted, like a crawl's),
then a journal `_compactions/<merged>.json` naming the shards it replaces, then the merged `models` file — the
commit. From that moment `Catalog.files` hides the old shards; they are deleted (models first), then the
journal. A killed compaction is finished (journal and merged shard committed) or rolled back (merged shard
not committed: its leftovers and the journal removed) by `finish_compactions`, which every crawl and every
compaction runs first. Do not compact while a crawl writes to the same catalog.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from catalog.schema import TABLES, schema_for
from catalog.store import COMPACTIONS, TMP_PREFIX, Catalog, atomic_write, rows_of

log = logging.getLogger(__name__)

TARGET_BYTES = 256 << 20
ROW_GROUP_ROWS = 1 << 14
#: Each merged table's order after its model id (training reads a few models of a shard with one filtered scan).
SORT_KEYS = {"models": [], "tensors": [("tensor_idx", "ascending")], "tokens": [("token_idx", "ascending")],
             "properties": [("name", "ascending")]}


def finish_compactions(cat: Catalog) -> int:
    """Finish every compaction whose merged shard is committed, roll back every other; returns files removed."""
    removed = 0
    for journal, merged, old in cat.compactions()[1]:
        committed = cat.fs.get_file_info(f"{cat.root}/models/{merged}.parquet").type == pafs.FileType.File
        for shard in old if committed else [merged]:
            removed += _delete_shard(cat, shard)
        cat.fs.delete_file(journal)
        removed += 1
    return removed


def _delete_shard(cat: Catalog, shard: str) -> int:
    """Delete a shard's files, models (its commit marker) first."""
    removed = 0
    for table in ("models", *[t for t in TABLES if t != "models"]):
        path = f"{cat.root}/{table}/{shard}.parquet"
        if cat.fs.get_file_info(path).type == pafs.FileType.File:
            cat.fs.delete_file(path)
            removed += 1
    stats = f"{cat.root}/_stats/{shard}.json"
    if cat.fs.get_file_info(stats).type == pafs.FileType.File:
        cat.fs.delete_file(stats)
    return removed


def _size(cat: Catalog, shard: str) -> int:
    total = 0
    for table in TABLES:
        info = cat.fs.get_file_info(f"{cat.root}/{table}/{shard}.parquet")
        total += info.size if info.type == pafs.FileType.File else 0
    return total


def plan(cat: Catalog, target_bytes: int) -> list[list[str]]:
    """Groups of consecutive shards, each smaller than `target_bytes`, packed up to about `target_bytes`;
    groups of one shard are left out (nothing to merge)."""
    groups, group, size = [], [], 0
    for shard in sorted(cat.shard_ids("models")):
        n = _size(cat, shard)
        if n >= target_bytes or size + n > target_bytes:
            if len(group) > 1:
                groups.append(group)
            group, size = [], 0
        if n < target_bytes:
            group.append(shard)
            size += n
    if len(group) > 1:
        groups.append(group)
    return groups


def compact(cat: Catalog, target_bytes: int = TARGET_BYTES) -> dict:
    """Merge small shards (see the module docstring); returns a summary."""
    t0 = time.time()
    cleaned = cat.clean()
    before = len(cat.shard_ids("models"))
    current = cat.current_models(("model_id", "status"))
    status = dict(zip(current.column("model_id").to_pylist(), current.column("status").to_pylist(), strict=True))
    own: dict[str, list[str]] = {}  # shard -> the models whose current row it holds
    for m, shard in zip(current.column("model_id").to_pylist(), current.column("shard").to_pylist(), strict=True):
        own.setdefault(shard, []).append(m)
    del current
    groups = plan(cat, target_bytes)
    dropped = 0
    for i, group in enumerate(groups):
        dropped += _merge(cat, group, own, status)
        log.info("compacted %d/%d: %d shards into one", i + 1, len(groups), len(group))
    return {"catalog": cat.uri, "shards_before": before, "shards_after": len(cat.shard_ids("models")),
            "merged": sum(len(g) for g in groups), "dropped_rows": dropped, "cleaned": cleaned,
            "seconds": round(time.time() - t0, 2)}


#: Which models' rows each table keeps, by the model's current status.
KEEP = {"models": None, "properties": None, "tensors": ("ok", "header_only"), "tokens": ("ok",)}


def _merge(cat: Catalog, group: list[str], own: dict[str, list[str]], status: dict[str, str]) -> int:
    """Write the merged shard of `group`, commit it, delete the group; returns the rows left out.

    A row is kept where its shard holds its model's current row (`own`) and the model's current status keeps
    that table (`KEEP`)."""
    fs, root = cat.fs, cat.root
    digest = hashlib.sha256("\0".join(group).encode()).hexdigest()[:16]
    merged = f"{group[-1].split('-')[0]}-merged-{digest}"
    dropped = 0
    for table in ("tokens", "tensors", "properties", "models"):
        schema = schema_for(table, cat.spec)
        final = f"{root}/{table}/{merged}.parquet"
        tmp = f"{root}/{table}/{TMP_PREFIX}{merged}.parquet"
        parts = []
        for shard in group:
            path = f"{root}/{table}/{shard}.parquet"
            if fs.get_file_info(path).type != pafs.FileType.File:
                continue
            ids = [m for m in own.get(shard, ()) if KEEP[table] is None or status[m] in KEEP[table]]
            with fs.open_input_file(path) as src:
                reader = pq.ParquetFile(src)
                dropped += reader.metadata.num_rows
                for part in rows_of(reader, ids):
                    dropped -= part.num_rows
                    parts.append(pa.Table.from_batches([part]).cast(schema))
        # sorted by model: a reader of a few models (training's filtered scan) skips the other row groups
        merged_table = pa.concat_tables(parts) if parts else schema.empty_table()
        del parts
        rows = merged_table.num_rows
        merged_table = merged_table.sort_by([("model_id", "ascending"), *SORT_KEYS[table]])
        with fs.open_output_stream(tmp) as out:
            pq.write_table(merged_table, out, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        del merged_table
        if table == "models":
            fs.create_dir(f"{root}/{COMPACTIONS}", recursive=True)
            atomic_write(fs, f"{root}/{COMPACTIONS}/{merged}.json",
                         json.dumps({"shard": merged, "replaces": group}).encode())
        if rows or table == "models":
            fs.move(tmp, final)  # the models file last: the merged shard's commit
        else:
            fs.delete_file(tmp)
    finish_compactions(cat)
    return dropped
