"""A catalog of a million models: crawl start-up, query times before and after compaction, exact statistics.

    python bench/catalog.py [--models 1000000] [--shards 2000] [--keep DIR]

Writes a synthetic catalog of `--models` hub-like `models` rows (and 4 tensors and 4 properties each) in
`--shards` shards,
as weeks of crawling leave it, then prints:
- the start-up of `python -m crawl hub --no-ray` on it (a loopback hub with one new repo): wall time, the
  catalog read alone (its log line), peak RSS of the process;
- typical queries (a GROUP BY over tensors, counts by status, a top-k by downloads, a property join, a lineage
  walk) before and after `catalog compact`,
  and the compaction's own time;
- the quantiles of an 11.7M-value MiniLM-sized table (30522 × 384) against numpy's exact ones, and their time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# This file's name shadows the `catalog` package: take its folder off the import path first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from catalog.schema import MODELS, PROPERTIES, TENSORS, CatalogSpec  # noqa: E402
from catalog.store import Catalog  # noqa: E402


def build(path: Path, n: int, shards: int) -> Catalog:
    """`n` models rows in `shards` shards: ok, skipped duplicates, errors; lineage over base_model; properties."""
    cat = Catalog.open(str(path), CatalogSpec(), create=True)
    rng = np.random.default_rng(0)
    per = -(-n // shards)
    t0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    for s in range(shards):
        ids = np.arange(s * per, min(n, (s + 1) * per))
        if not len(ids):
            break
        status = rng.choice(["ok", "ok", "ok", "skipped", "error"], len(ids))
        repo = [f"org{i % 5000}/model-{i}" for i in ids]
        base = [f"org{(i // 7) % 5000}/model-{i // 7}" if i % 3 == 0 and i >= 7 else None for i in ids]
        when = [t0 + dt.timedelta(seconds=int(i)) for i in ids]
        models = pa.table({
            "model_id": [f"{r}@{i:040x}" for r, i in zip(repo, ids, strict=True)],
            "source": ["hub"] * len(ids), "repo_id": repo, "revision": [f"{i:040x}" for i in ids],
            "library": rng.choice(["transformers", "timm", "diffusers"], len(ids)),
            "downloads": rng.integers(0, 100_000, len(ids)), "base_model": base,
            "n_params": rng.integers(10_000, 10_000_000, len(ids)),
            "content_hash": [f"{i:064x}" for i in ids], "status": status,
            "error": [None if st != "error" else "HTTP 500 on model.safetensors" for st in status],
            "crawled_at": pa.array(when, pa.timestamp("ms", tz="UTC")),
        })
        models = pa.table({f.name: models[f.name] if f.name in models.column_names else pa.nulls(len(ids), f.type)
                           for f in MODELS}, schema=MODELS)
        mids = models["model_id"].to_pylist()
        props = pa.table({"model_id": [m for m in mids for _ in range(4)],
                          "name": ["config.hidden_size", "config.num_layers", "config.model_type", "likes"] * len(ids),
                          "value": rng.integers(1, 1000, 4 * len(ids)).astype(float),
                          "text": [None] * (4 * len(ids))}, schema=PROPERTIES)
        k = len(ids) * TENSORS_PER_MODEL
        tensors = pa.table({"model_id": [m for m in mids for _ in range(TENSORS_PER_MODEL)],
                            "tensor_idx": np.tile(np.arange(TENSORS_PER_MODEL, dtype=np.int32), len(ids)),
                            "name": ["encoder.weight", "encoder.bias", "head.weight", "head.bias"] * len(ids),
                            "role": ["linear", "bias", "head", "bias"] * len(ids),
                            "dtype": rng.choice(["F32", "BF16", "F16"], k), "n_params": rng.integers(10, 10**6, k),
                            "mean": rng.standard_normal(k) * 0.01, "std": rng.random(k) * 0.1})
        tensors = pa.table({f.name: tensors[f.name] if f.name in tensors.column_names else pa.nulls(k, f.type)
                            for f in TENSORS}, schema=TENSORS)
        stem = f"20261101T{s // 3600 % 24:02d}{s // 60 % 60:02d}{s % 60:02d}-{s:016x}"
        cat.write_table("properties", stem, props)
        cat.write_table("tensors", stem, tensors)
        cat.write_table("models", stem, models)  # the commit marker last, as a crawl writes it
    return cat


def startup(cat: Catalog, work: Path) -> tuple[float, float, float]:
    """(wall s, catalog read s, peak RSS MB) of `python -m crawl hub --no-ray` crawling one new repo."""
    import modelfactory
    from hubserver import HubServer, make_repo

    hub = work / "hub"
    folder = modelfactory.cnn(work / "src" / "lab" / "new", seed=1)
    make_repo(hub, "lab/new", {p.name: p for p in folder.iterdir()})
    code = ("import resource, sys; from crawl.__main__ import cli; rc = cli(sys.argv[1:]); "
            "print('peak_rss_mb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr); "
            "sys.exit(rc)")
    with HubServer(hub) as server:
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code, "hub", "--endpoint", server.url, "--catalog", cat.uri,
                              "--no-ray", "--anonymous", "--download-dir", str(work / "dl")],
                             capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"crawl failed:\n{out.stderr[-3000:]}")
    read = float(re.search(r"catalog read in ([\d.]+)s", out.stderr).group(1))
    rss = float(re.search(r"peak_rss_mb ([\d.]+)", out.stderr).group(1))
    return wall, read, rss


TENSORS_PER_MODEL = 4
QUERIES = {
    "GROUP BY over tensors": "SELECT role, dtype, count(*), avg(std) FROM tensors GROUP BY ALL",
    "count by status": "SELECT status, count(*) FROM models GROUP BY status",
    "top 10 by downloads": "SELECT model_id, downloads FROM models WHERE status = 'ok' ORDER BY downloads DESC LIMIT 10",
    "a property join": """SELECT m.library, avg(p.value) FROM models m JOIN properties p USING (model_id)
                          WHERE p.name = 'config.num_layers' GROUP BY 1""",
    "fine-tunes of one model": "SELECT count(*) FROM lineage WHERE ancestor = 'org0/model-0'",
}


def queries(cat: Catalog) -> dict[str, float]:
    from catalog.query import connect

    out = {}
    t = time.perf_counter()
    con = connect(cat)
    out["connect"] = time.perf_counter() - t
    for name, sql in QUERIES.items():
        t = time.perf_counter()
        con.execute(sql).fetchall()
        out[name] = time.perf_counter() - t
    return out


def quantiles() -> tuple[float, float]:
    from catalog.stats import tensor_stats

    x = (np.random.default_rng(0).standard_normal((30522, 384)) * 0.05
         + np.linspace(-0.01, 0.01, 384)).astype(np.float32)
    t = time.perf_counter()
    s = tensor_stats(x)
    took = time.perf_counter() - t
    exact = np.quantile(x.reshape(-1).astype(np.float64), [0.01, 0.25, 0.5, 0.75, 0.99])
    err = max(abs(s[k] - e) for k, e in zip(("q01", "q25", "q50", "q75", "q99"), exact, strict=True))
    return took, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=2000)
    ap.add_argument("--keep", help="build the catalog here and keep it")
    a = ap.parse_args()
    work = Path(a.keep or tempfile.mkdtemp(prefix="wz-bench-catalog-"))
    try:
        t = time.perf_counter()
        cat = build(work / "cat", a.models, a.shards)
        print(f"built {a.models:,} models rows in {a.shards:,} shards in {time.perf_counter() - t:.1f}s "
              f"({sum(cat.fs.get_file_info(f).size for f in cat.files('models')) / 1e6:,.0f} MB of models Parquet)")
        wall, read, rss = startup(cat, work)
        print(f"crawl hub start-up on it (one new repo, --no-ray): {wall:.1f}s in all, catalog read {read:.1f}s, "
              f"peak RSS {rss:,.0f} MB")
        before = queries(cat)
        from catalog.compact import compact

        s = compact(cat)
        print(f"catalog compact: {s['shards_before']:,} shards → {s['shards_after']:,} in {s['seconds']:.1f}s")
        after = queries(cat)
        print(f"\n{'query':<26} {'before (s)':>10} {'after (s)':>10}")
        for k in before:
            print(f"{k:<26} {before[k]:>10.3f} {after[k]:>10.3f}")
        took, err = quantiles()
        print(f"\nquantiles of a 30522 × 384 table (11.7M values): {took:.2f}s for all statistics, "
              f"largest difference to numpy's exact quantiles {err:.1e}")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
