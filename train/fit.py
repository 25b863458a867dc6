"""`train fit`: the backbone trained data-parallel with Ray Train (DDP; gloo on CPUs, NCCL on GPUs).

The driver (`fit`) makes the fit's plan (train/plan.py: the models split by trained model, the normalizer,
the architectures), writes RUN/config.json and starts a `TorchTrainer` on the Ray Data window stream
(train/stream.py). Each worker (`train_loop`) reads its shard of the windows, trains with AdamW, a one-cycle schedule, gradient clipping and — on CUDA only —
bfloat16 autocast, and reports metrics every epoch with a checkpoint (model, optimizer, scheduler,
epoch and loss history through `state_dict()`: train/checkpoint.py), written by rank 0 while every rank
calls `ray.train.report` (a barrier).

Resuming is rerunning: the same RUN gives the same `RunConfig(name, storage_path)`, Ray Train
restores its checkpoint list, and `ray.train.get_checkpoint()` at the start of the loop hands the
workers the last epoch's state; a worker or node that dies mid-run is restarted from it
(`FailureConfig(max_failures)`). A rerun with more `--epochs` trains only the epochs missing.
At the end the driver writes RUN/backbone.pt (the model's state_dict) for `train embed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catalog.errors import WildzooError
from catalog.rayenv import ray_session
from catalog.store import Catalog
from train.behaviour import reconstruction_report
from train.checkpoint import load_state, report_state, restore, run_meta
from train.config import TrainConfig
from train.losses import backbone_loss
from train.model import Backbone, ModelConfig
from train.normalize import Normalizer
from train.plan import FitPlan, make_plan
from train.run import MODEL_FILE, RAY_RUN_NAME, RunDir
from train.stream import data_config, window_count, window_dataset

log = logging.getLogger(__name__)
VAL_CACHE_BYTES = 512 * 2**20  # a rank keeps its held-out batches in memory up to this size (train_loop)


def lr_factor(step: int, total: int, warmup: float, schedule: str) -> float:
    """One-cycle: linear from 1/25 to 1 over the warm-up, then cosine down to 1e-4 (× lr)."""
    if schedule == "constant":
        return 1.0
    warm = max(1, int(round(warmup * total)))
    if step < warm:
        return 1 / 25 + (1 - 1 / 25) * step / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * t))


def to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device, non_blocking=True) for k, v in arrays.items()}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums across ranks, for metrics; a no-op on one worker."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _all_max(value: float, device: torch.device) -> float:
    """The largest of a value across ranks; the value itself on one worker."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def validate(model: torch.nn.Module, cfg: TrainConfig, batches, device: torch.device, amp: bool,
             behaviour=None, loss_cfg=None) -> tuple[float, float, float, float]:
    """(sum of losses, batches, sum of reconstruction MSEs, sum of predict-zeros MSEs) over this rank's held-out
    windows (`batches`: its shard of the validation stream), with the same augmentations every epoch so the curve
    compares; `loss_cfg`: the epoch's loss (before `behaviour_from` without the behavioural term, as in training)."""
    model.eval()
    total, count, mse, zeros = 0.0, 0, 0.0, 0.0
    state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    torch.manual_seed(cfg.seed + 12345)
    if device.type == "cuda":
        torch.cuda.manual_seed(cfg.seed + 12345)
    with torch.no_grad():
        for batch in batches:
            with _autocast(device, amp):
                out = backbone_loss(model, batch, loss_cfg or cfg.loss, behaviour, zeros=True)
            total += float(out["loss"].detach())
            mse += float(out["mse"].detach())
            zeros += float(out["zeros_mse"].detach())
            count += 1
    torch.random.set_rng_state(state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)
    model.train()
    return total, count, mse, zeros


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MiB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: stream windows, fit, report and checkpoint every epoch."""
    import ray.train
    import ray.train.torch

    ours = logging.getLogger("train")
    if not ours.handlers:  # the worker's progress lines reach the driver's console through Ray's log forwarding
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        ours.addHandler(handler)
        ours.propagate = False
    ours.setLevel(logging.WARNING if config.get("quiet") else logging.INFO)
    if not config.get("verbose"):
        try:  # Ray Train logs each report with all its metrics, under a logger named by its file path
            from ray.train.v2._internal.execution import context as train_context

            logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
        except ImportError:
            pass
    cfg = TrainConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)
    device = ray.train.torch.get_device()
    from train.stream import window_collate

    # another source of training batches than the stream (`fit(source=…)`: the data path the stream replaced, to
    # measure the stream against it in bench/stream_vs_reader.py)
    steps_per_epoch = int(config["steps_per_epoch"])
    reader = config["source"](FitPlan.from_dict(config["plan"]), cfg, rank, world, steps_per_epoch) \
        if config.get("source") else None
    train_shard = ray.train.get_dataset_shard("train") if reader is None else None
    val_shard = ray.train.get_dataset_shard("val") if config.get("val_windows") else None
    pin = device.type == "cuda"

    def batches(shard, seed: int | None, shuffle: bool):
        """One pass over this rank's shard of a stream: prefetched, locally shuffled (training), collated."""
        return shard.iter_torch_batches(
            batch_size=cfg.batch_size, drop_last=shuffle, prefetch_batches=cfg.prefetch_batches,
            local_shuffle_buffer_size=cfg.shuffle_windows or 8 * cfg.batch_size if shuffle else None,
            local_shuffle_seed=seed, collate_fn=window_collate(cfg.permute, seed), device=device, pin_memory=pin)

    behaviour = None
    if cfg.behaviour > 0 or cfg.model.behaviour_queries > 0:
        from train.behaviour import N_QUERY, Behaviour

        behaviour = Behaviour(config["arch_keys"], cfg.model.token_size,
                              n_query=max(N_QUERY, cfg.model.behaviour_queries),
                              n_head=cfg.model.behaviour_queries or N_QUERY).to(device)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = Backbone(cfg.model)
    state = restore(ray.train.get_checkpoint(), model, cfg.model)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total=total_steps, warmup=cfg.warmup, schedule=cfg.schedule))
    start_epoch, history = 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, list(state["history"])
    log.info("rank %d of %d on node %s (%s)", rank, world, ray.get_runtime_context().get_node_id()[:12], device)
    if rank == 0 and start_epoch < cfg.epochs:
        log.info("rank 0 of %d on %s: %d windows/epoch in all, %d steps of %d per rank; %s parameters; epochs %d..%d",
                 world, device, config["windows_per_epoch"], steps_per_epoch, cfg.batch_size,
                 f"{_unwrap(model).n_params():,}", start_epoch + 1, cfg.epochs)
    torch.manual_seed(cfg.seed * 1000 + rank + 7919 * start_epoch)  # augmentations differ across ranks
    amp = cfg.amp and device.type == "cuda"

    writer = tensorboard_writer(config.get("run")) if rank == 0 and start_epoch < cfg.epochs else None
    val_batches = None  # this rank's held-out batches, once streamed (False: too large to keep, streamed each epoch)
    behaviour_epoch = int(round(cfg.behaviour_from * cfg.epochs))  # the first epoch with the behavioural loss
    for epoch in range(start_epoch, cfg.epochs):
        loss_cfg = cfg.loss if epoch >= behaviour_epoch else dataclasses.replace(cfg.loss, behaviour=0.0)
        t0 = last_log = time.time()
        per_step: list[dict[str, float]] = []
        sums = torch.zeros(7, device=device, dtype=torch.float64)  # loss, mse, stats, ntx, behaviour, head, grad norm
        steps = windows = 0
        epoch_batches = batches(train_shard, cfg.seed * 1_000_003 + epoch * 1009 + rank, shuffle=True) \
            if reader is None else reader.epoch(epoch, cfg.permute, device)
        for batch in epoch_batches:
            with _autocast(device, amp):
                out = backbone_loss(model, batch, loss_cfg, behaviour)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            optimizer.step()
            scheduler.step()
            sums += torch.stack([out[k].detach().double() for k in ("loss", "mse", "stats_mse", "ntx")]
                                + [out.get(k, out["mse"] * 0).detach().double() for k in ("behaviour", "behaviour_head")]
                                + [gnorm.detach().double()])
            steps += 1
            windows += len(batch["values"])
            if rank == 0:
                per_step.append({"epoch": epoch + 1, "step": epoch * steps_per_epoch + steps, "lr": scheduler.get_last_lr()[0],
                                 "grad_norm": float(gnorm), **{k: float(v.detach()) for k, v in out.items()}})
            if rank == 0 and time.time() - last_log > 30:
                log.info("epoch %d/%d: step %d/%d, loss %.4f", epoch + 1, cfg.epochs, steps, steps_per_epoch,
                         float(out["loss"].detach()))
                last_log = time.time()
        seconds = time.time() - t0
        if steps == 0:
            raise WildzooError(f"rank {rank} got no full batch of {cfg.batch_size} windows: use fewer workers "
                               f"or a smaller batch_size")
        loss, mse, smse, ntx, beh, head, gn = (v / (steps * world) for v in _all_sum(sums.tolist(), device))
        if not math.isfinite(loss):  # every rank sees the same all-reduced loss, so all stop together
            raise FloatingPointError(f"the loss diverged in epoch {epoch + 1} (try a lower lr or grad_clip)")
        metrics = {"epoch": epoch + 1, "loss": loss, "mse": mse, "stats_mse": smse, "ntx": ntx, "behaviour": beh, "behaviour_head": head,
                   "grad_norm": gn,
                   "lr": scheduler.get_last_lr()[0], "seconds": seconds,
                   "windows_per_s": _all_sum([windows], device)[0] / max(seconds, 1e-9),
                   "steps": steps, "rss_mb": _all_max(peak_rss_mb(), device)}
        if val_shard is not None:
            # the held-out windows are the same every epoch (no shuffle, no permuted views): streamed once and kept
            # where they fit, since another pass of the stream each epoch cost more than the validation itself (a
            # second Ray Data execution beside the training one: ~6 s of a 17 s epoch, small flavour, 2 cores)
            if val_batches is False:
                held_out = batches(val_shard, None, shuffle=False)
            elif val_batches is None:
                held_out = list(batches(val_shard, None, shuffle=False))
                fits = sum(t.nbytes for b in held_out for t in b.values()) <= VAL_CACHE_BYTES
                val_batches = held_out if fits else False
            else:
                held_out = val_batches
            vsum, vcount, vmse, vzeros = _all_sum(list(validate(_unwrap(model), cfg, held_out, device, amp, behaviour,
                                                                loss_cfg)), device)
            metrics["val_loss"] = vsum / max(vcount, 1)
            # the held-out reconstruction error relative to predicting zeros (1 − R²): unlike the loss, it does not
            # depend on γ, τ or the normalization's scale, so runs of different settings compare (train tune)
            metrics["val_rel_mse"] = vmse / vzeros if vzeros > 0 else math.nan
        history.append(metrics)
        if rank == 0:
            val = f"  val {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
            log.info("epoch %d/%d  loss %.4f (mse %.4f, stats %.4f, nt-xent %.4f, behaviour %.4f, head %.4f)%s  "
                     "lr %.2e  %.1fs, %.0f windows/s", epoch + 1, cfg.epochs, loss, mse, smse, ntx, beh, head, val,
                     metrics["lr"], seconds, metrics["windows_per_s"])
            append_steps(config.get("run"), epoch + 1, per_step)
            if writer is not None:
                for r in per_step:
                    for k, v in r.items():
                        if k not in ("epoch", "step"):
                            writer.add_scalar(f"train/{k}", v, int(r["step"]))
                writer.flush()
            report_state(metrics, _unwrap(model), optimizer, scheduler, epoch, history, cfg.model)
        else:
            ray.train.report(metrics, checkpoint=None)
    if writer is not None:
        writer.close()
    return {"start_epoch": start_epoch, "history": history}


