"""Shared fixtures: one Ray for the whole run (2 cores: start it once), model folders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (also for the multi-node tests' Ray ports)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Object storage in the tests is a real S3 server (moto, `s3_bucket`), reached only through the standard
# variables a user sets for MinIO or R2. They are set before any Ray starts, so Ray's workers inherit them.
S3_PORT = free_port()
os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "wildzoo-test",
                   "AWS_SECRET_ACCESS_KEY": "wildzoo-test-secret", "AWS_REGION": "us-east-1"})


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray shared by all tests; shut down at the end only if this fixture started it."""
    import ray

    started = False
    if not ray.is_initialized():
        env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
        ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env}, logging_level="WARNING")
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a real HTTP S3 API, in a thread), for the whole run."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the S3 server: its name (s3://NAME/...)."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") or "wildzoo"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def zoo_catalog(tmp_path_factory, ray_session):
    """`modelfactory.lab_zoo_catalog`: a lab zoo (24 CNNs × 4 checkpoints on digits) crawled, (zoo, catalog).

    Session-scoped: the zoo and catalog tests and the trainer tests share it (about a minute to build)."""
    import modelfactory

    return modelfactory.lab_zoo_catalog(tmp_path_factory.mktemp("labzoo"))


@pytest.fixture(scope="session")
def good_models(tmp_path_factory):
    import modelfactory

    root = tmp_path_factory.mktemp("good")
    return root, modelfactory.good_zoo(root)
