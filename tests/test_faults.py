"""Faults during a crawl: a batch Ray executes again after its actor died commits nothing twice."""

from __future__ import annotations

import pytest

from catalog.query import connect
from catalog.store import Catalog
from crawl import pipeline, tasks, zoo


@pytest.mark.ray
def test_an_actor_killed_right_after_its_commit_leaves_no_duplicate_rows(zoo_catalog, tmp_path):
    from faults import DiesAfterCommit

    zoo_dir, reference = zoo_catalog
    rows, _ = zoo.find_checkpoints([str(zoo_dir)])
    cat = Catalog.open(str(tmp_path / "cat"), Catalog.open(str(reference)).spec, create=True)
    marker = tmp_path / "died"
    summary = pipeline.crawl(tasks.make_tasks(rows), cat, {"die_marker": str(marker)}, workers=2, batch_size=16,
                             worker=DiesAfterCommit)
    assert marker.exists()  # an actor did die after committing a batch, and Ray ran that batch again
    assert summary["by_status"] == {"ok": 96}
    con = connect(cat)
    assert con.execute("SELECT count(*), count(DISTINCT model_id) FROM models").fetchone() == (96, 96)
    q = "SELECT count(*) FROM tokens"
    assert con.execute(q).fetchone() == connect(str(reference)).execute(q).fetchone()
    assert con.execute("SELECT count(*) FROM (SELECT DISTINCT model_id, name FROM tensors)").fetchone() == \
        con.execute("SELECT count(*) FROM tensors").fetchone()
