"""`train tune`: a Ray Tune sweep over the losses (ASHA, trials scored by the probe's validation R²), killed
mid-sweep and continued with --resume; its best config is what `train fit --config` reads."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.config import TrainConfig
from train.tune import SWEPT, format_table, results_rows, trial_config, write_results

ROOT = Path(__file__).resolve().parent.parent


def _rows() -> list[dict]:
    base = {"gamma": 0.05, "tau": 0.1, "behaviour": 0.0, "lr": 1e-3, "norm": "per-tensor", "window": 32,
            "epochs": 2, "val_loss": 1.0, "val_rel_mse": 0.4, "loss": 1.1, "run": ""}
    return [{**base, "trial": "a", "status": "stopped", "score": math.nan, "epochs": 1},
            {**base, "trial": "b", "status": "finished", "score": 0.31, "gamma": 0.2, "window": 64,
             "val_r2_test_acc": 0.5, "val_r2_epoch": 0.2, "val_r2_ggap": 0.23},
            {**base, "trial": "c", "status": "finished", "score": 0.12, "norm": "auto"}]


def test_results_are_sorted_by_score_and_the_best_config_is_a_fit_config(tmp_path):
    class Result:  # what Tune's ResultGrid yields, for the fields results_rows reads
        def __init__(self, row):
            self.metrics = {k: v for k, v in row.items() if k not in SWEPT and k != "status"}
            self.metrics["trial_id"] = row["trial"]
            if row["status"] == "stopped":
                del self.metrics["score"]
            self.config = {k: row[k] for k in SWEPT}
            self.error, self.path = None, str(tmp_path / row["trial"])

    rows = results_rows([Result(r) for r in _rows()])
    assert [r["trial"] for r in rows] == ["b", "c", "a"] and [r["status"] for r in rows] == ["finished"] * 2 + ["stopped"]
    base = TrainConfig.debug().replace(workers=2)
    written = write_results(tmp_path, rows, base)
    assert written["best_trial"] == "b" and Path(written["plot"]).stat().st_size > 5000
    table = list(csv.DictReader(open(written["csv"])))
    assert [r["trial"] for r in table] == ["b", "c", "a"] and float(table[0]["val_r2_test_acc"]) == 0.5
    best = TrainConfig.from_file(written["best"], base=TrainConfig.small())
    assert best.gamma == 0.2 and best.model.window == 64 and best.norm == "per-tensor" and best.lr == 1e-3
    assert best.model.d_model == base.model.d_model and best.epochs == base.epochs  # the trials' flavour, whole
    assert "workers" not in json.loads(Path(written["best"]).read_text())  # where to run is the fit's flags
    assert trial_config(base, rows[0]) == best.replace(workers=2)
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:3] == ["trial", "status", "score"] and lines[1].split()[:3] == ["b", "finished", "0.3100"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_sweep_continues_with_resume(zoo_catalog, tmp_path):
    """A debug sweep of 3 trials (2 at a time), killed (SIGKILL, the whole process group) once a trial is scored; the
    rerun with --resume keeps that trial's score, trains only what is missing and writes the table, plot and best
    config."""
    _, cat = zoo_catalog
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "train", "tune", "--catalog", str(cat), "--out", str(out), "--debug",
            "--samples", "3", "--epochs", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        p = subprocess.Popen(args, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 420
    while p.poll() is None and "scored" not in log.read_text() and time.time() < deadline:
        time.sleep(0.5)  # observed progress: a trial finished and was scored
    assert p.poll() is None, log.read_text()[-3000:]  # still sweeping: the kill lands mid-sweep
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    first = log.read_text()
    scored = {line.split()[4]: float(line.split()[6]) for line in first.splitlines() if " scored " in line}
    assert scored and not (out / "results.csv").exists()
    kept_trial = next(iter(scored))
    (kept_run,) = (out / "trials").glob(f"{kept_trial}-*")  # the trial's folder: its id and a digest of its settings
    ckpts = sorted(p.name for p in (kept_run / "fit").glob("checkpoint_*"))

    again = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "--resume" in again.stderr  # no silent overwrite of a sweep

    done = subprocess.run(args + ["--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming the sweep" in done.stderr + done.stdout
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 3 and len({r["trial"] for r in rows}) == 3
    assert {r["status"] for r in rows} <= {"finished", "stopped"}
    by_trial = {r["trial"]: r for r in rows}
    assert float(by_trial[kept_trial]["score"]) == pytest.approx(scored[kept_trial], abs=1e-4)
    # a finished trial trains no further (it may be scored again if the kill beat Tune's experiment snapshot)
    assert sorted(p.name for p in (kept_run / "fit").glob("checkpoint_*")) == ckpts
    assert by_trial[kept_trial]["run"].rstrip("/").endswith(kept_run.name)
    finished = [r for r in rows if r["status"] == "finished"]
    assert [float(r["score"]) for r in finished] == sorted((float(r["score"]) for r in finished), reverse=True)
    assert rows[0]["status"] == "finished" and (out / "score.png").stat().st_size > 5000
    best = TrainConfig.from_file(out / "best.json", base=TrainConfig.small())
    assert best.gamma == pytest.approx(float(rows[0]["gamma"])) and best.model.window == int(rows[0]["window"])
    assert best.model.d_model == TrainConfig.debug().model.d_model
    assert "tune:" in done.stdout and "best.json" in done.stdout
    trace = done.stderr.find("Traceback")
    assert trace < 0, done.stderr[max(0, trace - 500): trace + 6000]  # what went wrong, in the test's report
    assert "PYTHON worker processes have been started" not in done.stdout + done.stderr  # Ray internals stay quiet
