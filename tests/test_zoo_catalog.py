"""A lab zoo, crawled with `crawl zoo`, answers SQL over its properties; `train probe` scores the baselines.

The `zoo_catalog` fixture (conftest.py) is shared with the trainer tests."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from catalog.query import connect
from crawl.__main__ import cli as crawl_cli
from train import probe
from train.__main__ import cli as train_cli
from zoo import generate


def test_every_checkpoint_is_a_model_with_its_properties(zoo_catalog):
    zoo, cat = zoo_catalog
    con = connect(str(cat))
    assert con.execute("SELECT count(*), count(DISTINCT repo_id) FROM models WHERE status = 'ok'").fetchone() == (96, 24)
    trial = sorted(p for p in zoo.iterdir() if p.is_dir())[0]
    lines = [json.loads(x) for x in (trial / "result.json").read_text().splitlines()]
    params = json.loads((trial / "params.json").read_text())
    for e, line in enumerate(lines):
        mid = f"{zoo.name}/{trial.name}@epoch{e}"
        props = dict(con.execute("SELECT name, coalesce(value, 0) FROM properties WHERE model_id = ? AND "
                                 "text IS NULL", [mid]).fetchall())
        assert props["test_acc"] == pytest.approx(line["test_acc"]) and props["epoch"] == e
        if e == 0:  # -999: not measured; never a value
            assert "train_acc" not in props and "ggap" not in props
        else:
            assert props["ggap"] == pytest.approx(line["train_acc"] - line["test_acc"])
        texts = dict(con.execute("SELECT name, text FROM properties WHERE model_id = ? AND text IS NOT NULL",
                                 [mid]).fetchall())
        assert texts["model::nlin"] == params["model::nlin"] and props["optim::lr"] == params["optim::lr"]


def test_sql_average_accuracy_by_activation_and_optimizer(zoo_catalog):
    zoo, cat = zoo_catalog
    rows = connect(str(cat)).execute(
        """SELECT act.text AS activation, opt.text AS optimizer, avg(acc.value) AS mean_acc, count(*) AS n
           FROM properties acc
           JOIN properties act ON act.model_id = acc.model_id AND act.name = 'model::nlin'
           JOIN properties opt ON opt.model_id = acc.model_id AND opt.name = 'optim::optimizer'
           WHERE acc.name = 'test_acc' GROUP BY ALL ORDER BY ALL"""
    ).fetchall()
    expected: dict[tuple[str, str], list[float]] = {}
    for trial in (p for p in zoo.iterdir() if p.is_dir()):
        params = json.loads((trial / "params.json").read_text())
        for line in (trial / "result.json").read_text().splitlines():
            expected.setdefault((params["model::nlin"], params["optim::optimizer"]), []).append(
                json.loads(line)["test_acc"])
    assert {(a, o): (pytest.approx(m), n) for a, o, m, n in rows} == {
        k: (pytest.approx(float(np.mean(v))), len(v)) for k, v in expected.items()}


def test_probe_prints_every_property_and_method(zoo_catalog, capsys, tmp_path):
    _, cat = zoo_catalog
    assert train_cli(["probe", "--catalog", str(cat), "--format", "json", "--out", str(tmp_path), "--seeds", "2"]) == 0
    results = json.loads(capsys.readouterr().out)
    got = {(r["property"], r["method"]) for r in results}
    for prop in ("test_acc", "epoch", "ggap"):
        for method in ("s(W) ridge", "s(W) ridge-robust", "s(W) trees", "W ridge"):
            assert (prop, method) in got
    assert all(math.isfinite(r["mean"]) and math.isfinite(r["sd"]) for r in results)
    assert {r["n"] for r in results if r["metric"] == "R2"} == {2}  # R² on every seed; hyperparameters on the first
    assert {r["n"] for r in results if r["metric"] == "accuracy"} == {1}
    assert any(r["metric"] == "accuracy" and r["property"] == "model::nlin" for r in results)
    assert (tmp_path / "probe_test_acc.png").stat().st_size > 10_000 and (tmp_path / "features_pca.png").exists()
    assert train_cli(["probe", "--catalog", str(tmp_path / "missing")]) == 1


def test_group_split_keeps_checkpoints_of_one_model_together():
    groups = np.repeat(np.arange(40), 5)
    s = probe.group_split(groups, seed=3)
    sides = [set(groups[i]) for i in (s.train, s.val, s.test)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert (len(sides[0]), len(sides[1]), len(sides[2])) == (28, 6, 6)


def test_ridge_picks_alpha_on_validation_and_robust_head_survives_outliers():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 5))
    y = x @ np.array([1.0, -2.0, 0.5, 0.0, 0.0]) + 0.1 * rng.standard_normal(300)
    s = probe.group_split(np.arange(300), seed=0)
    r2, _, alpha = probe.ridge_probe(x, y, s)
    assert r2 > 0.95 and alpha < 10
    x_out = x.copy()
    x_out[s.test[:3], 0] = 1e4  # three diverged models in the test split
    bad, _, _ = probe.ridge_probe(x_out, y, s)
    safe, _, _ = probe.ridge_probe(x_out, y, s, robust=True)
    assert bad < 0 and safe > bad


def test_ridge_path_equals_a_direct_solve_for_every_alpha():
    """One eigendecomposition serves every alpha: the weights equal a fresh solve, primal (n > d) and dual (d > n)."""
    rng = np.random.default_rng(1)
    for n, d in ((80, 12), (30, 200)):
        x, y = rng.standard_normal((n, d)), rng.standard_normal(n)
        path = probe.RidgePath(x, y)
        xc, yc = x - x.mean(0), y - y.mean()
        for alpha in probe.ALPHAS[::4]:
            w, b = path.fit(alpha)
            direct = (np.linalg.solve(xc.T @ xc + alpha * np.eye(d), xc.T @ yc) if d <= n else
                      xc.T @ np.linalg.solve(xc @ xc.T + alpha * np.eye(n), yc))
            np.testing.assert_allclose(w, direct, rtol=1e-6, atol=1e-9 * max(1.0, np.abs(direct).max()))
            assert b == pytest.approx(y.mean() - x.mean(0) @ w)


def test_probe_parts_in_processes_give_the_results_of_one_process():
    """run_probes in 2 worker processes: every seed's R² and accuracy equal those of one process, in its order."""
    from train.evaluate import run_probes
    from train.features import Population

    rng = np.random.default_rng(2)
    n = 240
    groups = np.repeat(np.arange(60), 4)
    x = rng.standard_normal((n, 6))
    numeric = {"test_acc": x[:, 0] + 0.1 * rng.standard_normal(n), "epoch": x[:, 1] * x[:, 2],
               "ggap": np.abs(x[:, 3])}
    labels = np.array(["relu", "tanh", "gelu"], dtype=object)[np.repeat(rng.integers(0, 3, 60), 4)]
    pop = Population([f"m{i}" for i in range(n)], groups, numeric, {"model::nlin": labels}, "sig", 0)
    sets = {"s(W)": x, "behaviour": x[:, :3] ** 2}
    one, preds1 = run_probes(None, [0, 1, 2], pop=pop, sets=sets, jobs=1)
    two, preds2 = run_probes(None, [0, 1, 2], pop=pop, sets=sets, jobs=2)
    assert [(r["property"], r["method"], r["seed"]) for r in one] == [(r["property"], r["method"], r["seed"]) for r in two]
    np.testing.assert_allclose([r["value"] for r in two], [r["value"] for r in one], rtol=0, atol=1e-9)
    assert {r["seed"] for r in one} == {0, 1, 2} and any(r["metric"] == "accuracy" for r in one)
    np.testing.assert_allclose(preds2["pred"]["test_acc"]["s(W) trees"], preds1["pred"]["test_acc"]["s(W) trees"])


