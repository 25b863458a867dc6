"""DuckDB views over a catalog's shards: what SQL users see.

Local catalogs are read with DuckDB's own Parquet reader; object-store catalogs through a pyarrow
dataset that DuckDB scans directly (DuckDB's httpfs needs the internet to install). A table with no
shard yet is an empty view with the right columns, so queries work on a fresh catalog; `embeddings`
(written by `train embed`, not by crawls) is such a view until a backbone has embedded the catalog, and
`behaviour` (fingerprints, `train behaviour`) until models of a known architecture have been run.
"""

from __future__ import annotations

import duckdb
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from catalog.schema import TABLES, schema_for
from catalog.store import Catalog

OPTIONAL_TABLES = ("embeddings", "behaviour")


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def connect(catalog: Catalog | str, tables: tuple[str, ...] = TABLES + OPTIONAL_TABLES) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per catalog table."""
    cat = catalog if isinstance(catalog, Catalog) else Catalog.open(catalog)
    con = duckdb.connect(":memory:")
    local = isinstance(cat.fs, pafs.LocalFileSystem)
    for table in tables:
        files = cat.files(table)
        if not files:
            empty = schema_for(table, cat.spec).empty_table()
            con.register(f"_{table}_empty", empty)
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM _{table}_empty")
            continue
        if local:
            listing = ", ".join(_sql_str(f) for f in files)
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{listing}], union_by_name = true)")
        else:
            dataset = ds.dataset(files, schema=schema_for(table, cat.spec), format="parquet", filesystem=cat.fs)
            con.register(table, dataset)
    return con
