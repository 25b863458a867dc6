"""Hub crawl against the loopback Hub: requests per model, bytes downloaded per byte needed, speed.

    python bench/crawl.py [--repos 100] [--model-mb 2] [--no-ray] [--workers N]

Builds N repos (mostly single-file safetensors in f32/bf16, some sharded, some gated, some with only
pytorch_model.bin), serves them with tests/hubserver.py in its own process (it logs every request), and
measures three runs on fresh catalogs:

- `crawl hub --header-only`  (target: ≤ 1.1 requests per model for listing + headers)
- `crawl hub`                (target: ≤ 1.01 bytes downloaded per byte needed)
- the script a researcher writes by hand: `list_models`, then per repo `snapshot_download` +
  `safetensors.torch.load_file` + the catalog's tokenizer + a Parquet file, one repo after another.

Ray is started before the clocks run (a cluster is up already in real use); its start-up is printed apart.
Prints figures; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# This file's name shadows the `crawl` package: take its folder off the import path first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# One process per core, as in Ray's workers (which get OMP_NUM_THREADS=1): a multi-threaded BLAS under the
# per-tensor statistics only fights the other processes for the cores.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from hubserver import make_repo  # noqa: E402


# ------------------------------------------------------------------------------------------------------
# The repos
# ------------------------------------------------------------------------------------------------------
def st_bytes(tensors: dict[str, tuple[str, np.ndarray]]) -> bytes:
    """A safetensors file from {name: (dtype, raw array)} (BF16 given as its uint16 bit patterns)."""
    header, chunks, offset = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def transformer(rng: np.random.Generator, target_bytes: int, bf16: bool) -> dict[str, tuple[str, np.ndarray]]:
    """A BERT-shaped state dict of about `target_bytes`."""
    itemsize = 2 if bf16 else 4
    d = 64
    while 12 * (2 * d) * (2 * d) * 4 * itemsize <= target_bytes:
        d *= 2
    layers = max(1, round(target_bytes / itemsize / (12 * d * d + 10 * d)))

    def t(*shape):
        x = rng.standard_normal(shape, dtype=np.float32) * 0.02
        return ("BF16", (x.view(np.uint32) >> 16).astype(np.uint16)) if bf16 else ("F32", x)

    out = {"embeddings.word_embeddings.weight": t(512, d), "embeddings.LayerNorm.weight": t(d)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        out.update({p + "attention.self.qkv.weight": t(3 * d, d), p + "attention.self.qkv.bias": t(3 * d),
                    p + "attention.output.dense.weight": t(d, d), p + "attention.output.LayerNorm.weight": t(d),
                    p + "intermediate.dense.weight": t(4 * d, d), p + "output.dense.weight": t(d, 4 * d)})
    return out


def build(root: Path, n: int, model_mb: float, seed: int = 0) -> dict:
    """N repos: 80% single-file (f32 or bf16), 10% two shards, 5% gated, 5% only pytorch_model.bin."""
    rng = np.random.default_rng(seed)
    kinds = {"single": 0, "sharded": 0, "gated": 0, "pickle": 0}
    for i in range(n):
        kind = "sharded" if i % 10 == 9 else "gated" if i % 20 == 4 else "pickle" if i % 20 == 14 else "single"
        kinds[kind] += 1
        tensors = transformer(rng, int(model_mb * 1e6), bf16=i % 3 == 0)
        config = json.dumps({"architectures": ["BertModel"], "model_type": "bert"})
        if kind == "sharded":
            names = list(tensors)
            half = len(names) // 2
            parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
            files = {f: st_bytes({k: tensors[k] for k in ks}) for f, ks in parts.items()}
            files["model.safetensors.index.json"] = json.dumps(
                {"weight_map": {k: f for f, ks in parts.items() for k in ks}})
        elif kind == "pickle":
            files = {"pytorch_model.bin": b"\x80\x02pickled-state-dict" + bytes(1024)}
        else:
            files = {"model.safetensors": st_bytes(tensors)}
        make_repo(root, f"bench/m{i:04d}", {**files, "config.json": config}, downloads=n - i,
                  library_name="transformers", gated="auto" if kind == "gated" else False)
    return kinds


def needed(root: Path) -> tuple[int, int]:
    """(weight bytes, header bytes) of the safetensors files a crawl can read (not gated)."""
    weights = headers = 0
    for f in root.rglob("*.safetensors"):
        if json.loads((f.parent / ".hubmeta.json").read_text()).get("gated"):
            continue
        weights += f.stat().st_size
        with open(f, "rb") as fh:
            headers += 8 + struct.unpack("<Q", fh.read(8))[0]
    return weights, headers


# ------------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------------
class Server:
    """tests/hubserver.py in its own process (so it does not share a GIL with the crawl); reads its log."""

    def __init__(self, root: Path, log: Path) -> None:
        url_file = log.with_suffix(".url")
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hubserver.py"), "--root", str(root),
                                      "--page-size", "100", "--log", str(log), "--url-file", str(url_file)],
                                     stdout=subprocess.DEVNULL)
        for _ in range(200):
            if url_file.exists() and url_file.read_text():
                break
            time.sleep(0.05)
        self.url = url_file.read_text()
        self.mark = 0

    def since_mark(self) -> list[dict]:
        rows = [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []
        out, self.mark = rows[self.mark:], len(rows)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def traffic(rows: list[dict]) -> dict:
    return {"api": sum(r["kind"] == "api" for r in rows), "resolve": sum(r["kind"] == "resolve" for r in rows),
            "bytes": sum(r["bytes_sent"] for r in rows if r["kind"] == "resolve")}


def run_crawl(url: str, work: Path, name: str, extra: list[str], workers: int | None, use_ray: bool) -> float:
    from crawl.__main__ import cli

    argv = ["hub", "--endpoint", url, "--catalog", str(work / name), "--download-dir", str(work / f"{name}-dl"),
            "--anonymous", "--author", "bench", *extra]
    argv += ["--workers", str(workers)] if workers else []
    argv += [] if use_ray else ["--no-ray"]
    t = time.perf_counter()
    if cli(argv) != 0:
        raise SystemExit(f"crawl {name} failed")
    return time.perf_counter() - t


def run_baseline(url: str, work: Path) -> float:
    """The hand-written script: list, then per repo snapshot_download + load + tokenize + Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import HfApi, snapshot_download
    from safetensors.torch import load_file

    from catalog.process import ModelRecords
    from catalog.schema import CatalogSpec
    from catalog.statedict import StateDictWeights

    out = work / "baseline"
    out.mkdir()
    spec = CatalogSpec()
    t = time.perf_counter()
    for m in HfApi(endpoint=url, token=False).list_models(author="bench"):
        try:
            folder = Path(snapshot_download(m.id, endpoint=url, token=False, cache_dir=work / "baseline-cache",
                                            allow_patterns=["*.safetensors", "*.json"]))
        except Exception:  # gated: the script moves on
            continue
        state = {}
        for f in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(f)))
        if not state:
            continue  # only pytorch_model.bin
        rec = ModelRecords(m.id, StateDictWeights(state), spec)
        pq.write_table(pa.concat_tables(rec.consume()), out / f"{m.id.replace('/', '--')}.parquet")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repos", type=int, default=100)
    ap.add_argument("--model-mb", type=float, default=2.0, help="size of each model's weights")
    ap.add_argument("--workers", type=int, default=None, help="crawl workers (default: one per CPU)")
    ap.add_argument("--no-ray", action="store_true", help="crawl in this process")
    ap.add_argument("--keep", help="build everything in this folder and keep it")
    a = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    work = Path(a.keep or tempfile.mkdtemp(prefix="wildzoo-bench-crawl-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    kinds = build(work / "hub", a.repos, a.model_mb)
    weight_bytes, header_bytes = needed(work / "hub")
    print(f"built {a.repos} repos {kinds} ({weight_bytes / 1e6:,.0f} MB of readable weights) "
          f"in {time.perf_counter() - t:.1f}s")
    server = Server(work / "hub", work / "requests.jsonl")
    use_ray = not a.no_ray
    t = time.perf_counter()
    try:
        if use_ray:
            from catalog.rayenv import ensure_ray

            ensure_ray()
        with open(os.devnull, "w") as quiet:
            saved, sys.stdout = sys.stdout, quiet
            try:
                run_crawl(server.url, work, "warm-up", ["--header-only", "--limit", "1"], a.workers, use_ray)
                warm_up = time.perf_counter() - t
                fixed = run_crawl(server.url, work, "one-repo", ["--limit", "1"], a.workers, use_ray)
                server.since_mark()
                results = {}
                for name, extra in (("header-only", ["--header-only"]), ("full", [])):
                    seconds = run_crawl(server.url, work, name, extra, a.workers, use_ray)
                    results[name] = (seconds, traffic(server.since_mark()))
                results["baseline"] = (run_baseline(server.url, work), traffic(server.since_mark()))
            finally:
                sys.stdout = saved
    finally:
        server.stop()
        if use_ray:
            import ray

            ray.shutdown()
    print(f"{'ray start-up and ' if use_ray else ''}a warm-up crawl of one repo (not timed below): {warm_up:.1f}s")
    print(f"fixed cost of every crawl run (listing, starting its workers), from a one-repo crawl: {fixed:.1f}s")
    report(results, a.repos, weight_bytes, header_bytes, fixed)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict, n: int, weight_bytes: int, header_bytes: int, fixed: float) -> None:
    print(f"\n{'run':<12} {'api/model':>9} {'files/model':>11} {'req/model':>9} {'down/needed':>11} "
          f"{'models/s':>9} {'MB/s':>7} {'seconds':>8}   {'models/s, fixed cost apart':>26}")
    for name, (s, tr) in results.items():
        need = header_bytes if name == "header-only" else weight_bytes
        # a run barely longer than the fixed cost has no measurable steady rate
        steady = "" if name == "baseline" else (f"{n / (s - fixed):>26.1f}" if s - fixed > 0.5 else f"{'< fixed cost':>26}")
        print(f"{name:<12} {tr['api'] / n:>9.2f} {tr['resolve'] / n:>11.2f} {(tr['api'] + tr['resolve']) / n:>9.2f} "
              f"{tr['bytes'] / need:>11.3f} {n / s:>9.1f} {weight_bytes / 1e6 / s:>7.1f} {s:>8.1f}   {steady}")
    (hs, htr), (fs, ftr), (bs, btr) = results["header-only"], results["full"], results["baseline"]
    print("\ntargets: header-only requests/model <= 1.1 -> "
          f"{(htr['api'] + htr['resolve']) / n:.2f}; full downloaded/needed <= 1.01 -> {ftr['bytes'] / weight_bytes:.3f}")
    print(f"ratios vs the hand-written script (speed = its seconds / ours): full crawl {bs / fs:.2f}x "
          f"({bs / max(fs - fixed, 0.5):.2f}x fixed cost apart), {(btr['api'] + btr['resolve']) / max(1, ftr['api'] + ftr['resolve']):.2f}x "
          f"fewer requests, {btr['bytes'] / max(1, ftr['bytes']):.2f}x the bytes; header-only {bs / hs:.1f}x, "
          f"{(btr['api'] + btr['resolve']) / max(1, htr['api'] + htr['resolve']):.1f}x fewer requests, "
          f"{btr['bytes'] / max(1, htr['bytes']):.0f}x fewer bytes")
    print("(MB/s counts the readable weights of every repo; header-only reads "
          f"{htr['bytes'] / 1e6:.1f} MB of {weight_bytes / 1e6:.0f} MB: the first 100 kB of each file)")


if __name__ == "__main__":
    main()
