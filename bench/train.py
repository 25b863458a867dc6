"""Training input against training compute: does the Ray Data window stream keep the step fed?

    python bench/train.py [--catalog wildzoo-data/catalog] [--flavour small] [--device cpu|cuda]
                          [--peak-tflops 989] [--scale 4] [--batches 60]

Prints, in one run:
- the tokens/s the training window stream delivers alone (train.fit.training_streams drained in the driver with
  the fit's collate — permuted views included — and no model);
- the tokens/s one training step consumes alone (forward + backward + AdamW of the flavour's backbone on batches
  of the same shapes already in memory, one worker's threads);
- `stream/step: R`, the stream's rate over what all `--workers` steps consume together;
- the trainer's peak RSS (max over ranks) for one epoch of `train fit` on the catalog and on one `--scale` times
  larger (the same models copied under other ids): the stream must not grow with the catalog;
- with `--device cuda`: model FLOP utilisation (matmul FLOPs of forward + backward per token, 6 × the
  backbone's matmul parameters plus attention, over `--peak-tflops`, the GPU's bf16 peak).
Tokens are real tokens (padding excluded). Nothing here is asserted by tests: it prints figures.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ holds tokenize.py, which would shadow the standard library's module that torch imports
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]


def scaled_catalog(src: str, dst: Path, k: int) -> str:
    """A catalog k times larger: every shard of `src` copied k times, model ids (and trained-model ids) suffixed."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from catalog.store import Catalog

    cat = Catalog.open(src)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copy(Path(cat.root) / "catalog.json", dst / "catalog.json")
    for table in ("models", "tensors", "tokens", "properties"):
        (dst / table).mkdir()
        for path in cat.files(table):
            t = pq.read_table(path)
            stem = Path(path).stem
            for i in range(k):
                part = t
                for col in ("model_id", "repo_id"):
                    if col in part.column_names:
                        j = part.column_names.index(col)
                        part = part.set_column(j, col, pc.binary_join_element_wise(part[col], pa.scalar(f"#{i}"), ""))
                pq.write_table(part, dst / table / f"{stem}-x{i}.parquet")
    return str(dst)


def matmul_flops_per_token(model, window: int) -> float:
    """Forward + backward matmul FLOPs per token: 6 × parameters of the linear layers, plus attention scores and
    values (4 · T · d_model per layer and token, × 3 for backward)."""
    import torch

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attn = 2 * model.cfg.n_layers * 4 * window * model.cfg.d_model  # encoder + decoder
    return 6.0 * linear + 3.0 * attn


