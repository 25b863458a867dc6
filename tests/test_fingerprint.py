"""Behaviour fingerprints: the `behaviour` table, computed once, equal to running the checkpoints directly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from catalog.__main__ import cli as catalog_cli
from catalog.query import connect
from catalog.store import Catalog
from crawl.__main__ import cli as crawl_cli
from train import fingerprint
from train.__main__ import cli as train_cli
from train.behaviour import input_shape, recognize
from zoo.models import build_model


@pytest.fixture()
def zoo_copy(zoo_catalog, tmp_path):
    """A private copy of the shared zoo catalog (fingerprints are written into it)."""
    zoo, cat = zoo_catalog
    shutil.copytree(cat, tmp_path / "cat")
    for stale in (tmp_path / "cat" / "behaviour").glob("*.parquet"):
        stale.unlink()
    return zoo, tmp_path / "cat"


def test_fingerprints_equal_the_checkpoints_run_directly_and_a_rerun_computes_nothing(zoo_copy, capsys):
    zoo, cat = zoo_copy
    assert train_cli(["behaviour", "--catalog", str(cat)]) == 0
    assert "96 model(s) of a known architecture, 96 fingerprinted now (192 rows)" in capsys.readouterr().out
    again = fingerprint.compute(Catalog.open(str(cat)))
    assert again["written"] == 0 and again["path"] is None and again["models"] == 96

    # one checkpoint loaded the ordinary way (torch.load, weights only) and run on the same probes
    trial = sorted(p for p in zoo.iterdir() if p.is_dir())[3]
    params = json.loads((trial / "params.json").read_text())
    net = build_model(params).eval()
    net.load_state_dict(torch.load(trial / "checkpoint_000002" / "checkpoints", weights_only=True))
    sets = fingerprint.probe_sets((1, 8, 8))
    assert sorted(sets) == ["digits", "noise"] and len(sets["digits"]) == 128 and len(sets["noise"]) == 64
    with torch.no_grad():
        p = torch.softmax(net(sets["digits"]).double(), -1)
    mid = f"{zoo.name}/{trial.name}@epoch2"
    max_prob, entropy, probs, outputs = connect(str(cat)).execute(
        "SELECT max_prob, entropy, class_probs, outputs FROM behaviour WHERE model_id = ? AND probe_set = 'digits'",
        [mid]).fetchone()
    assert max_prob == pytest.approx(float(p.max(-1).values.mean()), abs=1e-5)
    assert entropy == pytest.approx(float(-(p * p.clamp_min(1e-300).log()).sum(-1).mean()), abs=1e-4)
    np.testing.assert_allclose(probs, p.mean(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.reshape(outputs, (16, 10)), p[:16].numpy(), atol=1e-5)

    # SQL sees the table: one row per model and probe set
    assert catalog_cli(["sql", str(cat), "SELECT probe_set, count(*) AS n FROM behaviour GROUP BY 1 ORDER BY 1",
                        "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["probe_set,n", "digits,96", "noise,96"]
    feats = fingerprint.features(Catalog.open(str(cat)), [mid, f"{zoo.name}/{trial.name}@epoch0"])
    assert feats.shape == (2, 2 * (5 + 10)) and np.isfinite(feats).all()


def test_models_of_unknown_architectures_have_no_fingerprint_and_no_error(good_models, tmp_path, capsys):
    root, _ = good_models
    cat = tmp_path / "cat"
    assert crawl_cli(["local", str(root), "--catalog", str(cat)]) == 0
    capsys.readouterr()
    assert train_cli(["behaviour", "--catalog", str(cat)]) == 0
    out = capsys.readouterr().out
    assert "0 model(s) of a known architecture" in out and "0 fingerprinted now" in out
    assert connect(str(cat)).execute("SELECT count(*) FROM behaviour").fetchone() == (0,)


def test_user_probe_images_come_from_a_plain_npy_and_a_pickle_is_refused(zoo_copy, tmp_path, capsys):
    _, cat = zoo_copy
    images = np.random.default_rng(0).random((20, 8, 8)).astype(np.float32)
    np.save(tmp_path / "probes.npy", images)
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert train_cli(["behaviour", "--catalog", str(cat), "--probes", str(tmp_path / "pickled.npy")]) == 1
    assert "not a plain .npy array" in capsys.readouterr().err
    assert train_cli(["behaviour", "--catalog", str(cat), "--probes", str(tmp_path / "probes.npy")]) == 0
    sets = dict(connect(str(cat)).execute("SELECT probe_set, min(n_probes) FROM behaviour GROUP BY 1").fetchall())
    assert sets == {f"npy-{fingerprint.hashlib.sha256(images[:, None].tobytes()).hexdigest()[:8]}": 20, "noise": 64}


def test_the_real_model_zoos_cnn_s_is_told_apart_from_the_lab_cnn_by_its_shapes():
    props = {"model::type": "CNN", "model::nlin": "tanh", "model::channels_in": "1", "model::o_dim": "10"}
    real = build_model({**props, "model::type": "CNN-s", "model::dropout": 0.1, "model::init_type": "uniform"})
    assert sum(p.numel() for p in real.parameters()) == 2464  # MODELZOOS.md: MNIST CNN (s)
    lab = build_model({**props, "model::dropout": 0.0, "model::init_type": "uniform"})
    shapes = [tuple(v.shape) for v in real.state_dict().values()]
    assert recognize(props, shapes) == "CNN-s/tanh/1/10" and input_shape("CNN-s/tanh/1/10") == (1, 28, 28)
    assert recognize(props, [tuple(v.shape) for v in lab.state_dict().values()]) == "CNN/tanh/1/10"
    assert recognize(props, shapes[:-1]) is None and recognize({**props, "model::nlin": None}, shapes) is None
    sets = fingerprint.probe_sets((1, 28, 28))
    assert sorted(sets) == ["noise", "smooth"] and sets["smooth"].shape == (64, 1, 28, 28)
