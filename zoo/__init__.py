"""Lab zoos: populations of small models trained here on scikit-learn's digits, in the Model Zoos layout.

Public API:
- ``generate(out, models, epochs, seed, workers, arch)`` trains a zoo into a folder and returns a summary.
- ``build_model(params)`` rebuilds the architecture of a params.json dict (to load a checkpoint into).
- ``load_digits_split()`` returns the fixed ``(x_train, y_train, x_test, y_test)`` tensors.
- ``evaluate(model, x, y)`` returns ``(loss, accuracy)``.
"""

from .data import load_digits_split
from .generate import generate
from .models import build_model
from .train import evaluate

__all__ = ["build_model", "evaluate", "generate", "load_digits_split"]
