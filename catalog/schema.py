"""Arrow schemas of the catalog tables (DESIGN §3) and the catalog's own metadata file.

Every shard is written with one of these schemas, so a column never changes type between shards
and DuckDB's views over many shards stay consistent.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pyarrow as pa

FORMAT_VERSION = 1
TABLES = ("models", "tensors", "tokens", "properties")
MODEL_STATUSES = ("ok", "header_only", "skipped", "error")
TOKENIZATIONS = ("dense", "row")
TOKEN_DTYPES = ("float32", "float16")

MODELS = pa.schema(
    [
        ("model_id", pa.string()),
        ("source", pa.string()),
        ("repo_id", pa.string()),
        ("revision", pa.string()),
        ("path", pa.string()),
        ("architecture", pa.string()),
        ("model_type", pa.string()),
        ("library", pa.string()),
        ("pipeline_tag", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("license", pa.string()),
        ("downloads", pa.int64()),
        ("likes", pa.int64()),
        ("base_model", pa.string()),
        ("datasets", pa.list_(pa.string())),
        ("n_params", pa.int64()),
        ("n_tensors", pa.int32()),
        ("n_tokens", pa.int64()),
        ("total_bytes", pa.int64()),
        ("content_hash", pa.string()),
        ("duplicate_of", pa.string()),  # a model with the same content hash, whose tokens stand for this one
        ("status", pa.string()),
        ("error", pa.string()),
        ("crawled_at", pa.timestamp("ms", tz="UTC")),
    ]
)

TENSORS = pa.schema(
    [
        ("model_id", pa.string()),
        ("tensor_idx", pa.int32()),
        ("name", pa.string()),
        ("role", pa.string()),
        ("dtype", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("n_params", pa.int64()),
        ("layer_idx", pa.int32()),
        ("mean", pa.float64()),
        ("std", pa.float64()),
        ("min", pa.float64()),
        ("max", pa.float64()),
        ("q01", pa.float64()),
        ("q25", pa.float64()),
        ("q50", pa.float64()),
        ("q75", pa.float64()),
        ("q99", pa.float64()),
        ("l2", pa.float64()),
        ("sparsity", pa.float64()),
        ("norm_mean", pa.float64()),
        ("norm_std", pa.float64()),
        ("token_start", pa.int64()),
        ("n_tokens", pa.int64()),
        # Row tokenization appends a bias to its weight's rows: the bias then has no tokens of its
        # own and `packed_into` names the tensor_idx whose tokens carry it.
        ("packed_into", pa.int32()),
        ("file", pa.string()),
        # the tensor's values are in `tokens` (float dtypes converted exactly to float32; F64 rounded)
        ("tokenized", pa.bool_()),
    ]
)


def tokens_schema(token_size: int, token_dtype: str = "float32") -> pa.Schema:
    """The `tokens` schema for one catalog: `values` is a fixed-size list of `token_size` floats."""
    value_type = pa.float32() if token_dtype == "float32" else pa.float16()
    return pa.schema(
        [
            ("model_id", pa.string()),
            ("token_idx", pa.int64()),
            ("tensor_idx", pa.int32()),
            ("layer_idx", pa.int32()),
            ("row_idx", pa.int64()),
            ("values", pa.list_(value_type, token_size)),
            ("n_valid", pa.int32()),
        ]
    )


PROPERTIES = pa.schema(
    [
        ("model_id", pa.string()),
        ("name", pa.string()),
        ("value", pa.float64()),
        ("text", pa.string()),
    ]
)


# Written by `train embed` (not by crawls): one shard per backbone run, `embeddings/<run>.parquet`,
# rewritten whole when the run embeds the catalog again, so it holds one row per ok model and run.
EMBEDDINGS = pa.schema(
    [
        ("model_id", pa.string()),
        ("run", pa.string()),  # the run's id (RUN/config.json `run_id`)
        ("embedding", pa.list_(pa.float32())),  # token latents pooled per layer group, concatenated
        ("embedding_mean", pa.list_(pa.float32())),  # mean of all the model's token latents
        ("epoch", pa.int32()),  # epochs the backbone had trained when it embedded
        ("created_at", pa.timestamp("ms", tz="UTC")),
    ]
)


# Written by `train behaviour` / `train probe` (not by crawls): behaviour fingerprints of models whose architecture
# wildzoo can rebuild (train/fingerprint.py), one row per model and probe set, appended as shards.
BEHAVIOUR = pa.schema(
    [
        ("model_id", pa.string()),
        ("probe_set", pa.string()),  # digits, noise, smooth, npy-<hash> (a user's images)
        ("arch", pa.string()),  # the recognized architecture: kind/activation/channels_in/o_dim
        ("n_probes", pa.int32()),
        ("max_prob", pa.float64()),  # mean over probes of the largest softmax probability
        ("entropy", pa.float64()),  # mean entropy of the softmax (nats)
        ("margin", pa.float64()),  # mean top-1 minus top-2 probability
        ("logit_norm", pa.float64()),  # mean L2 norm of the logits
        ("sensitivity", pa.float64()),  # mean total variation of the softmax under 10% weight noise
        ("class_probs", pa.list_(pa.float32())),  # mean probability of each class
        ("outputs", pa.list_(pa.float32())),  # the softmax on the first 16 probes, flattened
        ("created_at", pa.timestamp("ms", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class CatalogSpec:
    """What every shard of one catalog agrees on; stored as `catalog.json` at the catalog root."""

    token_size: int = 256
    tokenization: str = "dense"
    token_dtype: str = "float32"
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not 1 <= self.token_size <= 1 << 20:
            raise ValueError(f"token size must be between 1 and {1 << 20}, got {self.token_size}")
        if self.tokenization not in TOKENIZATIONS:
            raise ValueError(f"tokenization must be one of {TOKENIZATIONS}, got {self.tokenization!r}")
        if self.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"token dtype must be one of {TOKEN_DTYPES}, got {self.token_dtype!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CatalogSpec:
        data = json.loads(text)
        known = {k: data[k] for k in ("token_size", "tokenization", "token_dtype", "format_version") if k in data}
        return cls(**known)


def schema_for(table: str, spec: CatalogSpec) -> pa.Schema:
    """The Arrow schema of `table` in a catalog described by `spec`."""
    if table == "models":
        return MODELS
    if table == "tensors":
        return TENSORS
    if table == "tokens":
        return tokens_schema(spec.token_size, spec.token_dtype)
    if table == "properties":
        return PROPERTIES
    if table == "embeddings":
        return EMBEDDINGS
    if table == "behaviour":
        return BEHAVIOUR
    raise KeyError(table)
