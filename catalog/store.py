"""The catalog on disk (a folder or an object-store prefix): metadata, shards, and what is done.

A shard is the unit of writing and of resumption: `<table>/<shard>.parquet` for each table, written
under a temporary name and renamed into place when complete. The `models` file is written last and
is the shard's commit marker: shards of other tables without it are leftovers of a killed crawl and
are removed before the next crawl starts, so a rerun neither loses nor duplicates anything.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from catalog.errors import WildzooError
from catalog.schema import TABLES, CatalogSpec, schema_for

TMP_PREFIX = ".tmp-"
COMPACTIONS = "_compactions"


class CatalogMissing(WildzooError):
    """No catalog at this location yet (the folder is absent or empty)."""


_MOCK: dict[str, pafs.FileSystem] = {}


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local folder or an `s3://`, `gs://`… URI.

    `mock://` (pyarrow's in-memory filesystem, one per process) stands in for object storage in tests.
    """
    if uri.startswith("mock://"):
        fs = _MOCK.setdefault("mock", pafs.FileSystem.from_uri("mock://")[0])
        return fs, uri[len("mock://") :].strip("/") or "catalog"
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, OSError) as e:
            raise WildzooError(f"cannot open catalog {uri}: {e}") from None
    import os

    return pafs.LocalFileSystem(), os.path.abspath(uri)


