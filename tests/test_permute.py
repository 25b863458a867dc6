"""Permutation views: the hidden units of a zoo CNN or MLP permuted in token space compute the same function."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catalog import tokenize as tk
from catalog.reassemble import tensors_from_tokens
from train.data import permutation_plan, permute_index
from zoo.models import build_model

PARAMS = {"model::channels_in": 1, "model::o_dim": 10, "model::nlin": "tanh", "model::init_type": "kaiming_uniform"}


def _rows_and_tokens(state: dict[str, torch.Tensor], token_size: int, tokenization: str = "row"):
    names = list(state)
    shapes = [tuple(v.shape) for v in state.values()]
    plan = tk.plan(names, shapes, [True] * len(names), tokenization, token_size)
    rows, blocks = [], []
    for i, (name, p) in enumerate(zip(names, plan, strict=True)):
        rows.append({"tensor_idx": i, "name": name, "shape": list(shapes[i]), "token_start": p.token_start,
                     "n_tokens": p.n_tokens, "packed_into": p.packed_into})
        if p.geometry is not None:
            bias = None if p.bias_idx is None else state[names[p.bias_idx]].numpy()
            blocks.append(tk.tokenize(state[name].numpy(), p.geometry, token_size, bias))
    return rows, np.concatenate(blocks)


@pytest.mark.parametrize("kind,dropout", [("CNN", 0.0), ("CNN", 0.1), ("MLP", 0.0)])
def test_permuted_model_computes_the_same_function(kind, dropout):
    torch.manual_seed(0)
    net = build_model({**PARAMS, "model::type": kind, "model::dropout": dropout}).eval()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    token_size = 73
    rows, tokens = _rows_and_tokens(state, token_size)
    plan = permutation_plan(rows, token_size)
    assert plan is not None and len(plan) == (4 if kind == "CNN" else 2)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = net(x)
    src_tok, src_col = permute_index(plan, token_size, np.random.default_rng(3))
    assert not np.array_equal(src_tok, np.arange(len(src_tok)))  # something moved
    permuted = tokens[src_tok[:, None], src_col]
    rebuilt = tensors_from_tokens(rows, permuted, "row", token_size)
    assert any(not np.array_equal(rebuilt[k], state[k].numpy()) for k in state)  # other weights...
    net.load_state_dict({k: torch.from_numpy(v) for k, v in rebuilt.items()})
    with torch.no_grad():
        after = net(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)  # ...the same function


def test_only_known_layouts_are_permutable():
    torch.manual_seed(0)
    state = build_model({**PARAMS, "model::type": "CNN", "model::dropout": 0.0}).state_dict()
    rows, _ = _rows_and_tokens(state, 73)
    assert permutation_plan(rows, 73) is not None
    assert permutation_plan(_rows_and_tokens(state, 32)[0], 32) is None  # rows split over several tokens
    assert permutation_plan(_rows_and_tokens(state, 256, "dense")[0], 256) is None
    norm = {**state, "norm.weight": torch.ones(10)}  # a 1-D tensor that no weight carries: not a plain chain
    assert permutation_plan(_rows_and_tokens(norm, 73)[0], 73) is None
