"""`train embed`: every ok model of a catalog embedded by a run's backbone, into `embeddings/`.

A model is tiled with non-overlapping windows (the last one padded), each window encoded, and its
token latents pooled per layer group: the model's layers are cut into K groups by depth
(K = min(layers, MAX_DIMS // d_latent)) and the latents of each group averaged, then concatenated
(`embedding`, K·d_latent values: layers stay apart, as probes need), next to the plain mean of every
token latent (`embedding_mean`, for comparison). Sums are per model, so an embedding does not depend
on how windows fall into batches. The table `embeddings/<run_id>.parquet` (model_id, run, embedding,
embedding_mean, epoch, created_at) is written whole under a temporary name and renamed, replacing an
older embedding by the same run; it joins `models` on model_id in SQL.

The job is Ray Data batch inference (`embed_stream`): units of whole models (train/stream.py)
mapped by a pool of actors that each load the backbone once (on a GPU where the cluster has them);
`embed_models` is the same computation in one process, which the pool's rows equal.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
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
from train.normalize import Normalizer
from train.plan import catalog_id
from train.run import RunDir

log = logging.getLogger(__name__)
MAX_DIMS = 1000  # per-layer embeddings stay small enough for gradient-boosted trees


def load_backbone(run: RunDir, device: torch.device | str = "cpu") -> tuple[Backbone, dict[str, Any]]:
    """The run's trained backbone (eval mode, on `device`) and its config.json."""
    meta = run.meta()
    try:
        cfg = TrainConfig.from_dict(meta["config"], where=f"{run.uri}/config.json")
    except KeyError:
        raise WildzooError(f"{run.uri}/config.json has no config: is it a run folder of `train fit`?") from None
    if "norm" in meta:
        Normalizer.from_dict(meta["norm"])  # a run of another statistics row: a one-line error, before any weight
    model = Backbone(cfg.model)
    model.load_state_dict(run.load_state_dict())
    return model.to(device).eval(), meta


def layer_counts(cat: Catalog, refs: list[ModelRef]) -> np.ndarray:
    """Layers (1 + the largest layer_idx holding tokens) of each model of `refs`."""
    con = connect(cat, tables=("tensors",))
    rows = dict(con.execute("SELECT model_id, max(layer_idx) + 1 FROM tensors WHERE n_tokens > 0 GROUP BY model_id")
                .fetchall())
    return np.array([max(1, int(rows.get(r.model_id) or 1)) for r in refs], dtype=np.int64)


