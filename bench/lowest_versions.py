"""Install the lowest versions pyproject.toml allows in a fresh venv and run the entry points there.

    python bench/lowest_versions.py [--venv /tmp/wildzoo-lowest]

Every `name>=X` requirement becomes `name==X`, the project is installed on top without
dependencies, and `--help` of every command plus a small offline crawl and a SQL query run in that venv. It
prints each command's exit status; a resolver refusal (floors that cannot be installed together) is printed as
well — the floors are then wrong. Needs the package index; nothing here is timed by tests.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def floors() -> list[str]:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = []
    for d in deps:
        if ";" in d and "python_version < '3.11'" in d:
            continue
        m = re.match(r"^([A-Za-z0-9_.\-\[\],]+)>=([0-9][^,;<\s]*)", d)
        pins.append(f"{m.group(1)}=={m.group(2)}" if m else d.split(";")[0])
    return pins


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", default=str(Path(tempfile.gettempdir()) / "wildzoo-lowest"))
    args = ap.parse_args()
    venv = Path(args.venv)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pins = floors()
    print("pins:", " ".join(pins), flush=True)
    p = subprocess.run([py, "-m", "pip", "install", "-q", *pins], capture_output=True, text=True)
    if p.returncode:
        print("the resolver refuses the floors:\n" + p.stderr[-2000:])
        return 1
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)], check=True, capture_output=True)
    work = Path(tempfile.mkdtemp())
    commands = [["crawl", "hub", "--help"], ["crawl", "zoo", "--help"], ["catalog", "--help"], ["train", "fit", "--help"],
                ["zoo", "--out", str(work / "zoo"), "--models", "4", "--epochs", "1", "--workers", "1"],
                ["crawl", "zoo", str(work / "zoo"), "--catalog", str(work / "cat"), "--no-ray"],
                ["catalog", "sql", str(work / "cat"), "SELECT status, count(*) AS n FROM models GROUP BY status"]]
    bad = 0
    for c in commands:
        r = subprocess.run([py, "-m", *c], capture_output=True, text=True, cwd=work)
        bad += r.returncode != 0
        print(f"rc {r.returncode}: python -m {' '.join(c[:3])}" + ("" if r.returncode == 0 else "\n" + r.stderr[-1500:]))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
