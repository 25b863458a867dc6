"""Crawl stages as plain functions over pyarrow Tables, without Ray; local enumeration rules."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from catalog.store import Catalog
from crawl.local import find_models
from crawl.tasks import dedupe, make_tasks, skip_done
from crawl.worker import CrawlWorker

import modelfactory


def test_skip_done_and_dedupe():
    t = make_tasks([{"model_id": m, "source": "local", "path": "/x"} for m in ("a", "b", "c", "a")])
    assert dedupe(t).column("model_id").to_pylist() == ["a", "b", "c"]
    left = skip_done(dedupe(t), {"a": "ok", "c": "error"})
    assert left.column("model_id").to_pylist() == ["b"]
    assert skip_done(dedupe(t), {"a": "ok", "c": "error"}, retry_errors=True).column("model_id").to_pylist() == ["b", "c"]


def test_worker_on_a_three_row_table(tmp_path):
    modelfactory.cnn(tmp_path / "m" / "cnn")
    modelfactory.mlp(tmp_path / "m" / "mlp")
    rows, _ = find_models([str(tmp_path / "m")])
    rows.append({"model_id": "ghost", "source": "local", "path": str(tmp_path / "nowhere")})
    cat = Catalog.open(str(tmp_path / "cat"), create=True)
    out = CrawlWorker(cat.uri)(make_tasks(rows))
    assert isinstance(out, pa.Table) and out.num_rows == 3
    status = dict(zip(out.column("model_id").to_pylist(), out.column("status").to_pylist(), strict=True))
    assert status == {"m/cnn": "ok", "m/mlp": "ok", "ghost": "error"}
    assert cat.done() == status
    assert len(cat.files("models")) == 1 and len(cat.files("tokens")) == 1


def test_local_enumeration_folders_nesting_and_hf_cache(tmp_path):
    modelfactory.cnn(tmp_path / "zoo" / "vision" / "cnn")
    modelfactory.sharded(tmp_path / "zoo" / "gpt")
    (tmp_path / "zoo" / "empty").mkdir()
    cfg_only = tmp_path / "zoo" / "no-weights"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text('{"model_type": "bert"}')
    snap = tmp_path / "cache" / "models--org--tiny" / "snapshots" / "0123abc"
    blobs = tmp_path / "cache" / "models--org--tiny" / "blobs"
    modelfactory.mlp(blobs / "x")
    snap.mkdir(parents=True)
    os.symlink(blobs / "x" / "model.safetensors", snap / "model.safetensors")
    rows, warnings = find_models([str(tmp_path / "zoo"), str(tmp_path / "cache")])
    ids = {r["model_id"]: r for r in rows}
    assert set(ids) == {"zoo/vision/cnn", "zoo/gpt", "zoo/no-weights", "org/tiny@0123abc"}
    assert ids["org/tiny@0123abc"]["repo_id"] == "org/tiny" and ids["org/tiny@0123abc"]["revision"] == "0123abc"
    assert not warnings
    cat = Catalog.open(str(tmp_path / "cat"), create=True)
    out = CrawlWorker(cat.uri)(make_tasks(rows)).to_pylist()
    by = {r["model_id"]: r for r in out}
    assert by["org/tiny@0123abc"]["status"] == "ok" and by["zoo/gpt"]["status"] == "ok"
    assert by["zoo/no-weights"]["status"] == "error" and "no weight files" in by["zoo/no-weights"]["error"]


def test_object_store_catalog_path(tmp_path):
    """A non-local catalog (pyarrow's in-memory filesystem standing in for S3): written, read back by SQL."""
    from catalog.query import connect
    from catalog.reassemble import model_tensors
    from crawl.pipeline import crawl

    modelfactory.cnn(tmp_path / "m" / "cnn")
    modelfactory.transformer(tmp_path / "m" / "bert")
    rows, _ = find_models([str(tmp_path / "m")])
    cat = Catalog.open("mock://bucket/wz", create=True)
    summary = crawl(make_tasks(rows), cat, use_ray=False)
    assert summary["by_status"] == {"ok": 2}
    con = connect(Catalog.open("mock://bucket/wz"))
    assert con.execute("SELECT count(*) FROM models WHERE status = 'ok'").fetchone()[0] == 2
    n = con.execute("SELECT sum(n_tokens) FROM tensors WHERE model_id = 'm/cnn'").fetchone()[0]
    assert con.execute("SELECT count(*) FROM tokens WHERE model_id = 'm/cnn'").fetchone()[0] == n > 0
    assert "classifier.weight" in model_tensors("mock://bucket/wz", "m/cnn")
    assert crawl(make_tasks(rows), cat, use_ray=False)["already_done"] == 2


@pytest.mark.ray
def test_the_driver_drops_rays_internal_preemption_watcher_line_and_keeps_every_other(ray_session, capsys):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from catalog.rayenv import filter_driver_logs

    assert filter_driver_logs()
    internal = ("[2026-12-03 12:10:12,401 E 11172 11197] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
                "and ID: '5a43' has constructor arguments in the object store and max_restarts > 0")
    mine = "12:10:16 INFO train.fit: rank 0 of 2 on cpu"
    other_cc = "[2026-12-03 12:10:12,401 E 11172 11197] core_worker.cc:999: something a user must see"
    dispatcher.emit({"ip": "127.0.0.1", "localhost": "127.0.0.1", "pid": 4242, "task_name": "TrainController",
                     "actor_name": "", "is_err": True, "lines": [internal, mine, other_cc], "job": ""})
    err = capsys.readouterr().err
    assert mine in err and "something a user must see" in err
    assert "PreemptionWatcher" not in err
    # Train V2's placement-group cleaner, whose thread dies where two Rays share a machine: its output goes
    dispatcher.emit({"ip": "127.0.0.1", "localhost": "127.0.0.1", "pid": 4243, "task_name": "",
                     "actor_name": "PlacementGroupCleaner", "is_err": True, "job": "",
                     "lines": ["Traceback (most recent call last):", "ConnectionError: Found multiple active Ray"]})
    # the raylet's warnings reach the driver as error messages, printed by the worker module's own function
    import ray._private.worker as worker_module

    worker_module.print_to_stdstream({"lines": [
        "WARNING: 8 PYTHON worker processes have been started on node: 57b7 with address: 192.0.2.2, which is 4x "
        "the maximum expected startup concurrency (2).", "a raylet warning a user must see"],
        "pid": "raylet", "is_err": True}, ignore_prefix=False)
    err = capsys.readouterr().err
    assert "Found multiple active Ray" not in err and "Traceback" not in err
    assert "a raylet warning a user must see" in err and "PYTHON worker processes" not in err
    assert filter_driver_logs()  # idempotent: a second call does not wrap twice
    assert sum(name == "ray_print_logs" for name, _ in dispatcher.handlers) == 1
    assert getattr(worker_module.print_to_stdstream, "wrapped", False)
    assert not getattr(getattr(worker_module.print_to_stdstream, "__wrapped_printer__", None), "wrapped", False)


def test_the_stderr_filter_drops_the_drivers_own_core_worker_line_and_passes_everything_else():
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "from catalog.rayenv import filter_stderr\n"
        "assert filter_stderr() and not filter_stderr()\n"
        "os.write(2, b\"[2026 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(CrawlWorker))' "
        "and ID: 'f5' has constructor arguments in the object store and max_restarts > 0.\\n\")\n"
        "os.write(2, b'[2026 E 1 1] core_worker.cc:10: a real error\\n')\n"
        "print('from python', file=sys.stderr)\n"
        "os.write(2, b'progress 50%')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "MapWorker" not in p.stderr
    assert "a real error" in p.stderr and "from python" in p.stderr and p.stderr.endswith("progress 50%")


def test_worker_resources_are_custom_names_with_positive_amounts(capsys):
    import argparse

    from catalog.cli import resources_arg
    from crawl.__main__ import cli as crawl_cli
    from train.config import TrainConfig

    assert resources_arg('{"crawler": 1}') == {"crawler": 1.0}
    for bad in ('{"CPU": 1}', '{"crawler": 0}', '["crawler"]', '{"crawler": true}', "{crawler"):
        with pytest.raises(argparse.ArgumentTypeError):
            resources_arg(bad)
    with pytest.raises(SystemExit) as e:  # argparse: one line on stderr, exit 2
        crawl_cli(["zoo", "nowhere", "--catalog", "nowhere-cat", "--worker-resources", '{"GPU": 1}'])
    assert e.value.code == 2 and "--worker-resources" in capsys.readouterr().err
    with pytest.raises(ValueError):
        TrainConfig(worker_resources={"GPU": 1.0})
    assert TrainConfig.from_dict({"worker_resources": {"trainer": 1}}).worker_resources == {"trainer": 1}


def test_the_wildzoo_console_script_answers_help_on_stdout_and_rejects_unknown_commands():
    import shutil
    import subprocess
    import sys

    exe = shutil.which("wildzoo", path=os.path.dirname(sys.executable))
    assert exe, "the wildzoo console script is installed with the package"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.startswith("usage: wildzoo") and all(c in out.stdout for c in ("crawl", "catalog", "train", "zoo"))
    bad = subprocess.run([exe, "crawls"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == "" and "unknown command 'crawls'" in bad.stderr
    sub = subprocess.run([exe, "catalog", "--help"], capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0 and sub.stdout.startswith("usage: python -m catalog")


def test_crawl_imports_run_one_way():
    """No import cycle among crawl/'s modules, lazy imports inside functions included."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "crawl"
    graph = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "crawl":
                    deps.update(a.name for a in node.names)
                elif node.module.startswith("crawl."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("crawl."))
        graph[path.stem] = deps - {path.stem}
    assert graph["cli"] >= {"hub", "pipeline"} and "cli" not in set().union(*(graph[m] for m in graph if m != "__main__"))

    def visit(m, stack):
        assert m not in stack, " → ".join([*stack, m])
        for d in graph.get(m, ()):
            visit(d, [*stack, m])

    for m in graph:
        visit(m, [])


@pytest.mark.ray
def test_train_placement_group_cleaner_sees_dead_controllers_without_the_state_api(ray_session):
    """Train V2 frees a dead controller's worker placement group through a detached cleaner that asks the State
    API (absent without a dashboard): every worker's setup hook points it at the GCS instead, so the CPUs of a
    trial that Tune stopped come back (a 2-core sweep hung without it)."""
    import time

    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    from catalog.rayenv import _gcs_actor_alive, quiet_worker_logs

    @ray_session.remote(num_cpus=0)
    class Probe:
        def ping(self) -> int:
            return 1

    @ray_session.remote(num_cpus=0)
    class Asker:
        def alive(self, actor_id: str) -> bool:
            quiet_worker_logs()  # what Ray runs first in every worker (worker_process_setup_hook)
            from ray.train.v2._internal.execution.controller import placement_group_cleaner as cleaner

            return cleaner.is_actor_alive(actor_id=actor_id, timeout=5)

    probe = Probe.remote()
    ray_session.get(probe.ping.remote())
    asker = Asker.remote()
    assert ray_session.get(asker.alive.remote(probe._actor_id.hex())) is True
    ray_session.kill(probe)
    deadline = time.time() + 30
    while ray_session.get(asker.alive.remote(probe._actor_id.hex())) and time.time() < deadline:
        time.sleep(0.2)
    assert ray_session.get(asker.alive.remote(probe._actor_id.hex())) is False
    assert _gcs_actor_alive("ff" * 16) is False  # an actor not found is not alive (as Ray's own check)
    quiet_worker_logs()
    assert placement_group_cleaner.is_actor_alive is _gcs_actor_alive
    ray_session.kill(asker)
