"""What a fit trains on, decided once on the driver: `make_plan(cat, cfg) -> FitPlan`.

A `FitPlan` holds the training and held-out models (the held-out ones are the test models of every probe split
seed of the run), the fitted `Normalizer`, the architecture every rebuildable model has, and a summary of the
split. It is a frozen value with `to_dict`/`from_dict`, so it travels to the Ray Train workers and to a sweep's
trials as plain data: `train tune` plans once per normalization its search space holds and every trial fits
on a shared plan instead of re-reading the model list and refitting the normalizer.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import astuple, dataclass
from typing import Any

from catalog.errors import WildzooError
from catalog.store import Catalog
from train.data import ModelRef, list_models, split_models
from train.normalize import Normalizer, fit_normalizer

log = logging.getLogger(__name__)


def catalog_id(cat: Catalog) -> str:
    """The catalog as every process can open it: its URI, or its absolute path."""
    return cat.uri if "://" in cat.uri else cat.root


@dataclass(frozen=True)
class FitPlan:
    catalog: str  # catalog_id: what a worker or trial opens
    token_size: int
    train: tuple[ModelRef, ...]
    held: tuple[ModelRef, ...]
    norm: Normalizer
    arch_keys: tuple[str, ...]  # the architectures of the catalog that can be rebuilt (train.behaviour)
    archs: dict[str, int]  # model_id -> index into arch_keys, for every model of a known architecture
    split: dict[str, Any]  # seed, seeds, holdout, model and trained-model counts on each side

    def to_dict(self) -> dict[str, Any]:
        return {"catalog": self.catalog, "token_size": self.token_size,
                "train": [list(astuple(r)) for r in self.train], "held": [list(astuple(r)) for r in self.held],
                "norm": self.norm.to_dict(), "arch_keys": list(self.arch_keys), "archs": dict(self.archs),
                "split": dict(self.split)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitPlan:
        return cls(d["catalog"], int(d["token_size"]), tuple(ModelRef(*r) for r in d["train"]),
                   tuple(ModelRef(*r) for r in d["held"]), Normalizer.from_dict(d["norm"]), tuple(d["arch_keys"]),
                   {str(k): int(v) for k, v in d["archs"].items()}, dict(d["split"]))

    def renormalized(self, cat: Catalog, mode: str) -> FitPlan:
        """The same split with a normalizer of another mode fitted on its training models."""
        return dataclasses.replace(self, norm=fit_normalizer(cat, list(self.train), mode))

    def matches(self, cat: Catalog, split_seed: int, probe_seeds: int, holdout: bool) -> bool:
        """Whether this plan was made for this catalog and split (a sweep's shared plan against a trial's config)."""
        seeds = list(range(split_seed, split_seed + probe_seeds))
        return (self.catalog == catalog_id(cat) and self.token_size == cat.spec.token_size
                and self.split.get("holdout") == holdout and (not holdout or self.split.get("seeds") == seeds))


def make_plan(cat: Catalog, cfg, norm: Normalizer | None = None) -> FitPlan:
    """The plan of a fit of `cfg` (a TrainConfig) on `cat`; `norm`: a normalizer already fitted (a resumed run
    keeps its own), else one of `cfg.norm` is fitted on the training models."""
    from train.behaviour import model_archs, too_long, too_long_line

    refs = list_models(cat)
    if not refs:
        raise WildzooError(f"catalog {cat.uri} has no ok models with tokens to train on")
    seeds = list(range(cfg.split_seed, cfg.split_seed + cfg.probe_seeds))
    train, held = split_models(cat, refs, seeds) if cfg.holdout else (refs, [])
    split = {"seed": cfg.split_seed, "seeds": seeds, "holdout": cfg.holdout, "train_models": len(train),
             "held_out_models": len(held), "train_groups": len({r.group for r in train}),
             "held_out_groups": len({r.group for r in held})}
    arch_of = model_archs(cat, [r.model_id for r in refs])
    keys = sorted(set(arch_of.values()))
    long = too_long(refs, arch_of, cfg.model.window)
    if long:
        log.warning(too_long_line(len(long), max(r.n_tokens for r in long), cfg.model.window))
    return FitPlan(catalog_id(cat), cat.spec.token_size, tuple(train), tuple(held),
                   norm if norm is not None else fit_normalizer(cat, train, cfg.norm), tuple(keys),
                   {m: keys.index(k) for m, k in arch_of.items()}, split)
