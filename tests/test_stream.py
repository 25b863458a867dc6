"""The Ray Data window stream in a real fit: a killed worker resumes from its checkpoint; the GPU path.

(The stream's split, whole-model windows and the Ray Data embedding are in tests/test_train.py, which
shares its debug fit.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
# a debug epoch takes about 2 s with its checkpoint and the driver sees worker log lines late (under a second):
# the kill, once epoch 5 is logged, lands with ten epochs (~20 s) of the first worker group still to run
EPOCHS = 15


@pytest.mark.ray
def test_a_worker_killed_mid_epoch_resumes_from_the_last_checkpoint_and_the_run_finishes(zoo_catalog, tmp_path):
    """`train fit` in its own process (its own local Ray); once the first epoch's checkpoint is committed, rank 0's
    worker process is killed with SIGKILL: Ray Train restarts the worker group from that checkpoint, the stream
    starts again, and the run ends with every epoch trained once."""
    _, cat = zoo_catalog
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "train", "fit", "--catalog", str(cat), "--out", str(run),
                             "--debug", "--workers", "2", "--epochs", str(EPOCHS)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    worker = None
    try:
        for line in proc.stdout:  # progress is observed, not timed: the worker's pid, then a committed checkpoint
            lines.append(line)
            m = re.search(r"RayTrainWorker pid=(\d+)\).*rank 0 of 2", line)
            if m:
                worker = int(m.group(1))
            # rank 0 logs an epoch before its report (a barrier): once epoch 5 is logged, epochs 1-3 have reported
            # their checkpoints (the controller registers a report when it next polls the workers, so the last
            # one or two may not count yet: the run resumes after some checkpointed epoch, not a fixed one)
            if worker and f"epoch 5/{EPOCHS}  loss" in line:
                os.kill(worker, signal.SIGKILL)
                break
        lines += list(proc.stdout)
    finally:
        proc.wait(timeout=600)
    out = "".join(lines)
    assert worker is not None and proc.returncode == 0, out[-3000:]
    # the restarted group began after a checkpointed epoch, not from scratch, and finished
    resumed = [int(a) for a in re.findall(rf"rank 0 of 2 on cpu: .* epochs (\d+)\.\.{EPOCHS}", out)]
    assert resumed[0] == 1 and len(resumed) >= 2 and resumed[-1] > 1, out[-3000:]
    meta = json.loads((run / "config.json").read_text())
    assert meta["epochs_trained"] == EPOCHS and [h["epoch"] for h in meta["history"]] == list(range(1, EPOCHS + 1))
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))


@pytest.mark.gpu
@pytest.mark.ray
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_short_fit_on_cuda_with_bf16(zoo_catalog, tmp_path):
    from train.fit import fit

    _, cat = zoo_catalog
    s = fit(str(cat), str(tmp_path / "gpu"), TrainConfig.debug().replace(workers=1, gpus_per_worker=1.0))
    losses = [h["loss"] for h in s["history"]]
    assert len(losses) == 2 and losses[1] < losses[0] and all(map(lambda x: x == x, losses))
