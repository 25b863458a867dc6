"""`train sample`: models generated from a backbone's latents are written as Hugging Face-layout folders that load,
run in their architecture, crawl back with `crawl local` and can be probed; the report compares them with the
anchors, random initializations, the best training model and anchor + noise models of the same accuracy."""

from __future__ import annotations

import json
import math

import pytest
import torch

from train.config import TrainConfig
from train.sample import sample_latents


def test_the_sampling_methods_draw_on_the_anchors_they_say():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 7, 3)
    kde, used = sample_latents(z, 200, "kde", gen)
    assert kde.shape == (200, 7, 3) and all(len(u) == 1 for u in used)
    near = torch.stack([(kde[i] - z[u[0]]).norm() for i, u in enumerate(used)])
    assert near.mean() < (z[:, None] - z[None]).norm(dim=(2, 3)).sum() / 20  # an anchor plus noise
    mid, used = sample_latents(z, 50, "interp", gen)
    for m, (i, j) in zip(mid, used, strict=True):  # on the segment between its two anchors, not at either end
        lam = float(((m - z[i]) * (z[j] - z[i])).sum() / ((z[j] - z[i]) ** 2).sum())
        assert 0.25 <= lam <= 0.75 and torch.allclose(m, (1 - lam) * z[i] + lam * z[j], atol=1e-5)
    g, used = sample_latents(z, 4000, "gauss", gen)
    assert used[0] == list(range(5)) and torch.allclose(g.mean(0), z.mean(0), atol=0.1)
    assert torch.allclose(g.var(0), z.var(0), rtol=0.15, atol=0.02)  # the anchors' covariance, not a point mass
    from catalog.errors import WildzooError

    with pytest.raises(WildzooError, match="unknown method"):
        sample_latents(z, 1, "gan", gen)


@pytest.fixture(scope="module")
def sampled(zoo_catalog, tmp_path_factory):
    from train.fit import fit
    from train.sample import sample

    _, cat = zoo_catalog
    root = tmp_path_factory.mktemp("sample")
    fit(str(cat), str(root / "run"), TrainConfig.debug().replace(epochs=2))
    s = sample(str(cat), str(root / "run"), str(root / "out"), anchors=6, n=4, bandwidths=(0.5, 1.0))
    return cat, root, s


@pytest.mark.ray
def test_generated_folders_load_run_and_report_their_accuracy(sampled):
    from safetensors.torch import load_file

    from zoo.data import load_digits_split
    from zoo.models import build_model

    _, root, s = sampled
    out = root / "out"
    folders = sorted((out / "samples").iterdir())
    labels = ["kde-0.5", "kde-1", "interp", "gauss"]
    assert [f.name for f in folders] == sorted(f"{m}-{i:03d}" for m in labels for i in range(4)) and s["samples"] == 16
    _, _, x, y = load_digits_split()
    for f in folders:
        cfg = json.loads((f / "config.json").read_text())
        props = cfg["wildzoo"]
        assert cfg["architectures"] and props["generated"] == 1 and len(cfg["wildzoo_anchors"]) >= 1
        net = build_model({**props, "model::dropout": 0.0, "model::init_type": "kaiming_uniform"}).eval()
        net.load_state_dict(load_file(f / "model.safetensors"))  # strict: every tensor, the right shapes
        with torch.no_grad():
            acc = float((net(x).argmax(-1) == y).float().mean())
        assert acc == pytest.approx(props["test_acc"], abs=1e-6)  # the report's accuracy is the folder's
    sets = {r["set"]: r for r in s["sets"]}
    labels = ["kde×0.5", "kde×1", "interp", "gauss"]
    assert set(sets) >= {*labels, "anchors", "random init", "best training model",
                         *(f"anchor + noise ({m})" for m in labels)}
    assert sets["anchors"]["dist_mean"] > 0 and all(math.isfinite(r["dist_mean"]) for r in s["sets"])
    assert sets["anchors"]["of_anchors"] == pytest.approx(1.0)
    assert sets["best training model"]["acc_mean"] >= sets["anchors"]["acc_mean"] - 1e-9
    for m in labels:  # the noise baseline is tuned to each method's accuracy
        assert abs(sets[f"anchor + noise ({m})"]["acc_mean"] - sets[m]["acc_mean"]) < 0.1
    report = (out / "report.md").read_text()
    assert "| anchors |" in report and "anchor + noise (kde×0.5)" in report and (out / "report.png").stat().st_size > 5000


@pytest.mark.ray
def test_generated_models_crawl_back_and_are_probed(sampled, tmp_path, capsys):
    from catalog.query import connect
    from crawl.__main__ import cli as crawl_cli
    from train.__main__ import cli as train_cli
    from train.behaviour import model_archs

    _, root, _ = sampled
    cat2 = tmp_path / "generated"
    assert crawl_cli(["local", str(root / "out" / "samples"), "--catalog", str(cat2), "--no-ray"]) == 0
    con = connect(str(cat2))
    assert con.execute("SELECT count(*) FROM models WHERE status = 'ok'").fetchone()[0] == 16
    accs = dict(con.execute("SELECT model_id, value FROM properties WHERE name = 'test_acc'").fetchall())
    assert len(accs) == 16 and all(0 <= v <= 1 for v in accs.values())
    from catalog.store import Catalog

    ids = [m for (m,) in con.execute("SELECT model_id FROM models").fetchall()]
    assert len(model_archs(Catalog.open(str(cat2)), ids)) == 16  # recognized: behaviour fingerprints apply
    capsys.readouterr()
    assert train_cli(["probe", "--catalog", str(cat2), "--seeds", "1", "--out", str(tmp_path / "probe")]) == 0
    printed = capsys.readouterr().out
    assert "test_acc" in printed and "s(W)" in printed


def test_bad_sample_arguments_are_one_line_errors(zoo_catalog, tmp_path, capsys):
    from train.__main__ import cli as train_cli

    _, cat = zoo_catalog
    assert train_cli(["sample", "--run", str(tmp_path / "none"), "--catalog", str(cat), "--out", str(tmp_path / "o"),
                      "--method", "gan"]) != 0
    err = capsys.readouterr().err
    assert "gan" in err and "Traceback" not in err


@pytest.mark.ray
def test_anchors_chosen_by_sql_are_the_ones_sampled_from(sampled, tmp_path):
    from catalog.query import connect
    from train.sample import sample

    cat, root, _ = sampled
    where = "SELECT model_id FROM properties WHERE name = 'model::nlin' AND text = 'tanh'"
    tanh = {m for (m,) in connect(str(cat)).execute(where).fetchall()}
    s = sample(str(cat), str(root / "run"), str(tmp_path / "out"), where=where, n=3, methods=("kde", "interp"),
               bandwidths=(0.5,))
    assert s["arch"].split("/")[1] == "tanh" and s["samples"] == 6
    for f in (tmp_path / "out" / "samples").iterdir():
        cfg = json.loads((f / "config.json").read_text())
        assert set(cfg["wildzoo_anchors"]) <= tanh and cfg["wildzoo"]["model::nlin"] == "tanh"
