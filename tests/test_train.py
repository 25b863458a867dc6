"""The backbone trainer: model, losses, config, windows, a Ray Train fit on 2 CPU workers, resume, embed, probe.

The debug fits run on the shared lab-zoo catalog (conftest `zoo_catalog`). A 1-worker debug fit with a
fixed seed is compared with the reference loss curve in tests/assets/; after a deliberate change to
the model, losses or data, regenerate it with `python bench/loss_curve_spread.py --write-reference` (the mean of 20 runs, and their spread).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from catalog.errors import WildzooError
from catalog.query import connect
from catalog.reassemble import model_tensors
from catalog.store import Catalog
from train.__main__ import cli as train_cli
from train.config import TrainConfig
from train.data import list_models, read_tokens, split_models
from train.losses import LossConfig, backbone_loss, masked_mse, nt_xent
from train.model import Backbone, ModelConfig, token_mask
from train.normalize import N_STATS, Normalizer


def _batch(cfg: ModelConfig, B: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T, S = cfg.window, cfg.token_size
    n_valid = torch.randint(1, S + 1, (B, T), generator=g)
    n_valid[0, T - 5:] = 0  # the first window runs past the end of its model
    return {"values": torch.randn(B, T, S, generator=g), "stats": torch.randn(B, T, cfg.n_stats, generator=g),
            "n_valid": n_valid,
            "n": torch.arange(T).repeat(B, 1) + 1000, "l": torch.randint(0, 6, (B, T), generator=g),
            "k": torch.randint(0, 40, (B, T), generator=g), "role": torch.randint(0, cfg.n_roles, (B, T), generator=g)}


# ---------------------------------------------------------------- model, losses, config (no Ray)

def test_model_shapes_and_embedding_ignores_padding():
    cfg = ModelConfig.debug(token_size=24)
    torch.manual_seed(0)
    model = Backbone(cfg).eval()
    batch = _batch(cfg)
    recon, latent, proj, _ = model(batch)
    assert recon.shape == (3, cfg.window, 24 + cfg.n_stats) and latent.shape == (3, cfg.window, cfg.d_latent)
    assert proj.shape == (3, cfg.proj_dim) and model.embed(batch).shape == (3, cfg.d_latent)
    # garbage in padded entries and padded tokens, and other positions for padded tokens: same embedding
    noisy = {k: v.clone() for k, v in batch.items()}
    pad = torch.arange(24) >= noisy["n_valid"][..., None]
    noisy["values"][pad] = 1e3
    noisy["stats"][0, -5:] = 1e3
    noisy["l"][0, -5:] = 99
    torch.testing.assert_close(model.embed(noisy), model.embed(batch))
    # a real entry does matter; positions far beyond anything seen stay finite (sinusoids, no tables)
    changed = {**batch, "values": batch["values"] + (~pad) * 0.5}
    assert not torch.allclose(model.embed(changed), model.embed(batch))
    scaled = {**batch, "stats": batch["stats"] + 1.0}  # the same standardized weights at another scale
    assert not torch.allclose(model.embed(scaled), model.embed(batch))
    assert torch.isfinite(model.embed({**batch, "n": batch["n"] * 10_000})).all()


def test_nt_xent_of_identical_views_is_lower_than_of_shuffled_ones():
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    same = nt_xent(z, z + 0.01 * torch.randn(16, 8))
    shuffled = nt_xent(z, z[torch.randperm(16, generator=torch.Generator().manual_seed(2))])
    assert same < shuffled and same < math.log(31)


def test_masked_mse_ignores_padding_in_every_normalization():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 5, 6, generator=g)
    n_valid = torch.tensor([[6, 6, 3, 0, 0], [6, 2, 6, 6, 1]])
    layer = torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, 3, 3]])
    real = token_mask(n_valid, 4, 2)  # 4 values and 2 statistics per token
    assert real.sum() == n_valid.clamp(max=4).sum() + 2 * (n_valid > 0).sum()
    pred = target + 0.1 * torch.randn(2, 5, 6, generator=g)
    for norm in ("none", "layer", "batch"):
        base = masked_mse(pred, target, real, layer, norm)
        garbage = torch.where(real, pred, torch.full_like(pred, 1e4))
        torch.testing.assert_close(masked_mse(garbage, target, real, layer, norm), base)
        assert base > 0 and masked_mse(target, target, real, layer, norm) == 0
    expected = ((pred - target) ** 2)[real].mean()
    torch.testing.assert_close(masked_mse(pred, target, real), expected)


def test_backbone_loss_backpropagates():
    cfg = ModelConfig.debug(token_size=24)
    model = Backbone(cfg)
    out = backbone_loss(model, _batch(cfg, B=4), LossConfig())
    out["loss"].backward()
    assert torch.isclose(out["loss"], 0.05 * out["ntx"] + 0.95 * (out["mse"] + out["stats_mse"]))
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_a_masked_token_is_not_a_constant_tensor():
    """A constant tensor standardizes to zeros; a masked token enters as the learned mask vector instead."""
    cfg = ModelConfig.debug(token_size=24)
    torch.manual_seed(0)
    model = Backbone(cfg).eval()
    with torch.no_grad():
        model.encoder.mask.normal_()
    batch = _batch(cfg)
    zeros = {**batch, "values": torch.zeros_like(batch["values"]), "stats": torch.zeros_like(batch["stats"])}
    masked = {**zeros, "masked": torch.ones(batch["n_valid"].shape, dtype=torch.bool)}
    assert not torch.allclose(model.embed(masked), model.embed(zeros))


def test_one_cycle_schedule_warms_up_then_anneals():
    from train.fit import lr_factor

    f = [lr_factor(s, total=100, warmup=0.3, schedule="onecycle") for s in range(101)]
    assert f[0] == pytest.approx(1 / 25) and f[30] == pytest.approx(1.0) and f[100] == pytest.approx(1e-4)
    assert all(a <= b for a, b in zip(f[:30], f[1:31], strict=True))
    assert all(a >= b for a, b in zip(f[30:-1], f[31:], strict=True))
    assert lr_factor(7, total=100, warmup=0.3, schedule="constant") == 1.0


def test_config_file_round_trip_and_clear_errors(tmp_path):
    cfg = TrainConfig.debug().replace(epochs=7, lr=2e-4, loss_norm="layer")
    (tmp_path / "c.json").write_text(cfg.to_json())
    assert TrainConfig.from_file(tmp_path / "c.json") == cfg
    (tmp_path / "c.toml").write_text('epochs = 3\nlr = 1e-3\ngrad_clip = 0\n[model]\nd_model = 64\nwindow = 8\n')
    toml = TrainConfig.from_file(tmp_path / "c.toml", base=TrainConfig.debug())
    assert (toml.epochs, toml.lr, toml.grad_clip, toml.model.d_model, toml.model.window) == (3, 1e-3, 0.0, 64, 8)
    assert toml.model.n_layers == ModelConfig.debug().n_layers and TrainConfig().grad_clip == 1.0
    bad = {"c1.toml": ("lrr = 1\n", "unknown key 'lrr'"), "c2.toml": ("[model]\nwidth = 3\n", "model: unknown key 'width'"),
           "c3.json": ('{"epochs": "ten"}', "epochs must be int"), "c4.toml": ("epochs = 0\n", "epochs must be >= 1"),
           "c5.toml": ("[model]\nd_model = 30\n", "multiple of 8"), "c6.json": ("{", "malformed")}
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(WildzooError, match=message):
            TrainConfig.from_file(tmp_path / name)
    assert train_cli(["fit", "--catalog", str(tmp_path), "--out", str(tmp_path / "run"),
                      "--config", str(tmp_path / "c1.toml")]) == 1


# ---------------------------------------------------------------- windows from the catalog

def test_tokens_are_standardized_per_tensor_and_windows_tile_every_token(zoo_catalog):
    _, cat_path = zoo_catalog
    cat = Catalog.open(str(cat_path))
    assert (cat.spec.tokenization, cat.spec.token_size) == ("row", 73)  # crawl zoo: row tokens, size auto
    refs = list_models(cat)
    assert len(refs) == 96 and {r.n_tokens for r in refs} == {54}  # one token per output unit: 8 + 16 + 20 + 10
    tokens = read_tokens(cat, refs[0].shard, [refs[0].model_id, refs[1].model_id])
    assert tokens.model_ids == [refs[0].model_id, refs[1].model_id] and list(tokens.offsets) == [0, 54, 108]
    # token 0 is row 0 of the first conv with its bias appended: each part standardized with its own tensor's statistics
    w = model_tensors(cat, refs[0].model_id)
    (wm, ws), (bm, bs) = connect(cat).execute(
        "SELECT norm_mean, norm_std FROM tensors WHERE model_id = ? AND tensor_idx IN (0, 1) ORDER BY tensor_idx",
        [refs[0].model_id]).fetchall()
    np.testing.assert_allclose(tokens.values[0, :9], (w["module_list.0.weight"][0].ravel() - wm) / ws, rtol=1e-5)
    np.testing.assert_allclose(tokens.values[0, 9], (w["module_list.0.bias"][0] - bm) / bs, rtol=1e-5, atol=1e-6)
    assert tokens.n_valid[0] == 10 and not tokens.values[0, 10:].any()
    model, start = tokens.windows(16)
    b = tokens.batch(model, start, 16)
    assert b["values"].shape == (8, 16, 73) and (b["n_valid"] > 0).sum() == 108  # every token exactly once
    np.testing.assert_allclose(tokens.stats[0, :2], [np.arcsinh(wm), np.log(ws)], rtol=1e-5)  # the scale is kept
    np.testing.assert_array_equal(b["n"][b["n_valid"] > 0], np.concatenate([np.arange(54)] * 2))


def test_per_layer_normalization_is_detected_and_keeps_scale_across_models(zoo_catalog):
    from train.normalize import Normalizer, fit_normalizer

    _, cat_path = zoo_catalog
    cat = Catalog.open(str(cat_path))
    everyone = list_models(cat)
    inits = dict(connect(cat).execute(
        "SELECT model_id, text FROM properties WHERE name = 'model::init_type'").fetchall())
    refs = [r for r in everyone if inits[r.model_id].startswith("kaiming")]
    norm = fit_normalizer(cat, refs)  # one architecture, one family of scales: tensors line up
    assert norm.mode == "per-layer" and sorted(norm.layer) == list(range(8)) and "line up" in norm.reason
    # with the raw U(0,1)/N(0,1) initializations, per-layer statistics would leave many tensors far off unit scale
    mixed = fit_normalizer(cat, everyone)
    assert mixed.mode == "per-tensor" and "orders of magnitude" in mixed.reason and not mixed.layer
    assert fit_normalizer(cat, everyone, "per-layer").mode == "per-layer"  # asked for, it is what it is
    assert Normalizer.from_dict(norm.to_dict()) == norm
    tokens = read_tokens(cat, refs[0].shard, [refs[0].model_id], norm)
    w = model_tensors(cat, refs[0].model_id)
    mu, sd = norm.layer[0]
    np.testing.assert_allclose(tokens.values[0, :9], np.clip((w["module_list.0.weight"][0].ravel() - mu) / sd, -10, 10),
                               rtol=1e-5, atol=1e-6)
    assert np.isfinite(tokens.stats).all() and abs(tokens.stats.mean()) < 1.0
    assert fit_normalizer(cat, refs, "per-tensor").mode == "per-tensor"


def _zoo_tokens(zoo_catalog, n_models: int):
    """The first `n_models` of the shared zoo catalog read for training (per-layer normalization, architectures
    known), and the behaviour of those architectures."""
    from train.behaviour import Behaviour, model_archs
    from train.data import read_models
    from train.normalize import fit_normalizer

    cat = Catalog.open(str(zoo_catalog[1]))
    refs = list_models(cat)[:n_models]
    arch_of = model_archs(cat, [r.model_id for r in refs])
    keys = sorted(set(arch_of.values()))
    tokens = read_models(cat, refs, fit_normalizer(cat, list_models(cat)), {m: keys.index(k) for m, k in arch_of.items()})
    return cat, tokens, Behaviour(keys, cat.spec.token_size)


def test_decoding_the_true_statistics_rows_gives_back_each_tensors_scale(zoo_catalog):
    """What generation de-normalizes with: the statistics rows, un-standardized and pooled per tensor, give
    back the mean and std that per-tensor normalization used (weights and packed biases)."""
    from train.data import read_models
    from train.normalize import decoded_scale, fit_normalizer

    cat = Catalog.open(str(zoo_catalog[1]))
    refs = list_models(cat)[:5]
    norm = fit_normalizer(cat, list_models(cat), "per-tensor")
    tokens = read_models(cat, refs, norm)
    model, start = tokens.windows(64)
    b = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tokens.batch(model, start, 64).items()
         if k != "plan"}
    got = decoded_scale(b["stats"], b, norm)
    real = b["n_valid"] > 0
    for k in ("mu", "sd"):
        torch.testing.assert_close(got[k][real], b[k][real], rtol=1e-4, atol=1e-6)
    has = b["has_bias"] & real & (b["bsd"] != 1)  # a constant bias (std 0) was normalized with σ = 1
    torch.testing.assert_close(got["bsd"][has], b["bsd"][has], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["bmu"][b["has_bias"] & real], b["bmu"][b["has_bias"] & real], rtol=1e-4, atol=1e-6)
    assert decoded_scale(b["stats"], b, fit_normalizer(cat, list_models(cat), "per-layer"))["mu"] is b["mu"]
    assert ModelConfig().n_stats == N_STATS == b["stats"].shape[-1]
    # a run whose statistics row is of another length (an older wildzoo's) is refused in one line, not misread
    old = {**norm.to_dict(), "stats_mu": list(norm.stats_mu[:11]), "stats_sd": list(norm.stats_sd[:11])}
    with pytest.raises(WildzooError, match="statistics row of 11 numbers"):
        Normalizer.from_dict(old)


def test_views_permute_hidden_units_and_carry_what_rebuilding_needs(zoo_catalog):
    from train.normalize import denormalize

    _, tokens, beh = _zoo_tokens(zoo_catalog, 6)
    assert all(p is not None for p in tokens.plans)
    model, start = tokens.windows(64, np.random.default_rng(0))
    b = tokens.batch(model, start, 64, np.random.default_rng(1), permute=1.0)
    assert (b["arch"] >= 0).all() and not np.allclose(b["values"], b["values2"])
    # the two views are the same functions: rebuilt, they give the same outputs on the query images
    t = {k: torch.from_numpy(v) for k, v in b.items()}
    groups = list(beh.groups(t))
    assert sum(len(sel) for _, sel, _ in groups) == len(model)
    for a, sel, sub in groups:
        one, two = (a.outputs(denormalize(t[k][sel], sub), beh.query) for k in ("values", "values2"))
        torch.testing.assert_close(one, two, atol=1e-4, rtol=1e-4)
    # and a view carries no behavioural loss against itself
    assert float(beh.loss(t["values"], t["values"], t)) == pytest.approx(0.0, abs=1e-6)


def test_batched_permutation_views_equal_the_window_by_window_gather(zoo_catalog):
    from train.data import decode_plan, permute_index, permute_views

    _, tokens, _ = _zoo_tokens(zoo_catalog, 6)
    model, start = tokens.windows(64, np.random.default_rng(0), views=3)
    b = tokens.batch(model, start, 64)
    b["plan"][::4] = 0  # windows without a plan stay as they are
    got = permute_views(b, 0.7, np.random.default_rng(5))
    rng, S = np.random.default_rng(5), b["values"].shape[-1]
    for key in ("values", "values2"):  # the reference: one window at a time, the same random stream
        want = b["values"].copy()
        for w in np.flatnonzero(rng.random(len(want)) < 0.7):
            plan = decode_plan(b["plan"][w])
            if plan is not None:
                tok, col = permute_index(plan, S, rng)
                want[w, : len(tok)] = b["values"][w, tok[:, None], col]
        np.testing.assert_array_equal(got[key], want)
    assert not np.array_equal(got["values"], b["values"]) and np.array_equal(got["values"][::4], b["values"][::4])


def test_behavioural_loss_reaches_the_backbone_and_weight_zero_is_the_old_loss(zoo_catalog):
    cat, tokens, beh = _zoo_tokens(zoo_catalog, 4)
    model_idx, start = tokens.windows(64, np.random.default_rng(0))
    batch = {k: torch.from_numpy(v) for k, v in tokens.batch(model_idx, start, 64, np.random.default_rng(1), 1.0).items()}
    cfg = ModelConfig.debug(token_size=cat.spec.token_size)

    def run(loss_cfg: LossConfig, behaviour) -> tuple[dict, Backbone]:
        torch.manual_seed(0)
        m = Backbone(cfg)
        torch.manual_seed(1)
        out = backbone_loss(m, batch, loss_cfg, behaviour)
        out["loss"].backward()
        return out, m

    with_b, m = run(LossConfig(behaviour=1.0), beh)
    assert with_b["behaviour"] > 0
    only_b, m = run(LossConfig(behaviour=1.0, gamma=0.0, stats_weight=0.0), beh)
    assert m.encoder.inp.weight.grad.abs().sum() > 0  # through decoder, de-normalization and the rebuilt nets
    off, _ = run(LossConfig(behaviour=0.0), beh)
    old, _ = run(LossConfig(), None)
    assert "behaviour" not in off and torch.equal(off["loss"], old["loss"])
    # the behaviour head (predicting the original's fingerprint from pooled latents) shares the originals' run
    cfg = dataclasses.replace(cfg, behaviour_queries=8)
    both, m = run(LossConfig(behaviour=1.0), beh)
    assert both["behaviour"] > 0 and both["behaviour_head"] > 0 and m.behaviour_head[0].weight.grad.abs().sum() > 0
    # the two views of a window (the second permuted) compute one function: running the originals of the first
    # half only (`twins`, what a training step does) gives the losses of running both
    two = {k: torch.cat([batch[k], batch["values2" if k == "values" else k]]) for k in batch if k != "values2"}
    target = two["values"]
    recon = target + 0.3 * torch.randn(target.shape, generator=torch.Generator().manual_seed(3))
    predicted = torch.rand(len(target), 4 + 10, generator=torch.Generator().manual_seed(4))
    full, once = (beh.losses(target, two, recon, predicted, twins=t) for t in (False, True))
    for k in ("behaviour", "behaviour_head"):
        assert float(full[k]) > 0
        torch.testing.assert_close(once[k], full[k], rtol=1e-4, atol=1e-5)


def test_ranks_take_equal_steps_and_the_split_holds_out_the_probe_models(zoo_catalog):
    from train.features import load_population
    from train.probe import group_split

    _, cat_path = zoo_catalog
    cat = Catalog.open(str(cat_path))
    refs = list_models(cat)
    train, held = split_models(cat, refs, seeds=0)
    pop = load_population(cat)
    s = group_split(pop.groups, 0)
    assert {r.group for r in held} == set(pop.groups[np.concatenate([s.val, s.test])])
    assert not {r.group for r in train} & {r.group for r in held} and len(train) + len(held) == 96
    # several probe seeds: every seed's test models are held out (validation models may be trained on)
    _, held5 = split_models(cat, refs, seeds=[0, 1, 2, 3, 4])
    tests = set().union(*(set(pop.groups[group_split(pop.groups, k).test]) for k in range(5)))
    assert {r.group for r in held5} == tests


def test_a_fit_plan_travels_as_plain_data_and_knows_its_split(zoo_catalog):
    """The plan a fit (and every trial of a sweep) trains on: the split, the normalizer and the architectures,
    made once on the driver; it survives to_dict/from_dict through JSON and refuses another split."""
    from train.plan import FitPlan, catalog_id, make_plan

    _, cat_path = zoo_catalog
    cat = Catalog.open(str(cat_path))
    cfg = TrainConfig.debug()
    plan = make_plan(cat, cfg)
    train, held = split_models(cat, list_models(cat), seeds=list(range(cfg.probe_seeds)))
    assert plan.train == tuple(train) and plan.held == tuple(held) and plan.catalog == catalog_id(cat)
    assert plan.split["train_models"] == len(train) and plan.split["held_out_models"] == len(held) > 0
    assert len(plan.arch_keys) >= 1 and set(plan.archs) == {r.model_id for r in [*train, *held]}
    back = FitPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan
    assert plan.matches(cat, cfg.split_seed, cfg.probe_seeds, cfg.holdout)
    assert not plan.matches(cat, cfg.split_seed + 1, cfg.probe_seeds, cfg.holdout)
    other = plan.renormalized(cat, "per-tensor")
    assert other.norm.mode == "per-tensor" and other.train == plan.train and other.archs == plan.archs


def test_models_longer_than_the_window_are_said_not_rebuilt_rather_than_scored_as_nan(zoo_catalog, caplog):
    """A window shorter than the zoo's models holds none whole, so none can be rebuilt and run: the plan warns with the
    window the models need, and the reconstruction report says accuracy kept was not measured (no NaN)."""
    from train.__main__ import reconstruction_line
    from train.behaviour import reconstruction_report
    from train.plan import make_plan

    _, cat_path = zoo_catalog
    cat = Catalog.open(str(cat_path))
    longest = max(r.n_tokens for r in list_models(cat))
    for window, warned in ((longest - 1, True), (longest, False)):
        cfg = TrainConfig.debug()
        cfg = cfg.replace(model=dataclasses.replace(cfg.model, window=window))
        caplog.clear()
        with caplog.at_level("WARNING", logger="train.plan"):
            plan = make_plan(cat, cfg)
        assert (f"set model.window >= {longest}" in caplog.text) is warned
    torch.manual_seed(0)
    model = Backbone(dataclasses.replace(ModelConfig.debug(cat.spec.token_size), window=longest - 1)).eval()
    held = list(plan.held)
    rec = reconstruction_report(model, cat, held, plan.norm, plan.archs, list(plan.arch_keys))
    assert rec["too_long"] == sum(r.n_tokens > longest - 1 for r in held) > 0 and rec["too_long_tokens"] <= longest
    assert rec.get("kept") is None and rec["mse_median"] > 0
    line = reconstruction_line(rec)
    assert "accuracy kept not measured" in line and f"window of {longest - 1}" in line and "nan" not in line


@pytest.mark.ray
def test_the_ray_data_stream_gives_every_rank_equal_steps_of_whole_model_windows(zoo_catalog, ray_session):
    """Windows from Ray Data, split 3 ways with equal=True (as TorchTrainer does): every rank takes the same
    number of full batches, windows never mix models, and a unit per shard holds whole models."""
    import threading

    from train.normalize import fit_normalizer
    from train.stream import data_config, units, window_collate, window_count, window_dataset

    _, cat_path = zoo_catalog
    cat = Catalog.open(str(cat_path))
    train, _ = split_models(cat, list_models(cat), seeds=0)
    us = units(train, unit_tokens=200)
    assert sum(len(u["model_ids"]) for u in us) == len(train) and len(us) > 1
    assert all(len(u["model_ids"]) == 1 or u["n_tokens"] <= 200 for u in us)
    norm = fit_normalizer(cat, train)
    ds = window_dataset(str(cat_path), train, window=16, norm=norm, archs={}, train=True, views=2, unit_tokens=200)
    ds.context.execution_options = data_config(1.0)._resolve_execution_options("train")
    expected = window_count(train, 16, 2)
    splits = ds.streaming_split(3, equal=True)
    counts, shapes, starts = [0] * 3, set(), []

    def drain(i: int) -> None:
        for b in splits[i].iter_torch_batches(batch_size=10, drop_last=True, local_shuffle_buffer_size=40,
                                              local_shuffle_seed=i, collate_fn=window_collate(1.0, i)):
            counts[i] += 1
            shapes.add(tuple(b["values2"].shape))
            # position n is the token index within its model: consecutive inside a window, never mixed
            real = b["n_valid"] > 0
            steps = torch.diff(b["n"], dim=1)[real[:, 1:]]
            starts.append(bool((steps == 1).all()))

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts == [expected // 3 // 10] * 3 and shapes == {(10, 16, 73)} and all(starts)


# ---------------------------------------------------------------- Ray Train fit, resume, embed, probe

@pytest.fixture(scope="module")
def fitted(zoo_catalog, tmp_path_factory):
    """A debug fit of 2 epochs with 2 Ray Train workers on CPU (gloo)."""
    from train.fit import fit

    _, cat = zoo_catalog
    run = tmp_path_factory.mktemp("runs") / "debug"
    summary = fit(str(cat), str(run), TrainConfig.debug().replace(workers=2))
    return cat, run, summary


@pytest.mark.ray
def test_debug_fit_on_two_workers_lowers_the_loss(fitted):
    _, run, s = fitted
    losses = [h["loss"] for h in s["history"]]
    assert s["start_epoch"] == 0 and len(losses) == 2 and losses[1] < losses[0]
    assert all(math.isfinite(h["val_loss"]) for h in s["history"])
    assert all(0 < h["val_rel_mse"] < 1.5 for h in s["history"])  # held-out error relative to predicting zeros
    meta = json.loads((run / "config.json").read_text())
    assert meta["epochs_trained"] == 2 and meta["split"]["held_out_models"] > 0
    from safetensors.torch import load_file

    Backbone(ModelConfig(**meta["config"]["model"])).load_state_dict(load_file(run / "model.safetensors"))
    assert list((run / "fit").glob("checkpoint_*"))
    # the test zoo holds raw U(0,1)/N(0,1)-initialized models: auto picks per-tensor and says why
    assert meta["norm"]["mode"] == "per-tensor" and "orders of magnitude" in meta["norm"]["reason"]
    rec = meta["reconstruction"]
    assert rec["rebuildable"] > 0 and rec["zeros_median"] > 0 and 0 < rec["mse_median"] and rec["kept_true"] is not None
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and {r["epoch"] for r in steps} == {1, 2}
    assert all(math.isfinite(r["loss"]) for r in steps) and (run / "loss_curve.png").stat().st_size > 1000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.ray
def test_the_behavioural_loss_joins_after_the_reconstruction_phase(zoo_catalog, tmp_path):
    """`behaviour_from`: the first epochs train on reconstruction alone, the behavioural loss joins after them."""
    from train.fit import fit

    _, cat = zoo_catalog
    cfg = TrainConfig.debug().replace(epochs=2, behaviour=0.1, behaviour_from=0.5, val_batches=0)
    s = fit(str(cat), str(tmp_path / "run"), cfg, reconstruction=False)
    assert [h["behaviour"] == 0 for h in s["history"]] == [True, False]
    assert s["history"][1]["behaviour"] > 0 and math.isfinite(s["history"][1]["loss"])
    with pytest.raises(ValueError, match="behaviour_from"):
        TrainConfig.debug().replace(behaviour_from=1.0)


@pytest.mark.ray
def test_rerun_with_more_epochs_resumes_from_the_checkpoint(fitted, capsys):
    cat, run, first = fitted
    assert train_cli(["fit", "--catalog", str(cat), "--out", str(run), "--debug", "--workers", "2",
                      "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "resumed after epoch 2" in out and "loss by epoch: 1:" in out
    meta = json.loads((run / "config.json").read_text())
    assert meta["epochs_trained"] == 3 and meta["run_id"] == first["run_id"]
    assert [h["loss"] for h in meta["history"][:2]] == [h["loss"] for h in first["history"]]
    # a different model in the same run folder is refused before any training
    assert train_cli(["fit", "--catalog", str(cat), "--out", str(run), "--epochs", "3"]) == 1
    assert "different model" in capsys.readouterr().err


@pytest.mark.ray
def test_embed_writes_one_row_per_ok_model(fitted, capsys):
    cat, run, _ = fitted
    assert train_cli(["embed", "--run", str(run), "--catalog", str(cat)]) == 0
    assert "embedded 96 models" in capsys.readouterr().out
    run_id = json.loads((run / "config.json").read_text())["run_id"]
    rows = connect(str(cat)).execute(
        """SELECT count(*), count(DISTINCT model_id), min(len(embedding)), max(len(embedding)),
                  (SELECT count(*) FROM models WHERE status = 'ok')
           FROM embeddings WHERE run = ?""", [run_id]).fetchone()
    assert rows == (96, 96, 64, 64, 96)  # 4 layers × 16 latent dims, pooled per layer
    assert connect(str(cat)).execute("SELECT min(len(embedding_mean)) FROM embeddings WHERE run = ?",
                                     [run_id]).fetchone() == (16,)
    # the Ray Data job (an actor pool over units of whole models) equals the driver-side embedding, model by model
    from train.embed import embed_models, load_backbone
    from train.normalize import Normalizer
    from train.run import RunDir

    catalog = Catalog.open(str(cat))
    refs = list_models(catalog)
    model, meta = load_backbone(RunDir.at(str(run)))
    driver, driver_mean = embed_models(model.eval(), catalog, refs, norm=Normalizer.from_dict(meta["norm"]),
                                       progress=False)
    stored = dict(connect(str(cat)).execute("SELECT model_id, embedding FROM embeddings WHERE run = ?",
                                            [run_id]).fetchall())
    stored_mean = dict(connect(str(cat)).execute("SELECT model_id, embedding_mean FROM embeddings WHERE run = ?",
                                                 [run_id]).fetchall())
    np.testing.assert_allclose(np.array([stored[r.model_id] for r in refs]), driver, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array([stored_mean[r.model_id] for r in refs]), driver_mean, rtol=1e-5, atol=1e-5)
    assert np.abs(driver).max() > 1e-3  # not a comparison of zeros
    assert train_cli(["embed", "--run", str(run / "nope"), "--catalog", str(cat)]) == 1


@pytest.mark.ray
def test_probe_with_a_run_prints_backbone_rows(fitted, capsys, tmp_path, monkeypatch):
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    from train import evaluate, probe

    # the heads, not the plumbing, cost minutes here: fewer boosting rounds, no W features
    monkeypatch.setattr(probe, "HistGradientBoostingRegressor",
                        lambda **kw: HistGradientBoostingRegressor(**{**kw, "max_iter": 10}))
    monkeypatch.setattr(probe, "HistGradientBoostingClassifier",
                        lambda **kw: HistGradientBoostingClassifier(**{**kw, "max_iter": 5}))
    monkeypatch.setattr(evaluate, "weight_features", lambda cat, ids: None)
    cat, run, _ = fitted
    assert train_cli(["probe", "--catalog", str(cat), "--run", str(run), "--out", str(tmp_path), "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    methods = [line.split("  ")[0] for line in out.splitlines()[3:]]
    for m in ("s(W) trees", "backbone ridge", "backbone trees", "backbone-mean ridge", "combined trees"):
        assert m in methods
    assert "(wins over s(W) trees per split in brackets)" in out and " ± " in out
    results = json.loads((tmp_path / "probe.json").read_text())["results"]
    backbone = [r for r in results if r["method"].startswith("backbone") and r["metric"] == "R2"]
    assert {r["property"] for r in backbone} == {"test_acc", "epoch", "ggap"} and {r["seed"] for r in backbone} == {0, 1}
    assert all(math.isfinite(r["value"]) for r in backbone)
    assert train_cli(["probe", "--catalog", str(cat), "--run", str(tmp_path / "missing")]) == 1


@pytest.mark.ray
def test_debug_loss_curve_matches_the_reference(zoo_catalog, tmp_path):
    """1 worker, debug flavour, seed 0, 3 epochs: the loss per epoch near the mean curve of 20 runs in tests/assets/.

    A fit is not bit-reproducible (the Ray Data stream draws a fresh unit and window order every epoch, so batches
    meet the step in another order), so each term is held to twice the largest deviation of one run from the mean
    that bench/loss_curve_spread.py measured over 20 runs (loss 1.6%, mse 0.1%, stats 8.1%, NT-Xent 18.6%, val
    1.9%), 5% at least. A fit that stops learning leaves them far behind: its statistics loss stays near epoch 1's
    (+30% at epoch 3), a broken contrastive loss near log(2B − 1) ≈ 3.4 (+79%)."""
    from modelfactory import REFERENCE_CURVE, reference_curve

    curve = reference_curve(zoo_catalog[1], tmp_path / "ref")
    ref = json.loads(REFERENCE_CURVE.read_text())
    rtol = {"loss": 0.05, "mse": 0.05, "stats_mse": 0.17, "ntx": 0.38, "val_loss": 0.05}
    for key, values in curve.items():
        np.testing.assert_allclose(values, ref[key], rtol=rtol[key], err_msg=f"{key} per epoch left the reference curve")
