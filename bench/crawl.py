"""Hub crawl against the loopback Hub over a realistic network: speed, requests per model, bytes per byte needed.

    python bench/crawl.py [--repos 360] [--latency-ms 100] [--mbps 40] [--model-mb 2] [--no-ray] [--workers N]

Builds N repos (every one with its own weights: mostly single-file safetensors in f32/bf16, some sharded, some
gated, some with only pytorch_model.bin), serves them with tests/hubserver.py in its own process (every answer
waits --latency-ms, file bodies are paced to --mbps per connection; it logs every request) and measures, on fresh
catalogs:

- `crawl hub --header-only`  (target: ≤ 1.1 requests per model for listing + headers)
- `crawl hub`                (target: ≤ 1.01 bytes downloaded per byte needed)
- the script a researcher writes by hand: `list_models`, then per repo `snapshot_download` +
  `safetensors.torch.load_file` + the catalog's tokenizer + a Parquet file, one repo after another (`sequential`),
  and the same with a `ThreadPoolExecutor(16)` over the repos (`16 threads`).
- a budget-bound header-only crawl: the server enforces a small fixed-window quota on file requests and the
  crawl is given the same budget; it should use ≥ 90% of every complete window and cause no 429.

Every crawl's wall time includes starting Ray (a local Ray is started by the command itself, as a user's
first run does; the Ray start-up alone is printed apart). Prints figures; not a test.
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

    def __init__(self, root: Path, log: Path, latency_ms: float = 0.0, mbps: float | None = None,
                 quota: str | None = None) -> None:
        url_file = log.with_suffix(".url")
        self.log = log
        argv = [sys.executable, str(ROOT / "tests" / "hubserver.py"), "--root", str(root), "--page-size", "100",
                "--log", str(log), "--url-file", str(url_file), "--latency-ms", str(latency_ms)]
        argv += ["--mbps", str(mbps)] if mbps else []
        argv += ["--quota-resolve", quota] if quota else []
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        for _ in range(400):
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
            "bytes": sum(r["bytes_sent"] for r in rows if r["kind"] == "resolve"),
            "inflight": max((r.get("inflight", 1) for r in rows), default=0),
            "429": sum(r["status"] == 429 for r in rows), "over_quota": sum(bool(r.get("over_quota")) for r in rows)}


def run_crawl(url: str, work: Path, name: str, extra: list[str], workers: int | None, use_ray: bool) -> tuple[float, int]:
    """`python -m crawl hub` as a user runs it (its own process, starting its own Ray): (seconds, models ok)."""
    argv = [sys.executable, "-m", "crawl", "hub", "--endpoint", url, "--catalog", str(work / name),
            "--download-dir", str(work / f"{name}-dl"), "--anonymous", "--author", "bench", *extra]
    argv += ["--workers", str(workers)] if workers else []
    argv += [] if use_ray else ["--no-ray"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"crawl {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds, _count_ok(work / name)


def _count_ok(catalog: Path) -> int:
    from catalog.store import Catalog

    statuses = Catalog.open(str(catalog)).current_models(("model_id", "status")).column("status").to_pylist()
    return sum(s in ("ok", "header_only") for s in statuses)


def run_baseline(url: str, work: Path, threads: int) -> tuple[float, int]:
    """The hand-written script: list, then per repo snapshot_download + load + tokenize + Parquet; with `threads`
    > 1, the per-repo part runs in a ThreadPoolExecutor. Returns (seconds, models written)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import HfApi, snapshot_download
    from safetensors.torch import load_file

    from catalog.process import ModelRecords
    from catalog.schema import CatalogSpec
    from catalog.statedict import StateDictWeights

    out = work / f"baseline-{threads}"
    out.mkdir()
    spec = CatalogSpec()

    def one(m) -> int:
        try:
            folder = Path(snapshot_download(m.id, endpoint=url, token=False, cache_dir=out / "cache",
                                            allow_patterns=["*.safetensors", "*.json"]))
            state = {}
            for f in sorted(folder.glob("*.safetensors")):
                state.update(load_file(str(f)))
            if not state:
                return 0  # only pytorch_model.bin
            rec = ModelRecords(m.id, StateDictWeights(state), spec)
            pq.write_table(pa.concat_tables(rec.consume()), out / f"{m.id.replace('/', '--')}.parquet")
            return 1
        except Exception:  # gated, or a dtype the script's loader does not convert: the script moves on
            return 0

    t = time.perf_counter()
    listed = HfApi(endpoint=url, token=False).list_models(author="bench")
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            ok = sum(pool.map(one, listed))
    else:
        ok = sum(one(m) for m in listed)
    return time.perf_counter() - t, ok


