"""Small real checkpoints in Hugging Face layout, good and broken, for tests and benchmarks."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

REFERENCE_CURVE = Path(__file__).parent / "assets" / "debug_loss_curve.json"  # mean of bench/loss_curve_spread.py


def lab_zoo_catalog(root: Path) -> tuple[Path, Path]:
    """A lab zoo (24 CNNs × 4 checkpoints on digits, seed 1) crawled into a catalog with `crawl zoo`'s defaults
    (row tokens, token size auto: 73, the widest row with its bias): (zoo, catalog). conftest's `zoo_catalog`;
    bench/loss_curve_spread.py builds the same."""
    from crawl.__main__ import cli as crawl_cli
    from zoo import generate

    zoo, cat = root / "zoo", root / "cat"
    generate(zoo, models=24, epochs=3, seed=1, workers=2, arch="cnn")
    if crawl_cli(["zoo", str(zoo), "--catalog", str(cat)]) != 0:
        raise RuntimeError(f"crawl zoo {zoo} failed")
    return zoo, cat


def reference_curve(cat: Path, out: Path) -> dict[str, list[float]]:
    """The loss terms per epoch of the reference fit (debug flavour, 3 epochs, seed 0, 1 worker) on `cat`: what
    REFERENCE_CURVE holds the mean of, and tests/test_train.py compares with it."""
    from train.config import TrainConfig
    from train.fit import fit

    s = fit(str(cat), str(out), TrainConfig.debug().replace(epochs=3, seed=0))
    return {k: [h[k] for h in s["history"]] for k in ("loss", "mse", "stats_mse", "ntx", "val_loss")}


def _save(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None, name="model.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def cnn(folder: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    t = {
        "features.0.weight": torch.randn(8, 3, 3, 3, generator=g),
        "features.0.bias": torch.randn(8, generator=g),
        "features.1.weight": torch.rand(8, generator=g),
        "features.1.bias": torch.randn(8, generator=g),
        "features.1.running_mean": torch.randn(8, generator=g),
        "features.1.running_var": torch.rand(8, generator=g),
        "features.1.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "features.3.weight": torch.randn(16, 8, 3, 3, generator=g),
        "features.3.bias": torch.randn(16, generator=g),
        "classifier.weight": torch.randn(10, 16, generator=g),
        "classifier.bias": torch.randn(10, generator=g),
    }
    return _save(folder, t, {"architectures": ["TinyCNN"], "model_type": "cnn", "num_classes": 10})


def mlp(folder: Path, seed: int = 1) -> Path:
    g = torch.Generator().manual_seed(seed)
    t = {f"layers.{i}.weight": torch.randn(o, n, generator=g) for i, (o, n) in enumerate([(32, 20), (32, 32), (3, 32)])}
    t.update({f"layers.{i}.bias": torch.randn(o, generator=g) for i, o in enumerate([32, 32, 3])})
    return _save(folder, t, {"architectures": ["MLP"], "model_type": "mlp"})


def transformer(folder: Path, seed: int = 2, dtype=torch.float32, layers: int = 2, d: int = 24) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = {
        "embeddings.word_embeddings.weight": torch.randn(50, d, generator=g),
        "embeddings.position_embeddings.weight": torch.randn(16, d, generator=g),
        "embeddings.LayerNorm.weight": torch.ones(d) + 0.1 * torch.randn(d, generator=g),
        "embeddings.LayerNorm.bias": 0.1 * torch.randn(d, generator=g),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            t[p + f"attention.self.{n}.weight"] = torch.randn(d, d, generator=g)
            t[p + f"attention.self.{n}.bias"] = torch.randn(d, generator=g)
        t[p + "attention.output.dense.weight"] = torch.randn(d, d, generator=g)
        t[p + "attention.output.LayerNorm.weight"] = torch.randn(d, generator=g)
        t[p + "intermediate.dense.weight"] = torch.randn(4 * d, d, generator=g)
        t[p + "output.dense.weight"] = torch.randn(d, 4 * d, generator=g)
    t = {k: v.to(dtype) for k, v in t.items()}
    _save(folder, t, {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": d})
    return t


def sharded(folder: Path, seed: int = 3) -> Path:
    """A model split over two safetensors shards with a model.safetensors.index.json."""
    g = torch.Generator().manual_seed(seed)
    t = {f"h.{i}.mlp.c_fc.weight": torch.randn(12, 40, generator=g) for i in range(4)}
    t.update({f"h.{i}.ln_1.weight": torch.randn(12, generator=g) for i in range(4)})
    names = sorted(t)
    parts = [names[: len(names) // 2], names[len(names) // 2 :]]
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for k, part in enumerate(parts):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: t[n] for n in part}, str(folder / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    return folder


def good_zoo(root: Path) -> dict[str, Path]:
    """The five kinds of the foundation issue: CNN, MLP, transformer, sharded, bf16."""
    root.mkdir(parents=True, exist_ok=True)
    transformer(root / "bert-tiny")
    transformer(root / "bert-bf16", seed=4, dtype=torch.bfloat16)
    return {
        "cnn": cnn(root / "cnn"),
        "mlp": mlp(root / "mlp"),
        "bert-tiny": root / "bert-tiny",
        "sharded": sharded(root / "gpt-sharded"),
        "bf16": root / "bert-bf16",
    }


def _raw(folder: Path, header: dict | bytes, data: bytes = b"", claimed_len: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(h) if claimed_len is None else claimed_len
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", n) + h + data)
    return folder


def bad_zoo(root: Path) -> dict[str, Path]:
    """Broken models, each with the reason the crawl must give."""
    root.mkdir(parents=True, exist_ok=True)
    trunc = cnn(root / "truncated")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) - 100])
    f32 = np.arange(8, dtype=np.float32).tobytes()
    text = root / "text-file"
    text.mkdir(parents=True, exist_ok=True)
    (text / "model.safetensors").write_text("this is not a safetensors file, just some text\n" * 3)
    return {
        "truncated": trunc,
        "huge-header": _raw(root / "huge-header", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                            f32, claimed_len=10 << 30),
        "overlap": _raw(root / "overlap", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                           "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, f32[:24]),
        "unknown-dtype": _raw(root / "unknown-dtype", {"a": {"dtype": "F7", "shape": [8], "data_offsets": [0, 32]}}, f32),
        "text-file": text,
    }
