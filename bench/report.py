"""The bench convention in one place: every bench/*.py takes `--out DIR` (default $OUT, else ./bench-out),
stamps its result with the run's date and commit (docs/benchmarks.md records both beside every number), and
writes <name>.json and <name>.md there. bench/gpu_check.sh merges the .md files into summary.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")),
                        help="folder for <name>.json and <name>.md (default $OUT, else ./bench-out)")


def stamp() -> dict[str, str]:
    """The run's date (local time, to the second) and commit ("unknown" outside a git checkout)."""
    try:  # a machine without git (the GPU machine's copy of the tree) must not cost the measured results
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        commit = git.stdout.strip()
    except OSError:
        commit = ""
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit or "unknown"}


def save(out: Path, name: str, result: object, markdown: str) -> None:
    """Write out/<name>.json (the numbers) and out/<name>.md (the table for docs/benchmarks.md)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    (out / f"{name}.md").write_text(markdown.rstrip("\n") + "\n")
