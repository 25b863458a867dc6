"""A real Ray cluster of two nodes on this machine (`ray start --head` + `ray start --address`, subprocesses,
each with custom resources so placement is observable): a crawl spread over both nodes, a 2-worker fit with one
worker per node, a node lost mid-crawl and mid-fit, and `ray job submit` of a crawl and a fit (catalog and run on
the S3 server) — the commands a user runs against a cluster, run as subprocesses with RAY_ADDRESS.

The session's own Ray (conftest) is left alone: the cluster has its own ports and temp folder, and each node is
stopped by ending its own `ray start --block` process group, never with `ray stop`.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_port

from catalog.query import connect

ROOT = Path(__file__).resolve().parent.parent
RAY = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _agent_ports() -> list[str]:
    """Ports of a node's own agents: the defaults (52365, …) are taken by the session's Ray on this machine."""
    return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]


class Node:
    """One Ray node: a `ray start --block` process in a process group of its own (killing the group loses the
    node at once, as a crashed machine would)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen([RAY, "start", "--block", *args], stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=ROOT)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)


class Cluster:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="wzray", dir="/tmp"))  # short: Ray's socket paths must fit
        self.port, self.dashboard = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.head = Node(["--head", "--port", str(self.port), "--dashboard-port", str(self.dashboard),
                          "--ray-client-server-port", str(free_port()), *_agent_ports(),
                          "--include-dashboard", "true", "--num-cpus", "2", "--temp-dir", str(self.tmp),
                          "--resources", json.dumps({"node_head": 1, "trainer": 1, "crawler": 1})], self.tmp / "head.log")
        self.wait_nodes(1)
        self.b = self.start_b()

    def start_b(self) -> Node:
        node = Node(["--address", self.address, "--num-cpus", "2", *_agent_ports(),
                     "--resources", json.dumps({"node_b": 1, "trainer": 1, "crawler": 1})], self.tmp / "node_b.log")
        self.wait_nodes(2)
        return node

    def alive_nodes(self) -> int:
        code = "import ray; ray.init(address=%r, logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
        p = subprocess.run([sys.executable, "-c", code % self.address], capture_output=True, text=True, timeout=120,
                           env=self.env())
        return int(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else 0

    def wait_nodes(self, n: int) -> None:
        for _ in range(60):
            if self.alive_nodes() == n:
                return
            time.sleep(1)
        raise AssertionError(f"the cluster did not reach {n} alive node(s): see {self.tmp}/*.log")

    def env(self) -> dict[str, str]:
        # every worker's lines, not Ray's deduplicated summary of similar ones
        return {**os.environ, "RAY_ADDRESS": self.address, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}

    def run(self, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        """A command line of the product against the cluster (a driver attached through RAY_ADDRESS)."""
        return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                              env=self.env(), cwd=ROOT)

    def popen(self, *args: str, log: Path) -> subprocess.Popen:
        f = open(log, "w")  # noqa: SIM115 (the caller waits for the process; the file closes with it)
        return subprocess.Popen([sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT, text=True,
                                env=self.env(), cwd=ROOT)

    def stop(self) -> None:
        self.b.kill()
        self.head.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    yield c
    c.stop()


def _wait_for(predicate, proc: subprocess.Popen, what: str, limit: int = 600) -> None:
    """Poll until `predicate()` (observed progress), failing if the process ends first."""
    for _ in range(limit * 4):
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}")
        time.sleep(0.25)
    raise AssertionError(f"no {what} after {limit}s")


def _unique(cat: Path) -> tuple[int, int]:
    return connect(str(cat)).execute("SELECT count(*), count(DISTINCT model_id) FROM models").fetchone()


def test_a_crawl_spreads_over_both_nodes_and_losing_one_mid_crawl_loses_nothing(cluster, zoo_catalog, tmp_path):
    zoo, reference = zoo_catalog
    cat = tmp_path / "cat"
    # one `crawler` slot per node: the pool's second actor can only go to the other node
    p = cluster.run("crawl", "zoo", str(zoo), "--catalog", str(cat), "--batch-size", "4", "--workers", "2", "--worker-resources",
                    '{"crawler": 1}')
    assert p.returncode == 0, p.stderr[-3000:]
    assert "96 model(s) crawled (ok 96)" in p.stdout
    nodes = {json.loads(Path(f).read_text())["node"] for f in glob.glob(str(cat / "_stats" / "*.json"))}
    assert len(nodes) == 2 and None not in nodes  # shards were written on both nodes
    assert _unique(cat) == (96, 96)

    # node b dies once the crawl has committed a few shards; Ray's retries or a rerun complete the catalog
    lost = tmp_path / "lost"
    proc = cluster.popen("crawl", "zoo", str(zoo), "--catalog", str(lost), "--batch-size", "2", log=tmp_path / "c.log")
    _wait_for(lambda: len(glob.glob(str(lost / "models" / "*.parquet"))) >= 3, proc, "3 committed shards")
    cluster.b.kill()
    rc = proc.wait(timeout=600)
    cluster.b = cluster.start_b()
    if rc != 0 or _unique(lost)[1] < 96:
        p = cluster.run("crawl", "zoo", str(zoo), "--catalog", str(lost))
        assert p.returncode == 0, p.stderr[-3000:]
    assert _unique(lost) == (96, 96)  # nothing lost, nothing twice
    q = "SELECT count(*), sum(n_valid) FROM tokens"
    assert connect(str(lost)).execute(q).fetchone() == connect(str(reference)).execute(q).fetchone()


def _rank_nodes(text: str) -> dict[int, str]:
    import re

    return {int(r): n for r, n in re.findall(r"rank (\d+) of 2 on node (\w+)", text)}


def test_a_two_worker_fit_runs_one_worker_per_node_and_survives_losing_one(cluster, zoo_catalog, tmp_path):
    _, cat = zoo_catalog
    run = tmp_path / "run"
    fit = ["train", "fit", "--catalog", str(cat), "--out", str(run), "--debug", "--workers", "2",
           "--worker-resources", '{"trainer": 1}']
    log = tmp_path / "fit.log"
    proc = cluster.popen(*fit, "--epochs", "8", log=log)
    _wait_for(lambda: len(glob.glob(str(run / "fit" / "checkpoint_*"))) >= 1, proc, "a checkpoint")
    first = _rank_nodes(log.read_text())
    assert len(first) == 2 and len(set(first.values())) == 2  # one worker on each node
    cluster.b.kill()
    cluster.b = cluster.start_b()  # the node comes back (an autoscaler replaces it): the run goes on from there
    rc = proc.wait(timeout=600)
    text = log.read_text()
    if rc != 0:  # the run gave up: rerunning the command resumes it from its checkpoint
        p = cluster.run(*fit, "--epochs", "8")
        assert p.returncode == 0, p.stderr[-3000:]
        text += p.stdout + p.stderr
        assert "resumed after epoch" in p.stdout
    meta = json.loads((run / "config.json").read_text())
    assert meta["epochs_trained"] == 8 and len(meta["history"]) == 8
    assert text.count("rank 1 of 2 on node") >= 2  # the worker group started again after the loss


def test_ray_job_submit_runs_a_crawl_and_a_fit_on_s3(cluster, zoo_catalog, s3_bucket):
    import re

    import boto3

    zoo, _ = zoo_catalog
    cat, run = f"s3://{s3_bucket}/catalog", f"s3://{s3_bucket}/runs/job"
    address = ["--address", f"http://127.0.0.1:{cluster.dashboard}"]
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    plain = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # only the job's runtime env has them

    def job(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, "job", *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=plain,
                              stdin=subprocess.DEVNULL)

    for command in (["python", "-m", "crawl", "zoo", str(zoo), "--catalog", cat],
                    ["python", "-m", "train", "fit", "--catalog", cat, "--out", run, "--debug", "--workers", "2"]):
        for _ in range(120):  # the head's job agent comes up some seconds after the node
            p = job("submit", "--no-wait", *address, "--working-dir", ".", "--runtime-env-json",
                    json.dumps({"env_vars": env}), "--", *command)
            if "No available agent to submit job" not in p.stderr:
                break
            time.sleep(1)
        ids = re.findall(r"raysubmit_\w+", p.stdout + p.stderr)
        assert p.returncode == 0 and ids, (p.stdout + p.stderr)[-3000:]
        for _ in range(240):
            status = job("status", *address, ids[0])
            if re.search(r"(succeeded|failed|stopped)\b", status.stdout + status.stderr, re.I):
                break
            time.sleep(1)
        logs = job("logs", *address, ids[0]).stdout
        assert re.search(r"Job '\w+' succeeded", status.stdout + status.stderr), logs[-3000:]
        assert env["AWS_SECRET_ACCESS_KEY"] not in logs  # the keys reached the workers, not the log
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert any(k.startswith("catalog/tokens/") for k in keys)
    assert "runs/job/model.safetensors" in keys and any(k.startswith("runs/job/fit/checkpoint_") for k in keys)
    assert connect(cat).execute("SELECT count(DISTINCT model_id) FROM models").fetchone() == (96,)
