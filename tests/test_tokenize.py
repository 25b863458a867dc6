"""Tokenization (dense and row) and its exact inverse; roles; statistics."""

from __future__ import annotations

import numpy as np
import pytest

from catalog import tokenize as tk
from catalog.roles import assign_roles
from catalog.stats import tensor_stats


def _roundtrip(names, shapes, tokenization, ts, seed=0):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    plan = tk.plan(names, shapes, [True] * len(names), tokenization, ts)
    toks = [tk.tokenize(xs[i], p.geometry, ts, None if p.bias_idx is None else xs[p.bias_idx])
            for i, p in enumerate(plan) if p.geometry]
    values = np.concatenate(toks)
    assert values.shape == (sum(p.n_tokens for p in plan), ts)
    for i, p in enumerate(plan):
        if p.geometry is None:
            continue
        assert np.array_equal(values[p.token_start : p.token_start + p.n_tokens], toks[sum(
            1 for q in plan[:i] if q.geometry)])
        w, b = tk.detokenize(values[p.token_start : p.token_start + p.n_tokens], shapes[i], p.geometry,
                             p.bias_idx is not None)
        assert np.array_equal(w, xs[i])
        if b is not None:
            assert np.array_equal(b, xs[p.bias_idx])
    return plan, values


def test_dense_counts_and_padding():
    plan, values = _roundtrip(["a.weight", "a.bias", "s"], [(5, 3, 2, 2), (5,), ()], "dense", 7)
    assert [p.n_tokens for p in plan] == [9, 1, 1]  # ceil(60/7), ceil(5/7), 1
    g = plan[0].geometry
    row_idx, n_valid = tk.positions(g, 7, "dense")
    assert list(n_valid) == [7] * 8 + [4] and list(row_idx) == list(range(9))
    assert np.all(values[8, 4:] == 0)


def test_row_packs_bias_as_last_column():
    names, shapes = ["conv.weight", "conv.bias", "ln.weight", "fc.weight"], [(4, 3, 2, 2), (4,), (6,), (2, 10)]
    plan, values = _roundtrip(names, shapes, "row", 5)
    # conv: 4 rows of 12+1=13 values → 3 chunks each; bias packed; ln: one row of 6 → 2; fc: 2 rows of 10 → 2 each
    assert [p.n_tokens for p in plan] == [12, 0, 2, 4]
    assert plan[1].packed_into == 0 and plan[0].bias_idx == 1
    row_idx, n_valid = tk.positions(plan[0].geometry, 5, "row")
    assert list(row_idx) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert list(n_valid) == [5, 5, 3] * 4


@pytest.mark.parametrize("tokenization", ["dense", "row"])
@pytest.mark.parametrize("ts", [1, 3, 64, 289])
def test_roundtrip_is_bit_exact(tokenization, ts):
    names = ["e.weight", "l.weight", "l.bias", "n.weight", "n.bias", "c.weight", "c.bias", "x", "empty"]
    shapes = [(11, 7), (9, 11), (9,), (7,), (7,), (3, 2, 3, 3), (3,), (), (0, 4)]
    _roundtrip(names, shapes, tokenization, ts)


def test_stats_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(10_001).astype(np.float32)
    x[:100] = 0
    s = tensor_stats(x)
    x64 = x.astype(np.float64)
    assert s["mean"] == pytest.approx(x64.mean(), abs=1e-12)
    assert s["std"] == pytest.approx(x64.std(), rel=1e-10)
    assert s["l2"] == pytest.approx(np.linalg.norm(x64), rel=1e-10)
    assert s["q25"] == pytest.approx(np.quantile(x64, 0.25)) and s["q99"] == pytest.approx(np.quantile(x64, 0.99))
    assert s["sparsity"] == pytest.approx(100 / 10_001)
    assert (s["min"], s["max"]) == (float(x.min()), float(x.max()))
    assert tensor_stats(np.zeros(5, np.float32))["norm_std"] == 1.0


