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


def config_properties(model_id: str, cfg: dict) -> list[dict]:
    """Scalar entries of config.json as properties named `config.<key>`."""
    out = []
    for k, v in cfg.items():
        if isinstance(v, bool) or not isinstance(v, int | float | str) or k.startswith("_"):
            continue
        if isinstance(v, str):
            out.append({"model_id": model_id, "name": f"config.{k}", "value": None, "text": v[:200]})
        else:
            out.append({"model_id": model_id, "name": f"config.{k}", "value": float(v), "text": None})
    return out
