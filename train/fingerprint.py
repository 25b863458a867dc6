"""Behaviour fingerprints: every model of a known architecture run on fixed probe inputs, summarized.

What a model computes predicts its properties better than its weight statistics do (SCIENCE.md: s(W) ⊕
output summaries beat s(W) on accuracy, epoch and generalization gap; ProbeGen, ICLR'25). For every model
whose architecture `train.behaviour.model_archs` recognizes, the weights are rebuilt exactly from the
catalog's tokens (`catalog.reassemble`), loaded into the canonical network by tensor order, and run —
all models of one architecture at once (`torch.func.functional_call` + `vmap`) — on each probe set:

- `digits`: the first 128 images of the digits training split, unlabeled (only for 8×8 one-channel inputs,
  where the product has the data; never a label, never a test image);
- `noise`: 64 uniform-noise images in the data's range [0, 1];
- `smooth`: 64 smoothed-noise images (a structured synthetic family, for zoos whose data wildzoo lacks);
- `npy-<hash>`: images a user hands over as an `.npy` array (loaded with `allow_pickle=False`).

Per model and probe set, one row of the `behaviour` table: mean max-probability, mean entropy, mean top-1 −
top-2 margin, mean logit norm, the outputs' sensitivity to 10% multiplicative weight noise (mean total
variation between the softmax of w and of w·(1 + 0.1ε), a fixed ε), the per-class mean probability, and
the softmax on the first `N_RAW` probes (a compact block of raw outputs). Rows are appended as shards
`behaviour/<id>.parquet`; a rerun computes only the (model, probe set) pairs that are missing. A model of
an unknown architecture has no row, and no error.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from catalog.errors import WildzooError
from catalog.query import connect
from catalog.reassemble import tensors_from_tokens
from catalog.store import Catalog

log = logging.getLogger(__name__)
N_DIGITS, N_NOISE, N_SMOOTH, N_RAW = 128, 64, 64, 16
NOISE_SCALE = 0.1  # relative weight noise of the sensitivity summary
SUMMARIES = ("max_prob", "entropy", "margin", "logit_norm", "sensitivity")
CHUNK = 256  # models per forward pass
LOGIT_CLIP = 1e4  # diverged models (weights in the thousands) give huge logits: clipped, never inf/NaN


def probe_sets(input_shape: tuple[int, ...], user: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """The probe inputs of an architecture whose input is `input_shape` (C, H, W): digits + noise where the
    product has the data (8×8, one channel), noise + smoothed noise otherwise; a user's `.npy` array
    (N, C, H, W) or (N, H, W) replaces the data set when given and its shape fits."""
    g = torch.Generator().manual_seed(20251203)
    noise = torch.rand((N_NOISE, *input_shape), generator=g)
    sets: dict[str, torch.Tensor] = {}
    if user is not None:
        x = torch.from_numpy(np.ascontiguousarray(user, dtype=np.float32))
        if x.dim() == len(input_shape):
            x = x.unsqueeze(1)
        if tuple(x.shape[1:]) == tuple(input_shape):
            sets[f"npy-{hashlib.sha256(x.numpy().tobytes()).hexdigest()[:8]}"] = x
    if not sets and tuple(input_shape) == (1, 8, 8):
        from zoo.data import load_digits_split

        sets["digits"] = load_digits_split()[0][:N_DIGITS]
    sets["noise"] = noise
    if len(sets) == 1:  # no data: a structured synthetic family beside the noise
        raw = torch.rand((N_SMOOTH, *input_shape), generator=g)
        k = max(3, (min(input_shape[-2:]) // 4) | 1)
        smooth = F.avg_pool2d(raw, k, stride=1, padding=k // 2, count_include_pad=False)
        lo = smooth.amin(dim=(1, 2, 3), keepdim=True)
        hi = smooth.amax(dim=(1, 2, 3), keepdim=True)
        sets["smooth"] = (smooth - lo) / (hi - lo).clamp_min(1e-6)
    return sets


def load_user_probes(path: str) -> np.ndarray:
    """Images from an `.npy` file, without pickle: (N, H, W) or (N, C, H, W), finite floats."""
    p = Path(path)
    if not p.is_file():
        raise WildzooError(f"--probes {path}: no such file")
    try:
        x = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise WildzooError(f"--probes {path}: not a plain .npy array ({e})") from None
    if x.ndim not in (3, 4) or not np.issubdtype(x.dtype, np.number) or not len(x):
        raise WildzooError(f"--probes {path}: expected images (N, H, W) or (N, C, H, W), got {x.dtype} {x.shape}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise WildzooError(f"--probes {path}: holds NaN or infinite values")
    return x


def _clean(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.nan_to_num(logits.to(dtype), nan=0.0, posinf=LOGIT_CLIP, neginf=-LOGIT_CLIP).clamp(-LOGIT_CLIP, LOGIT_CLIP)


def _summaries(logits: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({max_prob, entropy, margin, logit_norm, class_probs}, softmax) of clean logits (G, Q, C), means over Q."""
    logp = F.log_softmax(logits, -1)
    p = logp.exp()
    top2 = p.topk(min(2, p.shape[-1]), dim=-1).values
    margin = top2[..., 0] - (top2[..., 1] if top2.shape[-1] > 1 else 0)
    return {"max_prob": top2[..., 0].mean(-1), "entropy": -(p * logp).sum(-1).mean(-1), "margin": margin.mean(-1),
            "logit_norm": logits.norm(dim=-1).mean(-1), "class_probs": p.mean(1)}, p


