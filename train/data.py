"""Windows of weight tokens, read from a catalog, for training and embedding the backbone.

A window is `window` consecutive tokens of one model (never two models), standardized per tensor
with the `norm_mean`/`norm_std` of the `tensors` table when read (tokens store raw values, so a new
normalization needs no re-crawl; a bias that row tokenization packs into its weight's rows is
standardized with its own statistics), entries past `n_valid` zeroed, and windows that run past the
end of a model padded with tokens of `n_valid == 0`. What standardizing takes away is handed to the
model as two features per token (`stats`: asinh of the tensor's mean, log of its std).

How windows reach the workers — a per-worker Parquet reader sharded by rank, not Ray Data:
- a window must hold tokens of one model in order; the unit of reading is therefore a set of whole
  models of one shard (`tokens/<shard>.parquet`, filtered on `model_id`), not Ray Data's blocks,
  which cut models at row-group boundaries;
- DDP needs every rank to take the same number of steps. Window counts follow from `models.n_tokens`
  alone, so each rank computes every rank's count from the catalog's metadata and all take the
  minimum: no extra collective, no `equal=True` streaming split;
- on 2 cores, Ray Train plus Ray Data deadlocked with `num_cpus=2` (backpressured reads wait for CPU
  slots the train workers hold) and ran only with logical oversubscription. A reader inside each
  worker needs no extra CPU slot, so `--workers N` asks Ray for exactly N worker slots.
Memory stays bounded: a worker reads `chunk_tokens` at a time (models of one shard), shuffles
windows within the chunk and the leftovers of the previous one; when all its tokens fit in
`cache_tokens` it reads them once, as one chunk in model_id order, and keeps them across epochs —
so a small catalog trains the same whatever way its crawl cut the shards.

The split is by trained model (`models.repo_id`): `split_models` holds out every trained model
the probe (`train.probe.group_split` with the same seed) puts in its validation or test side, so
`train probe --run` scores embeddings of models the backbone never saw.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog.errors import WildzooError
from catalog.roles import ROLES
from catalog.store import Catalog

log = logging.getLogger(__name__)
ROLE_INDEX = {r: i for i, r in enumerate(ROLES)}
OTHER_ROLE = ROLE_INDEX["other"]
BatchArrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class ModelRef:
    """One `ok` model with tokens: where its tokens are and which trained model it belongs to."""

    model_id: str
    group: str  # the trained model (repo_id): every checkpoint of it lands on one side of a split
    n_tokens: int
    shard: str  # file stem shared by its models/, tensors/ and tokens/ shards


def list_models(cat: Catalog) -> list[ModelRef]:
    """Every `ok` model of the catalog that has tokens, sorted by model_id."""
    token_shards = cat.shard_ids("tokens")
    refs = []
    for path in cat.files("models"):
        shard = path.rsplit("/", 1)[1][: -len(".parquet")]
        t = pq.read_table(path, columns=["model_id", "repo_id", "status", "n_tokens"], filesystem=cat.fs)
        for row in t.to_pylist():
            if row["status"] == "ok" and (row["n_tokens"] or 0) > 0 and shard in token_shards:
                refs.append(ModelRef(row["model_id"], row["repo_id"] or row["model_id"], int(row["n_tokens"]), shard))
    return sorted(refs, key=lambda r: r.model_id)


def split_models(cat: Catalog, refs: list[ModelRef], seed: int = 0) -> tuple[list[ModelRef], list[ModelRef]]:
    """(train, held out): held out are the trained models the probe validates and tests on with `seed`.

    The probe scores the largest architecture group of the catalog (`train.features.load_population`);
    models outside it are never probed and all go to training.
    """
    from train.features import load_population
    from train.probe import group_split

    pop = load_population(cat)
    if len(np.unique(pop.groups)) < 3:
        log.warning("only %d trained model(s): nothing held out", len(np.unique(pop.groups)))
        return list(refs), []
    s = group_split(pop.groups, seed)
    held = set(pop.groups[np.concatenate([s.val, s.test])].tolist())
    return [r for r in refs if r.group not in held], [r for r in refs if r.group in held]


@dataclass
class Tokens:
    """Standardized tokens of several models, concatenated in (model, token_idx) order."""

    model_ids: list[str]
    offsets: np.ndarray  # (M + 1,) where each model's tokens start; the last entry is N
    values: np.ndarray  # (N, S) float32, standardized, padding zeroed
    n_valid: np.ndarray  # (N,) int64
    n: np.ndarray  # (N,) int64 token index within its model
    l: np.ndarray  # noqa: E741 (N,) int64 layer index
    k: np.ndarray  # (N,) int64 row index
    role: np.ndarray  # (N,) int64 index into catalog.roles.ROLES
    stats: np.ndarray  # (N, 2) float32: asinh(mean) and log(std) of the token's tensor

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def windows(self, window: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(model index, start) of ceil(T/window) windows per model of T tokens.

        With `rng`, starts are uniform in [0, T − window] (training); without, the windows tile the
        model exactly, the last one padded (embedding: every token counted once).
        """
        lengths = self.lengths
        count = np.maximum(1, -(-lengths // window))
        model = np.repeat(np.arange(len(lengths)), count)
        if rng is None:
            first = np.repeat(np.cumsum(count) - count, count)
            start = (np.arange(len(model)) - first) * window
        else:
            start = rng.integers(0, np.maximum(lengths - window, 0)[model] + 1)
        return model, start

    def batch(self, model: np.ndarray, start: np.ndarray, window: int) -> BatchArrays:
        """Arrays of windows (B, T, ...) at (model index, start); positions past a model's end are padding."""
        idx = self.offsets[model][:, None] + start[:, None] + np.arange(window)  # (B, T)
        real = idx < self.offsets[model + 1][:, None]
        idx = np.where(real, idx, 0)
        out = {"values": self.values[idx] * real[..., None], "stats": self.stats[idx] * real[..., None]}
        for name in ("n_valid", "n", "l", "k", "role"):
            out[name] = np.where(real, getattr(self, name)[idx], 0)
        return out


def read_tokens(cat: Catalog, shard: str, model_ids: list[str]) -> Tokens:
    """The tokens of `model_ids` (all in `shard`), joined with their tensors' role and statistics."""
    wanted = [("model_id", "in", list(model_ids))]
    tok = pq.read_table(f"{cat.root}/tokens/{shard}.parquet", filesystem=cat.fs, filters=wanted,
                        columns=["model_id", "token_idx", "tensor_idx", "layer_idx", "row_idx", "values", "n_valid"])
    ten = pq.read_table(f"{cat.root}/tensors/{shard}.parquet", filesystem=cat.fs, filters=wanted,
                        columns=["model_id", "tensor_idx", "role", "norm_mean", "norm_std", "packed_into"])
    con = duckdb.connect(":memory:")
    con.register("tok", tok)
    con.register("ten", ten)
    # b: the bias that row tokenization packs into the last column of this tensor's rows, if any
    t = con.sql(
        """SELECT tok.model_id, token_idx, tok.tensor_idx, layer_idx, row_idx, n_valid, "values",
                  coalesce(w.role, 'other') AS role, w.norm_mean, w.norm_std,
                  b.norm_mean AS bias_mean, b.norm_std AS bias_std
           FROM tok
           LEFT JOIN ten w ON w.model_id = tok.model_id AND w.tensor_idx = tok.tensor_idx
           LEFT JOIN ten b ON b.model_id = tok.model_id AND b.packed_into = tok.tensor_idx
           ORDER BY tok.model_id, token_idx"""
    ).to_arrow_table()
    con.close()
    return _standardize(t, cat.spec.token_size)


def _stat(t: pa.Table, name: str, default: float) -> np.ndarray:
    x = t.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
    bad = ~np.isfinite(x) | (x <= 0 if name.endswith("std") else np.zeros(len(x), dtype=bool))
    return np.where(bad, default, x).astype(np.float32)


def _standardize(t: pa.Table, token_size: int) -> Tokens:
    """Tokens from the joined table: every entry standardized with its own tensor's statistics."""
    ids = t.column("model_id").to_numpy(zero_copy_only=False)
    change = np.flatnonzero(ids[1:] != ids[:-1]) + 1 if len(ids) else np.array([], dtype=np.int64)
    offsets = np.concatenate([[0], change, [len(ids)]]).astype(np.int64)
    model_ids = [str(ids[i]) for i in offsets[:-1]]
    flat = t.column("values").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    raw = flat.astype(np.float32, copy=False).reshape(len(ids), token_size)
    n_valid = t.column("n_valid").to_numpy().astype(np.int64)
    real = np.arange(token_size) < n_valid[:, None]  # (N, S)
    mean, std = _stat(t, "norm_mean", 0.0), _stat(t, "norm_std", 1.0)
    values = np.where(real, (raw - mean[:, None]) / std[:, None], 0.0).astype(np.float32)

    def col(name: str) -> np.ndarray:
        return t.column(name).to_numpy().astype(np.int64)

    tensor, row = col("tensor_idx"), col("row_idx")
    # a packed bias is the last real entry of the last token of each row of its weight
    carries = t.column("bias_mean").is_valid().to_numpy(zero_copy_only=False)
    last_of_row = np.ones(len(ids), dtype=bool)
    last_of_row[:-1] = (tensor[1:] != tensor[:-1]) | (row[1:] != row[:-1]) | (ids[1:] != ids[:-1])
    at = np.flatnonzero(carries & last_of_row & (n_valid > 0))
    if len(at):
        j = n_valid[at] - 1
        bias_mean, bias_std = _stat(t, "bias_mean", 0.0), _stat(t, "bias_std", 1.0)
        values[at, j] = (raw[at, j] - bias_mean[at]) / bias_std[at]
    roles = t.column("role").to_pylist()
    role = np.array([ROLE_INDEX.get(r, OTHER_ROLE) for r in roles], dtype=np.int64)
    # what standardizing removes, kept as features: the scale tells diverged and untrained models apart
    stats = np.stack([np.arcsinh(mean), np.log(std)], axis=1).astype(np.float32)
    return Tokens(model_ids, offsets, values, n_valid, col("token_idx"), col("layer_idx"), row, role, stats)


def read_models(cat: Catalog, refs: list[ModelRef]) -> Tokens:
    """The tokens of `refs` from however many shards hold them, in model_id order."""
    by_shard: dict[str, list[str]] = defaultdict(list)
    for r in refs:
        by_shard[r.shard].append(r.model_id)
    parts = [read_tokens(cat, shard, ids) for shard, ids in sorted(by_shard.items())]
    if len(parts) == 1:
        return parts[0]
    ids = [m for p in parts for m in p.model_ids]
    starts = np.concatenate([p.offsets[:-1] + base for p, base in zip(parts, _bases(parts), strict=True)])
    lengths = np.concatenate([p.lengths for p in parts])
    order = sorted(range(len(ids)), key=ids.__getitem__)
    idx = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in order])
    cat_ = {name: np.concatenate([getattr(p, name) for p in parts])[idx]
            for name in ("values", "n_valid", "n", "l", "k", "role", "stats")}
    offsets = np.concatenate([[0], np.cumsum(lengths[order])]).astype(np.int64)
    return Tokens([ids[i] for i in order], offsets, **cat_)


