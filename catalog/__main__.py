"""`python -m catalog sql|info|compact CATALOG ...`: query a catalog with SQL, summarize it, or compact it."""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Sequence

import duckdb

from catalog.cli import Parser, run
from catalog.errors import WildzooError
from catalog.query import connect
from catalog.store import Catalog


def _cell(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    if isinstance(v, list):
        inner = ", ".join(_cell(x) for x in v[:8])
        return f"[{inner}{', …' if len(v) > 8 else ''}]"
    s = str(v)
    return s if len(s) <= 80 else s[:77] + "..."


def format_table(columns: list[str], rows: list[tuple], total: int | None = None) -> str:
    """Rows as an aligned text table for people."""
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    total = len(rows) if total is None else total
    out.append(f"({total} row{'s' if total != 1 else ''}{f', first {len(rows)} shown' if total > len(rows) else ''})")
    return "\n".join(out)


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, int | float | str | bool) or v is None:
        return v
    return str(v)


def query(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[list[str], list[tuple]]:
    """Run SQL; a DuckDB error becomes a one-line user error."""
    try:
        rel = con.execute(sql)
        if rel.description is None:
            return [], []
        return [d[0] for d in rel.description], rel.fetchall()
    except duckdb.Error as e:
        first = str(e).strip().splitlines()[0]
        raise WildzooError(f"SQL error: {first}") from None


def emit(columns: list[str], rows: list[tuple], fmt: str, max_rows: int, out=None) -> None:
    out = out or sys.stdout
    if fmt == "csv":
        w = csv.writer(out)
        w.writerow(columns)
        w.writerows([[json.dumps(v) if isinstance(v, list) else v for v in r] for r in rows])
    elif fmt == "json":
        json.dump([{c: _jsonable(v) for c, v in zip(columns, r, strict=True)} for r in rows], out, indent=1)
        out.write("\n")
    else:
        print(format_table(columns, rows[:max_rows], len(rows)), file=out)


INFO_QUERIES = {
    "tables": """
        SELECT 'models' AS "table", count(*) AS rows FROM models UNION ALL
        SELECT 'tensors', count(*) FROM tensors UNION ALL
        SELECT 'tokens', count(*) FROM tokens UNION ALL
        SELECT 'properties', count(*) FROM properties""",
    "models by source and status": """
        SELECT source, status, count(*) AS models, sum(n_params) AS params, sum(n_tokens) AS tokens,
               round(sum(total_bytes) / 1e6, 1) AS mb
        FROM models GROUP BY ALL ORDER BY ALL""",
    "dtypes": "SELECT dtype, count(*) AS tensors, sum(n_params) AS params FROM tensors GROUP BY ALL ORDER BY params DESC",
    "roles": "SELECT role, count(*) AS tensors, sum(n_params) AS params FROM tensors GROUP BY ALL ORDER BY params DESC",
    "failures": """
        SELECT model_id, status, error FROM models WHERE status IN ('error', 'skipped') ORDER BY model_id LIMIT 20""",
}


def info(cat: Catalog, out=None) -> None:
    """Counts, sizes, dtypes, roles and failures of a catalog, for people."""
    out = out or sys.stdout
    con = connect(cat)
    spec = cat.spec
    size = sum(cat.fs.get_file_info(f).size for t in ("models", "tensors", "tokens", "properties") for f in cat.files(t))
    print(f"catalog {cat.uri}: {spec.tokenization} tokens of {spec.token_size} {spec.token_dtype}, "
          f"{size / 1e6:,.1f} MB of Parquet", file=out)
    for title, sql in INFO_QUERIES.items():
        columns, rows = query(con, sql)
        if title == "failures" and not rows:
            continue
        print(f"\n{title}:", file=out)
        print(format_table(columns, rows), file=out)


def build_parser() -> Parser:
    parser = Parser(prog="python -m catalog", description="Query or summarize a wildzoo catalog.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser("sql", help="run SQL over the catalog's views (models, tensors, tokens, properties)",
                       description="Run one SQL statement with DuckDB over the catalog's tables.")
    p.add_argument("catalog", metavar="CATALOG")
    p.add_argument("sql", metavar="SQL")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--max-rows", type=int, default=100, help="rows shown in table format (default 100)")
    p = sub.add_parser("info", help="counts, sizes, dtypes, roles and failures", description="Summarize a catalog.")
    p.add_argument("catalog", metavar="CATALOG")
    p = sub.add_parser("compact", help="merge small shards into large ones (atomically; safe to kill)",
                       description="Merge consecutive small shards into shards of about --target-mb, keeping each "
                       "model's current rows only, so queries stay fast after weeks of crawling. Readers never see a "
                       "half state; a killed compaction is finished or rolled back by the next crawl or compaction. "
                       "Do not run it while a crawl writes to the same catalog.")
    p.add_argument("catalog", metavar="CATALOG")
    p.add_argument("--target-mb", type=float, default=256, help="size of a merged shard in MB of Parquet (default 256)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cat = Catalog.open(args.catalog)
    if args.command == "info":
        info(cat)
        return 0
    if args.command == "compact":
        from catalog.cli import setup_logging
        from catalog.compact import compact

        if not args.target_mb > 0:
            raise WildzooError("--target-mb must be > 0")
        setup_logging()
        s = compact(cat, int(args.target_mb * 1e6))
        print(f"compact: {s['shards_before']:,} shards → {s['shards_after']:,} ({s['merged']:,} merged; "
              f"{s['dropped_rows']:,} rows of replaced models dropped) in {s['seconds']:.1f}s → {s['catalog']}")
        return 0
    columns, rows = query(connect(cat), args.sql)
    emit(columns, rows, args.format, args.max_rows)
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run(main, argv, prog="catalog")


if __name__ == "__main__":
    sys.exit(cli())