def storage_error(e: OSError) -> str:
    """A storage error in one line, with what to do where the cause is a missing bucket."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "allow_bucket_creation" in text or "NoSuchBucket" in text:
        text = text.split(". To create buckets")[0] + " (create the bucket first: wildzoo never creates buckets)"
    return text


@dataclass
class Catalog:
    """A catalog location and its spec (token size, tokenization)."""

    uri: str
    spec: CatalogSpec
    fs: pafs.FileSystem = field(repr=False, default=None)
    root: str = ""

    @classmethod
    def open(cls, uri: str, spec: CatalogSpec | None = None, create: bool = False) -> Catalog:
        """Open a catalog; with `create`, make it if missing. A given `spec` must match an existing one."""
        fs, root = resolve(uri)
        meta = f"{root}/catalog.json"
        info = fs.get_file_info(meta)
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(meta) as f:
                try:
                    existing = CatalogSpec.from_json(f.read().decode())
                except (ValueError, TypeError) as e:
                    raise WildzooError(f"{meta} is not a valid catalog description: {e}") from None
            cat = cls(uri, existing, fs, root)
            if spec is not None:
                cat.check(asdict(spec))
            return cat
        if not create:
            if fs.get_file_info(root).type == pafs.FileType.NotFound:
                raise CatalogMissing(f"catalog {uri} does not exist")
            if not fs.get_file_info(pafs.FileSelector(root)):
                raise CatalogMissing(f"catalog {uri} is an empty folder")
            raise WildzooError(f"{uri} is not a wildzoo catalog (no catalog.json)")
        spec = spec or CatalogSpec()
        try:
            fs.create_dir(root, recursive=True)
            for t in TABLES:
                fs.create_dir(f"{root}/{t}", recursive=True)
            atomic_write(fs, meta, spec.to_json().encode())
        except OSError as e:
            raise WildzooError(f"cannot create catalog {uri}: {storage_error(e)}") from None
        return cls(uri, spec, fs, root)

    def check(self, settings: dict) -> None:
        """Raise if any of the given spec fields (token_size, tokenization, …) differs from this catalog's."""
        if any(getattr(self.spec, k) != v for k, v in settings.items()):
            raise WildzooError(
                f"catalog {self.uri} was built with token size {self.spec.token_size} and "
                f"{self.spec.tokenization} tokenization ({self.spec.token_dtype}); rerun with those settings "
                f"or use a new catalog folder"
            )

    def files(self, table: str) -> list[str]:
        """Committed shard files of one table, sorted: a crawl's or a compaction's shard is seen from the moment
        its `models` file lands, and shards a committed compaction replaced are not seen any more."""
        replaced = self.compactions()[0] if table in TABLES else set()
        paths = self._parquet(table)
        if table in TABLES and table != "models":
            committed = {_stem(p) for p in self._parquet("models")}
            paths = [p for p in paths if _stem(p) in committed]
        return sorted(p for p in paths if _stem(p) not in replaced)

    def _parquet(self, table: str) -> list[str]:
        sel = pafs.FileSelector(f"{self.root}/{table}", allow_not_found=True)
        return [i.path for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File
                and i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_"))]

    def compactions(self) -> tuple[set[str], list[tuple[str, str, list[str]]]]:
        """(shards replaced by committed compactions, [(journal path, new shard, old shards)] of every journal).

        `catalog compact` writes a journal naming the shards it merges before it commits the merged shard; from
        that commit on, the old shards are invisible to readers until they are deleted (catalog.compact)."""
        sel = pafs.FileSelector(f"{self.root}/{COMPACTIONS}", allow_not_found=True)
        journals = [i.path for i in self.fs.get_file_info(sel)
                    if i.type == pafs.FileType.File and i.base_name.endswith(".json") and not i.base_name.startswith(".")]
        replaced: set[str] = set()
        out = []
        for path in sorted(journals):
            with self.fs.open_input_stream(path) as f:
                entry = json.loads(f.read().decode())
            out.append((path, entry["shard"], list(entry["replaces"])))
            if self.fs.get_file_info(f"{self.root}/models/{entry['shard']}.parquet").type == pafs.FileType.File:
                replaced.update(entry["replaces"])
        return replaced, out

    def shard_ids(self, table: str) -> set[str]:
        return {_stem(p) for p in self.files(table)}

    def current_models(self, columns: Iterable[str] = ("model_id", "status")) -> pa.Table:
        """The current `models` row of every model: `columns` and `shard` (the shard the row is in).

        A model may have several rows: a later crawl replaces an error (`--retry-errors`), a duplicate's
        row is re-pointed to a better copy. The current row is the one crawled last (`crawled_at`; on a tie,
        the later shard). Every reader of `models` goes through this rule (and the SQL view, catalog.query)."""
        columns = list(dict.fromkeys(["model_id", *columns]))
        read = list(dict.fromkeys([*columns, "crawled_at"]))
        files = self.files("models")
        if not files:
            schema = schema_for("models", self.spec)
            return pa.table({**{c: pa.array([], schema.field(c).type) for c in columns}, "shard": pa.array([], pa.string())})
        with ThreadPoolExecutor(min(8, len(files))) as pool:  # many small files: reading them overlaps
            parts = list(pool.map(lambda p: pq.read_table(p, columns=read, filesystem=self.fs), files))
        file_of = np.repeat(np.arange(len(files), dtype=np.int32), [t.num_rows for t in parts])
        t = pa.concat_tables(parts)
        del parts
        counts = pc.value_counts(t.column("model_id"))
        repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
        if len(repeated):  # only the models with several rows need the rule
            rows = np.flatnonzero(pc.is_in(t.column("model_id"), repeated).to_numpy(zero_copy_only=False))
            sub = t.take(rows)
            when = pc.fill_null(sub.column("crawled_at"), pa.scalar(0, sub.schema.field("crawled_at").type))
            key = pa.table({"model_id": sub.column("model_id"), "when": when, "file": file_of[rows]})
            order = pc.sort_indices(key, [("model_id", "ascending"), ("when", "descending"), ("file", "descending")])
            ids = key.column("model_id").take(order).combine_chunks()
            first = np.ones(len(ids), bool)
            first[1:] = pc.not_equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)
            keep = np.ones(t.num_rows, bool)
            keep[rows] = False
            keep[rows[order.to_numpy()[first]]] = True
            t, file_of = t.filter(pa.array(keep)), file_of[keep]
        shards = pa.array([_stem(p) for p in files], pa.string())
        return t.select(columns).append_column("shard", pa.DictionaryArray.from_arrays(pa.array(file_of), shards))

    def done(self) -> dict[str, str]:
        """{model_id: status} of every committed model (its current row)."""
        t = self.current_models(("model_id", "status"))
        return dict(zip(t.column("model_id").to_pylist(), t.column("status").to_pylist(), strict=True))

    def clean(self) -> int:
        """Remove temporary files and uncommitted shards left by a killed crawl, and finish (or roll back) a killed
        compaction; returns how many files."""
        from catalog.compact import finish_compactions

        removed = finish_compactions(self)
        committed = self.shard_ids("models")
        # the tables' folders, and those of the small files written whole (atomic_write: the spec, statistics,
        # compaction journals), where a kill between writing and renaming leaves the temporary file
        for folder in (*TABLES, "_stats", COMPACTIONS, ""):
            sel = pafs.FileSelector(f"{self.root}/{folder}".rstrip("/"), allow_not_found=True)
            for i in self.fs.get_file_info(sel):
                stem = i.base_name[: -len(".parquet")] if i.base_name.endswith(".parquet") else None
                uncommitted = folder in TABLES and folder != "models" and stem and stem not in committed
                if i.type == pafs.FileType.File and (i.base_name.startswith(TMP_PREFIX) or uncommitted):
                    self.fs.delete_file(i.path)
                    removed += 1
        return removed

    def new_shard(self, stamp: str | None = None, settings: dict | None = None, model_id: str | None = None) -> Shard:
        """A shard whose id is decided by its content (see `Shard`); `model_id` names its one model up front
        (a model streamed into a shard of its own)."""
        return Shard(self, stamp, settings, model_id)

    def rewrite_shard(self, shard: str, updates: dict[str, dict], drop: set[str]) -> None:
        """Update `models` rows of shard `shard` (model_id -> {column: new value}) and remove the `tensors` and
        `tokens` rows of the models in `drop` (a copy re-pointed to another: its tokens are the other's).

        Each file is replaced atomically, `tensors` and `tokens` first: a kill in between leaves a row whose
        update has not landed yet (the caller's pass, run again, finishes it), never rows that no current model
        row accounts for. Tokens are filtered batch by batch (bounded memory); a file left empty is deleted."""
        fs, root = self.fs, self.root
        for table in ("tensors", "tokens") if drop else ():
            path = f"{root}/{table}/{shard}.parquet"
            if fs.get_file_info(path).type != pafs.FileType.File:
                continue
            directory, name = path.rsplit("/", 1)
            tmp, kept = f"{directory}/{TMP_PREFIX}{name}", 0
            with fs.open_input_file(path) as src:
                reader = pq.ParquetFile(src)
                with fs.open_output_stream(tmp) as out, pq.ParquetWriter(out, reader.schema_arrow,
                                                                          compression="zstd") as writer:
                    for part in rows_of(reader, drop, keep=False):
                        kept += part.num_rows
                        writer.write_batch(part)
            if kept:
                fs.move(tmp, path)
            else:
                fs.delete_file(path)
                fs.delete_file(tmp)
        path = f"{root}/models/{shard}.parquet"
        current = pq.read_table(path, filesystem=fs).to_pylist()
        if any(m["model_id"] in updates for m in current):
            new = [{**m, **updates.get(m["model_id"], {})} for m in current]
            _write_table(fs, path, pa.Table.from_pylist(new, schema=schema_for("models", self.spec)))

    def write_table(self, table: str, stem: str, data: pa.Table) -> str:
        """Write `<table>/<stem>.parquet` whole and atomically (temporary name, then rename); returns its path.

        For tables written outside crawls (`embeddings`): a rewrite replaces the file in one step.
        """
        self.fs.create_dir(f"{self.root}/{table}", recursive=True)
        path = f"{self.root}/{table}/{stem}.parquet"
        _write_table(self.fs, path, data.cast(schema_for(table, self.spec)))
        return path


