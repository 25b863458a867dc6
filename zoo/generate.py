"""Generate a lab zoo: plan the trials, skip the finished ones, train the rest on all cores, summarize.

One process per worker (``spawn``), each single-threaded: at this model size threads do not help and
single-threaded kernels make the weights identical whatever the number of workers.
"""

from __future__ import annotations

import concurrent.futures as cf
import fcntl
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .grid import ARCHES, TRAINABLE, experiment_hash, search_space, trial_id, trial_name, trial_params
from .trial import TMP_PREFIX, TrialOutcome, TrialTask, run_trial

log = logging.getLogger(__name__)

_TRIAL_RE = re.compile(rf"^{TRAINABLE}_([0-9a-f]{{5}})_\d+_\d+_")


def default_workers() -> int:
    """The number of cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def generate(
    out: str | os.PathLike,
    models: int = 200,
    epochs: int = 5,
    seed: int = 0,
    workers: int | None = None,
    arch: str = "cnn",
) -> dict[str, Any]:
    """Train a zoo of ``models`` models for ``epochs`` epochs each into the folder ``out``.

    ``arch`` is ``cnn`` (one architecture, so layers line up across the zoo), ``mlp`` or ``mixed``;
    ``seed`` fixes the configurations and the weights; ``workers`` processes train in parallel (default: all
    cores). Trials already complete in ``out`` are skipped, stale temporary folders removed.

    Returns a summary: ``trained``, ``skipped``, ``failed`` counts, ``failures`` (trial and reason),
    ``seconds``, and ``test_acc`` (min, q25, median, q75, max of the last-epoch test accuracy over all complete
    trials, or None). Raises ``ValueError`` for bad arguments, for an ``out`` that is not a folder, or one
    holding another zoo or in use by another run.
    """
    workers = default_workers() if workers is None else workers
    _check_args(models, epochs, seed, workers, arch)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    exp_hash = experiment_hash(seed, arch, epochs)
    with _locked(out):
        _check_same_zoo(out, exp_hash)
        _remove_stale(out)
        tasks = _plan(out, models, epochs, seed, arch, exp_hash)
        _write_json(out / "config.json", search_space(arch, epochs, [t.params["seed"] for t in tasks]))
        pending = [t for t in tasks if not (out / t.name).is_dir()]
        log.info("zoo %s: %d models (%s, %d epochs, seed %d)", out, models, arch, epochs, seed)
        log.info("%d already done, %d to train on %d workers", models - len(pending), len(pending), workers)
        outcomes = _run(pending, workers)
    pending_names = {t.name for t in pending}
    skipped = [t for t in tasks if t.name not in pending_names]
    failures = [o for o in outcomes if o.status == "failed"]
    accs = [o.test_acc for o in outcomes if o.test_acc is not None]
    accs += [a for a in (_last_test_acc(out / t.name) for t in skipped) if a is not None]
    return {
        "out": str(out),
        "models": models,
        "trained": len(outcomes) - len(failures),
        "skipped": len(skipped),
        "failed": len(failures),
        "failures": [{"trial": o.name, "error": o.error} for o in failures],
        "seconds": time.perf_counter() - start,
        "test_acc": _quartiles(accs),
    }


def _check_args(models: int, epochs: int, seed: int, workers: int, arch: str) -> None:
    for name, value, low in (
        ("models", models, 1),
        ("epochs", epochs, 1),
        ("seed", seed, 0),
        ("workers", workers, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")
    if arch not in ARCHES:
        raise ValueError(f"--arch must be one of {', '.join(ARCHES)}, got {arch!r}")


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    # An advisory lock on the folder itself (no lock file in the zoo): a second run on the same folder would
    # delete the first one's temporary folders as stale.
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--out {out} is in use by another zoo run") from None
        yield
    finally:
        os.close(fd)


def _check_same_zoo(out: Path, exp_hash: str) -> None:
    for entry in out.iterdir():
        match = _TRIAL_RE.match(entry.name)
        if match and match.group(1) != exp_hash:
            raise ValueError(
                f"--out {out} holds trials of another zoo (other --seed, --arch, --epochs or grid): "
                f"e.g. {entry.name}; use a new folder"
            )


def _remove_stale(out: Path) -> None:
    for entry in out.iterdir():
        if entry.name.startswith(TMP_PREFIX) and entry.is_dir():
            log.info("removing the unfinished trial %s", entry.name)
            shutil.rmtree(entry)


def _plan(out: Path, models: int, epochs: int, seed: int, arch: str, exp_hash: str) -> list[TrialTask]:
    tasks = []
    for index in range(models):
        params = trial_params(seed, arch, epochs, index)
        name = trial_name(params, exp_hash, index)
        tasks.append(TrialTask(str(out), name, trial_id(exp_hash, index), params))
    return tasks


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _last_test_acc(folder: Path) -> float | None:
    try:
        lines = (folder / "result.json").read_text().splitlines()
        return float(json.loads(lines[-1])["test_acc"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _quartiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    q = np.quantile(np.asarray(values), [0.0, 0.25, 0.5, 0.75, 1.0])
    return dict(zip(("min", "q25", "median", "q75", "max"), (float(v) for v in q), strict=True))


def _run(tasks: list[TrialTask], workers: int) -> list[TrialOutcome]:
    if not tasks:
        return []
    progress = _Progress(len(tasks))
    outcomes = []
    try:
        if min(workers, len(tasks)) == 1:
            with _single_threaded():
                for task in tasks:
                    outcomes.append(progress.update(run_trial(task)))
        else:
            context = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(min(workers, len(tasks)), context, initializer=_init_worker) as pool:
                futures = {pool.submit(run_trial, task): task for task in tasks}
                try:
                    for future in cf.as_completed(futures):
                        outcomes.append(progress.update(_outcome(future, futures[future])))
                except BaseException:  # Ctrl-C: let running trials finish, drop the queued ones
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        progress.close()
    return outcomes


def _outcome(future: cf.Future, task: TrialTask) -> TrialOutcome:
    try:
        return future.result()
    except Exception as exc:  # the worker process died (e.g. out of memory): the trial failed
        return TrialOutcome(task.name, "failed", error=f"{type(exc).__name__}: {exc}")


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


@contextmanager
def _single_threaded() -> Iterator[None]:
    # Training in this process: the same settings as a worker, restored afterwards.
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


class _Progress:
    """A tqdm bar on a terminal; otherwise a log line about every 10% of the trials."""

    def __init__(self, total: int):
        self.total, self.count, self.failed = total, 0, 0
        self.step = max(1, math.ceil(total / 10))
        self.bar = self.redirect = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, unit="model", file=sys.stderr, desc="training")
            self.redirect = logging_redirect_tqdm()  # log lines above the bar, not through it
            self.redirect.__enter__()

    def update(self, outcome: TrialOutcome) -> TrialOutcome:
        self.count += 1
        if outcome.status == "failed":
            self.failed += 1
            log.warning("trial %s failed: %s", outcome.name, outcome.error)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(failed=self.failed)
        elif self.count % self.step == 0 or self.count == self.total:
            log.info(
                "trained %d/%d models (%d%%), %d failed",
                self.count,
                self.total,
                100 * self.count // self.total,
                self.failed,
            )
        return outcome

    def close(self) -> None:
        if self.bar is not None:
            self.redirect.__exit__(None, None, None)
            self.bar.close()
