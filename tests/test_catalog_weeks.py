"""A catalog that runs for weeks: lineage in SQL, compaction, start-up on many rows."""

from __future__ import annotations

import pyarrow as pa

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
