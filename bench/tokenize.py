"""Tokenization bandwidth against a plain memory copy, and the peak memory of crawling a ≥1 GB model.

    python bench/tokenize.py [--size-mb 1100] [--largest-mb 256] [--reps 5]

Prints figures (DESIGN §8 targets: tokenize/memcpy ≥ 0.5 per core; crawl peak memory under
3 × largest tensor + 500 MB). Runs on one core: the crawl uses one process per core.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
# This file's name shadows the standard library's `tokenize` (which numpy and inspect import):
# take its folder off the import path before anything else is imported.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from catalog import tokenize as tk  # noqa: E402
from catalog.safetensors_io import to_float32  # noqa: E402


def best_seconds(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bandwidth(reps: int) -> list[tuple[str, float, float, float]]:
    """(case, tokenize GB/s, memcpy GB/s, ratio) for real-sized tensors; bytes counted as float32 output."""
    rng = np.random.default_rng(0)
    cases = [
        ("llama mlp 4096x11008 f32 dense/256", rng.standard_normal((4096, 11008), np.float32), "F32", "dense", 256),
        ("bert ffn 3072x768 f32 dense/256", rng.standard_normal((3072, 768), np.float32), "F32", "dense", 256),
        ("bert ffn 3072x768 f32 row/289", rng.standard_normal((3072, 768), np.float32), "F32", "row", 289),
        ("resnet conv 512x512x3x3 f32 row/288", rng.standard_normal((512, 512, 3, 3), np.float32), "F32", "row", 288),
        ("llama attn 4096x4096 bf16 dense/256",
         (rng.standard_normal((4096, 4096), np.float32).view(np.uint32) >> 16).astype(np.uint16), "BF16", "dense", 256),
    ]
    out = []
    for name, x, dtype, tokenization, ts in cases:
        g = tk.geometry(x.shape, tokenization, ts)

        def run(x=x, g=g, dtype=dtype, ts=ts):
            tk.tokenize(to_float32(x, dtype), g, ts)

        def copy(x=x, dtype=dtype):
            # the plain copy of the same weights, as float32 (what the tokens hold)
            (x if dtype == "F32" else to_float32(x, dtype)).copy()

        nbytes = x.size * 4
        t_tok, t_copy = best_seconds(run, reps), best_seconds(copy, reps)
        out.append((name, nbytes / t_tok / 1e9, nbytes / t_copy / 1e9, t_copy / t_tok))
    return out


def make_model(folder: Path, size_mb: int, largest_mb: int) -> tuple[int, int]:
    """A safetensors model of about `size_mb` whose largest tensor is `largest_mb`; returns (bytes, largest)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((largest_mb << 18) // 1024 * 1024, np.float32)}
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].reshape(-1, 1024)
    rest = size_mb - largest_mb
    i = 0
    while rest > 0:
        mb = min(64, rest)
        tensors[f"model.layers.{i}.mlp.weight"] = rng.standard_normal(((mb << 20) // 4 // 4096, 4096), np.float32)
        tensors[f"model.layers.{i}.norm.weight"] = np.ones(4096, np.float32)
        rest -= mb
        i += 1
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"architectures": ["BenchModel"], "model_type": "bench"}')
    return (folder / "model.safetensors").stat().st_size, max(t.nbytes for t in tensors.values())


def crawl_peak(size_mb: int, largest_mb: int) -> None:
    with tempfile.TemporaryDirectory(prefix="wildzoo-bench-") as tmp:
        size, largest = make_model(Path(tmp) / "big", size_mb, largest_mb)
        # The crawl runs in a fresh process that reports its own high-water mark (VmHWM): a fork of this
        # big process would carry its memory into getrusage's ru_maxrss.
        code = (
            "import sys; from crawl.__main__ import cli; rc = cli(sys.argv[1:]); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]); sys.exit(rc)"
        )
        cmd = [sys.executable, "-c", code, "local", f"{tmp}/big", "--catalog", f"{tmp}/cat", "--no-ray"]
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        secs = time.perf_counter() - t
        if r.returncode != 0:
            sys.exit(f"crawl failed: {r.stderr[-2000:]}")
        peak = int(r.stdout.strip().splitlines()[-1]) * 1024
        target = 3 * largest + 500e6
        print(f"\ncrawl of one {size / 1e9:.2f} GB model (largest tensor {largest / 1e6:.0f} MB): "
              f"{secs:.1f} s, {size / secs / 1e6:.0f} MB/s end to end (stats, tokens, zstd Parquet)")
        print(f"peak memory {peak / 1e6:,.0f} MB; target < 3 x largest + 500 MB = {target / 1e6:,.0f} MB "
              f"-> {'OK' if peak < target else 'MISSED'} ({peak / size:.2f} x the model's size)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=1100)
    p.add_argument("--largest-mb", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-crawl", action="store_true")
    a = p.parse_args()
    print(f"{'case':40s} {'tokenize GB/s':>14s} {'memcpy GB/s':>12s} {'ratio':>6s}   (target ratio >= 0.5)")
    ratios = []
    for name, tok, cp, ratio in bandwidth(a.reps):
        ratios.append(ratio)
        print(f"{name:40s} {tok:14.2f} {cp:12.2f} {ratio:6.2f}")
    print(f"{'worst ratio':40s} {'':14s} {'':12s} {min(ratios):6.2f} -> {'OK' if min(ratios) >= 0.5 else 'MISSED'}")
    if not a.skip_crawl:
        crawl_peak(a.size_mb, a.largest_mb)


if __name__ == "__main__":
    main()
