"""Windows of weight tokens, read from a catalog, for training and embedding the backbone.

A window is `window` consecutive tokens of one model (never two models), normalized when read as the
run's `Normalizer` says (tokens store raw values, so a new normalization needs no re-crawl): per layer
(μ, σ of tensor i over the training split, for populations whose tensors line up) or per tensor (its own
`norm_mean`/`norm_std`); a bias that row tokenization packs into its weight's rows is normalized with its
own statistics. Entries past `n_valid` are zeroed, and windows that run past the end of a model are
padded with tokens of `n_valid == 0`. Every token carries its tensor's statistics row (`STAT_NAMES`:
what normalizing may take away — the scale — compressed with asinh/log and standardized), and what
de-normalizing needs (`mu`, `sd`, `bmu`, `bsd`, `has_bias`). For permutable models (the zoo's CNNs and
MLPs as row tokens) a training batch has a second view `values2` with hidden units permuted.

How windows reach the workers: Ray Data (train/stream.py) maps units of whole models through
`read_models` and `Tokens.batch`; `tiled_batches` is the same in one process (embedding in the driver,
the reconstruction report).

The split is by trained model (`models.repo_id`): `split_models` holds out every trained model that
the probe (`train.probe.group_split`) puts on its test side for any of the run's split seeds, so
`train probe --run` scores embeddings of models the backbone never saw, on every seed.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog.roles import ROLES
from catalog.store import Catalog
from train.normalize import CLIP, STAT_COLS, Normalizer, center_scale, raw_stat_features

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
    for row in cat.current_models(("model_id", "repo_id", "status", "n_tokens")).to_pylist():
        if row["status"] == "ok" and (row["n_tokens"] or 0) > 0 and row["shard"] in token_shards:
            refs.append(ModelRef(row["model_id"], row["repo_id"] or row["model_id"], int(row["n_tokens"]), row["shard"]))
    return sorted(refs, key=lambda r: r.model_id)


def split_models(cat: Catalog, refs: list[ModelRef], seeds: int | list[int] = 0,
                 ) -> tuple[list[ModelRef], list[ModelRef]]:
    """(train, held out): held out are the trained models on the test side of the probe's split for any
    of `seeds` (`train.probe.group_split`), so `train probe --run --seeds …` scores every split on
    models the backbone never saw. One seed holds out its validation side too (the published protocol).

    The probe scores the largest architecture group of the catalog (`train.features.load_population`);
    models outside it are never probed and all go to training.
    """
    from train.features import load_population
    from train.probe import group_split

    pop = load_population(cat)
    if len(np.unique(pop.groups)) < 3:
        log.warning("only %d trained model(s): nothing held out", len(np.unique(pop.groups)))
        return list(refs), []
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    held: set[str] = set()
    for seed in seeds:
        s = group_split(pop.groups, seed)
        side = np.concatenate([s.val, s.test]) if len(seeds) == 1 else s.test
        held |= set(pop.groups[side].tolist())
    return [r for r in refs if r.group not in held], [r for r in refs if r.group in held]


@dataclass(frozen=True)
class Layer:
    """One layer of a permutable model, as row tokens: `rows` consecutive tokens from `start`, one per
    output unit, each `width` weights then (with `bias`) the bias in column `width`."""

    start: int
    rows: int
    width: int
    bias: bool


def permutation_plan(tensor_rows: list[dict], token_size: int) -> list[Layer] | None:
    """The layer chain of a model whose hidden units can be permuted, or None.

    Permutable: row tokens with one token per row, every tokenized tensor a ≥2-D weight (its bias packed
    into it), consecutive in token order, and each layer's row a whole number of blocks per output unit
    of the layer before (conv [out, in, kh, kw] rows, and linear layers after a channel-major flatten).
    That is the zoo's CNNs and MLPs; anything else (norms, attention, unpacked 1-D tensors) is not.
    """
    packed = {r["packed_into"] for r in tensor_rows if r.get("packed_into") is not None}
    layers = []
    for r in sorted((r for r in tensor_rows if r.get("n_tokens")), key=lambda r: r["token_start"]):
        shape = list(r["shape"])
        if len(shape) < 2:
            return None
        width = int(np.prod(shape[1:]))
        bias = r["tensor_idx"] in packed
        if r["n_tokens"] != shape[0] or width + bias > token_size:
            return None
        if layers and r["token_start"] != layers[-1].start + layers[-1].rows:
            return None
        layers.append(Layer(int(r["token_start"]), int(shape[0]), width, bias))
    if len(layers) < 2 or any(b.width % a.rows for a, b in zip(layers, layers[1:], strict=False)):
        return None
    return layers


def permute_index(plan: list[Layer], token_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random permutation of every hidden layer's units, as a gather over the model's tokens:
    (source token (T,), source column (T, S)); `values[src_tok[:, None], src_col]` is the permuted model,
    which computes the same function (output units and inputs stay in place)."""
    n_tok, base_col, layers = _permute_layout(tuple(plan), token_size)
    src_tok = np.arange(n_tok)
    src_col = base_col.copy()
    prev: np.ndarray | None = None  # the permutation of the previous layer's units
    for i, (start, rows, width, block, j_div, j_mod) in enumerate(layers):
        perm = rng.permutation(rows) if i < len(layers) - 1 else np.arange(rows)
        src_tok[start:start + rows] = start + perm
        if prev is not None:
            src_col[start:start + rows, :width] = prev[j_div] * block + j_mod
        prev = perm
    return src_tok, src_col


