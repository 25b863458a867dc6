"""The safetensors reader trusts nothing in a header it has not checked."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from catalog.errors import BadWeights
from catalog.safetensors_io import SafetensorsFile, SafetensorsModel, parse_header, safe_filename, to_float32


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
