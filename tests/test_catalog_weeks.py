"""A catalog that runs for weeks: lineage in SQL, compaction, start-up on many rows."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet
import pytest

from catalog.query import connect
from catalog.schema import MODELS, CatalogSpec
from catalog.store import Catalog


def models_table(rows: list[tuple[str, str | None]], revision: str = "1") -> pa.Table:
    return pa.Table.from_pylist([{"model_id": f"{r}@{revision}", "repo_id": r, "revision": revision, "base_model": b,
                                  "status": "ok", "source": "hub"} for r, b in rows], schema=MODELS)


def test_lineage_answers_all_fine_tunes_transitively_with_merges_cycles_and_revisions(tmp_path):
    cat = Catalog.open(str(tmp_path / "c"), CatalogSpec(), create=True)
    graph = [("a", None), ("b", "a"), ("c", "b"), ("d", "b, x"), ("e", "c"), ("x", "e"), ("m", "a,z"),
             ("p", "q"), ("q", "p"), ("self", "self")]
    cat.write_table("models", "s1", models_table(graph))
    cat.write_table("models", "s2", models_table([("c", "b")], revision="2"))  # a new revision: same edge
    con = connect(cat)
    fine_tunes = con.execute("SELECT descendant, depth FROM lineage WHERE ancestor = 'a' ORDER BY 1").fetchall()
    assert fine_tunes == [("b", 1), ("c", 2), ("d", 2), ("e", 3), ("m", 1), ("x", 4)]
    assert con.execute("SELECT ancestor FROM lineage WHERE descendant = 'm' ORDER BY 1").fetchall() == [("a",), ("z",)]
    # a cycle in the metadata ends the walk (a repo is never its own ancestor); each pair once
    assert con.execute("SELECT ancestor, descendant, depth FROM lineage WHERE ancestor IN ('p', 'q') ORDER BY 1, 2"
                       ).fetchall() == [("p", "q", 1), ("q", "p", 1)]
    assert con.execute("SELECT count(*) FROM lineage WHERE ancestor = 'self'").fetchone() == (0,)
    n, pairs = con.execute("SELECT count(*), count(DISTINCT (ancestor, descendant)) FROM lineage").fetchone()
    assert n == pairs == 19


def test_lineage_on_an_empty_catalog_is_empty(tmp_path):
    cat = Catalog.open(str(tmp_path / "c"), CatalogSpec(), create=True)
    assert connect(cat).execute("SELECT count(*) FROM lineage").fetchone() == (0,)


def test_a_retried_model_has_one_current_row_everywhere(tmp_path):
    """`--retry-errors` writes a second row for a model that failed: SQL, resume and training see the new one."""
    from crawl.cli import cli as crawl_cli
    from train.data import list_models

    import modelfactory

    src = tmp_path / "models"
    modelfactory.cnn(src / "a")
    (src / "b").mkdir(parents=True)
    (src / "b" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    cat_dir = str(tmp_path / "cat")
    assert crawl_cli(["local", str(src), "--catalog", cat_dir, "--no-ray"]) == 0
    cat = Catalog.open(cat_dir)
    assert sorted(cat.done().values()) == ["error", "ok"]
    modelfactory.cnn(src / "b", seed=5)  # repaired
    assert crawl_cli(["local", str(src), "--catalog", cat_dir, "--no-ray", "--retry-errors"]) == 0
    assert len(cat.files("models")) == 2  # the error row is still on disk, replaced
    rows = connect(cat).execute("SELECT model_id, status FROM models ORDER BY 1").fetchall()
    assert [s for _, s in rows] == ["ok", "ok"]
    assert set(cat.done().values()) == {"ok"}
    current = cat.current_models(("model_id", "status", "n_tokens"))
    assert current.num_rows == 2 and all(n > 0 for n in current.column("n_tokens").to_pylist())
    assert len(list_models(cat)) == 2


def _crawled(tmp_path, n: int = 12):
    """A local catalog of `n` small models, one shard each, one model retried after an error."""
    from crawl.cli import cli as crawl_cli

    import modelfactory

    src = tmp_path / "models"
    for i in range(n):
        (modelfactory.cnn if i % 2 else modelfactory.mlp)(src / f"m{i:02d}", seed=i)
    (src / "broken").mkdir()
    (src / "broken" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    cat_dir = str(tmp_path / "cat")
    assert crawl_cli(["local", str(src), "--catalog", cat_dir, "--no-ray", "--batch-size", "1"]) == 0
    modelfactory.cnn(src / "broken", seed=99)
    time.sleep(1.1)  # a later crawl's shards have a later stamp (same second, same models: the same shard id)
    assert crawl_cli(["local", str(src), "--catalog", cat_dir, "--no-ray", "--retry-errors"]) == 0
    return Catalog.open(cat_dir)


def _content(cat: Catalog) -> dict:
    con = connect(cat)
    return {
        "models": con.execute("SELECT * EXCLUDE (crawled_at) FROM models ORDER BY model_id").fetchall(),
        "tensors": con.execute("SELECT * FROM tensors ORDER BY model_id, tensor_idx").fetchall(),
        "tokens": con.execute("SELECT model_id, token_idx, hash(values), n_valid FROM tokens ORDER BY 1, 2").fetchall(),
        "properties": con.execute("SELECT * FROM properties ORDER BY ALL").fetchall(),
    }


def test_compaction_merges_small_shards_and_readers_see_the_same_catalog(tmp_path):
    from catalog.__main__ import cli as catalog_cli
    from train.data import list_models, read_models

    cat = _crawled(tmp_path)
    before, refs = _content(cat), list_models(cat)
    tokens = read_models(cat, refs)  # what training reads
    assert len(cat.files("models")) == 14 and len(before["models"]) == 13
    raw = sum(pa.parquet.read_table(f, filesystem=cat.fs).num_rows for f in cat.files("models"))
    assert raw == 14  # the retried model's error row is on disk
    assert catalog_cli(["compact", cat.uri, "--target-mb", "1"]) == 0
    assert len(cat.files("models")) == 1 and len(cat.files("tokens")) == 1
    assert _content(cat) == before
    assert [(r.model_id, r.n_tokens) for r in list_models(cat)] == [(r.model_id, r.n_tokens) for r in refs]
    again = read_models(cat, list_models(cat))
    assert again.model_ids == tokens.model_ids and (again.offsets == tokens.offsets).all()
    assert (again.values == tokens.values).all() and (again.stats == tokens.stats).all()
    assert sum(pa.parquet.read_table(f, filesystem=cat.fs).num_rows for f in cat.files("models")) == 13
    assert not cat.fs.get_file_info(pa.fs.FileSelector(f"{cat.root}/_compactions"))  # journal gone
    assert catalog_cli(["compact", cat.uri]) == 0 and len(cat.files("models")) == 1  # nothing left to merge


@pytest.mark.parametrize("kill_at", ["before the journal", "before the commit", "after the commit", "mid-delete"])
def test_a_compaction_killed_anywhere_loses_nothing_and_shows_no_half_state(tmp_path, monkeypatch, kill_at):
    import catalog.compact as cc

    cat = _crawled(tmp_path, n=6)
    before, shards = _content(cat), len(cat.files("models"))

    class Killed(BaseException):
        pass

    def killer(real, when=0, after=False):
        calls = []

        def f(*a, **k):
            calls.append(1)
            if len(calls) > when:
                if after:
                    real(*a, **k)
                raise Killed
            return real(*a, **k)
        return f

    if kill_at == "before the journal":  # the merged shard's tables are written, not committed
        monkeypatch.setattr(cc, "atomic_write", killer(cc.atomic_write))
    elif kill_at == "before the commit":  # the journal is written, the merged models file not
        monkeypatch.setattr(cc, "atomic_write", killer(cc.atomic_write, after=True))
    elif kill_at == "after the commit":  # the merged shard committed, the old shards all there
        monkeypatch.setattr(cc, "finish_compactions", killer(cc.finish_compactions, when=1))  # 1: the clean() first
    else:
        monkeypatch.setattr(cc, "_delete_shard", killer(cc._delete_shard, when=2))
    with pytest.raises(Killed):
        cc.compact(Catalog.open(cat.uri), 1 << 20)
    monkeypatch.undo()
    cat = Catalog.open(cat.uri)
    assert _content(cat) == before  # readers: every row once, nothing missing
    assert len(cat.files("models")) in ((shards,) if kill_at.startswith("before") else (1,))
    cat.clean()  # what the next crawl or compaction does first
    assert _content(cat) == before
    leftovers = [i.base_name for t in ("models", "tensors", "tokens", "properties", "_compactions")
                 for i in cat.fs.get_file_info(pa.fs.FileSelector(f"{cat.root}/{t}", allow_not_found=True))
                 if i.base_name.startswith(".") or t == "_compactions"]
    assert leftovers == []
    assert len(cat.files("models")) in ((shards,) if kill_at.startswith("before") else (1,))


def test_clean_removes_what_a_kill_mid_write_leaves_of_journals_statistics_and_the_spec(tmp_path):
    """A kill between writing a small file whole and renaming it (a compaction's journal, a shard's statistics, the
    catalog's spec) leaves a temporary file; the next crawl or compaction removes it, and nothing else."""
    cat = _crawled(tmp_path, n=4)
    before = _content(cat)
    root = Path(cat.root)
    (root / "_compactions").mkdir(exist_ok=True)
    left = [root / "_compactions" / ".tmp-1a2b3c4d-x-merged-0.json", root / "_stats" / ".tmp-5e6f7a8b-x.json",
            root / ".tmp-9c0d1e2f-catalog.json"]
    kept = sorted(p for p in root.rglob("*") if p.is_file())
    for f in left:
        f.write_text("{")
    assert cat.clean() == len(left)
    assert not any(f.exists() for f in left) and sorted(p for p in root.rglob("*") if p.is_file()) == kept
    assert _content(Catalog.open(cat.uri)) == before


def test_sigkill_mid_compaction_then_a_rerun_leaves_the_uncompacted_catalog(tmp_path):
    """`python -m catalog compact` SIGKILLed once its first merged shard is committed (observed on disk), then run
    again: every reader sees the uncompacted catalog's content, in fewer shards, with nothing left over."""
    import os
    import signal
    import subprocess
    import sys

    cat = _crawled(tmp_path, n=16)
    before, shards = _content(cat), len(cat.files("models"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    # shards of ~28 kB and a 100 kB target: several merged shards, one after the other
    p = subprocess.Popen([sys.executable, "-m", "catalog", "compact", cat.uri, "--target-mb", "0.1"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    merged = Path(cat.root) / "models"
    while p.poll() is None and not any("-merged-" in f.name for f in merged.glob("*.parquet")):
        time.sleep(0.005)
    killed = p.poll() is None
    if killed:
        os.kill(p.pid, signal.SIGKILL)
    p.wait()
    print("killed mid-compaction" if killed else "finished before the kill")
    assert _content(Catalog.open(cat.uri)) == before  # readers right after the kill
    assert subprocess.run([sys.executable, "-m", "catalog", "compact", cat.uri, "--target-mb", "0.1"], env=env,
                          capture_output=True).returncode == 0
    cat = Catalog.open(cat.uri)
    assert _content(cat) == before
    assert 1 < len(cat.files("models")) < shards
    assert not list((Path(cat.root) / "_compactions").glob("*")) and not list(Path(cat.root).rglob(".tmp-*"))
