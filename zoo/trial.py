"""One trial: train one model and write its folder in the Model Zoos layout, atomically.

The folder is written under a temporary name (``.tmp-<trial name>``) and renamed into place only when every
file is complete, so a final name always means a finished trial. Runs in worker processes: never raises for
a bad model, it reports the failure instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import load_digits_split
from .models import INPUT_SIZE
from .train import finite_or_none, train_model

log = logging.getLogger(__name__)

#: Prefix of a trial folder that is still being written.
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class TrialTask:
    """What a worker needs to produce one trial folder ``out/name``."""

    out: str
    name: str
    trial_id: str
    params: dict[str, Any]


@dataclass(frozen=True)
class TrialOutcome:
    """What a worker reports: ``status`` is ``trained`` or ``failed`` (then ``error`` says why)."""

    name: str
    status: str
    test_acc: float | None = None
    error: str | None = None


def checkpoint_dir(epoch: int) -> str:
    """``checkpoint_<epoch:06d>``: the folder holding the weights after ``epoch`` epochs (0 = untrained)."""
    return f"checkpoint_{epoch:06d}"


def run_trial(task: TrialTask) -> TrialOutcome:
    """Train the model of ``task`` and write ``out/name`` with params.json, result.json and one
    ``checkpoint_<e:06d>/checkpoints`` per epoch e = 0..E. Any error is caught and returned as a failed
    outcome; the temporary folder is removed then and no final folder appears."""
    tmp = Path(task.out) / f"{TMP_PREFIX}{task.name}"
    final = Path(task.out) / task.name
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        (tmp / "params.json").write_text(json.dumps(task.params, indent=2, sort_keys=True) + "\n")
        with open(tmp / "result.json", "w") as results:
            writer = _ResultWriter(tmp, results, task)
            train_model(task.params, load_digits_split(INPUT_SIZE[task.params["model::type"]]), writer)
        if final.exists():
            raise FileExistsError(f"{final} appeared while the trial ran")
        os.rename(tmp, final)
        return TrialOutcome(task.name, "trained", test_acc=writer.last_test_acc)
    except Exception as exc:  # one bad model must not stop the zoo: report it and go on
        log.debug("trial %s failed", task.name, exc_info=True)
        shutil.rmtree(tmp, ignore_errors=True)
        return TrialOutcome(task.name, "failed", error=f"{type(exc).__name__}: {exc}")


class _ResultWriter:
    """The per-epoch callback: appends a result.json line (Ray Tune's fields) and saves the checkpoint."""

    def __init__(self, folder: Path, results, task: TrialTask):
        self.folder, self.results, self.task = folder, results, task
        self.epochs = int(task.params["training::epochs_train"])
        self.time_total = 0.0
        self.last_test_acc: float | None = None

    def __call__(self, epoch: int, metrics: dict[str, float], model: nn.Module) -> None:
        checkpoint = self.folder / checkpoint_dir(epoch)
        checkpoint.mkdir()
        torch.save(model.state_dict(), checkpoint / "checkpoints")
        self.time_total += metrics["time_this_iter_s"]
        now = datetime.now()
        line = {
            **{key: finite_or_none(value) for key, value in metrics.items()},
            "training_iteration": epoch,
            "time_total_s": self.time_total,
            "done": epoch == self.epochs,
            "trial_id": self.task.trial_id,
            "date": now.strftime("%Y-%m-%d_%H-%M-%S"),
            "timestamp": int(time.time()),
            "config": self.task.params,
        }
        self.results.write(json.dumps(line) + "\n")
        self.last_test_acc = metrics["test_acc"]
