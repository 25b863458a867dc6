"""The `local` source: model folders in Hugging Face layout, folders of them, and the HF cache.

Enumeration walks each PATH: a folder holding weight files is a model (not searched further); an
HF cache repo (`models--org--name/snapshots/<rev>`) gives one model per snapshot; other folders are
searched recursively. A model folder's id is derived from the path given and contains its name.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from catalog.errors import BadWeights, WildzooError
from catalog.safetensors_io import SafetensorsModel
from catalog.statedict import load_pickled
from crawl.source import PICKLE_NAMES, PICKLE_SUFFIXES, Loaded, config_fields, config_properties

log = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 16 << 20  # config.json larger than this is not a model config


def _weight_files(folder: Path) -> tuple[list[str], str | None, list[str]]:
    """(safetensors files, index file, pickled files) directly inside `folder`."""
    try:
        names = sorted(e.name for e in os.scandir(folder) if e.is_file())
    except OSError:
        return [], None, []
    index = next((n for n in names if n.endswith(".safetensors.index.json")), None)
    st = [n for n in names if n.endswith(".safetensors")]
    pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES) and (n in PICKLE_NAMES or n.startswith("pytorch_model"))]
    return st, index, pickled


def is_model_folder(folder: Path) -> bool:
    st, index, pickled = _weight_files(folder)
    return bool(st or index or pickled)


def _json_file(path: Path) -> object:
    """A small JSON file (config.json) parsed; size-bounded, and deep nesting is a reason, not a crash."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise BadWeights(f"{path.name} is {size:,} bytes (limit {MAX_CONFIG_BYTES:,})")
    try:
        return json.loads(path.read_bytes())
    except RecursionError:
        raise BadWeights(f"{path.name} is not valid JSON: nested too deeply") from None
    except ValueError as e:
        raise BadWeights(f"{path.name} is not valid JSON: {str(e).splitlines()[0][:200]}") from None


def _looks_like_model(folder: Path) -> bool:
    """A folder with a model config but no weights: reported, not silently skipped."""
    try:
        cfg = _json_file(folder / "config.json")
    except (OSError, BadWeights):
        return False
    return isinstance(cfg, dict) and ("architectures" in cfg or "model_type" in cfg)


def find_models(paths: list[str]) -> tuple[list[dict], list[str]]:
    """Task rows for every model under `paths`, and warnings (paths that hold nothing)."""
    tasks: list[dict] = []
    warnings: list[str] = []
    for raw in paths:
        root = Path(raw).expanduser()
        if not root.exists():
            raise WildzooError(f"path does not exist: {raw}")
        if root.is_file():
            raise WildzooError(f"{raw} is a file; pass the model folder that holds it")
        found = _walk(root.resolve(), root.resolve().name)
        if not found:
            warnings.append(f"no models found under {raw}")
        tasks.extend(found)
    return tasks, warnings


def _walk(folder: Path, model_id: str) -> list[dict]:
    if folder.name.startswith("models--") and (folder / "snapshots").is_dir():
        repo_id = folder.name[len("models--") :].replace("--", "/")
        out = []
        for snap in sorted(p for p in (folder / "snapshots").iterdir() if p.is_dir()):
            out.append(_task(snap, f"{repo_id}@{snap.name}", repo_id, snap.name))
        return out
    if is_model_folder(folder):
        return [_task(folder, model_id)]
    out = []
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise WildzooError(f"cannot list {folder}: {e.strerror}") from None
    for child in children:
        out.extend(_walk(child, f"{model_id}/{child.name}"))
    if not out and _looks_like_model(folder):
        out.append(_task(folder, model_id))  # will fail with "no weight files": reported, not dropped
    return out


def _task(folder: Path, model_id: str, repo_id: str | None = None, revision: str | None = None) -> dict:
    return {"model_id": model_id, "source": "local", "path": str(folder), "repo_id": repo_id, "revision": revision}


def read_config(folder: Path) -> dict:
    try:
        cfg = _json_file(folder / "config.json")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise BadWeights(f"cannot read config.json: {e.strerror or e}") from None
    return cfg if isinstance(cfg, dict) else {}


def load(task: dict, allow_pickle: bool = False) -> Loaded:
    """Open one local model folder: validate its weight files (no tensor data read yet)."""
    folder = Path(task["path"])
    cfg = read_config(folder)
    model = {"path": str(folder), **config_fields(cfg)}
    props = config_properties(task["model_id"], cfg)
    st, index, pickled = _weight_files(folder)
    if index or st:
        weights = SafetensorsModel.open(folder, st, index)
        return Loaded(model, weights, props)
    if pickled:
        if not allow_pickle:
            return Loaded(model, None, props, "skipped", f"only pickled weights ({pickled[0]}); pass --allow-pickle to read them safely")
        if len(pickled) > 1:
            raise BadWeights(f"several pickled weight files ({', '.join(pickled[:3])}); sharded .bin is not supported")
        return Loaded(model, load_pickled(folder / pickled[0]), props)
    raise BadWeights("no weight files (*.safetensors or pytorch_model.bin) in the folder")
