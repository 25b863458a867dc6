"""A safetensors reader that checks the header before trusting any of it.

The header is untrusted input (files come from the wild, some hostile). The check is as strict as
the reference parser (the `safetensors` package's Rust code) on what it rejects and as permissive on
what it accepts, with a few deliberate, written-out exceptions where wildzoo is stricter (marked
STRICTER below): JSON is typed exactly (a shape is a list of non-negative integers, and `true` is not
an integer), element counts and byte sizes are computed with the reference's overflow checks, every
dtype it knows is cataloged, sub-byte dtypes must end on a byte boundary, the offsets must be
contiguous from 0 and cover the data to the end of the file. Every rejection is a `BadWeights` with a
one-line reason naming the tensor and the rule broken.

Data is read through a memory map, so a tensor is paged in only when it is used and a model is never
held in memory twice.
"""

from __future__ import annotations

import json
import math
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
MAX_JSON_DEPTH = 127  # serde_json's recursion limit, which the reference parser inherits: deeper is refused
# STRICTER: the reference takes names of any length. Roles are matched on names with regular
# expressions whose cost grows with the name's length squared; no real checkpoint comes near this.
MAX_NAME_CHARS = 1024
# STRICTER than the Rust parser alone (which takes any u64 dimension of a zero-size tensor): the
# catalog stores shapes as int64, and neither torch nor numpy can build a larger dimension either.
MAX_DIM = (1 << 63) - 1
MAX_INDEX_BYTES = 64 << 20  # a `*.safetensors.index.json` larger than this is not an index
_U64 = 1 << 64

