"""The search space of a lab zoo, the deterministic choice of its N configurations, and trial names.

Like the Model Zoos (Ray Tune grid searches), every model is one point of a hyperparameter grid plus a seed.
Configuration ``i`` depends only on ``(seed, arch, i)``: a zoo of 10 models is the first 10 models of a zoo
of 200 made with the same settings, so a rerun with a larger ``--models`` resumes instead of restarting.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

import numpy as np

from .data import DATASET_NAME
from .models import ACTIVATIONS, INIT_TYPES

#: ``--arch`` values and the ``model::type`` values each one draws from.
ARCHES = {"cnn": ("CNN",), "mlp": ("MLP",), "mixed": ("CNN", "MLP"),
          "cnn-s": ("CNN-s",)}  # the Model Zoos MNIST "CNN (s)", on digits upsampled to 28x28

#: The grid, in the order its keys appear in trial names. Chosen (and measured: see zoo/README.md) so that
#: last-epoch test accuracies spread from chance (raw uniform/normal inits, sgd) to above 0.95 (kaiming, adam).
GRID: dict[str, tuple[Any, ...]] = {
    "model::init_type": INIT_TYPES,
    "model::nlin": ACTIVATIONS,
    "optim::optimizer": ("adam", "sgd"),
    "optim::lr": (1e-3, 3e-3, 1e-2),
    "optim::wd": (0.0, 1e-3),
    "model::dropout": (0.0, 0.1),
}

#: Keys with one value in every zoo.
FIXED: dict[str, Any] = {
    "model::channels_in": 1,
    "model::o_dim": 10,
    "optim::momentum": 0.9,
    "training::batchsize": 32,
    "dataset::dump": DATASET_NAME,
    "cuda": False,
}

TRAINABLE = "NN_tune_trainable"
#: Ray Tune cuts the ``k=v`` part of a trial folder name to this many characters.
TAG_MAX_CHARS = 130


def grid_points(arch: str) -> list[dict[str, Any]]:
    """All grid points of ``arch`` (``cnn``, ``mlp`` or ``mixed``), in a fixed order, without seeds."""
    axes = {"model::type": ARCHES[arch], **GRID}
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def experiment_hash(seed: int, arch: str, epochs: int) -> str:
    """The 5 hex characters that stand for Ray's experiment hash in trial names and ids.

    Derived from the settings and the search space (so from a change of this file too): two zoos made
    differently never share a trial name, and a rerun never mistakes another zoo's trials for its own.
    """
    recipe = json.dumps([seed, arch, epochs, GRID, FIXED], sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:5]


def model_seed(seed: int, index: int) -> int:
    """The torch seed of model ``index`` of the zoo made with ``--seed seed`` (a 32-bit integer)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def trial_params(seed: int, arch: str, epochs: int, index: int) -> dict[str, Any]:
    """The params.json dict of model ``index``: the grid is shuffled by ``seed`` and walked in that order;
    past its end it is shuffled again (new order, new model seeds), cycle after cycle."""
    points = grid_points(arch)
    cycle, position = divmod(index, len(points))
    order = np.random.default_rng([seed, cycle]).permutation(len(points))
    return {
        **FIXED,
        **points[order[position]],
        "seed": model_seed(seed, index),
        "training::epochs_train": epochs,
    }


def _clean_value(value: Any) -> str:
    # Ray Tune's formatting of values in trial names (floats to 5 significant digits).
    return f"{value:.5}" if isinstance(value, float) else str(value).replace("/", "_")


def trial_name(params: dict[str, Any], exp_hash: str, index: int) -> str:
    """Ray Tune's trial folder name, minus the date: ``NN_tune_trainable_<hash>_<idx:05d>_<idx>_<k=v,...>``.

    The ``k=v`` part lists the grid keys (short names, without the ``::`` namespace) and the seed, cut to
    130 characters. Deterministic, so a rerun finds the folders of finished trials.
    """
    keys = ["model::type", *GRID, "seed"]
    tag = ",".join(f"{key.rsplit('::', 1)[-1]}={_clean_value(params[key])}" for key in keys)
    return f"{TRAINABLE}_{trial_id(exp_hash, index)}_{index}_{tag[:TAG_MAX_CHARS]}"


def trial_id(exp_hash: str, index: int) -> str:
    """Ray's ``trial_id`` of model ``index``: ``<hash>_<idx:05d>``."""
    return f"{exp_hash}_{index:05d}"


def search_space(arch: str, epochs: int, seeds: list[int]) -> dict[str, Any]:
    """The config.json of a zoo: fixed values as they are, grid axes as ``{"grid_search": [...]}``."""
    space: dict[str, Any] = dict(FIXED)
    types = ARCHES[arch]
    space["model::type"] = types[0] if len(types) == 1 else {"grid_search": list(types)}
    space.update({key: {"grid_search": list(values)} for key, values in GRID.items()})
    space["seed"] = {"grid_search": seeds}
    space["training::epochs_train"] = epochs
    return space
