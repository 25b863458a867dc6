"""Behaviour: zoo models rebuilt from (reconstructed) tokens and run on a fixed query batch of digits.

The behavioural loss ("Structure is not enough", ICLR'25 WSL) compares what a model reconstructed from
the decoder's tokens computes with what the original computes, on the same fixed query images:
KL divergence of their softmax outputs at temperature T (T² · KL, so its gradient scale does not
depend on T). A model can be rebuilt only where its architecture is known: the lab zoo's CNNs and MLPs,
named by their `model::type`, `model::nlin`, `model::channels_in` and `model::o_dim` properties, whose
row tokens are one token per output unit. Rebuilding de-normalizes the tokens (value · σ + μ of the
tensor, or of the packed bias in its column) and runs the canonical network (no dropout) functionally,
vmapped over every window of one architecture at once (`torch.func.functional_call`).
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from catalog import tokenize as tk
from catalog.query import connect
from catalog.store import Catalog
from train.data import Layer, permutation_plan
from train.normalize import decoded_scale, denormalize

log = logging.getLogger(__name__)
ARCH_KEYS = ("model::type", "model::nlin", "model::channels_in", "model::o_dim")
N_QUERY = 128


KINDS = {"CNN": ("CNN", "CNN-s"), "MLP": ("MLP",), "CNN-s": ("CNN-s",)}  # `model::type` -> candidate networks


def arch_properties(key: str) -> dict[str, str | int]:
    """The zoo properties (ARCH_KEYS) an architecture key `kind/nlin/channels_in/o_dim` stands for."""
    kind, nlin, cin, odim = key.split("/")
    return {"model::type": kind, "model::nlin": nlin, "model::channels_in": int(cin), "model::o_dim": int(odim)}


@functools.lru_cache(maxsize=64)
def canonical_net(key: str) -> torch.nn.Module:
    """The canonical network of an architecture key `kind/nlin/channels_in/o_dim` (no dropout, eval mode)."""
    from zoo.models import build_model

    net = build_model({**arch_properties(key), "model::dropout": 0.0, "model::init_type": "kaiming_uniform"})
    return net.eval().requires_grad_(False)


def input_shape(key: str) -> tuple[int, int, int]:
    """(channels, height, width) the architecture `key` takes."""
    from zoo.models import INPUT_SIZE

    kind, _, cin, _ = key.split("/")
    return int(cin), INPUT_SIZE[kind], INPUT_SIZE[kind]


def recognize(props: dict[str, str], shapes: list[tuple[int, ...]]) -> str | None:
    """The architecture key of a model with properties `props` (ARCH_KEYS) and float tensor shapes `shapes`
    (in tensor order), or None. The one place architectures are recognized: the properties name the family
    and activation, the shapes pick the network (the Model Zoos' 28×28 "CNN (s)" and the lab's 8×8 CNN both
    say `CNN`); layers go by order, since a checkpoint's names shift with dropout."""
    if any(props.get(k) is None for k in ARCH_KEYS):
        return None
    for kind in KINDS.get(props["model::type"], ()):
        key = "/".join([kind, *(props[k] for k in ARCH_KEYS[1:])])
        try:
            net = canonical_net(key)
        except (ValueError, KeyError):
            return None
        if [tuple(v.shape) for v in net.state_dict().values()] == [tuple(x) for x in shapes]:
            return key
    return None


def model_archs(cat: Catalog, model_ids: list[str]) -> dict[str, str]:
    """{model_id: architecture key} for the models of `model_ids` whose architecture is known (`recognize`)."""
    con = connect(cat, tables=("properties", "tensors"))
    con.execute("CREATE TEMP TABLE chosen (model_id VARCHAR)")
    con.executemany("INSERT INTO chosen VALUES (?)", [[m] for m in model_ids])
    rows = con.execute(
        f"""SELECT model_id, name, coalesce(text, CAST(CAST(value AS BIGINT) AS VARCHAR)) FROM properties
            JOIN chosen USING (model_id) WHERE name IN ({", ".join("?" * len(ARCH_KEYS))})""",
        list(ARCH_KEYS)).fetchall()
    found: dict[str, dict[str, str]] = {}
    for mid, name, text in rows:
        found.setdefault(mid, {})[name] = text
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for mid, shape in con.execute(
            """SELECT model_id, shape FROM tensors JOIN chosen USING (model_id)
               WHERE std IS NOT NULL ORDER BY model_id, tensor_idx""").fetchall():
        shapes.setdefault(mid, []).append(tuple(shape))
    out = {}
    for m, p in found.items():
        key = recognize(p, shapes.get(m, []))
        if key is not None:
            out[m] = key
    return out