def _check_resources(cfg: TrainConfig) -> None:
    """Fail fast where a local Ray cannot ever place the workers (an autoscaling cluster may grow)."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return
    have = ray.cluster_resources()
    need_gpu = cfg.workers * cfg.gpus_per_worker
    if need_gpu > have.get("GPU", 0):
        raise WildzooError(f"{cfg.workers} worker(s) × {cfg.gpus_per_worker:g} GPU need {need_gpu:g} GPUs; "
                           f"this Ray has {have.get('GPU', 0):g}")
    missing = [k for k in cfg.worker_resources if k not in have]
    if missing:
        raise WildzooError(f"no node of this Ray offers the resource(s) {', '.join(missing)} the workers ask for")
    need_cpu = cfg.workers * cfg.cpus_per_worker + cfg.data_cpus
    if need_cpu > have.get("CPU", 0):
        raise WildzooError(f"{cfg.workers} worker(s) × {cfg.cpus_per_worker} CPU + {cfg.data_cpus:g} for the data "
                           f"stream need {need_cpu:g} CPUs; this Ray has {have.get('CPU', 0):g}")


def training_streams(cat: Catalog, cfg: TrainConfig, plan: FitPlan) -> tuple[dict[str, Any], dict[str, int]]:
    """The Ray Data streams of a fit ({"train", and "val" when models are held out}) and the counts the
    workers need: windows per epoch, steps per epoch (equal on every rank: `streaming_split(equal=True)`
    gives each rank ⌊windows / workers⌋ and the loop drops the last partial batch), validation windows."""
    train_refs, held = list(plan.train), list(plan.held)
    unit_tokens = max(1, cfg.unit_mb * 2**20 // (cat.spec.token_size * 4))
    windows = window_count(train_refs, cfg.model.window, cfg.views)
    steps = windows // cfg.workers // cfg.batch_size
    if steps == 0:
        raise WildzooError(f"{len(train_refs)} training model(s) give {windows} windows per epoch: too few for "
                           f"{cfg.workers} worker(s) × batches of {cfg.batch_size}; use fewer workers or a "
                           f"smaller batch_size")
    kw = {"window": cfg.model.window, "norm": plan.norm, "archs": plan.archs, "unit_tokens": unit_tokens,
          "data_cpus": cfg.data_cpus, "seed": cfg.seed}
    datasets = {"train": window_dataset(plan.catalog, train_refs, train=True, views=cfg.views, **kw)}
    val = 0
    if held and cfg.val_batches:
        val = min(window_count(held, cfg.model.window), cfg.val_batches * cfg.batch_size * cfg.workers)
        val -= val % cfg.workers
        if val:
            datasets["val"] = window_dataset(plan.catalog, held, train=False, **kw).limit(val)
    return datasets, {"windows_per_epoch": windows, "steps_per_epoch": steps, "val_windows": val}


def fit(catalog: str, out: str, cfg: TrainConfig, callbacks: list | None = None,
        reconstruction: bool = True, quiet: bool = False, source=None, plan: FitPlan | None = None) -> dict[str, Any]:
    """Train (or resume) the backbone on `catalog` into the run folder `out`; returns a summary.

    `callbacks`: Ray Train callbacks (`train tune` passes Tune's report callback); `reconstruction`: rebuild the
    held-out models at the end and report the accuracy they keep; `quiet`: the workers log warnings only (a sweep
    prints its own line per epoch and trial); `source`: instead of the Ray Data stream, a picklable callable
    `source(plan, cfg, rank, world, steps)` run in each worker (a FitPlan, the TrainConfig), returning an object
    whose `epoch(epoch, permute, device)` yields that many collated batches (bench/stream_vs_reader.py: the previous
    path); `plan`: the fit's plan made already (`train tune` shares one among its trials; it must be of this
    catalog and split); a resumed run keeps its own normalizer."""
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchTrainer

    t0 = time.time()
    cat = Catalog.open(catalog)
    if cfg.model.token_size not in (0, cat.spec.token_size):
        raise WildzooError(f"model.token_size {cfg.model.token_size} does not match the catalog's "
                           f"{cat.spec.token_size}: leave it out (0) to take the catalog's")
    cfg = cfg.replace(model=ModelConfig(**{**asdict(cfg.model), "token_size": cat.spec.token_size}))
    run = RunDir.at(out)
    existing = run.meta() if run.exists("config.json") else None
    saved = (existing or {}).get("norm")  # a resumed run keeps its normalizer
    if plan is not None and not plan.matches(cat, cfg.split_seed, cfg.probe_seeds, cfg.holdout):
        raise WildzooError("the plan given to fit was made for another catalog or split")
    if plan is None:
        plan = make_plan(cat, cfg, norm=Normalizer.from_dict(saved) if saved else None)
    elif saved:
        plan = dataclasses.replace(plan, norm=Normalizer.from_dict(saved))
    if len(plan.train) < cfg.workers:
        raise WildzooError(f"{len(plan.train)} training model(s) cannot feed {cfg.workers} workers")
    split, norm, held = plan.split, plan.norm, list(plan.held)
    meta = run_meta(run, existing, plan.catalog, plan.token_size, cfg, split)
    meta["norm"] = norm.to_dict()
    if meta.get("epochs_trained", 0) >= cfg.epochs and run.exists(MODEL_FILE):
        log.info("run %s has trained %d epoch(s) already: nothing to do", meta["run_id"], meta["epochs_trained"])
        return {"run_id": meta["run_id"], "run": run.uri, "start_epoch": meta["epochs_trained"],
                "epochs": meta["epochs_trained"], "history": meta["history"], "seconds": time.time() - t0,
                "split": split, "workers": cfg.workers,
                "n_params": sum(v.numel() for v in run.load_state_dict().values()), "norm": norm.mode}
    log.info("fit %s on %s: %d models for training (%d trained models), %d held out; %d worker(s)",
             meta["run_id"], cat.uri, len(plan.train), split["train_groups"], len(held), cfg.workers)
    # logical CPUs: a worker is a slot, not a core (on 2 cores, 2 workers of 2 threads still run); Ray Data's
    # window tasks get slots of their own on top (train/stream.py: otherwise no read task ever starts)
    with ray_session(cfg.workers * cfg.cpus_per_worker + math.ceil(cfg.data_cpus)):
        _check_resources(cfg)
        run.write_meta(meta)
        resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {}),
                     **cfg.worker_resources}
        datasets, stream = training_streams(cat, cfg, plan)
        if source is not None:
            del datasets["train"]
            stream.update(source=source, plan=plan.to_dict())  # the model lists only where a source reads them
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"cfg": cfg.to_dict(), "verbose": log.isEnabledFor(logging.DEBUG), "run": run.uri,
                               "quiet": quiet, "arch_keys": list(plan.arch_keys), **stream},
            datasets=datasets, dataset_config=data_config(cfg.data_cpus),
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=RAY_RUN_NAME, storage_path=run.storage_path, callbacks=callbacks or None,
                                 failure_config=FailureConfig(max_failures=cfg.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                                 # Ray Train's own INFO lines repeat every metric of every report: -v shows them
                                 logging_config=LoggingConfig(
                                     log_level="INFO" if log.isEnabledFor(logging.DEBUG) else "WARNING")),
        )
        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise WildzooError(f"training failed: {cause} (worker logs above; rerun to resume)") from e
    returned = result.return_value or {}
    if result.checkpoint is None:
        raise WildzooError(f"the fit of {run.uri} ended without a checkpoint")
    state = load_state(result.checkpoint)
    run.save_state_dict(state["model"])
    history = [{k: float(v) for k, v in h.items()} for h in state["history"]]
    meta.update(epochs_trained=state["epoch"] + 1, history=history)
    run.write_meta(meta)
    plot_curve(run, history)
    report = None
    if held and plan.arch_keys and reconstruction:
        backbone = Backbone(cfg.model)
        backbone.load_state_dict(state["model"])
        report = reconstruction_report(backbone.eval(), cat, held, norm, plan.archs, list(plan.arch_keys))
        meta["reconstruction"] = report
        run.write_meta(meta)
    return {"run_id": meta["run_id"], "run": run.uri, "start_epoch": returned.get("start_epoch", state["epoch"] + 1),
            "epochs": state["epoch"] + 1, "history": history, "seconds": time.time() - t0, "split": split,
            "workers": cfg.workers, "n_params": sum(v.numel() for v in state["model"].values()), "norm": norm.mode,
            "norm_reason": norm.reason,
            "reconstruction": report}


def append_steps(run_uri: str | None, epoch: int, steps: list[dict[str, float]]) -> None:
    """RUN/metrics.jsonl: one JSON line per optimizer step (rank 0), rewritten whole at the end of each epoch;
    lines of this epoch or later left by a run that died before its checkpoint are replaced."""
    if not run_uri:
        return
    run = RunDir.at(run_uri)
    old = run.read_bytes("metrics.jsonl").decode().splitlines() if run.exists("metrics.jsonl") else []
    kept = [line for line in old if line.strip() and json.loads(line).get("epoch", 0) < epoch]
    run.write_bytes("metrics.jsonl", "".join(line + "\n" for line in kept + [json.dumps(r) for r in steps]).encode())


def tensorboard_writer(run_uri: str | None):
    """A TensorBoard writer for RUN/tensorboard (tensorboardX, which Ray Train installs) where the run folder is
    on the local disk, else None; `tensorboard --logdir RUN/tensorboard` shows every per-step metric."""
    if not run_uri or "://" in run_uri:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(logdir=str(Path(run_uri) / "tensorboard"))


def plot_curve(run: RunDir, history: list[dict[str, float]]) -> None:
    """RUN/loss_curve.png: training (and held-out) loss per epoch, and its parts."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(ep, [h["loss"] for h in history], label="train")
    if "val_loss" in history[0]:
        axes[0].plot(ep, [h["val_loss"] for h in history], label="held out")
    axes[0].set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    axes[0].legend()
    for key in ("mse", "stats_mse", "ntx"):
        if key in history[0]:
            axes[1].plot(ep, [h[key] for h in history], label=key)
    axes[1].set(xlabel="epoch", yscale="log", title="parts")
    axes[1].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    run.write_bytes("loss_curve.png", buf.getvalue())