def rows_of(reader: pq.ParquetFile, model_ids: Iterable[str], keep: bool = True) -> Iterable[pa.RecordBatch]:
    """The non-empty batches of a shard file's rows of `model_ids` (`keep=False`: of every other model), read
    batch by batch (bounded memory)."""
    ids = pa.array(sorted(model_ids), pa.string())
    for batch in reader.iter_batches(batch_size=1 << 16):
        mask = pc.is_in(batch.column("model_id"), ids)
        part = batch.filter(mask if keep else pc.invert(mask))
        if part.num_rows:
            yield part


def _stem(path: str) -> str:
    """A shard file's shard id."""
    return path.rsplit("/", 1)[1][: -len(".parquet")]


def atomic_write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a small file whole: under a temporary name in the same folder, then renamed into place."""
    directory, name = path.rsplit("/", 1)
    tmp = f"{directory}/{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def _write_table(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    directory, name = path.rsplit("/", 1)
    tmp = f"{directory}/{TMP_PREFIX}{name}"
    with fs.open_output_stream(tmp) as f:
        pq.write_table(table, f, compression="zstd")
    fs.move(tmp, path)


def _ray_node() -> str | None:
    """The Ray node this process runs on (where a shard was written), or None outside Ray."""
    import sys

    if "ray" not in sys.modules:
        return None
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def crawl_stamp() -> str:
    """The time a crawl started, the first part of its shard ids: a later crawl's shards sort after."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime())