def _bases(parts: list[Tokens]) -> list[int]:
    sizes = [int(p.offsets[-1]) for p in parts]
    return [sum(sizes[:i]) for i in range(len(sizes))]


def chunks(refs: list[ModelRef], chunk_tokens: int) -> list[list[ModelRef]]:
    """Reading units of at most `chunk_tokens` tokens (or one model).

    Models that fit in one unit all go together in model_id order, so what a worker sees does not
    depend on how a crawl happened to cut its shards; otherwise each unit holds models of one shard
    (every shard file is read once per epoch).
    """
    if sum(r.n_tokens for r in refs) <= chunk_tokens:
        return [sorted(refs, key=lambda r: r.model_id)] if refs else []
    by_shard: dict[str, list[ModelRef]] = defaultdict(list)
    for r in refs:
        by_shard[r.shard].append(r)
    out = []
    for shard in sorted(by_shard):
        cur: list[ModelRef] = []
        size = 0
        for r in by_shard[shard]:
            if cur and size + r.n_tokens > chunk_tokens:
                out.append(cur)
                cur, size = [], 0
            cur.append(r)
            size += r.n_tokens
        out.append(cur)
    return out


def n_windows(ref: ModelRef, window: int) -> int:
    return max(1, -(-ref.n_tokens // window))


def assign_ranks(refs: list[ModelRef], world: int, window: int) -> list[list[ModelRef]]:
    """Whole models to ranks, balanced by window count (largest first to the least loaded rank)."""
    load = [0] * world
    out: list[list[ModelRef]] = [[] for _ in range(world)]
    for r in sorted(refs, key=lambda r: (-n_windows(r, window), r.model_id)):
        rank = min(range(world), key=lambda i: (load[i], i))
        out[rank].append(r)
        load[rank] += n_windows(r, window)
    return [sorted(rs, key=lambda r: r.model_id) for rs in out]


class WindowStream:
    """One rank's training windows, epoch after epoch; every rank yields the same number of batches."""

    def __init__(self, cat: Catalog, refs: list[ModelRef], window: int, batch_size: int, rank: int = 0,
                 world: int = 1, seed: int = 0, chunk_tokens: int = 1 << 16, cache_tokens: int = 1 << 20) -> None:
        per_rank = assign_ranks(refs, world, window)
        counts = [sum(n_windows(r, window) for r in rs) for rs in per_rank]
        if min(counts) == 0:
            raise WildzooError(f"{len(refs)} model(s) cannot feed {world} workers: use fewer workers")
        self.cat, self.window, self.batch_size, self.rank, self.seed = cat, window, batch_size, rank, seed
        self.refs = per_rank[rank]
        self.windows_per_rank = counts
        self.steps = max(1, min(counts) // batch_size)
        # tokens that fit in the cache are read once, as one chunk (windows then mix all of them)
        fits = sum(r.n_tokens for r in self.refs) <= cache_tokens
        self.chunks = chunks(self.refs, max(chunk_tokens, cache_tokens) if fits else chunk_tokens)
        self.cache: dict[int, Tokens] | None = {} if fits else None

    def _tokens(self, i: int) -> Tokens:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        tokens = read_models(self.cat, self.chunks[i])
        if self.cache is not None:
            self.cache[i] = tokens
        return tokens

    def epoch(self, epoch: int) -> Iterator[BatchArrays]:
        """`self.steps` batches of windows in a fresh random order (seeded by seed, epoch and rank)."""
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        leftover: BatchArrays | None = None
        emitted = 0
        for i in rng.permutation(len(self.chunks)):
            tokens = self._tokens(int(i))
            model, start = tokens.windows(self.window, rng)
            arrays = tokens.batch(model, start, self.window)
            if leftover is not None:
                arrays = {k: np.concatenate([leftover[k], v]) for k, v in arrays.items()}
            order = rng.permutation(len(arrays["values"]))
            arrays = {k: v[order] for k, v in arrays.items()}
            n_full = len(order) // self.batch_size
            for b in range(n_full):
                yield {k: v[b * self.batch_size: (b + 1) * self.batch_size] for k, v in arrays.items()}
                emitted += 1
                if emitted == self.steps:
                    return
            leftover = {k: v[n_full * self.batch_size:] for k, v in arrays.items()}
        if leftover is not None and len(leftover["values"]) and emitted < self.steps:
            yield leftover  # fewer windows than one batch on the smallest rank


def tiled_batches(cat: Catalog, refs: list[ModelRef], window: int, batch_size: int,
                  chunk_tokens: int = 1 << 16) -> Iterator[tuple[list[str], np.ndarray, BatchArrays]]:
    """Every token of every model exactly once: (model ids of the chunk, model index per window, batch)."""
    for chunk in chunks(refs, chunk_tokens):
        tokens = read_models(cat, chunk)
        model, start = tokens.windows(window)
        for b in range(0, len(model), batch_size):
            m, s = model[b: b + batch_size], start[b: b + batch_size]
            yield tokens.model_ids, m, tokens.batch(m, s, window)