def summarize(logits: torch.Tensor, noisy: torch.Tensor) -> dict[str, np.ndarray]:
    """Summaries (G,) or (G, ·) of G models' logits (G, Q, C) and of their logits under weight noise."""
    out, p = _summaries(_clean(logits, torch.float64))
    out["sensitivity"] = (0.5 * (p - F.softmax(_clean(noisy, torch.float64), -1)).abs().sum(-1)).mean(-1)
    out["outputs"] = p[:, :N_RAW].reshape(len(p), -1)
    return {k: v.float().numpy() for k, v in out.items()}


HEAD_SUMMARIES = ("max_prob", "entropy", "margin", "log_logit_norm")  # then the C class probabilities


def head_target(logits: torch.Tensor) -> torch.Tensor:
    """The fingerprint the backbone's behaviour head learns to predict from weights, (G, 4 + C) from logits
    (G, Q, C): the summaries of `summarize` (logit norm as log1p), all of order one."""
    out, _ = _summaries(_clean(logits, torch.float32))
    cols = [out["max_prob"], out["entropy"], out["margin"], torch.log1p(out["logit_norm"])]
    return torch.cat([torch.stack(cols, -1), out["class_probs"]], -1)


def _read_weights(cat: Catalog, by_shard: dict[str, list[str]]) -> dict[str, dict[str, np.ndarray]]:
    """{model_id: {tensor name: float32 array}} rebuilt exactly from the tokens, one read per shard."""
    out: dict[str, dict[str, np.ndarray]] = {}
    S = cat.spec.token_size
    for shard, ids in by_shard.items():
        wanted = [("model_id", "in", ids)]
        ten = pq.read_table(f"{cat.root}/tensors/{shard}.parquet", filesystem=cat.fs, filters=wanted,
                            columns=["model_id", "tensor_idx", "name", "shape", "token_start", "n_tokens",
                                     "packed_into"])
        tok = pq.read_table(f"{cat.root}/tokens/{shard}.parquet", filesystem=cat.fs, filters=wanted,
                            columns=["model_id", "token_idx", "values"]).sort_by([("model_id", "ascending"),
                                                                                   ("token_idx", "ascending")])
        rows: dict[str, list[dict]] = defaultdict(list)
        for r in ten.to_pylist():
            rows[r["model_id"]].append(r)
        mids = np.asarray(tok.column("model_id").to_pylist(), dtype=object)
        values = tok.column("values").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        values = values.astype(np.float32, copy=False).reshape(len(mids), S)
        starts = np.flatnonzero(np.r_[True, mids[1:] != mids[:-1]]) if len(mids) else np.array([], dtype=int)
        ends = np.r_[starts[1:], len(mids)]
        for s, e in zip(starts, ends, strict=True):
            m = mids[s]
            out[m] = tensors_from_tokens(sorted(rows[m], key=lambda r: r["tensor_idx"]), values[s:e],
                                         cat.spec.tokenization, S)
    return out


