"""``python -m zoo --out DIR``: train a lab zoo (small models on scikit-learn's digits, Model Zoos layout)."""

from __future__ import annotations

import argparse
import logging
import sys

from .generate import default_workers, generate
from .grid import ARCHES

PROG = "python -m zoo"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; exits with status 2 and one line on stderr for bad input."""
    parser = _Parser(
        prog=PROG,
        description=(
            "Train a lab zoo: MODELS small models on scikit-learn's bundled digits (no download), one per point "
            "of a hyperparameter grid (initialization, activation, optimizer, learning rate, weight decay, "
            "dropout) chosen by SEED, written in the Model Zoos layout: OUT/config.json and one Ray-Tune-style "
            "trial folder per model with params.json, result.json and checkpoint_<epoch:06d>/checkpoints for "
            "epochs 0 (untrained) to EPOCHS. Rerunning the same command skips finished models."
        ),
    )
    parser.add_argument("--out", required=True, help="folder of the zoo (created if missing)")
    parser.add_argument("--models", type=_int_at_least(1), default=200, help="number of models (default 200)")
    parser.add_argument("--epochs", type=_int_at_least(1), default=5, help="epochs per model (default 5)")
    parser.add_argument(
        "--seed", type=_int_at_least(0), default=0, help="seed of the configurations and weights (default 0)"
    )
    parser.add_argument(
        "--workers",
        type=_int_at_least(1),
        default=default_workers(),
        help="parallel training processes (default: all cores, here %(default)s)",
    )
    parser.add_argument(
        "--arch",
        choices=list(ARCHES),
        default="cnn",
        help="cnn (default: one architecture, layers line up across the zoo), mlp, mixed, or cnn-s (the Model Zoos "
        "MNIST CNN (s), 2,464 parameters, on the digits upsampled to 28x28)",
    )
    return parser.parse_args(argv)


def summary_line(summary: dict) -> str:
    """The one-line report of a ``generate`` summary."""
    line = (
        f"zoo {summary['out']}: {summary['trained']} trained, {summary['skipped']} skipped (already done), "
        f"{summary['failed']} failed in {summary['seconds']:.1f} s"
    )
    acc = summary["test_acc"]
    if acc:
        line += (
            f"; last-epoch test_acc min {acc['min']:.3f}, q25 {acc['q25']:.3f}, median {acc['median']:.3f}, "
            f"q75 {acc['q75']:.3f}, max {acc['max']:.3f}"
        )
    return line


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns 0 on success, 1 if some models failed, 2 for bad input, 130 on Ctrl-C."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    try:
        summary = generate(args.out, args.models, args.epochs, args.seed, args.workers, args.arch)
    except (ValueError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    for failure in summary["failures"]:
        logging.getLogger("zoo").error("%s: %s", failure["trial"], failure["error"])
    print(summary_line(summary))
    return 1 if summary["failed"] else 0


def cli(argv: list[str] | None = None) -> int:
    """Entry point shared with the `wildzoo zoo` console script."""
    return main(argv)


if __name__ == "__main__":
    sys.exit(cli())
