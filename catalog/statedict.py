"""Weights held as a PyTorch state dict (Model Zoos checkpoints, opted-in pickles).

Pickled files are read only with `torch.load(weights_only=True)`, which refuses arbitrary objects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from catalog.errors import BadWeights
from catalog.safetensors_io import TensorMeta

MAX_PICKLE_BYTES = 16 << 30


def _torch_dtypes() -> dict:
    import torch

    return {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.float8_e4m3fn: "F8_E4M3",
        torch.float8_e5m2: "F8_E5M2",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }


class StateDictWeights:
    """A `{name: tensor}` mapping, kept in its own order (module order, for `torch.save`d state dicts)."""

    def __init__(self, state: dict) -> None:
        import torch

        dtypes = _torch_dtypes()
        self._arrays: dict[str, np.ndarray] = {}
        metas = []
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                continue
            if t.dtype not in dtypes:
                raise BadWeights(f"tensor {name!r}: unsupported dtype {t.dtype}")
            dtype = dtypes[t.dtype]
            t = t.detach().cpu().contiguous()
            if dtype == "BF16":
                arr = t.view(torch.int16).numpy().view(np.uint16)
            elif dtype.startswith("F8"):
                arr = t.view(torch.uint8).numpy()
            else:
                arr = t.numpy()
            self._arrays[name] = arr
            metas.append(TensorMeta(str(name), dtype, tuple(t.shape), 0, arr.nbytes))
        if not metas:
            raise BadWeights("state dict holds no tensors")
        self._metas = metas

    @property
    def tensors(self) -> list[TensorMeta]:
        return self._metas

    @property
    def total_bytes(self) -> int:
        return sum(m.nbytes for m in self._metas)

    def stored(self, meta: TensorMeta) -> np.ndarray:
        return self._arrays[meta.name]


def load_pickled(path: Path) -> StateDictWeights:
    """A state dict from a `torch.save` file, read with `weights_only=True` (no code is ever run)."""
    import pickle

    import torch

    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise BadWeights(f"{path.name}: {size:,} bytes exceeds the {MAX_PICKLE_BYTES:,}-byte limit for pickled weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadWeights(f"{path.name}: not a loadable state dict ({first[:200]})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BadWeights(f"{path.name}: holds a {type(state).__name__}, not a state dict")
    return StateDictWeights(state)
