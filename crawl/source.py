"""What every source (local folders, Model Zoos, the Hub) hands the crawl: `Loaded`, and the fields and
properties a transformers-style config.json tells. Sources import from here; nothing here imports a source."""

from __future__ import annotations

from dataclasses import dataclass, field

PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.pth", "checkpoint.pt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class Loaded:
    """What a source hands the catalog for one model."""

    model: dict
    weights: object | None = None
    properties: list[dict] = field(default_factory=list)
    status: str = "ok"
    error: str | None = None


def config_fields(cfg: dict) -> dict:
    """`models` columns that a transformers-style config.json tells."""
    arch = cfg.get("architectures")
    return {
        "architecture": arch[0] if isinstance(arch, list) and arch and isinstance(arch[0], str) else None,
        "model_type": cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else None,
    }


WILDZOO_TABLE = "wildzoo"  # config.json's table of properties wildzoo wrote (train sample): kept under their own names
MAX_OWN = 64


def _property(model_id: str, name: str, v) -> dict | None:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        return None
    if isinstance(v, str):
        return {"model_id": model_id, "name": name, "value": None, "text": v[:200]}
    return {"model_id": model_id, "name": name, "value": float(v), "text": None}


def config_properties(model_id: str, cfg: dict) -> list[dict]:
    """Scalar entries of config.json as properties named `config.<key>`; the scalars of its `wildzoo` table (the
    measured properties `train sample` writes with a generated model: test_acc, model::type, …) under their own
    names, so a catalog of generated models is probed like the zoo they came from."""
    out = [p for k, v in cfg.items() if not k.startswith("_") and (p := _property(model_id, f"config.{k}", v))]
    own = cfg.get(WILDZOO_TABLE)
    if isinstance(own, dict):
        for k, v in list(own.items())[:MAX_OWN]:
            if isinstance(k, str) and 0 < len(k) <= 100 and (p := _property(model_id, k, v)):
                out.append(p)
    return out