def test_every_statistic_equals_numpys_on_a_minilm_sized_table_whose_columns_differ():
    """30522 × 384 (11.7M values, sentence-transformers MiniLM's word embeddings): even and odd columns differ, so
    a strided sample would land on some columns only (the old q50 was about -1 here). Every statistic equals
    numpy's on float64; the quantiles exactly."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((30522, 384)) * 0.05 + np.tile([-1.0, 1.0], 192)).astype(np.float32)
    x[::97, ::5] = 0
    s = tensor_stats(x)
    x64 = x.reshape(-1).astype(np.float64)
    exact = np.quantile(x64, [0.01, 0.25, 0.5, 0.75, 0.99])
    assert [s[k] for k in ("q01", "q25", "q50", "q75", "q99")] == list(exact)
    assert abs(s["q50"]) < 0.2
    want = {"mean": x64.mean(), "std": x64.std(), "min": x64.min(), "max": x64.max(), "l2": np.sqrt(np.dot(x64, x64)),
            "sparsity": np.count_nonzero(x64 == 0) / x64.size}
    for k, v in want.items():
        assert s[k] == pytest.approx(v, rel=1e-6, abs=1e-12), k
    x[5, 7] = np.nan  # NaN anywhere: NaN quantiles, as np.quantile
    assert np.isnan(tensor_stats(x)["q50"])


def test_stats_chunked_equals_whole(monkeypatch):
    import catalog.stats as st

    x = (np.random.default_rng(2).standard_normal(5000) * 3 + 100).astype(np.float32)
    whole = st.tensor_stats(x)
    monkeypatch.setattr(st, "CHUNK", 333)
    chunked = st.tensor_stats(x)
    for k in ("mean", "std", "l2"):
        assert chunked[k] == pytest.approx(whole[k], rel=1e-12)


ROLE_CASES = {
    # BERT
    "bert.embeddings.word_embeddings.weight": ((30522, 768), "embedding"),
    "bert.embeddings.position_embeddings.weight": ((512, 768), "position_embedding"),
    "bert.embeddings.LayerNorm.weight": ((768,), "norm"),
    "bert.encoder.layer.0.attention.self.query.weight": ((768, 768), "attn_q"),
    "bert.encoder.layer.0.attention.self.key.weight": ((768, 768), "attn_k"),
    "bert.encoder.layer.0.attention.self.value.weight": ((768, 768), "attn_v"),
    "bert.encoder.layer.0.attention.self.value.bias": ((768,), "bias"),
    "bert.encoder.layer.0.attention.output.dense.weight": ((768, 768), "attn_o"),
    "bert.encoder.layer.0.output.dense.weight": ((768, 3072), "linear"),
    "bert.encoder.layer.0.output.LayerNorm.bias": ((768,), "norm"),
    # GPT-2
    "h.0.attn.c_attn.weight": ((768, 2304), "attn_qkv"),
    "h.0.attn.c_proj.weight": ((768, 768), "attn_o"),
    "h.0.mlp.c_fc.weight": ((768, 3072), "linear"),
    "h.0.ln_1.weight": ((768,), "norm"),
    "wte.weight": ((50257, 768), "embedding"),
    "wpe.weight": ((1024, 768), "position_embedding"),
    # ViT
    "vit.embeddings.cls_token": ((1, 1, 768), "embedding"),
    "vit.embeddings.patch_embeddings.projection.weight": ((768, 3, 16, 16), "conv"),
    "vit.encoder.layer.0.layernorm_before.weight": ((768,), "norm"),
    "vit.encoder.layer.0.attention.attention.query.weight": ((768, 768), "attn_q"),
    # ResNet
    "conv1.weight": ((64, 3, 7, 7), "conv"),
    "bn1.weight": ((64,), "norm"),
    "bn1.running_var": ((64,), "norm_stat"),
    "layer1.0.downsample.1.weight": ((64,), "norm"),
    "layer1.0.downsample.1.bias": ((64,), "norm"),
    "fc.weight": ((1000, 512), "linear"),
    "fc.bias": ((1000,), "bias"),
    # Llama
    "model.embed_tokens.weight": ((32000, 4096), "embedding"),
    "model.layers.0.self_attn.q_proj.weight": ((4096, 4096), "attn_q"),
    "model.layers.0.self_attn.o_proj.weight": ((4096, 4096), "attn_o"),
    "model.layers.0.mlp.down_proj.weight": ((4096, 11008), "linear"),
    "model.layers.0.post_attention_layernorm.weight": ((4096,), "norm"),
    "lm_head.weight": ((32000, 4096), "linear"),
}


def test_roles_on_real_layer_names():
    names = list(ROLE_CASES)
    tensors = [(n, ROLE_CASES[n][0], "F32") for n in names]
    tensors.append(("bn1.num_batches_tracked", (), "I64"))
    roles = assign_roles(tensors)
    assert dict(zip(names, roles[:-1], strict=True)) == {n: r for n, (_, r) in ROLE_CASES.items()}
    assert roles[-1] == "norm_stat"
    assert assign_roles([("mask", (4,), "BOOL")]) == ["int"]
