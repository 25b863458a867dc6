"""The safetensors reader trusts nothing in a header it has not checked, and its verdict on a file is the
reference parser's (the `safetensors` package), except where it is stricter on purpose."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from catalog.errors import BadWeights
from catalog.process import ModelRecords
from catalog.safetensors_io import (
    SafetensorsFile,
    SafetensorsModel,
    is_float_dtype,
    parse_header,
    safe_filename,
    to_float32,
)
from catalog.schema import CatalogSpec
from crawl.worker import checked, model_row


def _file(tmp_path, header: dict, data: bytes, claimed: int | None = None):
    h = json.dumps(header).encode()
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", claimed if claimed is not None else len(h)) + h + data)
    return p


def test_reads_what_safetensors_wrote(tmp_path):
    t = {"b.weight": torch.randn(3, 4), "a.bias": torch.randn(5).half(), "c": torch.randn(2, 2).bfloat16(),
         "n": torch.tensor([1, 2, 3])}
    save_file(t, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile.open(tmp_path / "x.safetensors")
    got = {m.name: m for m in f.tensors}
    assert {k: (v.dtype, v.shape) for k, v in got.items()} == {
        "b.weight": ("F32", (3, 4)), "a.bias": ("F16", (5,)), "c": ("BF16", (2, 2)), "n": ("I64", (3,))}
    assert np.array_equal(f.array(got["b.weight"]), t["b.weight"].numpy())
    assert np.array_equal(to_float32(f.array(got["c"]), "BF16"), t["c"].float().numpy())
    assert np.array_equal(to_float32(f.array(got["a.bias"]), "F16"), t["a.bias"].float().numpy())


@pytest.mark.parametrize("dtype,name", [(torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2")])
def test_float8_converts_exactly(tmp_path, dtype, name):
    x = torch.randn(64).to(dtype)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile.open(tmp_path / "x.safetensors")
    assert f.tensors[0].dtype == name
    assert np.array_equal(to_float32(f.array(f.tensors[0]), name), x.float().numpy())


F32_8 = np.arange(8, dtype=np.float32).tobytes()


@pytest.mark.parametrize(
    "header,data,claimed,reason",
    [
        ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, F32_8, 10 << 30, "limit"),
        ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, F32_8[:20], None, "truncated"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
          "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, F32_8[:24], None, "overlap"),
        ({"a": {"dtype": "Q3", "shape": [8], "data_offsets": [0, 32]}}, F32_8, None, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [9], "data_offsets": [0, 32]}}, F32_8, None, "needs 36 bytes"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, F32_8, None, "gap"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 32]}}, F32_8, None, "bad shape"),
        ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [32, 0]}}, F32_8, None, "bad data_offsets"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, F32_8, None, "unexpected bytes"),
        ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, F32_8, 1 << 20, "only"),
    ],
)
def test_bad_headers_are_refused_with_a_reason(tmp_path, header, data, claimed, reason):
    p = _file(tmp_path, header, data, claimed)
    with pytest.raises(BadWeights, match=reason):
        SafetensorsFile.open(p)


def test_text_and_tiny_files(tmp_path):
    (tmp_path / "t.safetensors").write_text("hello, I am text pretending to be weights")
    with pytest.raises(BadWeights, match="text"):
        SafetensorsFile.open(tmp_path / "t.safetensors")
    (tmp_path / "s.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(BadWeights, match="at least 8"):
        SafetensorsFile.open(tmp_path / "s.safetensors")
    with pytest.raises(BadWeights, match="JSON"):
        parse_header(b"{not json", None)


@pytest.mark.parametrize("name", ["../etc/passwd", "/abs.safetensors", "a/b.safetensors", "..", "x\\y"])
def test_index_rejects_path_traversal(tmp_path, name):
    with pytest.raises(BadWeights, match="unsafe"):
        safe_filename(name)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": name}}))
    with pytest.raises(BadWeights, match="unsafe"):
        SafetensorsModel.open(tmp_path, [], "model.safetensors.index.json")


@pytest.mark.parametrize("text,reason", [("[" * 5000 + "]" * 5000, "nests deeper"), ('{"weight_map": [1]}', "weight_map"),
                                         ('{"weight_map": {"a": "\\ud800"}}', "surrogate"), ("{", "not valid JSON")])
def test_hostile_index_files_are_refused_with_a_reason(tmp_path, text, reason):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(BadWeights, match=reason):
        SafetensorsModel.open(tmp_path, [], "model.safetensors.index.json")


def test_index_must_match_shards(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors",
                                                                                       "b": "s1.safetensors"}}))
    with pytest.raises(BadWeights, match="does not match"):
        SafetensorsModel.open(tmp_path, [], "model.safetensors.index.json")


def test_tensors_are_memory_mapped_not_copied(tmp_path):
    save_file({"w": torch.randn(256, 256)}, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile.open(tmp_path / "x.safetensors")
    a = f.array(f.tensors[0])
    assert not a.flags.owndata and not a.flags.writeable


# ------------------------------------------------------------------------------------------------------
# Verdicts against the reference parser (the `safetensors` package's Rust code)
# ------------------------------------------------------------------------------------------------------
# Where wildzoo refuses what the reference takes, on purpose (each is explained in safetensors_io):
STRICTER = ("duplicate key", "entry is a list", "dtype is an object", "characters (limit", "exceeds the int64 range")
SPEC = CatalogSpec(token_size=8)


def write(path, header: dict | bytes, data: bytes = b"", claimed: int | None = None):
    """A file of `header` (a dict, or raw JSON bytes) and `data`; `claimed` overrides the length prefix."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if claimed is None else claimed) + h + data)
    return path


