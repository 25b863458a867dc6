"""The small models of a lab zoo, rebuilt from a params.json dict.

Both architectures keep their layers in one ``nn.ModuleList`` named ``module_list`` and run them in order,
exactly like the CNNs of the Model Zoos dataset: state-dict keys are ``module_list.<i>.weight/bias`` and
dropout layers take indices, so the indices shift when ``model::dropout`` > 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

#: Activations of the grid (``model::nlin``).
ACTIVATIONS = ("tanh", "relu", "sigmoid", "gelu")
#: Weight initializations of the grid (``model::init_type``).
INIT_TYPES = ("uniform", "normal", "kaiming_uniform", "kaiming_normal")
#: Architectures (``model::type``): the lab CNN and MLP take 8×8 digits; ``CNN-s`` is the Model Zoos dataset's
#: MNIST "CNN (s)" for 28×28 inputs (its zoos write ``"CNN"``: `train.behaviour` tells the two apart by shapes).
MODEL_TYPES = ("CNN", "MLP", "CNN-s")
#: Input (channels, height, width) per architecture, with ``C`` channels.
INPUT_SIZE = {"CNN": 8, "MLP": 8, "CNN-s": 28}
#: Initial value of every bias, as in the Model Zoos generator.
BIAS_INIT = 0.01


class ZooNet(nn.Module):
    """A plain stack of layers in ``module_list``; ``forward`` applies them in order."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.module_list = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, o_dim) logits
        for layer in self.module_list:
            x = layer(x)
        return x


def _activation(name: str) -> nn.Module:
    layers = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}
    if name not in layers:
        raise ValueError(f"model::nlin must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return layers[name]()


def _dropout(p: float) -> list[nn.Module]:
    # No layer at all for p == 0: like the Model Zoos CNNs, dropout only takes an index when it is used.
    return [nn.Dropout(p)] if p > 0 else []


def _cnn_layers(channels_in: int, o_dim: int, act: str, dropout: float) -> list[nn.Module]:
    # The Model Zoos "CNN (s)" pattern (conv -> [pool] -> act -> [dropout]), scaled down to 8x8 inputs.
    return [
        nn.Conv2d(channels_in, 8, 3),  # (B, 8, 6, 6)
        _activation(act),
        *_dropout(dropout),
        nn.Conv2d(8, 16, 3),  # (B, 16, 4, 4)
        nn.MaxPool2d(2, 2),  # (B, 16, 2, 2)
        _activation(act),
        *_dropout(dropout),
        nn.Flatten(),  # (B, 64)
        nn.Linear(64, 20),
        _activation(act),
        *_dropout(dropout),
        nn.Linear(20, o_dim),
    ]


def _cnn_s_layers(channels_in: int, o_dim: int, act: str, dropout: float) -> list[nn.Module]:
    # The Model Zoos MNIST "CNN (s)" (2,464 parameters for one channel), 28x28 inputs.
    return [
        nn.Conv2d(channels_in, 8, 5),  # (B, 8, 24, 24)
        nn.MaxPool2d(2, 2),  # (B, 8, 12, 12)
        _activation(act),
        *_dropout(dropout),
        nn.Conv2d(8, 6, 5),  # (B, 6, 8, 8)
        nn.MaxPool2d(2, 2),  # (B, 6, 4, 4)
        _activation(act),
        *_dropout(dropout),
        nn.Conv2d(6, 4, 2),  # (B, 4, 3, 3)
        _activation(act),
        *_dropout(dropout),
        nn.Flatten(),  # (B, 36)
        nn.Linear(36, 20),
        _activation(act),
        *_dropout(dropout),
        nn.Linear(20, o_dim),
    ]


def _mlp_layers(channels_in: int, o_dim: int, act: str, dropout: float) -> list[nn.Module]:
    return [
        nn.Flatten(),  # (B, channels_in * 64)
        nn.Linear(channels_in * 64, 32),
        _activation(act),
        *_dropout(dropout),
        nn.Linear(32, o_dim),
    ]


def initialize(model: nn.Module, init_type: str) -> None:
    """Initialize every conv and linear layer as the Model Zoos generator does.

    ``uniform`` and ``normal`` are the raw U(0, 1) and N(0, 1) (not scaled to the fan-in: most such models
    never train, which is the point); ``kaiming_*`` use torch's defaults. Biases start at 0.01.
    Draws from torch's global RNG, so seed it first.
    """
    inits = {
        "uniform": nn.init.uniform_,
        "normal": nn.init.normal_,
        "kaiming_uniform": nn.init.kaiming_uniform_,
        "kaiming_normal": nn.init.kaiming_normal_,
    }
    if init_type not in inits:
        raise ValueError(f"model::init_type must be one of {', '.join(INIT_TYPES)}, got {init_type!r}")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            inits[init_type](module.weight)
            nn.init.constant_(module.bias, BIAS_INIT)


def build_model(params: Mapping[str, Any]) -> nn.Module:
    """Build the untrained model that a params.json dict describes.

    Reads ``model::type`` ("CNN" or "MLP"), ``model::channels_in``, ``model::o_dim``, ``model::nlin``,
    ``model::dropout`` and ``model::init_type``. The returned module has exactly the state-dict keys and
    shapes of the zoo's checkpoints, so ``model.load_state_dict(torch.load(path, weights_only=True))``
    restores a trained model. Its weights are freshly initialized from torch's global RNG.
    Raises ``ValueError`` for an unknown type, activation or initialization.
    """
    kind = params["model::type"]
    args = (
        int(params["model::channels_in"]),
        int(params["model::o_dim"]),
        params["model::nlin"],
        float(params["model::dropout"]),
    )
    if kind == "CNN":
        model = ZooNet(_cnn_layers(*args))
    elif kind == "MLP":
        model = ZooNet(_mlp_layers(*args))
    elif kind == "CNN-s":
        model = ZooNet(_cnn_s_layers(*args))
    else:
        raise ValueError(f"model::type must be one of {', '.join(MODEL_TYPES)}, got {kind!r}")
    initialize(model, params["model::init_type"])
    return model