def test_trees_see_the_backbone_block_as_principal_components_fitted_on_their_rows():
    """A wide backbone embedding enters the trees as its first principal components (alone and as `combined`'s first
    block, the rest of `combined` untouched); the components come from the trees' rows only; narrow sets pass as
    they are."""
    from train.evaluate import trees_inputs

    rng = np.random.default_rng(3)
    n, wide = 200, 40
    basis = rng.standard_normal((3, wide))
    b = (rng.standard_normal((n, 3)) * [[10.0, 3.0, 1.0]]) @ basis + 0.01 * rng.standard_normal((n, wide))
    sw = rng.standard_normal((n, 5))
    sets = {"s(W)": sw, "backbone": b, "combined": np.concatenate([b, sw], axis=1)}
    rows = np.arange(150)
    out = trees_inputs(sets, rows, pcs=3)
    assert out["backbone"].shape == (n, 3) and out["combined"].shape == (n, 8)
    np.testing.assert_array_equal(out["combined"][:, 3:], sw)
    np.testing.assert_array_equal(out["combined"][:, :3], out["backbone"])
    assert out["s(W)"] is sw and sets["backbone"] is b  # nothing else changed, the input left alone
    # three components hold the three directions: the embedding is rebuilt from them to the noise
    mu = b[rows].mean(0)
    vt = np.linalg.svd(b[rows] - mu, full_matrices=False)[2][:3]
    np.testing.assert_allclose(out["backbone"] @ vt + mu, b, atol=0.1)
    # the other rows (the test models) do not move the components
    moved = b.copy()
    moved[150:] *= 100.0
    again = trees_inputs({"backbone": moved}, rows, pcs=3)["backbone"]
    np.testing.assert_allclose(again[:150], out["backbone"][:150], atol=1e-8)
    assert trees_inputs(sets, rows, pcs=wide) is sets


@pytest.mark.slow
def test_statistics_baseline_clears_the_bar_on_the_digits_zoo(tmp_path, ray_session):
    """Issue 4's bar: on a 200-model digits zoo, the best s(W) head reaches R² ≥ 0.9 on test accuracy."""
    zoo = tmp_path / "zoo"
    generate(zoo, models=200, epochs=5, seed=0, workers=2, arch="cnn")
    cat = tmp_path / "cat"
    assert crawl_cli(["zoo", str(zoo), "--catalog", str(cat)]) == 0
    from catalog.store import Catalog
    from train.evaluate import run_probe

    results, _ = run_probe(Catalog.open(str(cat)), categorical=False)  # the hyperparameters' trees: not the bar
    best = max(r["value"] for r in results if r["property"] == "test_acc" and r["method"].startswith("s(W)"))
    assert best >= 0.9


def test_token_size_auto_is_for_zoos_and_bad_sizes_are_one_line_errors(good_models, tmp_path, capsys):
    root, _ = good_models
    args = ["local", str(root), "--catalog", str(tmp_path / "c"), "--no-ray", "--token-size"]
    assert crawl_cli([*args, "auto"]) == 1
    assert "--token-size auto needs `crawl zoo`" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        crawl_cli([*args, "many"])
    assert e.value.code == 2 and "expected an integer or 'auto'" in capsys.readouterr().err