def pool_groups(n_layers: np.ndarray, d_latent: int) -> int:
    """K, the layer groups every embedding of a catalog has (the same for every model, so columns line up)."""
    return max(1, min(int(n_layers.max()), MAX_DIMS // d_latent))


@torch.no_grad()
def embed_models(model: Backbone, cat: Catalog, refs: list[ModelRef], batch_size: int = 256,
                 device: torch.device | str = "cpu", norm: Normalizer | None = None,
                 n_layers: np.ndarray | None = None, K: int | None = None, progress: bool = True,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(per-layer (len(refs), K·d_latent), mean (len(refs), d_latent)) float32, rows in the order of `refs`.

    `n_layers` (layers of each model) and `K` (layer groups) default to what the catalog says of `refs`;
    give them when embedding a part of a catalog, so every part pools alike."""
    pos = {r.model_id: i for i, r in enumerate(refs)}
    n_layers = layer_counts(cat, refs) if n_layers is None else np.asarray(n_layers, dtype=np.int64)
    K = pool_groups(n_layers, model.cfg.d_latent) if K is None else K
    L = model.cfg.d_latent
    sums = np.zeros((len(refs), K, L), dtype=np.float64)
    counts = np.zeros((len(refs), K), dtype=np.int64)
    done = 0
    t0 = time.time()
    for ids, which, arrays in tiled_batches(cat, refs, model.cfg.window, batch_size, norm=norm):
        batch = to_device(arrays, torch.device(device))
        keep = (arrays["n_valid"] > 0)  # (B, T)
        latent = model.encode(batch).double().cpu().numpy()  # (B, T, L)
        rows = np.array([pos[ids[m]] for m in which])  # (B,)
        group = np.minimum(arrays["l"] * K // n_layers[rows][:, None], K - 1)  # (B, T)
        b, t = np.nonzero(keep)
        np.add.at(sums, (rows[b], group[b, t]), latent[b, t])
        np.add.at(counts, (rows[b], group[b, t]), 1)
        done += len(rows)
        if progress and time.time() - t0 > 10:
            log.info("embedded %d windows", done)
            t0 = time.time()
    total = counts.sum(1)
    if (total == 0).any():
        raise WildzooError(f"{int((total == 0).sum())} model(s) had no tokens to embed")
    mean = sums.sum(1) / total[:, None]
    # a group with no tokens (a model with fewer layers than K) repeats the model's mean
    per_layer = np.where(counts[..., None] > 0, sums / np.maximum(counts, 1)[..., None], mean[:, None, :])
    return per_layer.reshape(len(refs), K * L).astype(np.float32), mean.astype(np.float32)


class Embedder:
    """A Ray Data actor (`map_batches(Embedder, compute=ActorPoolStrategy(...))`): loads the run's backbone once
    (on the GPU where the actor has one), then embeds units of whole models (train/stream.py)."""

    def __init__(self, catalog: str, run_uri: str, K: int, batch_size: int, threads: int = 0) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.cat = Catalog.open(catalog)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, meta = load_backbone(RunDir.at(run_uri), self.device)
        self.norm = Normalizer.from_dict(meta["norm"]) if "norm" in meta else None
        self.K, self.batch_size = K, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, per_layer, means = [], [], []
        for shards, models, layers in zip(batch["shards"], batch["model_ids"], batch["n_layers"], strict=True):
            refs = [ModelRef(str(m), str(m), 0, str(s)) for m, s in zip(models, shards, strict=True)]
            emb, mean = embed_models(self.model, self.cat, refs, self.batch_size, self.device, self.norm,
                                     n_layers=np.asarray(layers), K=self.K, progress=False)
            ids += [r.model_id for r in refs]
            per_layer.append(emb)
            means.append(mean)
        return {"model_id": np.array(ids, dtype=object), "embedding": np.concatenate(per_layer),
                "embedding_mean": np.concatenate(means)}


def embed_stream(cat: Catalog, run_uri: str, refs: list[ModelRef], d_latent: int, batch_size: int = 256,
                 actors: int = 0, unit_tokens: int = 1 << 14) -> tuple[np.ndarray, np.ndarray]:
    """embed_models over `refs` as Ray Data batch inference: units of whole models mapped by a pool of `actors`
    `Embedder`s (0: one per GPU of the cluster, else one per 4 CPUs, at least 1); rows in the order of `refs`."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from train.stream import quiet, units

    n_layers = layer_counts(cat, refs)
    layers_of = {r.model_id: int(n) for r, n in zip(refs, n_layers, strict=True)}
    K = pool_groups(n_layers, d_latent)
    rows = units(refs, unit_tokens)
    for row in rows:
        row["n_layers"] = [layers_of[m] for m in row["model_ids"]]
    have = ray.cluster_resources()
    gpus = int(have.get("GPU", 0))
    actors = actors or gpus or max(1, int(have.get("CPU", 1)) // 4)
    actors = max(1, min(actors, len(rows)))
    quiet(ray.data.DataContext.get_current())
    threads = 0 if gpus or os.environ.get("RAY_ADDRESS") else max(1, (os.cpu_count() or 1) // actors)
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        Embedder, batch_size=1, compute=ActorPoolStrategy(size=actors), num_gpus=1 if gpus else 0, num_cpus=1,
        fn_constructor_kwargs={"catalog": catalog_id(cat), "run_uri": run_uri, "K": K,
                               "batch_size": batch_size, "threads": threads})
    pos = {r.model_id: i for i, r in enumerate(refs)}
    emb = np.zeros((len(refs), K * d_latent), dtype=np.float32)
    mean = np.zeros((len(refs), d_latent), dtype=np.float32)
    seen = np.zeros(len(refs), dtype=bool)
    t0 = time.time()
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        idx = np.array([pos[str(m)] for m in out["model_id"]])
        emb[idx], mean[idx], seen[idx] = out["embedding"], out["embedding_mean"], True
        if time.time() - t0 > 10:
            log.info("embedded %d/%d models", int(seen.sum()), len(refs))
            t0 = time.time()
    if not seen.all():
        raise WildzooError(f"{int((~seen).sum())} model(s) came back without an embedding")
    return emb, mean


def embed(catalog: str | Catalog, run_uri: str, batch_size: int = 256, actors: int = 0) -> dict[str, Any]:
    """Embed every ok model of `catalog` with the backbone in `run_uri` (a Ray Data job on the running Ray, or
    on a local one started for it); returns a summary."""
    from catalog.rayenv import ray_session

    t0 = time.time()
    cat = catalog if isinstance(catalog, Catalog) else Catalog.open(catalog)
    run = RunDir.at(run_uri)
    model, meta = load_backbone(run, "cpu")
    if model.cfg.token_size != cat.spec.token_size:
        raise WildzooError(f"run {run.uri} reads tokens of {model.cfg.token_size} values; catalog {cat.uri} "
                           f"has {cat.spec.token_size}")
    refs = list_models(cat)
    if not refs:
        raise WildzooError(f"catalog {cat.uri} has no ok models with tokens to embed")
    with ray_session(actors):
        emb, emb_mean = embed_stream(cat, run.uri, refs, model.cfg.d_latent, batch_size, actors)
    now = dt.datetime.now(dt.timezone.utc)
    table = pa.table({
        "model_id": [r.model_id for r in refs],
        "run": [meta["run_id"]] * len(refs),
        "embedding": pa.array(list(emb), type=pa.list_(pa.float32())),
        "embedding_mean": pa.array(list(emb_mean), type=pa.list_(pa.float32())),
        "epoch": [int(meta.get("epochs_trained", 0))] * len(refs),
        "created_at": [now.replace(microsecond=now.microsecond // 1000 * 1000)] * len(refs),
    })
    path = cat.write_table("embeddings", meta["run_id"], table)
    return {"run_id": meta["run_id"], "models": len(refs), "dim": int(emb.shape[1]), "path": path,
            "epoch": int(meta.get("epochs_trained", 0)), "seconds": time.time() - t0}


def run_embeddings(cat: Catalog, run_uri: str, model_ids: list[str], auto: bool = True,
                   column: str = "embedding") -> np.ndarray:
    """Embeddings (`column`: embedding or embedding_mean) of `model_ids` (rows in that order) by the run;
    embeds the catalog first where they are missing or older than the run's last epoch (with `auto`), else
    a clear error."""
    run = RunDir.at(run_uri)
    meta = run.meta()
    run_id, epochs = meta["run_id"], int(meta.get("epochs_trained", 0))

    def load() -> dict[str, np.ndarray] | None:
        con = connect(cat, tables=("embeddings",))
        if column not in [c[0] for c in con.execute("DESCRIBE embeddings").fetchall()]:
            return None  # written by an older version: embed again
        rows = con.execute(f"SELECT model_id, {column}, epoch FROM embeddings WHERE run = ?", [run_id]).fetchall()
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
