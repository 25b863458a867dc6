"""DuckDB views over a catalog's shards: what SQL users see.

Local catalogs are read with DuckDB's own Parquet reader; object-store catalogs through a pyarrow
dataset that DuckDB scans directly (DuckDB's httpfs needs the internet to install). A table with no
shard yet is an empty view with the right columns, so queries work on a fresh catalog; `embeddings`
(written by `train embed`, not by crawls) is such a view until a backbone has embedded the catalog, and
`behaviour` (fingerprints, `train behaviour`) until models of a known architecture have been run.

`models` shows each model's current row: a model re-crawled (`--retry-errors`) or re-pointed to a better
copy of its weights has several rows, and the one crawled last stands (`Catalog.current_models`).

`lineage` is a view over `models.base_model` (comma-separated repo ids: a merge has several bases): one row
per (ancestor, descendant) repo pair with the shortest `depth` between them, transitively (a repo is never its
own ancestor) — "all fine-tunes of X" is `SELECT descendant FROM lineage WHERE ancestor = 'X'`. A cycle in the metadata stops the walk.
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
            if table == "models":
                con.execute(f"CREATE VIEW models AS SELECT * EXCLUDE (filename) FROM read_parquet([{listing}], "
                            f"union_by_name = true, filename = true) {CURRENT_ROW.format(tie=', filename DESC')}")
            else:
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{listing}], union_by_name = true)")
        else:
            dataset = ds.dataset(files, schema=schema_for(table, cat.spec), format="parquet", filesystem=cat.fs)
            if table == "models":
                con.register("_models_rows", dataset)
                con.execute(f"CREATE VIEW models AS SELECT * FROM _models_rows {CURRENT_ROW.format(tie='')}")
            else:
                con.register(table, dataset)
    if "models" in tables:
        con.execute(LINEAGE)
    return con


#: One row per model in the `models` view: its current row (`catalog.store.Catalog.current_models`'s rule).
CURRENT_ROW = "QUALIFY row_number() OVER (PARTITION BY model_id ORDER BY crawled_at DESC NULLS LAST{tie}) = 1"

#: The model graph from the catalog itself (Model Atlas's), as a recursive CTE over base_model edges.
LINEAGE = """
CREATE VIEW lineage AS
WITH RECURSIVE edges AS (
    SELECT DISTINCT trim(b.base) AS parent, repo_id AS child
    FROM models, unnest(string_split(base_model, ',')) AS b(base)
    WHERE base_model IS NOT NULL AND repo_id IS NOT NULL AND trim(b.base) <> '' AND trim(b.base) <> repo_id
),
walk(ancestor, descendant, depth, path) AS (
    SELECT parent, child, 1, [parent, child] FROM edges
    UNION ALL
    SELECT w.ancestor, e.child, w.depth + 1, list_append(w.path, e.child)
    FROM walk w JOIN edges e ON e.parent = w.descendant
    WHERE NOT list_contains(w.path, e.child) AND w.depth < 64
)
SELECT ancestor, descendant, min(depth) AS depth FROM walk GROUP BY ancestor, descendant
"""
