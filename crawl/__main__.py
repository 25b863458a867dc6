"""`python -m crawl local|zoo|hub ...`: turn sources into catalog shards (see `--help`, and crawl/cli.py)."""

import sys

from crawl.cli import cli

if __name__ == "__main__":
    sys.exit(cli())
