"""A safetensors reader that checks the header before trusting any of it.

The header is untrusted input (files come from the wild): its length is bounded, every tensor's
offsets must lie inside the file, be contiguous and non-overlapping, agree with the dtype and shape,
and the dtype must be known. Data is read through a memory map, so a tensor is paged in only when
it is used and a model is never held in memory twice.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from catalog.errors import BadWeights
from catalog.roles import natural_key

MAX_HEADER_BYTES = 100_000_000  # the Rust reference parser's own limit

# dtype -> bytes per element (F4 packs two values per byte), numpy storage dtype, floating?
DTYPES: dict[str, tuple[float, str, bool]] = {
    "F64": (8, "<f8", True),
    "F32": (4, "<f4", True),
    "F16": (2, "<f2", True),
    "BF16": (2, "<u2", True),
    "F8_E4M3": (1, "u1", True),
    "F8_E5M2": (1, "u1", True),
    "F8_E8M0": (1, "u1", False),
    "F4": (0.5, "u1", False),
    "I64": (8, "<i8", False),
    "I32": (4, "<i4", False),
    "I16": (2, "<i2", False),
    "I8": (1, "i1", False),
    "U64": (8, "<u8", False),
    "U32": (4, "<u4", False),
    "U16": (2, "<u2", False),
    "U8": (1, "u1", False),
    "BOOL": (1, "?", False),
}


def is_float_dtype(dtype: str) -> bool:
    """True for the dtypes that are tokenized (converted exactly to float32)."""
    return DTYPES[dtype][2]


@dataclass(frozen=True)
class TensorMeta:
    """One tensor as the header describes it; `offset` is absolute in its file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    file: str = ""

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def _nbytes(dtype: str, numel: int) -> int:
    size = DTYPES[dtype][0]
    return (numel + 1) // 2 if size == 0.5 else int(numel * size)


def header_length(prefix: bytes, file_size: int | None = None) -> int:
    """Header length from a file's first 8 bytes, bounded before anything is read."""
    if len(prefix) < 8:
        raise BadWeights(f"not a safetensors file: {len(prefix)} bytes, need at least 8")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES and all(32 <= b < 127 or b in (9, 10, 13) for b in prefix[:8]):
        raise BadWeights("not a safetensors file: it starts with text")
    if n > MAX_HEADER_BYTES:
        raise BadWeights(f"header claims {n:,} bytes (limit {MAX_HEADER_BYTES:,}): not a valid safetensors file")
    if n < 2:
        raise BadWeights(f"header length {n} is too small to be a safetensors header")
    if file_size is not None and 8 + n > file_size:
        raise BadWeights(f"header claims {n:,} bytes but the file has only {file_size:,}: truncated or not safetensors")
    return n


