"""The digits data every lab zoo trains on: scikit-learn's bundled 8x8 digits, split once and for all."""

from __future__ import annotations

import functools

import numpy as np
import torch

#: Number of test images; the remaining 1347 of the 1797 digits are for training.
N_TEST = 450
#: Seed of the train/test split. Fixed on purpose: every zoo, whatever its --seed, sees the same split,
#: so test accuracies of different zoos are comparable.
SPLIT_SEED = 20240712
#: The value written to ``dataset::dump`` in every params.json.
DATASET_NAME = "sklearn:digits"


@functools.lru_cache(maxsize=1)
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported lazily: sklearn is slow to import

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # (1797, 1, 8, 8), values in [0, 1]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    test, train = order[:N_TEST], order[N_TEST:]
    return x[train], y[train], x[test], y[test]


def load_digits_split(size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)`` of the fixed digits split.

    ``x_*`` are float32 tensors shaped ``(N, 1, size, size)`` with values in [0, 1]: the 8x8 images as they are
    (what the lab CNN and MLP take), or upsampled bilinearly to ``size`` (28: the Model Zoos "CNN (s)" input);
    ``y_*`` are int64 class labels 0-9. 1347 training and 450 test images; the split never changes.
    Fresh tensors are returned on every call, so callers may modify them.
    """
    x_train, y_train, x_test, y_test = (torch.from_numpy(a.copy()) for a in _split())
    if size != 8:
        x_train, x_test = (torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
                           .clamp(0, 1) for x in (x_train, x_test))
    return x_train, y_train, x_test, y_test
