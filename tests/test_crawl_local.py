"""`crawl local` end to end on real Ray: counts, exact round trip, bad input, resumption."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from catalog.query import connect
from catalog.reassemble import model_tensors
from catalog.store import Catalog
from crawl.__main__ import cli as crawl_cli

import modelfactory

ROOT = Path(__file__).resolve().parent.parent
FLOAT = {"F32", "F16", "BF16", "F64"}


def _headers(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                out[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


def expected_tokens(folder: Path, tokenization: str, ts: int) -> int:
    """Token count from tensor shapes alone, written independently of catalog.tokenize."""
    tensors = {k: s for k, (d, s) in _headers(folder).items() if d in FLOAT}
    total = 0
    for name, shape in tensors.items():
        numel = math.prod(shape)
        if tokenization == "dense":
            total += math.ceil(numel / ts)
            continue
        if name.endswith(".bias"):
            w = tensors.get(name[:-4] + "weight")
            if w is not None and len(w) >= 2 and w[0] == shape[0]:
                continue  # packed into its weight's rows
        if len(shape) >= 2:
            bias = tensors.get(name[:-6] + "bias") if name.endswith(".weight") else None
            width = numel // shape[0] + (1 if bias is not None and bias == (shape[0],) else 0)
            total += shape[0] * math.ceil(width / ts)
        else:
            total += math.ceil(numel / ts)
    return total


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return root, modelfactory.bad_zoo(root)


@pytest.mark.ray
@pytest.mark.parametrize("tokenization,ts", [("dense", 64), ("row", 17)])
def test_crawl_counts_roundtrip_and_errors(ray_session, good_models, bad_models, tmp_path, capsys, tokenization, ts):
    good_root, good = good_models
    bad_root, bad = bad_models
    cat = tmp_path / "cat"
    rc = crawl_cli(["local", str(good_root), str(bad_root), "--catalog", str(cat),
                    "--tokenization", tokenization, "--token-size", str(ts), "--batch-size", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "crawl: 10 model(s) crawled (error 5, ok 5)" in out
    con = connect(str(cat))
    for kind, folder in good.items():
        mid = f"{good_root.name}/{folder.name}"
        n = con.execute("SELECT count(*) FROM tokens WHERE model_id = ?", [mid]).fetchone()[0]
        assert n == expected_tokens(folder, tokenization, ts), kind
        status, n_tensors = con.execute("SELECT status, n_tensors FROM models WHERE model_id = ?", [mid]).fetchone()
        assert status == "ok" and n_tensors == len(_headers(folder))
        # every float tensor back bit-for-bit (bf16 exactly after conversion to f32)
        rebuilt = model_tensors(str(cat), mid)
        originals = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                originals.update({k: h.get_tensor(k) for k in h.keys()})
        floats = {k: v for k, v in originals.items() if v.is_floating_point()}
        assert set(rebuilt) == set(floats), kind
        for k, v in floats.items():
            assert np.array_equal(rebuilt[k], v.float().numpy()), (kind, k)
    total = sum(expected_tokens(f, tokenization, ts) for f in good.values())
    assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] == total
    errors = dict(con.execute("SELECT model_id, error FROM models WHERE status = 'error'").fetchall())
    reasons = {"truncated": "truncated", "huge-header": "limit", "overlap": "overlap",
               "unknown-dtype": "unknown dtype", "text-file": "text"}
    assert {k.split("/")[-1] for k in errors} == set(reasons)
    for mid, err in errors.items():
        assert reasons[mid.split("/")[-1]] in err
    # the sharded model is one model; roles and statistics are filled for float tensors
    assert con.execute("SELECT count(DISTINCT file) FROM tensors WHERE model_id LIKE '%gpt-sharded'").fetchone()[0] == 2
    nulls = con.execute("SELECT count(*) FROM tensors WHERE dtype IN ('F32','BF16') AND (std IS NULL OR q50 IS NULL)")
    assert nulls.fetchone()[0] == 0


@pytest.mark.ray
def test_rerun_skips_done_and_settings_are_fixed(ray_session, good_models, tmp_path, capsys):
    good_root, _ = good_models
    cat = str(tmp_path / "cat")
    assert crawl_cli(["local", str(good_root), "--catalog", cat]) == 0
    assert crawl_cli(["local", str(good_root), "--catalog", cat]) == 0
    out = capsys.readouterr().out
    assert "0 model(s) crawled (nothing new), 5 already in the catalog" in out
    rc = crawl_cli(["local", str(good_root), "--catalog", cat, "--token-size", "99"])
    assert rc == 1 and "token size 256" in capsys.readouterr().err
    con = connect(cat)
    assert con.execute("SELECT count(*), count(DISTINCT model_id) FROM models").fetchone() == (5, 5)


def _run(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, **kw)


@pytest.mark.parametrize(
    "args,message",
    [
        (["-m", "crawl", "local", "/does/not/exist", "--catalog", "{cat}"], "path does not exist"),
        (["-m", "crawl", "local", "{empty}", "--catalog", "{cat}"], "no models found"),
        (["-m", "crawl", "local", "--catalog", "{cat}"], "required"),
        (["-m", "crawl", "local", "{empty}", "--catalog", "{cat}", "--token-size", "0"], "token size"),
        (["-m", "catalog", "sql", "{cat}", "SELEC nonsense"], "SQL error"),
        (["-m", "catalog", "sql", "{cat}", "SELECT * FROM no_such_table"], "SQL error"),
        (["-m", "catalog", "info", "/does/not/exist"], "does not exist"),
    ],
)
def test_bad_command_lines_give_one_line_and_nonzero_exit(tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    cat = tmp_path / "cat"
    Catalog.open(str(cat), create=True)
    r = _run(*[a.format(cat=cat, empty=empty) for a in args])
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_sql_formats(tmp_path, good_models):
    good_root, _ = good_models
    cat = str(tmp_path / "cat")
    assert _run("-m", "crawl", "local", str(good_root), "--catalog", cat, "--no-ray").returncode == 0
    q = "SELECT model_id, n_tensors FROM models ORDER BY model_id"
    csv = _run("-m", "catalog", "sql", cat, q, "--format", "csv").stdout.splitlines()
    assert csv[0] == "model_id,n_tensors" and len(csv) == 6
    import json

    js = json.loads(_run("-m", "catalog", "sql", cat, q, "--format", "json").stdout)
    assert all(isinstance(r["n_tensors"], int) and r["n_tensors"] > 0 for r in js)
    assert len(js) == 5 and js[0]["model_id"].endswith("bert-bf16")
    table = _run("-m", "catalog", "sql", cat, q).stdout
    assert "model_id" in table and "(5 rows)" in table
    info = _run("-m", "catalog", "info", cat).stdout
    assert "models" in info and "roles:" in info and "BF16" in info


def _many_models(root: Path, n: int) -> Path:
    for i in range(n):
        modelfactory.transformer(root / f"m{i:03d}", seed=i, layers=1, d=64)
    return root


def test_sigkill_at_any_moment_then_rerun_completes(tmp_path):
    """Kill the crawl at random moments; the catalog stays readable and a rerun finishes it, no duplicates."""
    src = _many_models(tmp_path / "src", 24)
    ref = str(tmp_path / "ref")
    assert _run("-m", "crawl", "local", str(src), "--catalog", ref, "--no-ray", "--batch-size", "2").returncode == 0
    cat = str(tmp_path / "cat")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(0)
    for _ in range(4):
        p = subprocess.Popen([sys.executable, "-m", "crawl", "local", str(src), "--catalog", cat, "--no-ray",
                              "--batch-size", "2"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.8, 3.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if os.path.exists(f"{cat}/catalog.json"):
            con = connect(cat)  # readable at every moment
            n, distinct = con.execute("SELECT count(*), count(DISTINCT model_id) FROM models").fetchone()
            assert n == distinct
            con.execute("SELECT count(*) FROM tokens").fetchone()
    assert _run("-m", "crawl", "local", str(src), "--catalog", cat, "--no-ray").returncode == 0
    q = "SELECT model_id, n_tokens, content_hash FROM models ORDER BY model_id"
    assert connect(cat).execute(q).fetchall() == connect(ref).execute(q).fetchall()
    q = "SELECT count(*), count(DISTINCT (model_id, token_idx)), sum(n_valid) FROM tokens"
    assert connect(cat).execute(q).fetchone() == connect(ref).execute(q).fetchone()
    assert not list(Path(cat).rglob(".tmp-*"))