def main() -> int:
    import numpy as np
    import ray
    import torch

    from catalog.rayenv import ensure_ray
    from catalog.store import Catalog
    from train.__main__ import setup_logging
    from train.behaviour import Behaviour
    from train.config import TrainConfig
    from train.fit import fit, training_streams
    from train.losses import backbone_loss
    from train.model import Backbone
    from train.plan import make_plan
    from train.stream import window_collate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", default=str(ROOT / "wildzoo-data" / "catalog"))
    ap.add_argument("--flavour", default="small", choices=["debug", "small", "base"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's bf16 peak, for MFU (cuda)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data-cpus", type=float, default=1.0, help="CPU slots Ray Data gets (the fit's --data-cpus)")
    ap.add_argument("--unit-mb", type=int, default=0, help="tokens each Ray Data task reads (the fit's unit_mb; 0: the flavour's)")
    ap.add_argument("--scale", type=int, default=4, help="the larger catalog for peak memory (default 4×; 0: no memory figures)")
    ap.add_argument("--batches", type=int, default=60, help="training steps timed (default 60)")
    ap.add_argument("--stream-epochs", type=int, default=5,
                    help="epochs of the stream drained (default 5: the first pays Ray Data's start, the next few still warm up)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args()
    setup_logging(False)
    cfg = TrainConfig.flavour(args.flavour).replace(workers=args.workers, data_cpus=args.data_cpus)
    if args.unit_mb:
        cfg = cfg.replace(unit_mb=args.unit_mb)
    if args.device == "cuda":
        cfg = cfg.replace(gpus_per_worker=1.0)
    cat = Catalog.open(args.catalog)
    cfg = cfg.replace(model=cfg.model.__class__(**{**cfg.model.__dict__, "token_size": cat.spec.token_size}))
    plan = make_plan(cat, cfg)  # what the fit trains on: split of the probe's 5 seeds, normalizer, architectures
    train_refs, keys = plan.train, list(plan.arch_keys)
    print(f"catalog {cat.uri}: {len(train_refs)} training models; flavour {args.flavour}, batch {cfg.batch_size}, "
          f"window {cfg.model.window}, {args.workers} worker(s) × {cfg.cpus_per_worker} CPU, data CPUs {cfg.data_cpus:g}")

    # 1. the stream alone: one epoch of training windows drained with the fit's collate, no model
    started = ensure_ray(cfg.workers * cfg.cpus_per_worker + int(np.ceil(cfg.data_cpus)))
    datasets, counts = training_streams(cat, cfg, plan)
    ds = datasets["train"]
    from ray.data import ExecutionResources

    ds.context.execution_options.resource_limits = ExecutionResources(cpu=cfg.data_cpus)
    kept: list[dict] = []
    rates = []
    for epoch in range(args.stream_epochs):  # every epoch re-executes the dataset: the first pays Ray Data's start
        tokens, t0 = 0, time.time()
        for batch in ds.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True,
                                           prefetch_batches=cfg.prefetch_batches,
                                           local_shuffle_buffer_size=8 * cfg.batch_size, local_shuffle_seed=epoch,
                                           collate_fn=window_collate(cfg.permute, epoch)):
            tokens += int((batch["n_valid"] > 0).sum())
            if len(kept) < 8:
                kept.append(batch)
        rates.append(tokens / (time.time() - t0))
        print(f"stream alone, epoch {epoch + 1}: {tokens:,} tokens in {time.time() - t0:.1f}s = {rates[-1]:,.0f} tokens/s "
              f"({counts['windows_per_epoch']:,} windows/epoch)", flush=True)
    stream_rate = float(np.mean(rates[1:])) if len(rates) > 1 else rates[0]
    print(f"stream alone: {stream_rate:,.0f} tokens/s (epochs after the first)")

    # 2. the step alone: the same shapes, batches already in memory
    device = torch.device(args.device)
    torch.set_num_threads(cfg.cpus_per_worker if args.device == "cpu" else torch.get_num_threads())
    torch.manual_seed(0)
    model = Backbone(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    behaviour = Behaviour(keys, cfg.model.token_size, n_head=cfg.model.behaviour_queries or 128).to(device) \
        if cfg.model.behaviour_queries or cfg.behaviour else None
    batches = [{k: v.to(device) for k, v in b.items()} for b in kept]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else torch.autocast("cpu", enabled=False)
    step_tokens = 0
    for i in range(args.batches + 3):
        if i == 3:  # warm-up done
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0, step_tokens = time.time(), 0
        b = batches[i % len(batches)]
        with amp:
            loss = backbone_loss(model, b, cfg.loss, behaviour)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_tokens += int((b["n_valid"] > 0).sum())
    if args.device == "cuda":
        torch.cuda.synchronize()
    step_rate = step_tokens / (time.time() - t0)
    consumed = step_rate * args.workers
    print(f"step alone: {step_rate:,.0f} tokens/s per worker ({args.workers} workers consume {consumed:,.0f} tokens/s); "
          f"{model.n_params():,} parameters")
    print(f"stream/step: {stream_rate / consumed:.1f}")
    if args.device == "cuda" and args.peak_tflops > 0:
        # both views go through the model: 2 passes per real token of a batch
        flops = 2 * matmul_flops_per_token(model, cfg.model.window) * step_rate
        print(f"model FLOP utilisation: {flops / 1e12:.2f} TFLOP/s of {args.peak_tflops:g} = "
              f"{flops / (args.peak_tflops * 1e12):.1%}")
    if started:
        ray.shutdown()

    # 3. the trainer's peak memory: one epoch on the catalog and on one --scale times larger (--scale 0: skipped)
    if args.scale < 2:
        return 0
    big = scaled_catalog(args.catalog, Path(args.out) / f"catalog-x{args.scale}", args.scale)
    rss = {}
    for name, path in (("default", args.catalog), (f"{args.scale}x", big)):
        run = Path(args.out) / f"train-bench-{name}"
        shutil.rmtree(run, ignore_errors=True)
        s = fit(path, str(run), cfg.replace(epochs=1))
        rss[name] = s["history"][-1]["rss_mb"]
        print(f"trainer peak RSS, {name} catalog: {rss[name]:,.0f} MiB (max over ranks)", flush=True)
    print(f"peak RSS {args.scale}x / default: {rss[f'{args.scale}x'] / rss['default']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