@functools.lru_cache(maxsize=256)
def _permute_layout(plan: tuple[Layer, ...], token_size: int) -> tuple[int, np.ndarray, list[tuple]]:
    """What `permute_index` needs of a plan that does not depend on the draw, computed once per architecture:
    the token count, the identity column map, and per layer (start, rows, width, block, j // block, j % block) —
    a layer's input column j reads unit j // block of the layer before, at offset j % block."""
    n_tok = plan[-1].start + plan[-1].rows
    base_col = np.broadcast_to(np.arange(token_size), (n_tok, token_size)).copy()
    base_col.flags.writeable = False
    layers, prev_rows = [], None
    for layer in plan:
        block = layer.width // prev_rows if prev_rows else 0  # the first layer's inputs stay in place: no map
        j = np.arange(layer.width)
        layers.append((layer.start, layer.rows, layer.width, block, *((j // block, j % block) if block else (None, None))))
        prev_rows = layer.rows
    return n_tok, base_col, layers


@dataclass
class Tokens:
    """Normalized tokens of several models, concatenated in (model, token_idx) order."""

    model_ids: list[str]
    offsets: np.ndarray  # (M + 1,) where each model's tokens start; the last entry is N
    values: np.ndarray  # (N, S) float32, normalized, padding zeroed
    n_valid: np.ndarray  # (N,) int64
    n: np.ndarray  # (N,) int64 token index within its model
    l: np.ndarray  # noqa: E741 (N,) int64 layer index
    k: np.ndarray  # (N,) int64 row index
    role: np.ndarray  # (N,) int64 index into catalog.roles.ROLES
    stats: np.ndarray  # (N, F) float32: the token's tensor statistics row, standardized
    mu: np.ndarray  # (N,) float32: value = (raw − mu) / sd for the token's weights ...
    sd: np.ndarray
    bmu: np.ndarray  # ... and (raw − bmu) / bsd for its packed bias column, where has_bias
    bsd: np.ndarray
    has_bias: np.ndarray  # (N,) bool: entry n_valid − 1 is a packed bias
    plans: list[list[Layer] | None] = dataclass_field(default_factory=list)  # per model: permutable layers
    arch: np.ndarray | None = None  # (M,) int64 per model: index of its known architecture (−1: none)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def windows(self, window: int, rng: np.random.Generator | None = None, views: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(model index, start) of `views` × ceil(T/window) windows per model of T tokens.

        With `rng`, starts are uniform in [0, T − window] (training; a model that fits in one window
        always starts at 0); without, the windows tile the model exactly, the last one padded
        (embedding: every token counted once).
        """
        lengths = self.lengths
        count = np.maximum(1, -(-lengths // window))
        model = np.repeat(np.arange(len(lengths)), count)
        if rng is None:
            first = np.repeat(np.cumsum(count) - count, count)
            start = (np.arange(len(model)) - first) * window
        else:
            model = np.tile(model, views)
            start = rng.integers(0, np.maximum(lengths - window, 0)[model] + 1)
        return model, start

    def batch(self, model: np.ndarray, start: np.ndarray, window: int,
              rng: np.random.Generator | None = None, permute: float = 0.0) -> BatchArrays:
        """Arrays of windows (B, T, ...) at (model index, start); positions past a model's end are padding.

        `plan` carries the permutation plan of a permutable model that fits its window. With `rng` and
        `permute` > 0, adds `values2` (`permute_views`).
        """
        idx = self.offsets[model][:, None] + start[:, None] + np.arange(window)  # (B, T)
        real = idx < self.offsets[model + 1][:, None]
        idx = np.where(real, idx, 0)
        out = {"stats": self.stats[idx] * real[..., None]}
        for name in ("n_valid", "n", "l", "k", "role", "mu", "bmu"):
            out[name] = np.where(real, getattr(self, name)[idx], 0)
        out["has_bias"] = real & self.has_bias[idx]
        for name in ("sd", "bsd"):
            out[name] = np.where(real, getattr(self, name)[idx], 1).astype(np.float32)
        # a window holding a whole model of a known architecture can be rebuilt and run (behavioural loss),
        # and permuted when the model is permutable
        whole = (start == 0) & (self.lengths[model] <= window)
        arch = self.arch if self.arch is not None else np.full(len(self.model_ids), -1)
        out["arch"] = np.where(whole, arch[model], -1).astype(np.int64)
        plans = np.stack([encode_plan(p) for p in self.plans]) if self.plans else \
            np.zeros((len(self.model_ids), MAX_PLAN, 4), dtype=np.int64)
        out["plan"] = np.where(whole[:, None, None], plans[model], 0)
        out["values"] = self.values[idx] * real[..., None]
        if rng is None or permute <= 0:
            return out
        return permute_views(out, permute, rng)


MAX_PLAN = 32  # layers of a permutable model a window carries (deeper models are not permuted)


def encode_plan(plan: list[Layer] | None) -> np.ndarray:
    """A permutation plan as a (MAX_PLAN, 4) array (start, rows, width, bias per layer; zeros: none), so that a
    window row carries its own."""
    out = np.zeros((MAX_PLAN, 4), dtype=np.int64)
    if plan is not None and len(plan) <= MAX_PLAN:
        out[: len(plan)] = [(p.start, p.rows, p.width, int(p.bias)) for p in plan]
    return out


def decode_plan(rows: np.ndarray) -> list[Layer] | None:
    return _decode_plan(np.ascontiguousarray(rows, dtype=np.int64).tobytes())


@functools.lru_cache(maxsize=256)
def _decode_plan(raw: bytes) -> list[Layer] | None:
    """A window's plan rows, decoded once per distinct plan (every window of an architecture carries the same)."""
    rows = np.frombuffer(raw, dtype=np.int64).reshape(-1, 4)
    layers = [Layer(int(a), int(r), int(w), bool(b)) for a, r, w, b in rows if r > 0]
    return layers or None


def permute_views(arrays: BatchArrays, permute: float, rng: np.random.Generator) -> BatchArrays:
    """Adds `values2` to a batch of windows: a second view in which, with probability `permute`, the hidden units
    of each window's permutable model (its `plan`) are permuted — and `values` itself independently: the same
    function, other weights. Only values move: a layer's tokens share their statistics and normalization.

    The permutations are drawn window by window (the random stream does not depend on the batch's make-up); the
    gathers run once per model length for the whole batch."""
    S = arrays["values"].shape[-1]
    out = dict(arrays)
    for key in ("values", "values2"):
        values = np.array(arrays["values"], copy=True)
        by_len: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = defaultdict(list)
        for b in np.flatnonzero(rng.random(len(values)) < permute):
            plan = decode_plan(arrays["plan"][b])
            if plan is None:
                continue
            src_tok, src_col = permute_index(plan, S, rng)
            by_len[len(src_tok)].append((int(b), src_tok, src_col))
        for n, group in by_len.items():
            bs = np.array([g[0] for g in group])
            tok = np.stack([g[1] for g in group])  # (G, n)
            col = np.stack([g[2] for g in group])  # (G, n, S)
            values[bs, :n] = arrays["values"][bs[:, None, None], tok[:, :, None], col]
        out[key] = values
    return out


@functools.cache
def _database() -> duckdb.DuckDBPyConnection:
    """This process's in-memory DuckDB: opening one costs ~14 ms, a third of a small unit's read on the stream's hot
    path; each read joins on a cursor of it (its own registrations)."""
    return duckdb.connect(":memory:")


def read_tokens(cat: Catalog, shard: str, model_ids: list[str], norm: Normalizer | None = None) -> Tokens:
    """The tokens of `model_ids` (all in `shard`), normalized, with their tensors' role and statistics."""
    norm = norm or Normalizer()
    wanted = [("model_id", "in", list(model_ids))]
    tok = pq.read_table(f"{cat.root}/tokens/{shard}.parquet", filesystem=cat.fs, filters=wanted,
                        columns=["model_id", "token_idx", "tensor_idx", "layer_idx", "row_idx", "values", "n_valid"])
    ten = pq.read_table(f"{cat.root}/tensors/{shard}.parquet", filesystem=cat.fs, filters=wanted,
                        columns=["model_id", "tensor_idx", "role", "shape", "token_start", "n_tokens",
                                 "packed_into", "norm_mean", "norm_std", *STAT_COLS])
    con = _database().cursor()
    con.register("tok", tok)
    con.register("ten", ten)
    stat_cols = ", ".join(f"w.{c} AS s_{c}" for c in STAT_COLS)
    # b: the bias that row tokenization packs into the last column of this tensor's rows, if any
    t = con.sql(
        f"""SELECT tok.model_id, token_idx, tok.tensor_idx, layer_idx, row_idx, n_valid, "values",
                  coalesce(w.role, 'other') AS role, w.norm_mean, w.norm_std, {stat_cols},
                  b.tensor_idx AS bias_idx, b.norm_mean AS bias_mean, b.norm_std AS bias_std
           FROM tok
           LEFT JOIN ten w ON w.model_id = tok.model_id AND w.tensor_idx = tok.tensor_idx
           LEFT JOIN ten b ON b.model_id = tok.model_id AND b.packed_into = tok.tensor_idx
           ORDER BY tok.model_id, token_idx"""
    ).to_arrow_table()
    con.close()
    tokens = _normalize(t, cat.spec.token_size, norm)
    if cat.spec.tokenization == "row":
        by_model: dict[str, list[dict]] = defaultdict(list)
        for r in ten.select(["model_id", "tensor_idx", "shape", "token_start", "n_tokens", "packed_into"]).to_pylist():
            by_model[r["model_id"]].append(r)
        tokens.plans = [permutation_plan(by_model[m], cat.spec.token_size) for m in tokens.model_ids]
    else:
        tokens.plans = [None] * len(tokens.model_ids)
    return tokens


def _normalize(t: pa.Table, token_size: int, norm: Normalizer) -> Tokens:
    """Tokens from the joined table: every entry normalized as `norm` says, its statistics row attached."""
    ids = t.column("model_id").to_numpy(zero_copy_only=False)
    change = np.flatnonzero(ids[1:] != ids[:-1]) + 1 if len(ids) else np.array([], dtype=np.int64)
    offsets = np.concatenate([[0], change, [len(ids)]]).astype(np.int64)
    model_ids = [str(ids[i]) for i in offsets[:-1]]
    flat = t.column("values").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    raw = flat.astype(np.float32, copy=False).reshape(len(ids), token_size)
    n_valid = t.column("n_valid").to_numpy().astype(np.int64)
    real = np.arange(token_size) < n_valid[:, None]  # (N, S)
    mean, std = center_scale(t, norm, "tensor_idx", "norm_mean", "norm_std")
    values = np.where(real, (raw - mean[:, None]) / std[:, None], 0.0)

    def col(name: str) -> np.ndarray:
        return t.column(name).to_numpy().astype(np.int64)

    tensor, row = col("tensor_idx"), col("row_idx")
    # a packed bias is the last real entry of the last token of each row of its weight
    carries = t.column("bias_mean").is_valid().to_numpy(zero_copy_only=False)
    last_of_row = np.ones(len(ids), dtype=bool)
    last_of_row[:-1] = (tensor[1:] != tensor[:-1]) | (row[1:] != row[:-1]) | (ids[1:] != ids[:-1])
    at = np.flatnonzero(carries & last_of_row & (n_valid > 0))
    bmu, bsd = np.zeros(len(ids), np.float32), np.ones(len(ids), np.float32)
    if len(at):
        j = n_valid[at] - 1
        bias_mean, bias_std = center_scale(t.take(pa.array(at)), norm, "bias_idx", "bias_mean", "bias_std")
        values[at, j] = (raw[at, j] - bias_mean) / bias_std
        bmu[at], bsd[at] = bias_mean, bias_std
    has_bias = np.zeros(len(ids), dtype=bool)
    has_bias[at] = True
    values = np.clip(values, -CLIP, CLIP).astype(np.float32)
    roles = t.column("role").to_pylist()
    role = np.array([ROLE_INDEX.get(r, OTHER_ROLE) for r in roles], dtype=np.int64)
    # what normalizing takes away, kept as an input and a target: the scale tells diverged and untrained models apart
    cols = {c: t.column(f"s_{c}").to_numpy(zero_copy_only=False).astype(np.float64) for c in STAT_COLS}
    bias = {"mean": np.where(carries, t.column("bias_mean").to_numpy(zero_copy_only=False).astype(np.float64), np.nan),
            "std": np.where(carries, t.column("bias_std").to_numpy(zero_copy_only=False).astype(np.float64), np.nan)}
    stats = norm.scale_stats(raw_stat_features(cols, bias))
    return Tokens(model_ids, offsets, values, n_valid, col("token_idx"), col("layer_idx"), row, role, stats,
                  mean, std, bmu, bsd, has_bias)


def read_models(cat: Catalog, refs: list[ModelRef], norm: Normalizer | None = None,
                archs: dict[str, int] | None = None) -> Tokens:
    """The tokens of `refs` from however many shards hold them, in model_id order; `archs` gives each
    model's architecture index (models not in it: −1)."""
    tokens = _read_models(cat, refs, norm)
    tokens.arch = np.array([(archs or {}).get(m, -1) for m in tokens.model_ids], dtype=np.int64)
    return tokens


def _read_models(cat: Catalog, refs: list[ModelRef], norm: Normalizer | None = None) -> Tokens:
    by_shard: dict[str, list[str]] = defaultdict(list)
    for r in refs:
        by_shard[r.shard].append(r.model_id)
    parts = [read_tokens(cat, shard, ids, norm) for shard, ids in sorted(by_shard.items())]
    if len(parts) == 1:
        return parts[0]
    ids = [m for p in parts for m in p.model_ids]
    starts = np.concatenate([p.offsets[:-1] + base for p, base in zip(parts, _bases(parts), strict=True)])
    lengths = np.concatenate([p.lengths for p in parts])
    order = sorted(range(len(ids)), key=ids.__getitem__)
    idx = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in order])
    cat_ = {name: np.concatenate([getattr(p, name) for p in parts])[idx]
            for name in ("values", "n_valid", "n", "l", "k", "role", "stats", "mu", "sd", "bmu", "bsd", "has_bias")}
    offsets = np.concatenate([[0], np.cumsum(lengths[order])]).astype(np.int64)
    plans = [pl for p in parts for pl in p.plans]
    return Tokens([ids[i] for i in order], offsets, **cat_, plans=[plans[i] for i in order])


def _bases(parts: list[Tokens]) -> list[int]:
    sizes = [int(p.offsets[-1]) for p in parts]
    return [sum(sizes[:i]) for i in range(len(sizes))]


def shard_units(refs: list[ModelRef], max_tokens: int) -> list[list[ModelRef]]:
    """Consecutive models (in model_id order) of one shard, at most `max_tokens` tokens each (or one model):
    every shard file is read once per pass. The reading unit of the stream (train/stream.py) and of `chunks`."""
    by_shard: dict[str, list[ModelRef]] = defaultdict(list)
    for r in sorted(refs, key=lambda r: r.model_id):
        by_shard[r.shard].append(r)
    out = []
    for shard in sorted(by_shard):
        cur: list[ModelRef] = []
        size = 0
        for r in by_shard[shard]:
            if cur and size + r.n_tokens > max_tokens:
                out.append(cur)
                cur, size = [], 0
            cur.append(r)
            size += r.n_tokens
        out.append(cur)
    return out


def packed_units(refs: list[ModelRef], max_tokens: int) -> list[list[ModelRef]]:
    """`shard_units` packed together while they fit `max_tokens`: a unit may span shards (each still read with
    one filtered scan), so a catalog of many small shards — a crawl commits one per batch — is not read as
    many small units (every Ray Data task costs its scheduling, however little it reads)."""
    out: list[list[ModelRef]] = []
    cur: list[ModelRef] = []
    size = 0
    for u in shard_units(refs, max_tokens):
        n = sum(r.n_tokens for r in u)
        if cur and size + n > max_tokens:
            out.append(cur)
            cur, size = [], 0
        cur += u
        size += n
    if cur:
        out.append(cur)
    return out


def chunks(refs: list[ModelRef], chunk_tokens: int) -> list[list[ModelRef]]:
    """Reading units of at most `chunk_tokens` tokens (or one model).

    Models that fit in one unit all go together in model_id order, so what a reader sees does not
    depend on how a crawl happened to cut its shards; otherwise `shard_units`.
    """
    if sum(r.n_tokens for r in refs) <= chunk_tokens:
        return [sorted(refs, key=lambda r: r.model_id)] if refs else []
    return shard_units(refs, chunk_tokens)


def n_windows(ref: ModelRef, window: int) -> int:
    return max(1, -(-ref.n_tokens // window))


def tiled_batches(cat: Catalog, refs: list[ModelRef], window: int, batch_size: int,
                  chunk_tokens: int = 1 << 16, norm: Normalizer | None = None, archs: dict[str, int] | None = None,
                  ) -> Iterator[tuple[list[str], np.ndarray, BatchArrays]]:
    """Every token of every model exactly once: (model ids of the chunk, model index per window, batch)."""
    for chunk in chunks(refs, chunk_tokens):
        tokens = read_models(cat, chunk, norm, archs)
        model, start = tokens.windows(window)
        for b in range(0, len(model), batch_size):
            m, s = model[b: b + batch_size], start[b: b + batch_size]
            yield tokens.model_ids, m, tokens.batch(m, s, window)