def _run(net: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    def one(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(net, p, (x,))

    with torch.no_grad():
        return torch.func.vmap(one)(params)


def compute(cat: Catalog, user: np.ndarray | None = None, model_ids: list[str] | None = None) -> dict:
    """Fingerprint every recognized `ok` model (or those of `model_ids`) that lacks a row for one of its probe
    sets; append them as one `behaviour` shard. Returns a summary (models, rows written, skipped, seconds)."""
    from train.behaviour import canonical_net, input_shape, model_archs
    from train.data import list_models

    t0 = time.time()
    con = connect(cat, tables=("behaviour",))
    shard_of = {r.model_id: r.shard for r in list_models(cat)}
    if model_ids is not None:
        shard_of = {m: s for m, s in shard_of.items() if m in set(model_ids)}
    archs = model_archs(cat, list(shard_of))
    have = {h for (h,) in con.execute("SELECT model_id || chr(0) || probe_set FROM behaviour").fetchall()}
    by_arch: dict[str, list[str]] = defaultdict(list)
    sets_of: dict[str, dict[str, torch.Tensor]] = {}
    for m, key in sorted(archs.items()):
        if key not in sets_of:
            sets_of[key] = probe_sets(input_shape(key), user)
        if any(f"{m}\0{name}" not in have for name in sets_of[key]):
            by_arch[key].append(m)
    todo = sum(len(v) for v in by_arch.values())
    if not todo:
        return {"models": len(archs), "written": 0, "unknown": len(shard_of) - len(archs), "seconds": time.time() - t0,
                "path": None}
    log.info("fingerprinting %d model(s) of %d architecture(s) on %s", todo, len(by_arch),
             ", ".join(sorted({n for s in sets_of.values() for n in s})))
    now = dt.datetime.now(dt.timezone.utc)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    cols: dict[str, list] = defaultdict(list)
    done = 0
    last = time.time()
    for key, ids in by_arch.items():
        net = canonical_net(key)
        names = list(net.state_dict())
        shapes = [tuple(v.shape) for v in net.state_dict().values()]
        sets = sets_of[key]
        for c in range(0, len(ids), CHUNK):
            chunk = ids[c: c + CHUNK]
            by_shard: dict[str, list[str]] = defaultdict(list)
            for m in chunk:
                by_shard[shard_of[m]].append(m)
            weights = _read_weights(cat, by_shard)
            # tensors by order (a checkpoint's names shift with dropout; its shapes were checked by model_archs)
            per_model = [list(weights[m].values()) for m in chunk]
            stacked = {name: torch.from_numpy(np.stack([w[i] for w in per_model])).reshape(len(chunk), *shapes[i])
                       for i, name in enumerate(names)}
            g = torch.Generator().manual_seed(7)
            noisy = {k: v * (1 + NOISE_SCALE * torch.randn(v.shape[1:], generator=g)) for k, v in stacked.items()}
            for set_name, x in sets.items():
                s = summarize(_run(net, stacked, x), _run(net, noisy, x))
                for j, m in enumerate(chunk):
                    if f"{m}\0{set_name}" in have:
                        continue
                    cols["model_id"].append(m)
                    cols["probe_set"].append(set_name)
                    cols["arch"].append(key)
                    cols["n_probes"].append(len(x))
                    for k in SUMMARIES:
                        cols[k].append(float(s[k][j]))
                    cols["class_probs"].append(s["class_probs"][j])
                    cols["outputs"].append(s["outputs"][j])
            done += len(chunk)
            if time.time() - last > 10:
                log.info("fingerprinted %d/%d models", done, todo)
                last = time.time()
    n = len(cols["model_id"])
    table = pa.table({**{k: cols[k] for k in ("model_id", "probe_set", "arch", "n_probes", *SUMMARIES)},
                      "class_probs": pa.array([list(v) for v in cols["class_probs"]], type=pa.list_(pa.float32())),
                      "outputs": pa.array([list(v) for v in cols["outputs"]], type=pa.list_(pa.float32())),
                      "created_at": [now] * n})
    path = cat.write_table("behaviour", f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}", table)
    return {"models": len(archs), "written": n, "fingerprinted": todo, "unknown": len(shard_of) - len(archs),
            "seconds": time.time() - t0, "path": path}


def features(cat: Catalog, model_ids: list[str]) -> np.ndarray | None:
    """The fingerprint features of `model_ids` (rows in that order): per probe set (sorted by name), the
    summaries (logit norm as log1p) and the per-class mean probabilities; None unless every model has a row
    for the same probe sets."""
    con = connect(cat, tables=("behaviour",))
    con.execute("CREATE TEMP TABLE chosen (model_id VARCHAR, i INTEGER)")
    con.executemany("INSERT INTO chosen VALUES (?, ?)", [[m, i] for i, m in enumerate(model_ids)])
    rows = con.execute(
        f"""SELECT c.i, b.probe_set, {", ".join(SUMMARIES)}, class_probs FROM behaviour b JOIN chosen c USING (model_id)
            QUALIFY row_number() OVER (PARTITION BY b.model_id, b.probe_set ORDER BY created_at DESC) = 1
            ORDER BY c.i, b.probe_set""").fetchall()
    if not rows:
        return None
    by_model: dict[int, dict[str, list[float]]] = defaultdict(dict)
    for i, ps, *vals, probs in rows:
        vals[3] = float(np.log1p(max(vals[3], 0.0)))
        by_model[i][ps] = [*vals, *probs]
    sets = sorted(by_model[0]) if 0 in by_model else []
    if len(by_model) != len(model_ids) or any(sorted(v) != sets for v in by_model.values()):
        return None
    return np.array([[x for ps in sets for x in by_model[i][ps]] for i in range(len(model_ids))], dtype=np.float64)