def window_use(rows: list[dict], limit: int, window_s: float) -> list[float]:
    """Fraction of the quota used in each complete fixed window of the server (windows start at the first file
    request, as the server's do)."""
    ts = sorted(r["t"] for r in rows if r["kind"] == "resolve" and not r.get("over_quota"))
    if not ts:
        return []
    n = int((ts[-1] - ts[0]) // window_s)  # windows that ended before the last request
    return [sum(ts[0] + k * window_s <= t < ts[0] + (k + 1) * window_s for t in ts) / limit for k in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repos", type=int, default=360)
    ap.add_argument("--latency-ms", type=float, default=100.0, help="the server waits this long before every answer")
    ap.add_argument("--mbps", type=float, default=40.0, help="MB/s per connection for file bodies (0: no cap)")
    ap.add_argument("--model-mb", type=float, default=2.0, help="size of each model's weights")
    ap.add_argument("--workers", type=int, default=None, help="crawl workers (default: one per CPU)")
    ap.add_argument("--no-ray", action="store_true", help="crawl in the command's own process")
    ap.add_argument("--budget", default="40/5", metavar="N/SECONDS",
                    help="the budget-bound run's quota on file requests (default 40 per 5 s)")
    ap.add_argument("--skip-sequential", action="store_true", help="leave out the slow one-repo-at-a-time script")
    ap.add_argument("--keep", help="build everything in this folder and keep it")
    a = ap.parse_args()

    work = Path(a.keep or tempfile.mkdtemp(prefix="wildzoo-bench-crawl-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    kinds = build(work / "hub", a.repos, a.model_mb)
    weight_bytes, header_bytes = needed(work / "hub")
    print(f"built {a.repos} repos {kinds} ({weight_bytes / 1e6:,.0f} MB of readable weights) "
          f"in {time.perf_counter() - t:.1f}s; network: {a.latency_ms:g} ms per request, "
          f"{a.mbps:g} MB/s per connection", flush=True)
    use_ray = not a.no_ray
    if use_ray:
        print(f"starting a local Ray alone (part of every crawl below): {ray_start_s():.1f}s", flush=True)
    server = Server(work / "hub", work / "requests.jsonl", a.latency_ms, a.mbps or None)
    results = {}
    try:
        for name, extra in (("header-only", ["--header-only"]), ("full", [])):
            seconds, ok = run_crawl(server.url, work, name, extra, a.workers, use_ray)
            results[name] = (seconds, ok, traffic(server.since_mark()))
            print(f"  {name}: {seconds:.1f}s", flush=True)
        for threads in (16,) if a.skip_sequential else (16, 1):
            name = "16 threads" if threads > 1 else "sequential"
            seconds, ok = run_baseline(server.url, work, threads)
            results[name] = (seconds, ok, traffic(server.since_mark()))
            print(f"  {name}: {seconds:.1f}s", flush=True)
    finally:
        server.stop()
    report(results, a.repos, weight_bytes, header_bytes)

    limit, window = int(a.budget.split("/")[0]), float(a.budget.split("/")[1])
    server = Server(work / "hub", work / "requests-budget.jsonl", a.latency_ms, a.mbps or None, a.budget)
    try:
        seconds, ok = run_crawl(server.url, work, "budget", ["--header-only", "--requests-per-5min-resolve",
                                                              str(limit), "--rate-window", str(window)],
                                a.workers, use_ray)
        rows = server.since_mark()
    finally:
        server.stop()
    use, tr = window_use(rows, limit, window), traffic(rows)
    print(f"\nbudget-bound header-only crawl ({limit} file requests per {window:g}s, the server enforcing the same): "
          f"{seconds:.1f}s, {ok} models, {tr['resolve']} file requests; budget used per complete window: "
          f"{', '.join(f'{u:.0%}' for u in use) or 'no complete window'} (mean {np.mean(use) if use else 0:.0%}); "
          f"429s from overshooting: {tr['over_quota']}")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


def ray_start_s() -> float:
    """Seconds a fresh process takes to start a local Ray the way the crawl command does (then stop it)."""
    code = ("import time; t = time.perf_counter(); from catalog.rayenv import ensure_ray; ensure_ray(); "
            "print(time.perf_counter() - t); import ray; ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def report(results: dict, n: int, weight_bytes: int, header_bytes: int) -> None:
    print(f"\n{'run':<12} {'models ok':>9} {'requests':>8} {'req/model':>9} {'in flight':>9} {'down/needed':>11} "
          f"{'MB/s':>7} {'seconds':>8}")
    for name, (s, ok, tr) in results.items():
        need = header_bytes if name == "header-only" else weight_bytes
        req = tr["api"] + tr["resolve"]
        print(f"{name:<12} {ok:>9} {req:>8} {req / n:>9.2f} {tr['inflight']:>9} {tr['bytes'] / need:>11.3f} "
              f"{tr['bytes'] / 1e6 / s:>7.1f} {s:>8.1f}")
    (hs, _, htr), (fs, _, ftr) = results["header-only"], results["full"]
    ts = results["16 threads"][0]
    print(f"\ntargets: header-only requests/model <= 1.1 -> {(htr['api'] + htr['resolve']) / n:.2f}; "
          f"full downloaded/needed <= 1.01 -> {ftr['bytes'] / weight_bytes:.3f}")
    line = f"speed (the script's seconds / ours): full crawl vs 16 threads {ts / fs:.2f}x (target >= 1)"
    if "sequential" in results:
        line += f", vs sequential {results['sequential'][0] / fs:.1f}x (target >= 10)"
    print(line + f"; header-only vs 16 threads {ts / hs:.2f}x (target >= 2)")


if __name__ == "__main__":
    main()
