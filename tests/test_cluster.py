"""cluster.yaml passes Ray's own cluster-launcher validation (offline)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _validate(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_yaml_is_valid_and_has_crawl_and_train_nodes():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    _validate(cfg)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["cpu_crawler"]["max_workers"] > 0 and types["gpu_trainer"]["node_config"]["InstanceType"].startswith("g")
    assert any("pip install" in c and "-e ." in c for c in cfg["setup_commands"])


def test_validation_really_rejects_a_broken_config():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["available_node_types"]["cpu_crawler"]["min_workers"] = "many"
    with pytest.raises(Exception):  # noqa: B017 (jsonschema's ValidationError, whatever Ray wraps it in)
        _validate(cfg)
