"""Hostile safetensors files: mutated valid files judged by wildzoo and by the reference parser, and
crawls of folders that hold hostile files (every model gets its row, the crawl exits 0, no traceback).

The property test mutates valid files (flipped header bytes, a changed length prefix, truncations and
appended bytes, odd JSON values, odd JSON text) and checks on every example that wildzoo never
crashes (only `BadWeights` may come out), never accepts what the reference refuses, and refuses what
the reference accepts only for the reasons it documents as deliberately stricter.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from test_safetensors_io import agree, reference_verdict

from catalog.query import connect
from catalog.safetensors_io import BITS, SafetensorsFile, is_float_dtype, to_float32
from catalog.store import Catalog
from crawl.local import find_models
from crawl.tasks import make_tasks
from crawl.worker import CrawlWorker

import modelfactory

ROOT = Path(__file__).resolve().parent.parent
DTYPES = sorted(BITS)
UNKNOWN_DTYPES = ["F7", "f32", "Q4_0", "", "F8", "COMPLEX64", "F32 "]


# ------------------------------------------------------------------------------------------------------
# Valid files, and ways to break them
# ------------------------------------------------------------------------------------------------------
@st.composite
def valid_files(draw) -> tuple[list[tuple[str, object]], bytes]:
    """(header entries as (key, value) pairs, data) of a valid file: up to 4 tensors of any dtype the
    reference knows, zero-size ones included, in any order in the header, and maybe `__metadata__`."""
    n = draw(st.integers(0, 4))
    names = draw(st.lists(st.text(st.characters(codec="utf-8"), max_size=6), min_size=n, max_size=n, unique=True))
    entries, chunks, offset = [], [], 0
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        bits = BITS[dtype]
        if bits < 8:  # sub-byte values must fill whole bytes (and torch packs F4 along the last dim)
            shape = [*shape, 8 // math.gcd(bits, 8)]
        nbytes = math.prod(shape) * bits // 8
        chunks.append(draw(st.binary(min_size=nbytes, max_size=nbytes)))
        entries.append((name, {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}))
        offset += nbytes
    entries = draw(st.permutations(entries))
    if draw(st.booleans()):
        meta = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
        entries.insert(draw(st.integers(0, len(entries))), ("__metadata__", meta))
    return entries, b"".join(chunks)


def dumps(value: object) -> str:
    """JSON text of `value`, with any `Raw` inside it written as its text."""
    raws: list[str] = []

    def raw(o: object) -> str:
        if not isinstance(o, Raw):
            raise TypeError(type(o).__name__)
        raws.append(o.text)
        return f"@@raw{len(raws) - 1}@@"

    text = json.dumps(value, default=raw)
    for i, r in enumerate(raws):
        text = text.replace(f'"@@raw{i}@@"', r)
    return text


def header_text(entries: list[tuple[str, object]]) -> bytes:
    """JSON text of the entries, written pair by pair (so a key may repeat)."""
    return ("{" + ", ".join(json.dumps(k) + ": " + dumps(v) for k, v in entries) + "}").encode()


class Raw:
    """JSON text put into a header as it is (NaN, -0, 1e400, deep nesting, lone surrogates…)."""

    def __init__(self, text: str) -> None:
        self.text = text


ODD_TEXT = ["-0", "1e400", "NaN", "-Infinity", '"\\ud800"', "[" * 130 + "]" * 130, "1" * 400, "1.0", "2e0",
            "18446744073709551616", "18446744073709551615", "9223372036854775808", "[[]]", '{"F32": null}']
odd_values = st.one_of(
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64]),
    st.text(max_size=5),
    st.sampled_from(DTYPES + UNKNOWN_DTYPES),
    st.lists(st.one_of(st.integers(-2, 2**64 + 1), st.booleans(), st.none(), st.floats(0, 4)), max_size=4),
    st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), st.integers(), st.none()), max_size=2),
    st.sampled_from(ODD_TEXT).map(Raw),
)


def _set_odd_value(draw, entries: list) -> list:
    """One field of one entry (dtype, shape, a dimension, offsets, an offset, metadata) made odd."""
    entries = [(k, json.loads(json.dumps(v))) for k, v in entries]  # a deep copy
    if not entries:
        return [(draw(st.text(max_size=3)), draw(odd_values))]
    i = draw(st.integers(0, len(entries) - 1))
    key, value = entries[i]
    odd = draw(odd_values)
    if key == "__metadata__" or not isinstance(value, dict):
        if value and draw(st.booleans()):
            value[draw(st.sampled_from(sorted(value)))] = odd
        else:
            value = odd
    else:
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "shape[]", "data_offsets[]", "extra", "del"]))
        if field.endswith("[]"):
            seq = value[field[:-2]]
            if seq:
                seq[draw(st.integers(0, len(seq) - 1))] = odd
            else:
                seq.append(odd)
        elif field == "extra":
            value[draw(st.text(max_size=3))] = odd
        elif field == "del":
            del value[draw(st.sampled_from(sorted(value)))]
        else:
            value[field] = odd
    entries[i] = (key, value)
    if draw(st.booleans()) and entries:  # and sometimes a repeated key
        entries.insert(draw(st.integers(0, len(entries))), entries[draw(st.integers(0, len(entries) - 1))])
    return entries


@st.composite
def hostile_files(draw) -> bytes:
    """A valid file, then one mutation of it."""
    entries, data = draw(valid_files())
    kind = draw(st.sampled_from(["none", "flip", "length", "truncate", "append", "value", "value", "value"]))
    if kind == "value":
        entries = _set_odd_value(draw, entries)
    header = header_text(entries)
    if draw(st.booleans()):
        header += b" " * draw(st.integers(0, 7))  # the reference's own padding
    blob = bytearray(struct.pack("<Q", len(header)) + header + data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(8, 8 + len(header) - 1))
            blob[pos] ^= draw(st.integers(1, 255))
    elif kind == "length":
        n = draw(st.one_of(st.integers(max(0, len(header) - 16), len(header) + 16), st.integers(0, 2**64 - 1),
                           st.sampled_from([0, 1, 100_000_000, 100_000_001, 2**63, 2**64 - 1])))
        blob[:8] = struct.pack("<Q", n)
    elif kind == "truncate":
        del blob[draw(st.integers(0, len(blob) - 1)):]
    elif kind == "append":
        blob += draw(st.binary(min_size=1, max_size=9))
    return bytes(blob)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(derandomize=True, database=None, max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(blob=hostile_files())
def test_mutated_files_agree_with_the_reference(scratch, blob):
    path = scratch / "model.safetensors"
    path.write_bytes(blob)
    ours, _ = agree(path)
    if ours:  # both read it: the same tensors, and float values converted exactly
        f = SafetensorsFile.open(path)
        with safe_open(str(path), framework="pt") as ref:
            assert sorted(ref.keys()) == sorted(t.name for t in f.tensors)
            for t in f.tensors:
                sl = ref.get_slice(t.name)
                assert (sl.get_dtype(), list(sl.get_shape())) == (t.dtype, list(t.shape))
                if is_float_dtype(t.dtype) and t.numel:
                    want = ref.get_tensor(t.name).float().numpy()
                    assert np.array_equal(to_float32(f.array(t), t.dtype), want, equal_nan=True), t.name


# ------------------------------------------------------------------------------------------------------
# Crawls of folders that hold hostile files
# ------------------------------------------------------------------------------------------------------
def _raw(folder: Path, header: dict | bytes, data: bytes = b"") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    """Good models and hostile ones in one folder: {model folder: reason substring, None for good ones}."""
    root = tmp_path_factory.mktemp("hostile")
    expect: dict[str, str | None] = {}
    for i in range(4):
        modelfactory.transformer(root / f"good-{i}", seed=i, layers=1, d=16)
        expect[f"good-{i}"] = None
    _raw(root / "shape-true", {"a": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, bytes(16))
    expect["shape-true"] = "true is not a non-negative integer"
    _raw(root / "metadata-list", b'{"__metadata__": [1], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
         bytes(4))
    expect["metadata-list"] = "__metadata__ is a list"
    _raw(root / "deep", b'{"__metadata__": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    expect["deep"] = "nests deeper"
    _raw(root / "overflow", {"a": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}})
    expect["overflow"] = "overflow"
    config = root / "config-surrogate"
    config.mkdir()
    save_file({"w": torch.ones(3)}, str(config / "model.safetensors"))
    (config / "config.json").write_text('{"model_type": "\\ud800"}')
    expect["config-surrogate"] = "cannot hold"
    # valid, if unusual: zero-size tensors and the dtypes torch added late
    _raw(root / "zero-and-new-dtypes",
         {"e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]},
          "z": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]},
          "q": {"dtype": "F8_E4M3FNUZ", "shape": [4], "data_offsets": [8, 12]},
          "r": {"dtype": "F8_E5M2FNUZ", "shape": [4], "data_offsets": [12, 16]},
          "h": {"dtype": "F16", "shape": [2**62, 3, 0], "data_offsets": [16, 16]}}, bytes(range(16)))
    expect["zero-and-new-dtypes"] = None
    return root, expect


def _check_catalog(cat: Path, root: Path, expect: dict[str, str | None], status_ok: str) -> None:
    con = connect(str(cat))
    rows = {m.split("/")[-1]: (s, e) for m, s, e in con.execute("SELECT model_id, status, error FROM models").fetchall()}
    assert set(rows) == set(expect)
    for name, reason in expect.items():
        status, error = rows[name]
        if reason is None:
            assert status == status_ok, (name, error)
        else:
            assert status == "error" and reason in error and "\n" not in error, (name, error)
    q = "SELECT name, dtype, n_params, n_tokens, tokenized FROM tensors WHERE model_id LIKE '%zero-and-new-dtypes'"
    tensors = {r[0]: r[1:] for r in con.execute(q).fetchall()}
    assert {k: v[:2] for k, v in tensors.items()} == {"e": ("F32", 0), "z": ("C64", 1), "q": ("F8_E4M3FNUZ", 4),
                                                      "r": ("F8_E5M2FNUZ", 4), "h": ("F16", 0)}
    if status_ok == "ok":
        assert tensors["q"][2:] == (1, True) and tensors["z"][2:] == (0, False) and tensors["e"][2] == 0


def _crawl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "crawl", "local", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("header_only", [False, True], ids=["full", "header-only"])
def test_crawl_of_hostile_folder_without_ray(tmp_path, hostile_root, header_only):
    root, expect = hostile_root
    cat = tmp_path / "cat"
    r = _crawl(str(root), "--catalog", str(cat), "--no-ray", "--batch-size", "8", *(["--header-only"] * header_only))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    _check_catalog(cat, root, expect, "header_only" if header_only else "ok")


@pytest.mark.ray
@pytest.mark.parametrize("header_only", [False, True], ids=["full", "header-only"])
def test_crawl_of_hostile_folder_on_ray(ray_session, tmp_path, hostile_root, header_only):
    """The same crawl through Ray Data's actor pool: a separate driver attached to the session's Ray."""
    root, expect = hostile_root
    cat = tmp_path / "cat"
    address = ray_session.get_runtime_context().gcs_address
    r = _crawl(str(root), "--catalog", str(cat), "--batch-size", "10", "--workers", "1",
               *(["--header-only"] * header_only), env={"RAY_ADDRESS": address})
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    _check_catalog(cat, root, expect, "header_only" if header_only else "ok")


def test_worker_gives_every_model_of_a_hostile_batch_its_row(tmp_path, hostile_root):
    root, expect = hostile_root
    rows, _ = find_models([str(root)])
    cat = Catalog.open(str(tmp_path / "cat"), create=True)
    out = CrawlWorker(cat.uri)(make_tasks(rows)).to_pylist()  # one batch, one shard
    assert len(out) == len(expect) and len(cat.files("models")) == 1
    status = {r["model_id"].split("/")[-1]: r["status"] for r in out}
    assert status == {k: "ok" if v is None else "error" for k, v in expect.items()}
    assert reference_verdict(root / "zero-and-new-dtypes" / "model.safetensors")[0]
