"""README command 1: `dsq demo` runs end to end on a CPU with no download."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_demo_runs_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    run = subprocess.run([sys.executable, "-m", "dsq.cli.main", "demo", "--dir", str(tmp_path)], capture_output=True,
                         text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "random weights" in out
    assert re.search(r"experts\s+int4", out)  # the quantizer's report
    assert re.search(r"logits relative error 0\.\d+, top-1 agreement \d+%", out)
    assert re.search(r"24 tokens in [\d.]+ s", out)
    assert (tmp_path / "fp8-int4" / "dsq_manifest.json").exists()
    assert "Traceback" not in run.stderr