def _torch_cannot(dtype: str, shape: list[int]) -> bool:
    """Tensors the Rust parser validates but torch has no type for: their header verdict stands."""
    return dtype.startswith("F6_") or (dtype == "F4" and bool(shape) and shape[-1] % 2 == 1)


def reference_verdict(path) -> tuple[bool, str]:
    """The reference's verdict: `safe_open` (framework pt) and every tensor read with `get_tensor`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                if not _torch_cannot(sl.get_dtype(), sl.get_shape()):
                    f.get_tensor(k)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # SafetensorError, torch's TypeError, and pyo3's PanicException alike
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def wildzoo_verdict(path, header_only: bool = False) -> tuple[bool, str]:
    """wildzoo's verdict, through the crawl's own path: open, rows and tokens, rows checked against the
    schemas. Anything but `BadWeights` escaping from here is a crash (the test fails with it)."""
    try:
        weights = SafetensorsModel.open(path.parent, [path.name])
        rec = ModelRecords("m", weights, SPEC, header_only=header_only)
        rec.consume()
        row = model_row({"model_id": "m", "source": "local"}, n_params=rec.n_params, n_tokens=rec.n_tokens,
                        n_tensors=len(rec.tensor_rows), status="ok")
        checked(row, rec.tensor_rows, [])
    except BadWeights as e:
        return False, str(e)
    return True, ""


def agree(path) -> tuple[bool, str]:
    """Check wildzoo against the reference on one file; returns wildzoo's verdict and reason."""
    ref, ref_reason = reference_verdict(path)
    ours, reason = wildzoo_verdict(path)
    assert wildzoo_verdict(path, header_only=True)[0] == ours, "header-only and full crawls disagree"
    assert not (ours and not ref), f"wildzoo accepts what the reference refuses ({ref_reason})"
    if ref and not ours:
        assert any(s in reason for s in STRICTER), f"wildzoo refuses what the reference accepts: {reason}"
    assert "\n" not in reason
    return ours, reason


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
Z8 = bytes(8)


def _h(meta: bytes) -> bytes:
    return b'{"__metadata__": ' + meta + b', "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'


