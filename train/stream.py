"""Windows of weight tokens streamed by Ray Data into Ray Train workers, and embedding as batch inference.

The dataset (`window_dataset`) is a small table of *units* — whole models, a few MB of tokens, of one or
more catalog shards (`units`) — mapped by Ray Data tasks (`make_windows`) into window rows: each task reads the tokens of
its unit's models from their shard (only the columns training needs, filtered on `model_id`), normalizes
them as the run's `Normalizer` says, and cuts windows: `views` at random offsets per model for training,
or tiling every token once (validation, embedding). A window row holds arrays (T, …) of one model and,
for a model of a permutable architecture that fits the window, its permutation plan.

Why units rather than `read_parquet`'s blocks: a window must hold tokens of one model in order, and
Parquet readers cut files into row batches without regard to models; gathering a model back from
several blocks needs a shuffle by `model_id`. The crawl writes every model's tokens into one shard,
so a unit of whole models is read with one filtered scan per shard it touches and needs no shuffle;
small shards are packed into one unit, since every Ray Data task costs its scheduling.

In the workers (`train.fit.train_loop`), `ray.train.get_dataset_shard("train").iter_torch_batches`
prefetches batches while the step runs, shuffles windows in a bounded local buffer, and applies the
augmentations that are not stored (`WindowCollate`: the permuted second view; noise and masking happen
in the loss). `TorchTrainer` splits the dataset with `streaming_split(equal=True)`, so every rank gets the
same number of windows and, with `drop_last`, takes the same number of steps.

Resource accounting (the 2-core deadlock, understood): Ray Train's workers hold their CPU slots for the
whole fit; Ray Data's tasks need slots of their own. On a Ray with `num_cpus` equal to the workers' CPUs,
no slot is ever free, so no read task starts and the first `iter_torch_batches` waits forever.
`data_cpus` slots are therefore added to the local Ray (`catalog.rayenv.ray_session`) and given to Ray Data
as its resource limit (`DataConfig(execution_options=…)`), so Data and Train cannot starve each other.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import numpy as np

from catalog.store import Catalog
from train.data import BatchArrays, ModelRef, n_windows, packed_units, permute_views, read_models
from train.normalize import Normalizer

log = logging.getLogger(__name__)
def units(refs: list[ModelRef], unit_tokens: int) -> list[dict[str, Any]]:
    """Reading units (`train.data.packed_units`: whole models, possibly of several shards) as rows
    {shards (one per model), model_ids, n_tokens}."""
    return [{"shards": [r.shard for r in u], "model_ids": [r.model_id for r in u],
             "n_tokens": sum(r.n_tokens for r in u)} for u in packed_units(refs, unit_tokens)]


def window_count(refs: list[ModelRef], window: int, views: int = 1) -> int:
    """Windows the dataset of `refs` yields per epoch (`views` per tile of each model)."""
    return views * sum(n_windows(r, window) for r in refs)


def make_windows(batch: dict[str, np.ndarray], catalog: str, window: int, views: int, norm: dict,
                 archs: dict[str, int], train: bool, seed: int) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` function: units in, window rows out (see the module docstring).

    Training windows start at random offsets, drawn from the operating system's entropy (every epoch
    re-executes the dataset and gets fresh offsets; a model that fits one window always starts at 0, so a
    zoo of small models streams the same windows every epoch), and leave in random order; `train=False` tiles
    every token once, in order.

    Why the order: units hold whole models of a few shards, and a crawl writes related models into the same
    shard (a zoo's checkpoints of one run, its hyperparameter grid in order); emitted model after model, the
    workers' bounded local shuffle mixed only neighbours, so batches were far from i.i.d.: the `small` flavour
    ended 4 epochs 0.07 higher in training loss and held-out error than the global shuffle of the per-rank reader
    it replaced (bench/stream_vs_reader.py, 3 seeds, above the noise)."""
    cat = Catalog.open(catalog)
    normalizer = Normalizer.from_dict(norm)
    parts: list[BatchArrays] = []
    for shards, ids in zip(batch["shards"], batch["model_ids"], strict=True):
        ids = [str(m) for m in ids]
        tokens = read_models(cat, [ModelRef(m, m, 0, str(s)) for m, s in zip(ids, shards, strict=True)],
                             normalizer, archs)
        if train:
            rng = np.random.default_rng()
            model, start = tokens.windows(window, rng, views)
        else:
            model, start = tokens.windows(window)
        arrays = tokens.batch(model, start, window)
        arrays["has_bias"] = arrays["has_bias"].astype(np.uint8)
        # which model each window belongs to, as an index into the unit (embedding pools by it)
        arrays["model_row"] = model.astype(np.int64)
        arrays["unit_key"] = np.full(len(model), zlib.crc32(("\0".join(ids) + f"\0{seed}").encode()), dtype=np.int64)
        parts.append(arrays)
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if train:  # a unit's windows in random order: its models mixed in every batch, not one model after another
        order = np.random.default_rng().permutation(len(out["values"]))
        out = {k: v[order] for k, v in out.items()}
    return out


