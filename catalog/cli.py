"""What every command line of wildzoo shares: one-line errors, exit codes, logging, a console entry."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from catalog.errors import WildzooError


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line on stderr and exits with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def custom_resources(value: object) -> dict[str, float]:
    """Custom Ray resources per worker (a node type's label, e.g. {"crawler": 1}), checked; ValueError if not."""
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and k not in ("CPU", "GPU") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and v > 0 for k, v in value.items()):
        raise ValueError('worker resources must be a JSON object of custom resource names (not CPU or GPU) and '
                         'amounts > 0, e.g. \'{"crawler": 1}\'')
    return {k: float(v) for k, v in value.items()}


def resources_arg(text: str) -> dict[str, float]:
    """`--worker-resources JSON` (`custom_resources`)."""
    import json

    try:
        return custom_resources(json.loads(text))
    except ValueError as e:  # json's errors are ValueErrors too
        raise argparse.ArgumentTypeError(str(e)) from None


WORKER_RESOURCES_HELP = ("custom Ray resources each worker needs, e.g. '{\"%s\": 1}': on a cluster, workers go only "
                         "to nodes that offer them (cluster.yaml's node types)")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None, prog: str = "wildzoo") -> int:
    """Run a command's main; user errors become one line on stderr and exit code 1, never a traceback."""
    from catalog.rayenv import quiet_env

    quiet_env()
    try:
        return main(argv)
    except WildzooError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


WILDZOO_USAGE = """usage: wildzoo {crawl,catalog,train,zoo} ...

Neural-network weights as data: crawl models into a Parquet catalog, query it with SQL, train a backbone on it.

commands (each is also `python -m <command>`; `wildzoo <command> --help` explains it):
  zoo       train a lab zoo of small CNNs on scikit-learn's digits (Model Zoos layout)
  crawl     crawl local folders, Model Zoos or the Hugging Face Hub into a catalog
  catalog   ask a catalog: SQL, info, compaction
  train     fit the weight-space backbone, embed, probe
"""


def wildzoo_main(argv: Sequence[str] | None = None) -> int:
    """`wildzoo crawl|catalog|train|zoo ...`: the console script grouping the four entry points.

    `--help` (or `-h`) prints the usage on stdout and exits 0; no command or an unknown one prints it on
    stderr and exits 2."""
    import importlib

    args = list(sys.argv[1:] if argv is None else argv)
    commands = ("crawl", "catalog", "train", "zoo")
    if args and args[0] in ("-h", "--help"):
        print(WILDZOO_USAGE, end="")
        return 0
    if not args or args[0] not in commands:
        what = f"unknown command {args[0]!r}" if args else "a command is needed"
        print(f"{WILDZOO_USAGE}wildzoo: error: {what}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{args[0]}.__main__")
    return module.cli(args[1:])


def wildzoo() -> None:
    """The console script's entry (`[project.scripts]`)."""
    sys.exit(wildzoo_main())
