"""Training and evaluation of one zoo model, with no file I/O (the caller decides what to keep)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .models import build_model

#: Called after every epoch e = 0..E with (e, metrics, model); epoch 0 is the untrained model.
EpochCallback = Callable[[int, dict[str, float], nn.Module], None]

#: What ``train_*`` of the untrained model reads, as in the Model Zoos' result.json: "not measured".
NOT_MEASURED = -999


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Return ``(mean cross-entropy loss, accuracy as a fraction)`` of ``model`` on ``(x, y)``.

    Runs in eval mode without gradients (dropout off) and restores the model's previous mode.
    The loss is ``nan`` or ``inf`` when the model's outputs are not finite.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, y).item()
        acc = int((logits.argmax(dim=1) == y).sum()) / len(y)
    model.train(was_training)
    return loss, acc


def make_optimizer(params: Mapping[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``optim::optimizer`` (adam or sgd) with ``optim::lr``, ``optim::wd`` and, for
    sgd, ``optim::momentum``."""
    name, lr, wd = params["optim::optimizer"], float(params["optim::lr"]), float(params["optim::wd"])
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=float(params["optim::momentum"]), weight_decay=wd
        )
    raise ValueError(f"optim::optimizer must be adam or sgd, got {name!r}")


def train_model(
    params: Mapping[str, Any],
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    on_epoch: EpochCallback,
) -> nn.Module:
    """Train the model of ``params`` on ``data = (x_train, y_train, x_test, y_test)``.

    Deterministic given ``params["seed"]``: it seeds torch's global RNG (initialization, dropout) and the
    shuffling generator. Calls ``on_epoch`` for e = 0 (untrained: ``train_*`` = -999) and after each of the
    ``training::epochs_train`` epochs, with ``train_loss``/``train_acc`` (running means over the epoch),
    ``test_loss``/``test_acc`` (measured after it) and ``time_this_iter_s``. Returns the trained model.
    """
    x_train, y_train, x_test, y_test = data
    seed = int(params["seed"])
    torch.manual_seed(seed)
    model = build_model(params)
    optimizer = make_optimizer(params, model)
    shuffle = torch.Generator().manual_seed(seed)
    batch_size, epochs = int(params["training::batchsize"]), int(params["training::epochs_train"])

    start = time.perf_counter()
    test_loss, test_acc = evaluate(model, x_test, y_test)
    on_epoch(0, _metrics(NOT_MEASURED, NOT_MEASURED, test_loss, test_acc, start), model)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.train()
        loss_sum, correct = 0.0, 0
        for batch in torch.randperm(len(y_train), generator=shuffle).split(batch_size):
            xb, yb = x_train[batch], y_train[batch]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(batch)
            correct += int((logits.argmax(dim=1) == yb).sum())
        test_loss, test_acc = evaluate(model, x_test, y_test)
        metrics = _metrics(loss_sum / len(y_train), correct / len(y_train), test_loss, test_acc, start)
        on_epoch(epoch, metrics, model)
    return model


def _metrics(train_loss: float, train_acc: float, test_loss: float, test_acc: float, start: float) -> dict:
    return {
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "time_this_iter_s": time.perf_counter() - start,
    }


def finite_or_none(value: float) -> float | None:
    """``value``, or ``None`` where it is nan or infinite (strict JSON has no such numbers)."""
    return value if math.isfinite(value) else None
