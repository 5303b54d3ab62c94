"""bench/census.py runs on a CPU and counts what it claims to: a smoke test that the instrument still works
(its numbers are recorded in docs/benchmarks.md, never asserted: issue 15's targets are measured)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "census.py"


def test_census_counts_launches_ops_and_bytes(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--layers", "2", "--context", "64", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "census.json").read_text())
    assert result["date"] and result["commit"]  # docs/benchmarks.md records both beside the numbers
    steps = result["steps"]
    assert [s["step"] for s in steps] == ["decode batch 1", "decode batch 64", "prefill 512"]
    for s in steps:
        layers = s["per layer"]
        assert set(layers) == {"layer 0", "layer 1"}  # one dense, one MoE layer
        assert all(v["triton"] > 0 and v["weight_bytes"] > 0 and v["cache_bytes"] > 0 for v in layers.values()), s
        assert "_moe_kernel" in layers["layer 1"]["triton_kernels"], layers["layer 1"]  # the MoE layer routes
        # what the step read was compared with an ideal of the same kind: weights read once plus the cache in use
        assert s["ideal bytes per step"] > 0 and s["bytes per step (whole model, scaled)"] >= s["ideal bytes per step"]
    assert (tmp_path / "census.md").read_text().count("| decode batch") == 2
