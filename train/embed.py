"""`train embed`: every ok model of a catalog embedded by a run's backbone, into `embeddings/`.

A model's embedding is the mean of its token latents over all its tokens: the model is tiled with
non-overlapping windows (the last one padded), each window encoded, and the latents of real tokens
summed per model and divided by its token count — so a model's embedding does not depend on how its
windows fall into batches. The table `embeddings/<run_id>.parquet` (model_id, run, embedding,
epoch, created_at) is written whole under a temporary name and renamed, replacing an older
embedding by the same run.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from catalog.errors import WildzooError
from catalog.query import connect
from catalog.store import Catalog
from train.config import TrainConfig
from train.data import ModelRef, list_models, tiled_batches
from train.fit import to_device
from train.model import Backbone
from train.run import RunDir

log = logging.getLogger(__name__)


def load_backbone(run: RunDir, device: torch.device | str = "cpu") -> tuple[Backbone, dict[str, Any]]:
    """The run's trained backbone (eval mode, on `device`) and its config.json."""
    meta = run.meta()
    try:
        cfg = TrainConfig.from_dict(meta["config"], where=f"{run.uri}/config.json")
    except KeyError:
        raise WildzooError(f"{run.uri}/config.json has no config: is it a run folder of `train fit`?") from None
    model = Backbone(cfg.model)
    model.load_state_dict(run.load_state_dict())
    return model.to(device).eval(), meta


@torch.no_grad()
def embed_models(model: Backbone, cat: Catalog, refs: list[ModelRef], batch_size: int = 256,
                 device: torch.device | str = "cpu") -> np.ndarray:
    """(len(refs), d_latent) float32: the mean token latent of each model, in the order of `refs`."""
    pos = {r.model_id: i for i, r in enumerate(refs)}
    sums = np.zeros((len(refs), model.cfg.d_latent), dtype=np.float64)
    counts = np.zeros(len(refs), dtype=np.int64)
    done = 0
    t0 = time.time()
    for ids, which, arrays in tiled_batches(cat, refs, model.cfg.window, batch_size):
        batch = to_device(arrays, torch.device(device))
        keep = (batch["n_valid"] > 0)[..., None]  # (B, T, 1)
        per_window = (model.encode(batch) * keep).sum(1).double().cpu().numpy()  # (B, L)
        rows = np.array([pos[ids[m]] for m in which])
        np.add.at(sums, rows, per_window)
        np.add.at(counts, rows, keep.sum((1, 2)).cpu().numpy())
        done += len(rows)
        if time.time() - t0 > 10:
            log.info("embedded %d windows", done)
            t0 = time.time()
    if (counts == 0).any():
        raise WildzooError(f"{int((counts == 0).sum())} model(s) had no tokens to embed")
    return (sums / counts[:, None]).astype(np.float32)


def embed(catalog: str | Catalog, run_uri: str, batch_size: int = 256) -> dict[str, Any]:
    """Embed every ok model of `catalog` with the backbone in `run_uri`; returns a summary."""
    t0 = time.time()
    cat = catalog if isinstance(catalog, Catalog) else Catalog.open(catalog)
    run = RunDir.at(run_uri)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_backbone(run, device)
    if model.cfg.token_size != cat.spec.token_size:
        raise WildzooError(f"run {run.uri} reads tokens of {model.cfg.token_size} values; catalog {cat.uri} "
                           f"has {cat.spec.token_size}")
    refs = list_models(cat)
    if not refs:
        raise WildzooError(f"catalog {cat.uri} has no ok models with tokens to embed")
    emb = embed_models(model, cat, refs, batch_size, device)
    now = dt.datetime.now(dt.timezone.utc)
    table = pa.table({
        "model_id": [r.model_id for r in refs],
        "run": [meta["run_id"]] * len(refs),
        "embedding": pa.array(list(emb), type=pa.list_(pa.float32())),
        "epoch": [int(meta.get("epochs_trained", 0))] * len(refs),
        "created_at": [now.replace(microsecond=now.microsecond // 1000 * 1000)] * len(refs),
    })
    path = cat.write_table("embeddings", meta["run_id"], table)
    return {"run_id": meta["run_id"], "models": len(refs), "dim": int(emb.shape[1]), "path": path,
            "epoch": int(meta.get("epochs_trained", 0)), "seconds": time.time() - t0}


def run_embeddings(cat: Catalog, run_uri: str, model_ids: list[str], auto: bool = True) -> np.ndarray:
    """Embeddings of `model_ids` (rows in that order) by the run; embeds the catalog first where they are
    missing or older than the run's last epoch (with `auto`), else a clear error."""
    run = RunDir.at(run_uri)
    meta = run.meta()
    run_id, epochs = meta["run_id"], int(meta.get("epochs_trained", 0))

    def load() -> dict[str, np.ndarray] | None:
        rows = connect(cat, tables=("embeddings",)).execute(
            "SELECT model_id, embedding, epoch FROM embeddings WHERE run = ?", [run_id]).fetchall()
        found = {m: np.asarray(e, dtype=np.float64) for m, e, ep in rows if ep == epochs}
        return found if all(m in found for m in model_ids) else None

    found = load()
    if found is None:
        if not auto:
            raise WildzooError(f"catalog {cat.uri} has no embeddings by run {run_id} (epoch {epochs}) for every "
                               f"probed model: run `python -m train embed --run {run_uri} --catalog {cat.uri}`")
        log.info("embedding the catalog with run %s first", run_id)
        embed(cat, run_uri)
        found = load()
        if found is None:
            raise WildzooError(f"run {run_id} could not embed every probed model of {cat.uri}")
    return np.stack([found[m] for m in model_ids])
