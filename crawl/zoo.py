"""The `zoo` source: the Model Zoos layout (a Ray Tune experiment folder, one trial folder per model).

Every checkpoint (`checkpoint_<epoch>/checkpoints`, a `torch.save`d state dict) becomes a catalog
model `<zoo>/<trial>@epoch<e>` with properties: every key of `params.json` under its own name, the
epoch's metrics from `result.json` (`test_acc`, `train_acc`, `test_loss`, `train_loss`), `epoch`,
and `ggap = train_acc − test_acc`. The real zoo writes -999 for metrics it did not measure (the
untrained model's train metrics): those are missing, never values. `repo_id` is `<zoo>/<trial>`, the
trained model all its checkpoints share (probes split by it).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from catalog.errors import BadWeights, WildzooError
from catalog.statedict import load_pickled
from crawl.source import Loaded

CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")
METRICS = ("test_acc", "train_acc", "test_loss", "train_loss")
MISSING = -999


def is_trial(folder: Path) -> bool:
    return (folder / "params.json").is_file()


def find_checkpoints(paths: list[str]) -> tuple[list[dict], list[str]]:
    """One task per checkpoint of every trial under `paths`, and warnings for paths holding none."""
    tasks, warnings = [], []
    for raw in paths:
        root = Path(raw).expanduser()
        if not root.is_dir():
            raise WildzooError(f"path does not exist or is not a folder: {raw}")
        root = root.resolve()
        trials = [root] if is_trial(root) else sorted(p.parent for p in root.rglob("params.json"))
        found = []
        for trial in trials:
            rel = trial.name if trial == root else trial.relative_to(root).as_posix()
            group = f"{root.name}/{rel}" if trial != root else rel
            for ckpt in sorted(trial.iterdir()):
                m = CHECKPOINT.match(ckpt.name)
                if m and ckpt.is_dir():
                    epoch = int(m.group(1))
                    found.append(
                        {
                            "model_id": f"{group}@epoch{epoch}",
                            "source": "zoo",
                            "path": str(ckpt),
                            "repo_id": group,
                            "revision": f"epoch{epoch}",
                            "info": {"epoch": epoch},
                        }
                    )
        if not found:
            warnings.append(f"no Model Zoos checkpoints (params.json + checkpoint_*/) under {raw}")
        tasks.extend(found)
    return tasks, warnings


def _number(v) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float) and math.isfinite(v) and v != MISSING:
        return float(v)
    return None


def param_properties(model_id: str, params: dict) -> list[dict]:
    """Every hyperparameter, named as in params.json: numbers in `value`, everything else in `text`."""
    out = []
    for k, v in params.items():
        num = _number(v)
        text = None if num is not None and not isinstance(v, bool) else (v if isinstance(v, str) else json.dumps(v))
        out.append({"model_id": model_id, "name": str(k), "value": num, "text": text})
    return out


def epoch_metrics(result_file: Path, epoch: int) -> dict[str, float]:
    """Metrics of `training_iteration == epoch` in result.json (JSON lines); -999 and non-numbers dropped."""
    try:
        lines = result_file.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("training_iteration") == epoch:
            return {k: v for k in METRICS if (v := _number(rec.get(k))) is not None}
    return {}


def load(task: dict) -> Loaded:
    """One checkpoint: its state dict (read with weights_only=True) and its properties."""
    ckpt = Path(task["path"])
    trial = ckpt.parent
    epoch = json.loads(task["info"])["epoch"]
    try:
        params = json.loads((trial / "params.json").read_text())
        assert isinstance(params, dict)
    except (OSError, ValueError, AssertionError):
        raise BadWeights(f"{trial.name}/params.json is missing or not a JSON object") from None
    weights_file = ckpt / "checkpoints"
    if not weights_file.is_file():
        raise BadWeights(f"{ckpt.name} holds no 'checkpoints' file")
    mid = task["model_id"]
    props = param_properties(mid, params)
    metrics = epoch_metrics(trial / "result.json", epoch)
    metrics["epoch"] = float(epoch)
    if "train_acc" in metrics and "test_acc" in metrics:
        metrics["ggap"] = metrics["train_acc"] - metrics["test_acc"]
    props += [{"model_id": mid, "name": k, "value": v, "text": None} for k, v in metrics.items()]
    model = {"architecture": params.get("model::type") if isinstance(params.get("model::type"), str) else None,
             "model_type": "model-zoo", "library": "pytorch"}
    return Loaded(model, load_pickled(weights_file), props)