def parse_header(header: bytes, file_size: int | None, file: str = "") -> tuple[list[TensorMeta], dict]:
    """Validate a safetensors JSON header; returns tensors in data order and `__metadata__`.

    `file_size` is the size of the whole file (None when unknown, e.g. a header read by HTTP
    range without a size): with it, the data must end exactly at the end of the file.
    """
    try:
        raw = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadWeights(f"header is not valid JSON ({type(e).__name__}): not a safetensors file") from None
    if not isinstance(raw, dict):
        raise BadWeights("header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise BadWeights("__metadata__ is not an object")
    data_start = 8 + len(header)
    metas = []
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise BadWeights(f"tensor {name!r}: entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise BadWeights(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise BadWeights(f"tensor {name!r}: bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise BadWeights(f"tensor {name!r}: bad data_offsets {offsets!r}")
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if offsets[1] - offsets[0] != _nbytes(dtype, numel):
            raise BadWeights(
                f"tensor {name!r}: {dtype}{shape} needs {_nbytes(dtype, numel):,} bytes "
                f"but its offsets span {offsets[1] - offsets[0]:,}"
            )
        metas.append(TensorMeta(name, dtype, tuple(shape), data_start + offsets[0], offsets[1] - offsets[0], file))
    metas.sort(key=lambda m: (m.offset, m.nbytes))
    end = data_start
    prev = None
    for m in metas:
        if m.offset < end:
            raise BadWeights(f"tensors {prev!r} and {m.name!r} overlap")
        if m.offset > end:
            raise BadWeights(f"gap of {m.offset - end} bytes before tensor {m.name!r}: data is not contiguous")
        end, prev = m.offset + m.nbytes, m.name
    if file_size is not None:
        if end > file_size:
            raise BadWeights(f"truncated: tensor data ends at byte {end:,} but the file has {file_size:,}")
        if end < file_size:
            raise BadWeights(f"{file_size - end:,} unexpected bytes after the last tensor")
    return metas, {str(k): str(v) for k, v in metadata.items()}


@dataclass
class SafetensorsFile:
    """An open, validated safetensors file; `array` returns memory-mapped views."""

    path: Path
    tensors: list[TensorMeta] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    size: int = 0
    _map: mmap.mmap | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> SafetensorsFile:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                n = header_length(f.read(8), size)
                header = f.read(n)
        except OSError as e:
            raise BadWeights(f"cannot read {path.name}: {e.strerror or e}") from None
        tensors, metadata = parse_header(header, size, path.name)
        return cls(path, tensors, metadata, size)

    def array(self, meta: TensorMeta) -> np.ndarray:
        """The tensor's stored values (BF16 and F8 as their raw unsigned integers), zero-copy."""
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        storage = np.dtype(DTYPES[meta.dtype][1])
        count = meta.nbytes // storage.itemsize
        flat = np.frombuffer(self._map, dtype=storage, count=count, offset=meta.offset)
        return flat if meta.dtype == "F4" else flat.reshape(meta.shape)

    def release(self, meta: TensorMeta) -> None:
        """Drop a tensor's pages from memory once it is processed (they are re-read if used again).

        Without this, a model read through one memory map would count fully in the process's
        resident memory by the end, instead of one tensor at a time.
        """
        if self._map is None or not hasattr(self._map, "madvise") or meta.nbytes == 0:
            return
        page = mmap.PAGESIZE
        start = meta.offset // page * page
        end = min(-(-(meta.offset + meta.nbytes) // page) * page, self.size)
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        self._map = None  # views keep the map alive until they are released


_LUTS: dict[str, np.ndarray] = {}


def _f8_lut(dtype: str) -> np.ndarray:
    """float32 value of each of the 256 codes of an 8-bit float format (exact)."""
    if dtype not in _LUTS:
        import torch

        tdt = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[dtype]
        _LUTS[dtype] = torch.arange(256, dtype=torch.uint8).view(tdt).float().numpy()
    return _LUTS[dtype]


def to_float32(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Exact float32 values of a float tensor (F64 rounds to nearest). F32 input is returned as is."""
    if dtype == "F32":
        return stored
    if dtype == "BF16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F8_E4M3", "F8_E5M2"):
        return _f8_lut(dtype)[stored]
    if dtype in ("F16", "F64"):
        return stored.astype(np.float32)
    raise BadWeights(f"dtype {dtype} is not a float type that can be tokenized")


_SAFE_NAME = re.compile(r"^[^/\\\x00]+$")


def safe_filename(name: str) -> str:
    """Reject names that could escape their folder (path traversal) in index files and repo listings."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", "..") or name.startswith("~"):
        raise BadWeights(f"unsafe file name {name!r} in index")
    return name


@dataclass
class SafetensorsModel:
    """All tensors of one model, single-file or sharded with `model.safetensors.index.json`."""

    files: list[SafetensorsFile]
    index_file: str | None = None

    @classmethod
    def open(cls, folder: Path, weight_files: list[str], index: str | None = None) -> SafetensorsModel:
        if index is not None:
            try:
                data = json.loads((folder / index).read_text())
                weight_map = data["weight_map"]
                assert isinstance(weight_map, dict)
            except (OSError, ValueError, KeyError, TypeError, AssertionError):
                raise BadWeights(f"{index}: not a valid safetensors index (needs a weight_map object)") from None
            names = sorted({safe_filename(f) for f in weight_map.values()})
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise BadWeights(f"{index} names missing shard(s): {', '.join(missing[:3])}")
            files = [SafetensorsFile.open(folder / n) for n in names]
            found = {t.name: f.path.name for f in files for t in f.tensors}
            wrong = [k for k, v in weight_map.items() if found.get(k) != v]
            if wrong or len(found) != len(weight_map):
                raise BadWeights(f"{index} does not match its shards (e.g. {(wrong or sorted(found))[0]!r})")
            return cls(files, index)
        files = [SafetensorsFile.open(folder / safe_filename(n)) for n in weight_files]
        seen: dict[str, str] = {}
        for f in files:
            for t in f.tensors:
                if t.name in seen:
                    raise BadWeights(f"tensor {t.name!r} appears in both {seen[t.name]} and {f.path.name}")
                seen[t.name] = f.path.name
        return cls(files)

    @property
    def tensors(self) -> list[TensorMeta]:
        """All tensors in module order (files keep them sorted by dtype or name, not by layer)."""
        return sorted((t for f in self.files for t in f.tensors), key=lambda t: natural_key(t.name))

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def _file(self, meta: TensorMeta) -> SafetensorsFile:
        for f in self.files:
            if f.path.name == meta.file:
                return f
        raise KeyError(meta.file)

    def stored(self, meta: TensorMeta) -> np.ndarray:
        return self._file(meta).array(meta)

    def release(self, meta: TensorMeta) -> None:
        self._file(meta).release(meta)