def window_dataset(catalog: str, refs: list[ModelRef], window: int, norm: Normalizer, archs: dict[str, int],
                   train: bool, views: int = 1, seed: int = 0, unit_tokens: int = 1 << 14, data_cpus: float = 1.0):
    """A Ray Data dataset of the window rows of `refs` (lazy: nothing runs until it is iterated)."""
    import ray.data

    quiet(ray.data.DataContext.get_current())
    rows = units(refs, unit_tokens)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    if train:  # the units in a fresh random order every epoch (each execution draws its own)
        ds = ds.randomize_block_order()
    return ds.map_batches(make_windows, batch_size=1, num_cpus=min(1.0, data_cpus),
                          fn_kwargs={"catalog": catalog, "window": window, "views": views, "norm": norm.to_dict(),
                                     "archs": archs, "train": train, "seed": seed})


def quiet(ctx) -> None:
    """No progress bars or per-execution banners from Ray Data in a trainer's log (the fit logs its own progress)."""
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


def data_config(data_cpus: float, preserve_order: bool = True):
    """Ray Train's DataConfig with Ray Data's CPU budget set to the slots reserved for it."""
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train import DataConfig

    opts = ExecutionOptions(resource_limits=ExecutionResources(cpu=data_cpus), preserve_order=preserve_order)
    return DataConfig(execution_options=opts)


TORCH_KEYS = ("values", "values2", "stats", "n_valid", "n", "l", "k", "role", "mu", "sd", "bmu", "bsd", "has_bias",
              "arch")


def collate(arrays: BatchArrays, permute: float = 0.0, seed: int | None = None) -> dict[str, Any]:
    """A batch of window rows as the tensors `backbone_loss` takes, with the permuted view when `seed` is given.

    The permutations are seeded by `seed` and the batch's windows themselves, so they do not depend on
    which prefetch thread collates which batch."""
    import torch

    if seed is not None:
        key = zlib.crc32(np.ascontiguousarray(arrays["unit_key"]).tobytes()
                         + np.ascontiguousarray(arrays["values"][:, :2, :4]).tobytes())
        arrays = permute_views(arrays, permute, np.random.default_rng([seed, key]))
    # Ray hands read-only views of its blocks: copy into arrays torch may own
    out = {k: torch.from_numpy(np.array(arrays[k], copy=True, order="C")) for k in TORCH_KEYS if k in arrays}
    out["has_bias"] = out["has_bias"].bool()
    return out


def window_collate(permute: float = 0.0, seed: int | None = None):
    """`iter_torch_batches(collate_fn=…)`: numpy window rows → tensors (moved to the worker's device by Ray,
    pinned first with `pin_memory`), with on-the-fly permuted views when `seed` is given (training)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class WindowCollate(NumpyBatchCollateFn):
        def __call__(self, batch: BatchArrays) -> dict[str, Any]:
            return collate(batch, permute, seed)

    return WindowCollate()

