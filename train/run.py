"""A run folder (local or `s3://…`): what `train fit` leaves for `embed`, `probe` and a rerun.

    RUN/config.json   the run: id, catalog, token size, TrainConfig, split, epochs trained, loss history
    RUN/model.safetensors  the backbone's weights (safetensors: no pickle); RUN/config.json says how to build it
    RUN/metrics.jsonl the metrics of every epoch; RUN/loss_curve.png
    RUN/fit/          Ray Train's checkpoints (model + optimizer + scheduler + epoch), for resuming

Files are written under a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch

from catalog.errors import WildzooError
from catalog.store import atomic_write, resolve

RAY_RUN_NAME = "fit"
MODEL_FILE = "model.safetensors"


@dataclass
class RunDir:
    uri: str
    fs: pafs.FileSystem
    root: str

    @classmethod
    def at(cls, uri: str) -> RunDir:
        fs, root = resolve(uri)
        return cls(uri, fs, root)

    @property
    def storage_path(self) -> str:
        """Where Ray Train keeps checkpoints: an absolute path, or the object-store URI."""
        return self.uri.rstrip("/") if "://" in self.uri else self.root

    @property
    def name(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(f"{self.root}/{name}").type == pafs.FileType.File

    def read_bytes(self, name: str) -> bytes:
        try:
            with self.fs.open_input_stream(f"{self.root}/{name}") as f:
                return f.read()
        except (FileNotFoundError, OSError):
            raise WildzooError(f"{self.uri} has no {name}: is it a run folder of `python -m train fit`?") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        self.fs.create_dir(self.root, recursive=True)
        atomic_write(self.fs, f"{self.root}/{name}", data)

    def meta(self) -> dict[str, Any]:
        """The run's config.json."""
        try:
            return json.loads(self.read_bytes("config.json"))
        except json.JSONDecodeError as e:
            raise WildzooError(f"{self.uri}/config.json is malformed: {e}") from None

    def write_meta(self, meta: dict[str, Any]) -> None:
        meta = {**meta, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.write_bytes("config.json", json.dumps(meta, indent=2).encode())

    def save_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        self.write_bytes(MODEL_FILE, save({k: v.contiguous() for k, v in state.items()}))

    def load_state_dict(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        if not self.exists(MODEL_FILE):
            raise WildzooError(f"{self.uri} has no {MODEL_FILE}: the fit has not finished (rerun `train fit` to resume)")
        return load(self.read_bytes(MODEL_FILE))


def new_run_id(run: RunDir) -> str:
    """A run's identity in the catalog's embeddings table: the folder name and a random suffix."""
    return f"{run.name}-{uuid.uuid4().hex[:8]}"
