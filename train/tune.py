"""`train tune`: sweep the losses of the backbone with Ray Tune.

Each trial is a driver function that runs `train fit` (train/fit.py: a `TorchTrainer` on the Ray Data window
stream) with Ray Train's `TuneReportCallback`, so every epoch's metrics reach Tune and ASHA stops the
trials whose validation loss falls behind — the held-out reconstruction error relative to predicting zeros
(`val_rel_mse`, 1 − R²), since the total loss's scale changes with γ, τ and the normalization. A trial that trains all its epochs is then scored by the probe's
**validation** R²: its backbone embeds the probed models (train/embed.py) and gradient-boosted trees trained on
the probe split's train side predict test accuracy, epoch and generalization gap on its validation side; the
score is their mean. The test split is never looked at (and its models are held out of every trial's fit).

Swept: γ (contrastive vs reconstruction), τ, the behavioural loss's weight, the learning rate, the token
normalization and the window. Everything else is the flavour's (or `--config`'s).

Out: DIR/results.csv (one row per trial, sorted by score), DIR/score.png (score against each swept value),
DIR/best.json (the best trial's settings, for `python -m train fit --config DIR/best.json`), DIR/tune (Tune's
experiment: `--resume` continues it) and DIR/trials/<trial>-<digest> (each trial's run folder: a killed trial resumes
from its last epoch's checkpoint).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from pyarrow.fs import LocalFileSystem
from ray.tune import Callback

from catalog.errors import WildzooError
from catalog.rayenv import ray_session
from catalog.store import Catalog, atomic_write
from train.config import TrainConfig
from train.normalize import NORMS
from train.plan import catalog_id as plan_catalog_id

log = logging.getLogger(__name__)
SWEPT = ("gamma", "tau", "behaviour", "lr", "norm", "window")
LOG_SCALE = ("gamma", "tau", "lr")
# where a trial runs, not what it learns: left out of best.json (the fit command's flags set them)
PLACEMENT = ("workers", "cpus_per_worker", "gpus_per_worker", "worker_resources", "data_cpus")
EXPERIMENT = "tune"
TRIAL_CPU = 0.01


def search_space(base: TrainConfig) -> dict[str, Any]:
    """The swept settings around the flavour's own."""
    from ray import tune

    w = base.model.window
    return {"gamma": tune.loguniform(0.01, 0.5), "tau": tune.loguniform(0.03, 0.5),
            "behaviour": tune.choice([0.0, 0.01, 0.1]), "lr": tune.loguniform(base.lr / 3, base.lr * 3),
            "norm": tune.choice(list(NORMS)), "window": tune.choice(sorted({max(8, w // 2), w, 2 * w}))}


def trial_config(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """`base` with one trial's swept values."""
    model = dataclasses.replace(base.model, window=int(params["window"]))
    return base.replace(model=model, gamma=float(params["gamma"]), tau=float(params["tau"]),
                        behaviour=float(params["behaviour"]), lr=float(params["lr"]), norm=str(params["norm"]))


def validation_score(catalog: str, run_uri: str, split_seed: int) -> dict[str, float]:
    """The probe's validation R² of a run's embeddings, per property, and their mean (`score`); NaN without
    properties to predict."""
    from train import probe
    from train.data import list_models
    from train.embed import embed_models, load_backbone
    from train.evaluate import NUMERIC_TARGETS
    from train.features import load_population
    from train.normalize import Normalizer
    from train.run import RunDir

    cat = Catalog.open(catalog)
    pop = load_population(cat)
    by_id = {r.model_id: r for r in list_models(cat)}
    refs = [by_id[m] for m in pop.model_ids if m in by_id]
    if len(refs) < len(pop.model_ids):
        raise WildzooError(f"{len(pop.model_ids) - len(refs)} probed model(s) have no tokens to embed")
    model, meta = load_backbone(RunDir.at(run_uri))
    x, _ = embed_models(model, cat, refs, norm=Normalizer.from_dict(meta["norm"]), progress=False)
    split = probe.group_split(pop.groups, split_seed)
    scores = {}
    for name in NUMERIC_TARGETS:
        y = pop.numeric.get(name)
        if y is None:
            continue
        ok = np.isfinite(y)
        s = probe.Split(*(idx[ok[idx]] for idx in (split.train, split.val, split.test)))
        if min(len(s.train), len(s.val)) >= 2:
            scores[f"val_r2_{name}"] = probe.trees_val(x, y, s, split_seed)
    scores["score"] = float(np.mean(list(scores.values()))) if scores else math.nan
    return scores


def shared_plans(cat: Catalog, base: TrainConfig) -> dict[str, dict[str, Any]]:
    """One fit plan (train/plan.py) per normalization the search space draws from, made once for every trial: the
    split and architectures are shared, each mode has its normalizer. A mode the catalog cannot take (per-layer on
    models that do not line up) is left out: its trials make their own plan and fail with fit's message."""
    from train.plan import make_plan

    first = make_plan(cat, base)
    plans = {}
    for mode in NORMS:
        try:
            plans[mode] = (first if mode == base.norm else first.renormalized(cat, mode)).to_dict()
        except WildzooError:
            continue
    return plans


def run_trial(config: dict[str, Any], plans: dict[str, dict[str, Any]] | None = None) -> None:
    """One trial (a Tune function trainable): `train fit` into DIR/trials/<trial id>-<settings digest> with Tune's report
    callback,
    then, if ASHA let it finish, the validation score."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from train.fit import fit
    from train.plan import FitPlan

    logging.getLogger("train").setLevel(logging.WARNING)  # the sweep's own lines say what each trial did
    cfg = trial_config(TrainConfig.from_dict(config["base"]), config)
    # the folder is named by the trial and its settings: a sweep killed before Tune saved a new trial gives that
    # trial's id to another draw on --resume, which must not resume the lost trial's run (another model)
    digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    run = f"{config['dir'].rstrip('/')}/trials/{ray.tune.get_context().get_trial_id()}-{digest}"
    plan = FitPlan.from_dict(plans[cfg.norm]) if plans and cfg.norm in plans else None
    if plan is not None and not plan.matches(Catalog.open(config["catalog"]), cfg.split_seed, cfg.probe_seeds,
                                             cfg.holdout):
        plan = None  # a resumed sweep started with another split than this command line's
    s = fit(config["catalog"], run, cfg, callbacks=[TuneReportCallback()], reconstruction=False,
            quiet=True, plan=plan)
    last = s["history"][-1] if s["history"] else {}
    scores = validation_score(config["catalog"], run, cfg.split_seed)
    ray.tune.report({"epoch": s["epochs"], "loss": last.get("loss", math.nan),
                     "val_loss": last.get("val_loss", last.get("loss", math.nan)),
                     "val_rel_mse": last.get("val_rel_mse", math.nan), "run": run, **scores})


class Progress(Callback):
    """A Tune callback printing one line per trial event (Tune's own tables are off)."""

    def __init__(self, total: int, epochs: int) -> None:
        self.total, self.epochs, self.done = total, epochs, 0

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "score" in result:
            log.info("trial %s scored %.4f (validation R², mean of %s)", trial.trial_id, result["score"],
                     ", ".join(k[len("val_r2_"):] for k in result if k.startswith("val_r2_")))
        elif "epoch" in result:
            log.info("trial %s epoch %d/%d: held-out reconstruction error %.4f of predicting zeros (val loss %.4f)",
                     trial.trial_id, int(result["epoch"]), self.epochs, result.get("val_rel_mse", math.nan),
                     result.get("val_loss", result.get("loss", math.nan)))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        log.info("trial %s ended (%d of %d)", trial.trial_id, self.done, self.total)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        log.warning("trial %s failed (%d of %d): see %s", trial.trial_id, self.done, self.total, trial.path)


def asha_metric(base: TrainConfig) -> str:
    """What ASHA ranks trials by: trials of different γ, τ and normalization have losses on different scales (a
    sweep on val_loss stopped every per-layer trial after one epoch); the held-out reconstruction error relative
    to predicting zeros is not. `loss` where nothing is held out."""
    return "val_rel_mse" if base.holdout and base.val_batches else "loss"


def _resources_per_trial(cfg: TrainConfig) -> float:
    return cfg.workers * cfg.cpus_per_worker + math.ceil(cfg.data_cpus)


def tune(catalog: str, out: str, base: TrainConfig, samples: int = 8, resume: bool = False,
         concurrent: int = 0, grace: int = 1) -> dict[str, Any]:
    """Run (or, with `resume`, continue) a sweep of `samples` trials over `base`; returns a summary."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's console tables off (verbose 0): Progress prints
    from ray import tune as rt
    from ray.tune.schedulers import ASHAScheduler

    t0 = time.time()
    cat = Catalog.open(catalog)
    if "://" in out:
        raise WildzooError("train tune writes its sweep to a local folder (--out DIR); the trials' checkpoints "
                           "can still go to object storage by running on a cluster with shared storage")
    root = Path(out).resolve()
    experiment = root / EXPERIMENT
    if samples < 1:
        raise WildzooError("--samples must be >= 1")
    if grace < 1 or grace > base.epochs:
        raise WildzooError(f"--grace must be in 1..{base.epochs} (the epochs of each trial)")
    existing = (experiment / "tuner.pkl").exists()
    if existing and not resume:
        raise WildzooError(f"{root} holds a sweep already: add --resume to continue it, or use a new --out")
    per_trial = _resources_per_trial(base)
    concurrent = concurrent or max(1, (os.cpu_count() or 1) // max(1, base.workers * base.cpus_per_worker))
    metric = asha_metric(base)
    catalog_id = plan_catalog_id(cat)
    root.mkdir(parents=True, exist_ok=True)
    param_space = {"base": base.to_dict(), "catalog": catalog_id, "dir": str(root), **search_space(base)}
    # the trial's driver mostly waits on its workers, which hold the CPUs: a token slot (Tune needs one > 0)
    plans = shared_plans(cat, base)
    # logical CPUs: `concurrent` trials, each with its workers and Ray Data's window tasks (train/fit.py); on
    # fewer cores than that, Tune + Train + Data deadlock on backpressured reads unless slots are oversubscribed
    with ray_session(math.ceil(concurrent * (per_trial + TRIAL_CPU))):
        # the plans go to the object store once (with_parameters needs a running Ray), every trial reads them
        trainable = rt.with_resources(rt.with_parameters(run_trial, plans=plans), {"CPU": TRIAL_CPU})
        if existing:
            log.info("resuming the sweep in %s", root)
            # a trial killed before its first report has no results yet: Tune warns, then restarts it
            logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
            tuner = rt.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                     resume_errored=True)
        else:
            scheduler = ASHAScheduler(time_attr="epoch", max_t=base.epochs, grace_period=grace,
                                      reduction_factor=2, stop_last_trials=False)
            tuner = rt.Tuner(
                trainable, param_space=param_space,
                tune_config=rt.TuneConfig(metric=metric, mode="min", scheduler=scheduler, num_samples=samples,
                                          max_concurrent_trials=concurrent),
                run_config=rt.RunConfig(name=EXPERIMENT, storage_path=str(root), verbose=0,
                                        callbacks=[Progress(samples, base.epochs)]))
            log.info("sweep of %d trial(s), %d at a time, %d epoch(s) each, ASHA on %s (grace %d epoch(s)) -> %s",
                     samples, concurrent, base.epochs, metric, grace, root)
        grid = tuner.fit()
    # a resumed sweep keeps the settings it was started with, whatever this command line says
    started = [r.config["base"] for r in grid if r.config and "base" in r.config]
    if started:
        base = TrainConfig.from_dict(started[0])
        metric = asha_metric(base)
    rows = results_rows(grid)
    written = write_results(root, rows, base)
    return {"trials": len(rows), "finished": sum(1 for r in rows if r["status"] == "finished"),
            "stopped": sum(1 for r in rows if r["status"] == "stopped"),
            "failed": sum(1 for r in rows if r["status"] == "failed"), "rows": rows, "seconds": time.time() - t0,
            "metric": metric, **written}


def results_rows(grid) -> list[dict[str, Any]]:
    """One row per trial: its swept values, how far it got, its last losses and its validation scores."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        cfg = result.config or {}
        status = "failed" if result.error else "finished" if "score" in m else "stopped"
        row = {"trial": m.get("trial_id") or (Path(result.path).name if result.path else "?"),
               "status": status, "score": m.get("score", math.nan),
               **{k: cfg.get(k) for k in SWEPT}, "epochs": m.get("epoch", 0),
               "val_rel_mse": m.get("val_rel_mse", math.nan), "val_loss": m.get("val_loss", math.nan),
               "loss": m.get("loss", math.nan),
               **{k: v for k, v in m.items() if k.startswith("val_r2_")}, "run": m.get("run", "")}
        rows.append(row)
    rows.sort(key=lambda r: (-(r["score"] if np.isfinite(r["score"]) else -math.inf),
                             r["val_rel_mse"] if np.isfinite(r["val_rel_mse"]) else math.inf))
    return rows


def write_results(root: Path, rows: list[dict[str, Any]], base: TrainConfig) -> dict[str, str]:
    """DIR/results.csv, DIR/score.png and DIR/best.json (when a trial was scored), each written whole."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, restval="")
    w.writeheader()
    w.writerows(rows)
    written = {"csv": _write(root / "results.csv", buf.getvalue().encode())}
    scored = [r for r in rows if r["status"] == "finished" and np.isfinite(r["score"])]
    if scored:
        written["plot"] = _write(root / "score.png", score_plot(scored))
        best = trial_config(base, scored[0]).to_dict()
        for k in PLACEMENT:
            best.pop(k, None)
        written["best"] = _write(root / "best.json", (json.dumps(best, indent=2) + "\n").encode())
        written["best_trial"] = scored[0]["trial"]
    return written


def _write(path: Path, data: bytes) -> str:
    """Write a file whole (`catalog.store.atomic_write`): a crash leaves the old file or the new one."""
    atomic_write(LocalFileSystem(), str(path), data)
    return str(path)


def score_plot(rows: list[dict[str, Any]]) -> bytes:
    """PNG: the validation score of every scored trial against each swept value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 3, figsize=(11, 6))
    y = [r["score"] for r in rows]
    for ax, key in zip(axes.flat, SWEPT, strict=True):
        x = [r[key] for r in rows]
        if key == "norm":
            labels = sorted(set(x))
            ax.scatter([labels.index(v) for v in x], y)
            ax.set_xticks(range(len(labels)), labels)
        else:
            ax.scatter([float(v) for v in x], y)
            if key in LOG_SCALE:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.scatter([rows[0][key] if key != "norm" else sorted(set(x)).index(rows[0][key])], [y[0]], color="red",
                   label="best")
        ax.set(xlabel=key, ylabel="validation R² (mean)")
    axes.flat[0].legend()
    fig.suptitle("train tune: probe validation R² of each finished trial")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results, sorted by score, as a text table."""
    head = ["trial", "status", "score", "epochs", "val_rel_mse", "gamma", "tau", "behaviour", "lr", "norm", "window"]
    lines = [head]
    for r in rows:
        lines.append([str(r["trial"]), r["status"], f"{r['score']:.4f}" if np.isfinite(r["score"]) else "-",
                      str(int(r["epochs"] or 0)), f"{r['val_rel_mse']:.4f}" if np.isfinite(r["val_rel_mse"]) else "-",
                      f"{r['gamma']:.3g}", f"{r['tau']:.3g}", f"{r['behaviour']:g}", f"{r['lr']:.2e}", r["norm"],
                      str(r["window"])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)