# (header, data, reference accepts, wildzoo's reason): the cases of the issue, and their neighbours
CASES = {
    "shape-bool": ({"a": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, bytes(16), False,
                   "bad shape [True, 4]: true is not"),
    "metadata-list": (_h(b'["a"]'), Z8, False, "__metadata__ is a list"),
    "metadata-number": (_h(b"3"), Z8, False, "__metadata__ is a number"),
    "metadata-false": (_h(b"false"), Z8, False, "__metadata__ is false"),
    "metadata-null-value": (_h(b'{"k": null}'), Z8, False, "__metadata__['k'] is null"),
    "metadata-nested": (_h(b'{"k": {"x": "y"}}'), Z8, False, "__metadata__['k'] is an object"),
    "metadata-number-value": (_h(b'{"k": 1}'), Z8, False, "__metadata__['k'] is a number"),
    "metadata-duplicated": (b'{"__metadata__": {}, "__metadata__": {}, "a": {"dtype": "F32", "shape": [2], '
                            b'"data_offsets": [0, 8]}}', Z8, False, "duplicate key '__metadata__'"),
    "metadata-deep": (_h(b"[" * 5000 + b"]" * 5000), Z8, False, "nests deeper than 127"),
    "metadata-null": (_h(b"null"), Z8, True, None),  # the reference reads null as no metadata
    "offsets-bool": ({"a": {"dtype": "BOOL", "shape": [1], "data_offsets": [False, True]}}, b"\x01", False,
                     "bad data_offsets [False, True]"),
    "offsets-float": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}}, Z8, False, "bad data_offsets"),
    "f4-size-mismatch": ({"a": {"dtype": "F4", "shape": [15], "data_offsets": [0, 8]}}, Z8, False, "byte boundary"),
    "f4-odd-count": ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, Z8[:2], False, "byte boundary"),
    "f4-too-many-bytes": ({"a": {"dtype": "F4", "shape": [16], "data_offsets": [0, 16]}}, bytes(16), False,
                          "needs 8 bytes"),
    "f4": ({"a": {"dtype": "F4", "shape": [4, 4], "data_offsets": [0, 8]}}, Z8, True, None),
    "f6-misaligned": ({"a": {"dtype": "F6_E2M3", "shape": [3], "data_offsets": [0, 3]}}, Z8[:3], False, "byte boundary"),
    "f6": ({"a": {"dtype": "F6_E3M2", "shape": [4], "data_offsets": [0, 3]}}, Z8[:3], True, None),
    "zero-size": ({"a": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]},
                   "b": {"dtype": "F16", "shape": [3, 0], "data_offsets": [0, 0]}, "c": F32_2}, Z8, True, None),
    "zero-size-huge-dims": ({"a": {"dtype": "F32", "shape": [2**62, 3, 0], "data_offsets": [0, 0]}}, b"", True, None),
    "zero-first-then-overflow": ({"a": {"dtype": "U8", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}}, b"",
                                 True, None),
    "c64": ({"a": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, bytes(16), True, None),
    "f8-e4m3fnuz": ({"a": {"dtype": "F8_E4M3FNUZ", "shape": [8], "data_offsets": [0, 8]}}, bytes(range(8)), True, None),
    "f8-e5m2fnuz": ({"a": {"dtype": "F8_E5M2FNUZ", "shape": [8], "data_offsets": [0, 8]}}, bytes(range(8)), True, None),
    "numel-overflow": ({"a": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}, b"", False,
                       "more than 2**64 elements (overflow)"),
    "overflow-before-zero": ({"a": {"dtype": "F32", "shape": [2**32, 2**32, 0], "data_offsets": [0, 0]}}, b"", False,
                             "overflow"),
    "bits-overflow": ({"a": {"dtype": "F32", "shape": [2**62], "data_offsets": [0, 8]}}, Z8, False,
                      "more than 2**64 bits (overflow)"),
    "dim-u64-max": ({"a": {"dtype": "U8", "shape": [2**64 - 1, 0], "data_offsets": [0, 0]}}, b"", False,
                    "exceeds the int64 range"),
    "dim-2**64": ({"a": {"dtype": "U8", "shape": [2**64], "data_offsets": [0, 8]}}, Z8, False, "not a non-negative"),
    "negative-zero": (b'{"a": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}', b"", False, "bad shape"),
    "nan": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": NaN}}', Z8, False, "NaN is not JSON"),
    "number-out-of-range": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1e400}}', Z8, False,
                            "out of range"),
    "long-integer": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": ' + b"1" * 5000 + b"}}", Z8,
                     False, "not valid JSON"),
    "lone-surrogate": (b'{"\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', Z8, False, "surrogate"),
    "depth-127": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": ' + b"[" * 125 + b"]" * 125
                  + b"}}", Z8, True, None),
    "depth-128": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": ' + b"[" * 126 + b"]" * 126
                  + b"}}", Z8, False, "nests deeper than 127"),
    "extra-field": ({"a": {**F32_2, "note": [1, {"x": None}]}}, Z8, True, None),
    "empty-header": (b"{}      ", b"", True, None),
    "trailing-nul": (json.dumps({"a": F32_2}).encode() + b"\x00", Z8, False, "not valid JSON"),
    # deliberately stricter than the reference (see STRICTER)
    "duplicate-tensor": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                         b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', Z8, True, "duplicate key 'a'"),
    "entry-as-list": (b'{"a": ["F32", [2], [0, 8]]}', Z8, True, "entry is a list"),
    "dtype-as-map": (b'{"a": {"dtype": {"F32": null}, "shape": [2], "data_offsets": [0, 8]}}', Z8, True,
                     "dtype is an object"),
    "long-name": ({"n" * 2000: F32_2}, Z8, True, "characters (limit"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_verdict_matches_the_reference(tmp_path, case):
    header, data, ref_accepts, reason = CASES[case]
    p = write(tmp_path / "m.safetensors", header, data)
    assert reference_verdict(p)[0] == ref_accepts, "the reference parser changed its verdict"
    ours, why = agree(p)
    if reason is None:
        assert ours, why
    else:
        assert not ours and reason in why, why


def test_zero_size_tensors_are_cataloged_in_both_modes_and_tokenizations(tmp_path):
    header, data, _, _ = CASES["zero-size"]
    p = write(tmp_path / "m.safetensors", {**header, "d.weight": {"dtype": "F32", "shape": [2, 0], "data_offsets": [8, 8]},
                                           "d.bias": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
              data + np.array([1.5, -2], np.float32).tobytes())
    for tokenization in ("dense", "row"):
        for header_only in (False, True):
            rec = ModelRecords("m", SafetensorsModel.open(tmp_path, [p.name]), CatalogSpec(4, tokenization),
                               header_only=header_only)
            tables = rec.consume()
            rows = {r["name"]: r for r in rec.tensor_rows}
            assert rows["a"]["n_params"] == 0 and rows["b"]["shape"] == [3, 0] and rows["a"].get("mean") is None
            if header_only:
                assert not tables and rec.content_hash is None
                continue
            assert rows["a"]["n_tokens"] == 0 and rows["a"]["tokenized"]
            assert rows["c"]["n_tokens"] == 1 and rows["c"]["std"] == 0.0
            tokens = sum(t.num_rows for t in tables)
            # row tokenization packs the bias into its zero-width weight: two rows of one value each
            assert tokens == (1 + 1 if tokenization == "dense" else 1 + 2)
            assert rows["d.bias"]["mean"] == pytest.approx(-0.25)


@pytest.mark.parametrize("dtype,name", [(torch.float8_e4m3fnuz, "F8_E4M3FNUZ"), (torch.float8_e5m2fnuz, "F8_E5M2FNUZ")])
def test_fnuz_floats_convert_exactly(tmp_path, dtype, name):
    codes = torch.arange(256, dtype=torch.uint8)
    save_file({"x": codes.view(dtype)}, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile.open(tmp_path / "x.safetensors")
    assert f.tensors[0].dtype == name and is_float_dtype(name)
    ours = to_float32(f.array(f.tensors[0]), name)
    assert np.array_equal(ours, codes.view(dtype).float().numpy(), equal_nan=True)


def test_complex_is_cataloged_not_tokenized(tmp_path):
    save_file({"z": torch.randn(3, 2, dtype=torch.complex64), "w": torch.randn(3, 2)}, str(tmp_path / "x.safetensors"))
    rec = ModelRecords("m", SafetensorsModel.open(tmp_path, ["x.safetensors"]), SPEC)
    rec.consume()
    rows = {r["name"]: r for r in rec.tensor_rows}
    assert rows["z"]["dtype"] == "C64" and rows["z"]["n_params"] == 6 and not rows["z"]["tokenized"]
    assert rows["z"].get("mean") is None and rows["w"]["tokenized"] and rec.content_hash


def test_header_only_overflow_is_an_error_not_a_wrapped_count(tmp_path):
    write(tmp_path / "m.safetensors", {"a": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}})
    ok, why = wildzoo_verdict(tmp_path / "m.safetensors", header_only=True)
    assert not ok and "overflow" in why
