"""`TrainConfig`: everything one backbone fit depends on, typed, frozen and validated.

A config file (JSON, or TOML read with tomllib) holds the fields to change, the model's under a
`model` table; an unknown or mistyped key is an error naming the key, never silently ignored:

    epochs = 20
    lr = 3e-4
    [model]
    d_model = 256
    window = 64
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from catalog.cli import custom_resources
from catalog.errors import WildzooError
from train.losses import LOSS_NORMS, LossConfig
from train.model import ModelConfig
from train.normalize import NORMS

SCHEDULES = ("onecycle", "constant")
FLAVOURS = ("debug", "small", "base")
RETIRED = ("chunk_mb", "cache_mb")  # settings of the per-worker reader before the Ray Data stream: ignored when read


@dataclass(frozen=True)
class TrainConfig:
    """A backbone fit: the model, the optimization, the losses, the data and the workers."""

    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 50
    batch_size: int = 32  # windows per worker and step
    lr: float = 1e-4  # peak learning rate of the one-cycle schedule
    weight_decay: float = 1e-5
    schedule: str = "onecycle"  # linear warm-up to lr, cosine down to lr/1e4; or constant
    warmup: float = 0.3  # fraction of all steps spent rising to the peak
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off (a loss spike can collapse the latent)
    gamma: float = 0.05  # weight of NT-Xent in the loss; 1 − γ weighs the reconstruction
    tau: float = 0.1  # NT-Xent temperature
    noise: float = 0.1  # σ of the multiplicative noise w·(1+σε)
    mask_prob: float = 0.1  # probability that a token's input is masked in a view
    loss_norm: str = "none"  # reconstruction normalization: none, layer or batch
    stats_weight: float = 1.0  # weight of the statistics rows in the reconstruction loss
    behaviour: float = 0.0  # weight of the behavioural loss (zoo architectures; train/behaviour.py); 0: off
    # the fraction of the epochs trained on reconstruction alone before the behavioural loss joins: from scratch its
    # gradient is ~100x the reconstruction's and clipping leaves the latter nothing (bench/recon.py); 0: from the start
    behaviour_from: float = 0.0
    behaviour_head: float = 1.0  # weight of the behaviour head's loss (model.behaviour_queries > 0)
    norm: str = "auto"  # token normalization: per-layer (tensors line up), per-tensor (the wild), or auto
    views: int = 4  # random windows (views) of every training model per epoch
    permute: float = 1.0  # probability that a view permutes the hidden units of a permutable model
    probe_seeds: int = 5  # hold out the test models of the probe's split seeds split_seed … split_seed + n − 1
    seed: int = 0
    holdout: bool = True  # hold out the models the probe validates and tests on
    split_seed: int = 0  # the probe's split seed (`train probe --seed`)
    val_batches: int = 50  # held-out batches scored per worker and epoch (0: none)
    workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    worker_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per worker (node types)
    max_failures: int = 3  # worker or node failures survived by restarting from the last checkpoint
    keep_checkpoints: int = 2
    amp: bool = True  # bfloat16 autocast, on CUDA only
    data_cpus: float = 1.0  # CPU slots reserved for Ray Data's window tasks, next to the workers' (train/stream.py)
    unit_mb: int = 4  # tokens one Ray Data task reads and cuts into windows (whole models of one shard)
    prefetch_batches: int = 4  # batches each worker's stream prepares while a step runs
    shuffle_windows: int = 0  # windows in each worker's local shuffle buffer (0: 8 × batch_size)

    def __post_init__(self) -> None:
        custom_resources(self.worker_resources)  # ValueError, like the checks below
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (0 <= self.warmup < 1, "warmup must be in [0, 1)"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0: off)"),
            (0 <= self.gamma <= 1, "gamma must be in [0, 1]"),
            (self.tau > 0, "tau must be > 0"),
            (self.noise >= 0, "noise must be >= 0"),
            (0 <= self.mask_prob < 1, "mask_prob must be in [0, 1)"),
            (self.loss_norm in LOSS_NORMS, f"loss_norm must be one of {', '.join(LOSS_NORMS)}"),
            (self.stats_weight >= 0, "stats_weight must be >= 0"),
            (self.behaviour >= 0 and self.behaviour_head >= 0, "behaviour and behaviour_head must be >= 0 (0: off)"),
            (self.norm in NORMS, f"norm must be one of {', '.join(NORMS)}"),
            (self.views >= 1, "views must be >= 1"),
            (0 <= self.permute <= 1, "permute must be in [0, 1]"),
            (self.probe_seeds >= 1, "probe_seeds must be >= 1"),
            (self.workers >= 1, "workers must be >= 1"),
            (self.cpus_per_worker >= 1, "cpus_per_worker must be >= 1"),
            (self.gpus_per_worker >= 0, "gpus_per_worker must be >= 0"),
            (self.val_batches >= 0, "val_batches must be >= 0"),
            (self.max_failures >= 0, "max_failures must be >= 0"),
            (0.0 <= self.behaviour_from < 1.0, "behaviour_from must be in [0, 1)"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.data_cpus > 0, "data_cpus must be > 0"),
            (self.unit_mb >= 1, "unit_mb must be >= 1"),
            (self.prefetch_batches >= 1, "prefetch_batches must be >= 1"),
            (self.shuffle_windows == 0 or self.shuffle_windows >= self.batch_size,
             "shuffle_windows must be 0 (auto) or >= batch_size"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def debug(cls) -> TrainConfig:
        """The debug flavour: a tiny backbone, two epochs, a high learning rate; seconds on a CPU."""
        return cls(model=ModelConfig.debug(), epochs=2, batch_size=16, lr=3e-3, warmup=0.2, views=4)

    @classmethod
    def small(cls) -> TrainConfig:
        """The CPU default (`train fit` with no flavour): a zoo of ~1,000 small checkpoints in minutes on 2 cores."""
        # enough optimizer steps for per-weight reconstruction (945 on the README zoo with 2 workers), each cheap: the
        # steps count more than the windows per step (2026-12-07, held-out models with accuracy >= 0.5, decoded /
        # true statistics: 4 views and batches of 16 keep 91.0% / 93.7% in 15 epochs, 69.6% / 74.6% in 8; 2 views and
        # batches of 8, the same steps at half the compute, 85.5% / 88.4% at lr 1e-3, 86.2% / 91.3% at 2e-3, and the
        # README command fits in 10 minutes on 2 cores). The behaviour head's gradient, at weight 1, held the
        # reconstruction MSE near that of predicting zeros (bench/recon.py)
        return cls(model=ModelConfig.small(), epochs=15, batch_size=8, views=2, lr=2e-3, warmup=0.1,
                   weight_decay=1e-4, behaviour_head=0.1, val_batches=16)

    @classmethod
    def base(cls) -> TrainConfig:
        """What a GPU gets: SANE's CNN-zoo backbone (d_model 1024, 4 + 4 blocks)."""
        return cls(model=ModelConfig(), epochs=50, batch_size=32, lr=1e-4)

    @classmethod
    def flavour(cls, name: str) -> TrainConfig:
        if name not in FLAVOURS:
            raise WildzooError(f"flavour must be one of {', '.join(FLAVOURS)}, got {name!r}")
        return getattr(cls, name)()

    @property
    def loss(self) -> LossConfig:
        return LossConfig(gamma=self.gamma, tau=self.tau, noise=self.noise, mask_prob=self.mask_prob,
                          norm=self.loss_norm, stats_weight=self.stats_weight, behaviour=self.behaviour,
                          behaviour_head=self.behaviour_head)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: TrainConfig | None = None, where: str = "config") -> TrainConfig:
        """`base` (default: the defaults) with the fields in `data` changed. Bad keys or values raise WildzooError."""
        base = base or cls()
        if not isinstance(data, dict):
            raise WildzooError(f"{where}: expected a table of settings, got {type(data).__name__}")
        changes = _checked(cls, data, where, skip=("model", *RETIRED))
        model = data.get("model", {})
        if not isinstance(model, dict):
            raise WildzooError(f"{where}: 'model' must be a table of model settings")
        model_changes = _checked(ModelConfig, model, f"{where}: model")
        try:
            return dataclasses.replace(base, model=dataclasses.replace(base.model, **model_changes), **changes)
        except ValueError as e:
            raise WildzooError(f"{where}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
        """Read a JSON (`.json`) or TOML (any other suffix) config file over `base`."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise WildzooError(f"cannot read config {path}: {e.strerror or e}") from None
        try:
            if p.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                try:
                    import tomllib
                except ModuleNotFoundError:  # Python 3.10
                    import tomli as tomllib  # type: ignore[no-redef]
                data = tomllib.loads(text)
        except ValueError as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
            raise WildzooError(f"config {path} is malformed: {e}") from None
        return cls.from_dict(data, base, where=str(path))


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
                                       "dict[str, float]": (dict,)}


def _checked(cls: type, data: dict[str, Any], where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The items of `data` that name fields of `cls`, type-checked; an unknown key is an error."""
    known = {f.name: f for f in fields(cls) if f.name not in skip}
    out = {}
    for key, value in data.items():
        if key in skip:
            continue
        if key not in known:
            raise WildzooError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        types = _TYPES[str(known[key].type)]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise WildzooError(f"{where}: {key} must be {known[key].type}, got {value!r}")
        out[key] = float(value) if known[key].type == "float" else value
    return out