@dataclass
class Arch:
    """One known architecture: its canonical network and where each parameter sits in its row tokens."""

    key: str
    net: torch.nn.Module
    layers: list[Layer]
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]]  # (weight shape, bias shape) per layer
    names: list[tuple[str, str]]  # parameter names (weight, bias) per layer

    def params(self, raw: Tensor) -> dict[str, Tensor]:
        """Batched parameters (G, ...) from de-normalized tokens (G, T, S) laid out as this architecture."""
        out = {}
        for layer, (ws, bs), (wn, bn) in zip(self.layers, self.shapes, self.names, strict=True):
            rows = raw[:, layer.start: layer.start + layer.rows]  # (G, rows, S)
            out[wn] = rows[..., : layer.width].reshape(raw.shape[0], *ws)
            out[bn] = rows[..., layer.width].reshape(raw.shape[0], *bs)
        return out

    def outputs(self, raw: Tensor, x: Tensor) -> Tensor:
        """Logits (G, Q, C) of G models (de-normalized tokens (G, T, S)) on the query images x (Q, ...)."""
        def run(p: dict[str, Tensor]) -> Tensor:
            return torch.func.functional_call(self.net, p, (x,))

        return torch.func.vmap(run)(self.params(raw))


def build_arch(key: str, token_size: int) -> Arch | None:
    """The canonical zoo network of `key`, or None where it is unknown or its rows do not fit one token."""
    try:
        net = copy.deepcopy(canonical_net(key))
    except (ValueError, KeyError):
        return None
    state = net.state_dict()
    names, shapes = list(state), [tuple(v.shape) for v in state.values()]
    plan = tk.plan(names, shapes, [True] * len(names), "row", token_size)
    rows = [{"tensor_idx": i, "shape": list(shapes[i]), "token_start": p.token_start, "n_tokens": p.n_tokens,
             "packed_into": p.packed_into} for i, p in enumerate(plan)]
    layers = permutation_plan(rows, token_size)
    if layers is None or any(p.geometry is not None and p.bias_idx is None for p in plan):
        return None
    carriers = [i for i, p in enumerate(plan) if p.geometry is not None]
    return Arch(key, net, layers, [(shapes[i], shapes[plan[i].bias_idx]) for i in carriers],
                [(names[i], names[plan[i].bias_idx]) for i in carriers])


_DENORM = ("has_bias", "n_valid", "mu", "sd", "bmu", "bsd")  # what de-normalizing a window needs