# dtype -> bytes per element (sub-byte for F4 and F6), numpy storage dtype (raw bytes where numpy
# has no such type), tokenized (converted exactly to float32; F64 rounds to nearest). Every dtype of
# the reference parser is here; the untokenized ones are cataloged (name, shape, role) without tokens.
DTYPES: dict[str, tuple[float, str, bool]] = {
    "F64": (8, "<f8", True),
    "F32": (4, "<f4", True),
    "F16": (2, "<f2", True),
    "BF16": (2, "<u2", True),
    "F8_E4M3": (1, "u1", True),
    "F8_E5M2": (1, "u1", True),
    "F8_E4M3FNUZ": (1, "u1", True),
    "F8_E5M2FNUZ": (1, "u1", True),
    "F8_E8M0": (1, "u1", False),  # a block-scale exponent format, not weights
    "F6_E2M3": (0.75, "u1", False),  # packed 6-bit floats (MX): stored as raw bytes
    "F6_E3M2": (0.75, "u1", False),
    "F4": (0.5, "u1", False),  # packed 4-bit floats (MX), two per byte
    "C64": (8, "<c8", False),  # complex: no exact float32 form
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
BITS = {name: round(size * 8) for name, (size, _, _) in DTYPES.items()}
SUB_BYTE = frozenset(name for name, bits in BITS.items() if bits < 8)
TOKENIZED_DTYPES = frozenset(name for name, (_, _, tok) in DTYPES.items() if tok)


def is_float_dtype(dtype: str) -> bool:
    """True for the dtypes that are tokenized (converted exactly to float32)."""
    return dtype in TOKENIZED_DTYPES


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
        return math.prod(self.shape)


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


# ----------------------------------------------------------------------------------------------------
# JSON exactly as the reference reads it
# ----------------------------------------------------------------------------------------------------
class _JsonRefused(ValueError):
    """JSON that Python's parser takes but the reference's (serde_json) refuses."""


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # STRICTER: serde_json refuses a repeated `__metadata__`, `dtype`, `shape` or `data_offsets` but
    # keeps the last of repeated tensor names or metadata keys. A key given twice means different
    # things to different JSON parsers (first wins, last wins, error), so no duplicate is accepted.
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _JsonRefused(f"duplicate key {dup!r}")
    return out


def _json_int(text: str) -> int | float:
    if text == "-0":
        return -0.0  # serde_json reads -0 as a float: it is no valid size or offset
    value = int(text)  # over 4,300 digits: ValueError, and far out of range for serde_json too
    if not -_U64 < value < _U64:
        try:
            float(value)  # serde_json reads a larger integer as a float and refuses one out of its range
        except OverflowError:
            raise _JsonRefused(f"number out of range ({len(text)} digits)") from None
    return value


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JsonRefused(f"number out of range ({text[:40]})")
    return value


def _json_constant(text: str) -> None:
    raise _JsonRefused(f"{text} is not JSON")


def _check_tree(value: object, what: str) -> None:
    """Depth within serde_json's limit and no lone surrogate (`\\ud800`) in any string or key."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise BadWeights(f"{what} nests deeper than {MAX_JSON_DEPTH} levels (the reference parser's limit)")
            items = v.items() if isinstance(v, dict) else ((None, x) for x in v)
            for k, x in items:
                if k is not None:
                    _check_string(k, what)
                stack.append((x, depth + 1))
        elif isinstance(v, str):
            _check_string(v, what)


def _check_string(s: str, what: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise BadWeights(f"{what} holds a lone UTF-16 surrogate escape in {s[:40]!r}: not valid Unicode") from None


def strict_json(data: bytes | str, what: str, unique_keys: bool = True) -> object:
    """Parse JSON as the reference parser does: UTF-8, no NaN or Infinity, numbers within range, depth
    within serde_json's limit, no lone surrogates, and (with `unique_keys`) no repeated key."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise BadWeights(f"{what} is not valid UTF-8 (at byte {e.start:,})") from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates if unique_keys else None,
            parse_int=_json_int,
            parse_float=_json_float,
            parse_constant=_json_constant,
        )
    except json.JSONDecodeError as e:
        raise BadWeights(f"{what} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise BadWeights(f"{what} nests deeper than {MAX_JSON_DEPTH} levels (the reference parser's limit)") from None
    except ValueError as e:  # our refusals, and integers too long for Python to read
        raise BadWeights(f"{what} is not valid JSON: {str(e).splitlines()[0][:200]}") from None
    _check_tree(value, what)
    return value


def _json_type(v: object) -> str:
    """How the JSON value `v` reads, for a reason: `true`, `a list`, `a number (2.0)`…"""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return f"a number ({v!r:.40})"
    if isinstance(v, str):
        return f"a string ({v!r:.40})"
    return "a list" if isinstance(v, list) else "an object"


# ----------------------------------------------------------------------------------------------------
# The header's rules
# ----------------------------------------------------------------------------------------------------
def _is_size(v: object) -> bool:
    """A JSON value the reference reads as a `usize`: an integer (not a bool, not 2.0), 0 <= v < 2**64."""
    return type(v) is int and 0 <= v < _U64


def _entry(name: str, entry: object) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one tensor entry, its JSON types checked exactly."""
    if len(name) > MAX_NAME_CHARS:
        raise BadWeights(f"tensor {name[:60]!r}…: name of {len(name):,} characters (limit {MAX_NAME_CHARS:,})")
    if not isinstance(entry, dict):
        # STRICTER: serde also reads a list [dtype, shape, data_offsets] here; no writer makes one and
        # other readers (the Hub's header parser among them) refuse it
        raise BadWeights(f"tensor {name!r}: entry is {_json_type(entry)}, not an object with dtype, shape, data_offsets")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise BadWeights(f"tensor {name!r}: missing {key}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        # STRICTER: serde also reads {"F32": null} as a dtype, which no writer makes
        raise BadWeights(f"tensor {name!r}: dtype is {_json_type(dtype)}, not a string")
    if dtype not in DTYPES:
        raise BadWeights(f"tensor {name!r}: unknown dtype {dtype[:40]!r}")
    if not isinstance(shape, list):
        raise BadWeights(f"tensor {name!r}: bad shape: {_json_type(shape)}, not a list of integers")
    for d in shape:
        if not _is_size(d):
            raise BadWeights(f"tensor {name!r}: bad shape {shape!r:.100}: {_json_type(d)} is not a non-negative integer")
        if d > MAX_DIM:
            raise BadWeights(f"tensor {name!r}: bad shape: dimension {d:,} exceeds the int64 range")
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise BadWeights(f"tensor {name!r}: bad data_offsets {offsets!r:.100}: need a list [start, end]")
    for o in offsets:
        if not _is_size(o):
            raise BadWeights(f"tensor {name!r}: bad data_offsets {offsets!r:.100}: {_json_type(o)} is not a "
                             f"non-negative 64-bit integer")
    if offsets[1] < offsets[0]:
        raise BadWeights(f"tensor {name!r}: bad data_offsets {offsets!r}: end before start")
    return dtype, tuple(shape), offsets[0], offsets[1]


def tensor_nbytes(name: str, dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor, with the reference's checks: element count and bit count within 64 bits
    (checked after every factor, as the reference does), and whole bytes for sub-byte dtypes."""
    numel = 1
    for d in shape:
        numel *= d
        if numel >= _U64:
            raise BadWeights(f"tensor {name!r}: {dtype}{list(shape)} has more than 2**64 elements (overflow)")
    bits = numel * BITS[dtype]
    if bits >= _U64:
        raise BadWeights(f"tensor {name!r}: {dtype}{list(shape)} has more than 2**64 bits (overflow)")
    if bits % 8:
        raise BadWeights(f"tensor {name!r}: {dtype}{list(shape)} holds {bits:,} bits ({numel:,} × {BITS[dtype]}), "
                         f"which do not end on a byte boundary")
    return bits // 8


def _metadata(value: object) -> dict[str, str]:
    """`__metadata__`: absent or null, or an object of strings (as the reference requires)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadWeights(f"__metadata__ is {_json_type(value)}, not an object of strings")
    for k, v in value.items():
        if not isinstance(v, str):
            raise BadWeights(f"__metadata__[{k[:60]!r}] is {_json_type(v)}, not a string")
    return value


def parse_header(header: bytes, file_size: int | None, file: str = "") -> tuple[list[TensorMeta], dict]:
    """Validate a safetensors JSON header; returns tensors in data order and `__metadata__`.

    `file_size` is the size of the whole file (None when unknown, e.g. a header read by HTTP
    range without a size): with it, the data must end exactly at the end of the file.
    """
    raw = strict_json(header, "header")
    if not isinstance(raw, dict):
        raise BadWeights(f"header is {_json_type(raw)}, not a JSON object")
    metadata = _metadata(raw.pop("__metadata__", None))
    data_start = 8 + len(header)
    entries = []
    for name, entry in raw.items():
        dtype, shape, start, end = _entry(name, entry)
        nbytes = tensor_nbytes(name, dtype, shape)
        entries.append((start, end, name, dtype, shape, nbytes))
    entries.sort(key=lambda e: (e[0], e[1]))  # the reference's order: by (start, end)
    metas = []
    pos, prev = 0, None
    for start, end, name, dtype, shape, nbytes in entries:
        if start < pos:
            raise BadWeights(f"tensors {prev!r} and {name!r} overlap (bytes {start:,}..{pos:,})")
        if start > pos:
            raise BadWeights(f"gap of {start - pos:,} bytes before tensor {name!r}: data is not contiguous")
        if end - start != nbytes:
            raise BadWeights(f"tensor {name!r}: {dtype}{list(shape)} needs {nbytes:,} bytes "
                             f"but its offsets span {end - start:,}")
        metas.append(TensorMeta(name, dtype, shape, data_start + start, nbytes, file))
        pos, prev = end, name
    if file_size is not None:
        end = data_start + pos
        if end > file_size:
            raise BadWeights(f"truncated: tensor data ends at byte {end:,} but the file has {file_size:,}")
        if end < file_size:
            raise BadWeights(f"{file_size - end:,} unexpected bytes after the last tensor")
    return metas, metadata


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
        """The tensor's stored values, zero-copy: BF16 and F8 as their raw unsigned integers, sub-byte
        dtypes (F4, F6) as a flat array of their packed bytes. A zero-size tensor is a flat empty array
        (numpy cannot build some zero-size shapes the format allows, such as [2**62, 3, 0])."""
        storage = np.dtype(DTYPES[meta.dtype][1])
        if meta.nbytes == 0:
            return np.empty(0, storage)
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        count = meta.nbytes // storage.itemsize
        flat = np.frombuffer(self._map, dtype=storage, count=count, offset=meta.offset)
        return flat if meta.dtype in SUB_BYTE else flat.reshape(meta.shape)

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

        tdt = {
            "F8_E4M3": torch.float8_e4m3fn,
            "F8_E5M2": torch.float8_e5m2,
            "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
            "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
        }[dtype]
        _LUTS[dtype] = torch.arange(256, dtype=torch.uint8).view(tdt).float().numpy()
    return _LUTS[dtype]


def to_float32(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Exact float32 values of a float tensor (F64 rounds to nearest). F32 input is returned as is."""
    if dtype == "F32":
        return stored
    if dtype == "BF16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    if dtype.startswith("F8_") and dtype in TOKENIZED_DTYPES:
        return _f8_lut(dtype)[stored]
    if dtype == "F16":
        return stored.astype(np.float32)
    if dtype == "F64":
        with np.errstate(over="ignore"):  # beyond float32's range: ±inf, as rounding to nearest gives
            return stored.astype(np.float32)
    raise BadWeights(f"dtype {dtype} is not a float type that can be tokenized")


_SAFE_NAME = re.compile(r"^[^/\\\x00]+$")


def safe_filename(name: str) -> str:
    """Reject names that could escape their folder (path traversal) in index files and repo listings."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", "..") or name.startswith("~"):
        raise BadWeights(f"unsafe file name {name!r} in index")
    return name


def read_index(path: Path) -> dict:
    """The `weight_map` of a `*.safetensors.index.json` (tensor name -> shard file), size-bounded."""
    try:
        size = path.stat().st_size
        if size > MAX_INDEX_BYTES:
            raise BadWeights(f"{path.name}: {size:,} bytes (limit {MAX_INDEX_BYTES:,}): not a safetensors index")
        data = strict_json(path.read_bytes(), path.name, unique_keys=False)
    except OSError as e:
        raise BadWeights(f"cannot read {path.name}: {e.strerror or e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise BadWeights(f"{path.name}: not a valid safetensors index (needs a weight_map object)")
    return weight_map


@dataclass
class SafetensorsModel:
    """All tensors of one model, single-file or sharded with `model.safetensors.index.json`."""

    files: list[SafetensorsFile]
    index_file: str | None = None

    @classmethod
    def open(cls, folder: Path, weight_files: list[str], index: str | None = None) -> SafetensorsModel:
        if index is not None:
            weight_map = read_index(folder / index)
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