class Shard:
    """Rows of several models, written as one shard per table. Tokens may be streamed to disk.

    A shard's id is `<crawl stamp>-<hash>`, the hash of its model ids, the catalog's spec and the crawl's
    settings: a batch that Ray executes again (its actor died after committing) writes the same files
    again, replacing them, instead of adding a duplicate. A later crawl (`--retry-errors`) has a later
    stamp, so its rows sort after the ones they replace."""

    def __init__(self, catalog: Catalog, stamp: str | None = None, settings: dict | None = None,
                 model_id: str | None = None) -> None:
        self.catalog = catalog
        self.stamp = stamp or crawl_stamp()
        self.settings = settings or {}
        self._id = self._content_id([model_id]) if model_id is not None else None
        self.rows: dict[str, list[dict]] = {"models": [], "tensors": [], "properties": []}
        self.token_bytes = 0
        self._tokens: list[pa.Table] = []
        self._writer: pq.ParquetWriter | None = None
        self._stream = None
        self.t0 = time.time()

    def _content_id(self, model_ids: list[str]) -> str:
        settings = {k: v for k, v in sorted(self.settings.items()) if "token" not in k.lower()}  # never a secret
        content = json.dumps({"models": sorted(model_ids), "spec": asdict(self.catalog.spec), "settings": settings},
                             sort_keys=True, default=str)
        return f"{self.stamp}-{hashlib.sha256(content.encode()).hexdigest()[:16]}"

    @property
    def id(self) -> str:
        """Decided at the commit (or when tokens start streaming), by the models the shard holds then."""
        return self._id or self._content_id([m["model_id"] for m in self.rows["models"]])

    def _path(self, table: str, tmp: bool = False) -> str:
        return f"{self.catalog.root}/{table}/{TMP_PREFIX if tmp else ''}{self.id}.parquet"

    @property
    def n_models(self) -> int:
        return len(self.rows["models"])

    def add(self, model: dict, tensors: list[dict], properties: list[dict], tokens: Iterable[pa.Table] = ()) -> None:
        """Add one model whose tokens were buffered in memory (or none)."""
        for t in tokens:
            self._tokens.append(t)
            self.token_bytes += t.nbytes
        self.rows["models"].append(model)
        self.rows["tensors"].extend(tensors)
        self.rows["properties"].extend(properties)

    def stream_tokens(self, tokens: Iterable[pa.Table]) -> None:
        """Write token tables straight to this shard's temporary file (for models too big to buffer)."""
        if self._writer is None:
            self._stream = self.catalog.fs.open_output_stream(self._path("tokens", tmp=True))
            schema = schema_for("tokens", self.catalog.spec)
            self._writer = pq.ParquetWriter(self._stream, schema, compression="zstd")
        for t in tokens:
            self._writer.write_table(t)
            self.token_bytes += t.nbytes

    def abort(self) -> None:
        """Drop everything written so far (a model failed half-way through streaming)."""
        if self._writer is not None:
            self._writer.close()
            self._stream.close()
            self.catalog.fs.delete_file(self._path("tokens", tmp=True))
            self._writer = self._stream = None
        self._tokens.clear()

    def commit(self) -> dict:
        """Write every table (models last) and return the shard's stats."""
        cat, fs = self.catalog, self.catalog.fs
        self._id = self.id
        if self._writer is not None:
            for t in self._tokens:
                self._writer.write_table(t)
            self._writer.close()
            self._stream.close()
            fs.move(self._path("tokens", tmp=True), self._path("tokens"))
        elif self._tokens:
            _write_table(fs, self._path("tokens"), pa.concat_tables(self._tokens))
        for table in ("tensors", "properties", "models"):
            schema = schema_for(table, cat.spec)
            rows = self.rows[table]
            if rows or table == "models":
                _write_table(fs, self._path(table), pa.Table.from_pylist(rows, schema=schema))
        statuses = [m["status"] for m in self.rows["models"]]
        stats = {
            "shard": self.id,
            "models": len(statuses),
            **{s: statuses.count(s) for s in sorted(set(statuses))},
            "tensors": len(self.rows["tensors"]),
            "tokens": sum(m.get("n_tokens") or 0 for m in self.rows["models"]),
            "bytes": sum(m.get("total_bytes") or 0 for m in self.rows["models"]),
            "seconds": round(time.time() - self.t0, 3),
            "node": _ray_node(),
        }
        fs.create_dir(f"{cat.root}/_stats", recursive=True)
        atomic_write(fs, f"{cat.root}/_stats/{self.id}.json", json.dumps(stats).encode())
        return stats
