"""Trainer state in and out of Ray Train checkpoints, and the check that a run folder resumes the same run.

One writer (`report_state`: rank 0 saves model, optimizer, scheduler, epoch and history into `state.pt` and
reports it with the epoch's metrics) and one reader (`load_state`: `torch.load(weights_only=True)`, never an
unpickle), used by the worker loop to resume and by the driver to take the final weights.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict
from typing import Any

import torch

from catalog.errors import WildzooError
from train.run import RunDir, new_run_id

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"


def load_state(checkpoint) -> dict[str, Any]:
    """The trainer state of a Ray Train `Checkpoint`, on the CPU."""
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def restore(checkpoint, model: torch.nn.Module, model_config) -> dict[str, Any] | None:
    """Load `checkpoint` (or nothing: None) into `model`; refuses a checkpoint of another model configuration."""
    if checkpoint is None:
        return None
    state = load_state(checkpoint)
    if state["model_config"] != asdict(model_config):
        raise ValueError("the checkpoint holds a different model configuration than this run asks for")
    model.load_state_dict(state["model"])
    return state


def report_state(metrics: dict[str, float], model: torch.nn.Module, optimizer, scheduler, epoch: int,
                 history: list[dict[str, float]], model_config) -> None:
    """`ray.train.report` of `metrics` with the whole trainer state as the epoch's checkpoint (rank 0)."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                    "model_config": asdict(model_config)}, os.path.join(d, STATE_FILE))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def run_meta(run: RunDir, existing: dict[str, Any] | None, catalog: str, token_size: int, cfg,
             split: dict[str, Any]) -> dict[str, Any]:
    """The contents of RUN/config.json: new, or `existing` (the run's config.json, read once by the caller)
    checked against the run it resumes (same catalog and model)."""
    if existing is not None:
        meta = existing
        old = meta.get("config", {}).get("model")
        if old != asdict(cfg.model):
            changed = sorted(k for k in asdict(cfg.model) if (old or {}).get(k) != asdict(cfg.model)[k])
            raise WildzooError(f"{run.uri} holds a run with a different model ({', '.join(changed)} differ): "
                               f"use a new --out, or the run's own config")
        if meta.get("catalog") != catalog:
            raise WildzooError(f"{run.uri} was trained on catalog {meta.get('catalog')}, not {catalog}: "
                               f"use a new --out")
        log.info("resuming run %s (%d epoch(s) trained so far)", meta["run_id"], meta.get("epochs_trained", 0))
    else:
        meta = {"run_id": new_run_id(run), "catalog": catalog, "token_size": token_size,
                "epochs_trained": 0, "history": []}
    meta.update(config=cfg.to_dict(), split=split)
    return meta