class Behaviour:
    """Behavioural losses for windows whose `arch` (B,) names one of `keys` (−1: not rebuildable)."""

    def __init__(self, keys: list[str], token_size: int, temperature: float = 2.0, n_query: int = N_QUERY,
                 n_head: int = N_QUERY) -> None:
        from zoo.data import load_digits_split

        # the query images are digits (8x8): architectures of other inputs are not rebuilt for this loss
        self.archs = {i: a for i, k in enumerate(keys)
                      if input_shape(k)[1:] == (8, 8) and (a := build_arch(k, token_size)) is not None}
        self.temperature = temperature
        self.n_head = n_head  # query images the head's target fingerprint is taken on
        self.query = load_digits_split()[0][:n_query]  # the first digits training images, fixed

    def to(self, device: torch.device) -> Behaviour:
        self.query = self.query.to(device)
        for a in self.archs.values():
            a.net.to(device)
        return self

    def groups(self, batch: dict[str, Tensor]) -> Iterator[tuple[Arch, Tensor, dict[str, Tensor]]]:
        """(architecture, window indices, what de-normalizing them needs) per architecture present in `batch`."""
        for i, a in self.archs.items():
            sel = torch.nonzero(batch["arch"] == i).flatten()
            if len(sel):
                yield a, sel, {k: batch[k][sel] for k in _DENORM}

    def _kl(self, got: Tensor, want: Tensor) -> Tensor:
        """Σ over G models of T²·KL(want ‖ got) of softmax outputs at temperature T, averaged over queries."""
        T = self.temperature
        kl = F.kl_div(F.log_softmax(got.float() / T, -1), F.log_softmax(want.float() / T, -1), log_target=True,
                      reduction="none")
        return (T * T) * kl.sum(-1).mean(-1).sum()

    def losses(self, target: Tensor, batch: dict[str, Tensor], recon: Tensor | None = None,
               predicted: Tensor | None = None, twins: bool = False) -> dict[str, Tensor]:
        """Behavioural losses averaged over rebuildable windows, the originals (`target`, normalized values
        (B, T, S)) run once for both: `behaviour`, the model rebuilt from `recon` (B, T, S) against the
        original; `behaviour_head`, the MSE between the fingerprint the behaviour head predicts (`predicted`
        (B, 4 + C)) and the original's on the query images (`train.fingerprint.head_target`; a permuted view
        computes the same function, so both views share it). `twins`: the second half of the batch holds the same
        models as the first (two views of each window): the originals are run on the first half only (~5% of a
        `small` step saved). Each is zero, attached to the graph, when no
        window qualifies (DDP needs a gradient)."""
        from train.fingerprint import head_target

        sums = {name: x.sum() * 0.0 for name, x in (("behaviour", recon), ("behaviour_head", predicted))
                if x is not None}
        count = 0
        half = len(batch["arch"]) // 2 if twins else 0
        for a, sel, sub in self.groups(batch):
            first = sel[sel < half]
            with torch.no_grad():
                if twins and torch.equal(sel[len(first):], first + half):  # the originals of the twins run once
                    g = len(first)
                    want = a.outputs(denormalize(target[first], {k: v[:g] for k, v in sub.items()}), self.query)
                    want = torch.cat([want, want])
                else:
                    want = a.outputs(denormalize(target[sel], sub), self.query)  # (G, Q, C)
            if recon is not None:
                sums["behaviour"] = sums["behaviour"] + self._kl(a.outputs(denormalize(recon[sel], sub), self.query), want)
            if predicted is not None:
                fp = head_target(want[:, : self.n_head])
                sums["behaviour_head"] = sums["behaviour_head"] + ((predicted[sel].float() - fp) ** 2).mean(-1).sum()
            count += len(sel)
        return {name: total / max(count, 1) for name, total in sums.items()}

    def loss(self, recon: Tensor, target: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """T²·KL(original ‖ rebuilt) of softmax outputs at temperature T, averaged over rebuildable windows."""
        return self.losses(target, batch, recon=recon)["behaviour"]


def accuracy(a: Arch, raw: Tensor, x: Tensor, y: Tensor) -> np.ndarray:
    """Test accuracy (G,) of G models given as de-normalized tokens (G, T, S)."""
    with torch.no_grad():
        return (a.outputs(raw, x).argmax(-1) == y).float().mean(-1).cpu().numpy()


# one part of the statistics decoded, the rest true (`reconstruction_report(ablation=True)`): where decoded ones lose
ABLATION = {"weight means decoded": ("mu",), "weight stds decoded": ("sd",), "bias mean and std decoded": ("bmu", "bsd")}


def too_long(refs: list, archs: dict[str, int], window: int) -> list:
    """The models of `refs` of a known architecture with more tokens than `window`: no window holds one whole, so none
    is rebuilt and run (no behavioural loss, no behaviour-head target, no accuracy kept, no sampling)."""
    return [r for r in refs if r.model_id in archs and r.n_tokens > window]


def too_long_line(count: int, longest: int, window: int) -> str:
    """What `too_long` found, said once for the fit's warning and the reconstruction report."""
    return (f"{count} model(s) of a known architecture have more tokens (up to {longest}) than the window of {window}: "
            f"none is rebuilt or run (no behavioural loss, behaviour head or accuracy kept for them); "
            f"set model.window >= {longest}")


@torch.no_grad()
def reconstruction_report(model: torch.nn.Module, cat: Catalog, refs: list, norm, archs: dict[str, int],
                          keys: list[str], batch_size: int = 64, min_acc: float = 0.5, ablation: bool = False) -> dict:
    """How well `model` (a Backbone, eval mode) rebuilds the models of `refs` (held out from training).

    Each model is encoded and decoded whole (no noise, no masking). Per model: the reconstruction MSE of its
    normalized values (real entries) and that of predicting zeros (the mean, in normalized space), reported
    as median and mean over models and as R² = 1 − Σ error / Σ zeros-error. Models of a known architecture
    are de-normalized twice — with their true statistics (`true`) and with the decoded statistics row
    (`decoded`: what generation has, `decoded_scale`) — loaded into the architecture and scored on the
    digits test split next to the original (its own tokens through the same normalization: identical but for
    entries beyond ±CLIP σ): mean accuracies, and the mean ratio rebuilt/original over the models whose
    original accuracy ≥ min_acc (`kept`, `kept_true`). With `ablation` (and decoded statistics), also `kept_parts`:
    the same ratio with one part of the statistics decoded at a time (`ABLATION`). A model with more tokens than the
    window is not rebuilt whole: counted in `too_long` (its MSE still counts).
    """
    from train.data import tiled_batches
    from train.fingerprint import HEAD_SUMMARIES, head_target
    from zoo.data import load_digits_split

    S = model.cfg.token_size
    behaviour = Behaviour(keys, S, n_head=model.cfg.behaviour_queries or N_QUERY)
    long = too_long(refs, archs, model.cfg.window)
    fp_true, fp_pred = [], []
    _, _, x_test, y_test = load_digits_split()
    err = np.zeros(len(refs))
    zero = np.zeros(len(refs))
    count = np.zeros(len(refs))
    row_of = {r.model_id: i for i, r in enumerate(refs)}
    orig, rebuilt, decoded = [], [], []
    parts: dict[str, list] = {name: [] for name in ABLATION}
    for ids, models, arrays in tiled_batches(cat, refs, model.cfg.window, batch_size, norm=norm, archs=archs):
        batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        latent = model.encode(batch)
        out = model.decode(latent, batch).float()
        predicted = model.behaviour_head(model.pool(latent, batch)) if model.behaviour_head is not None else None
        recon = out[..., :S]
        real = torch.arange(S) < batch["n_valid"][..., None]
        rows = np.array([row_of[ids[m]] for m in models])
        np.add.at(err, rows, (((recon - batch["values"]) ** 2) * real).sum((1, 2)).double().numpy())
        np.add.at(zero, rows, ((batch["values"] ** 2) * real).sum((1, 2)).double().numpy())
        np.add.at(count, rows, real.sum((1, 2)).double().numpy())
        dec = decoded_scale(out[..., S:], batch, norm) if out.shape[-1] > S else None
        for a, sel, sub in behaviour.groups(batch):
            if predicted is not None:
                fp_true.append(head_target(a.outputs(denormalize(batch["values"][sel], sub),
                                                     behaviour.query[: behaviour.n_head])).numpy())
                fp_pred.append(predicted[sel].float().numpy())
            orig.append(accuracy(a, denormalize(batch["values"][sel], sub), x_test, y_test))
            rebuilt.append(accuracy(a, denormalize(recon[sel], sub), x_test, y_test))
            if dec is not None:
                dsub = {**sub, **{k: v[sel] for k, v in dec.items()}}
                decoded.append(accuracy(a, denormalize(recon[sel], dsub), x_test, y_test))
                for name, which in ABLATION.items() if ablation else ():
                    mixed = {**sub, **{k: dec[k][sel] for k in which}}
                    parts[name].append(accuracy(a, denormalize(recon[sel], mixed), x_test, y_test))
    per_model = err / np.maximum(count, 1)
    zeros = zero / np.maximum(count, 1)
    out = {"models": len(refs), "mse": float(err.sum() / max(count.sum(), 1.0)),
           "mse_median": float(np.median(per_model)) if len(refs) else None,
           "mse_mean": float(per_model.mean()) if len(refs) else None,
           "zeros_median": float(np.median(zeros)) if len(refs) else None,
           "zeros_mean": float(zeros.mean()) if len(refs) else None,
           "r2": float(1 - err.sum() / zero.sum()) if zero.sum() > 0 else None,
           "norm": getattr(norm, "mode", None), "window": model.cfg.window, "too_long": len(long),
           "too_long_tokens": max((r.n_tokens for r in long), default=0)}
    if fp_true:  # how well the behaviour head predicts the true fingerprint of held-out models, per summary
        t, p = np.concatenate(fp_true), np.concatenate(fp_pred)
        r2 = 1 - ((t - p) ** 2).sum(0) / np.maximum(((t - t.mean(0)) ** 2).sum(0), 1e-12)
        out["head_r2"] = {**{k: float(v) for k, v in zip(HEAD_SUMMARIES, r2, strict=False)},
                          "class_probs": float(r2[len(HEAD_SUMMARIES):].mean())}
    if orig:
        o, r = np.concatenate(orig), np.concatenate(rebuilt)
        d = np.concatenate(decoded) if decoded else r
        good = o >= min_acc
        out.update(rebuildable=int(len(o)), orig_acc=float(o.mean()), rebuilt_acc=float(d.mean()),
                   rebuilt_acc_true=float(r.mean()), good=int(good.sum()), min_acc=min_acc,
                   kept=float((d[good] / o[good]).mean()) if good.any() else None,
                   kept_true=float((r[good] / o[good]).mean()) if good.any() else None)
        if good.any() and all(parts.values()):
            out["kept_parts"] = {k: float((np.concatenate(v)[good] / o[good]).mean()) for k, v in parts.items()}
    return out
