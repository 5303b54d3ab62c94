"""The torch backend without Triton (pyproject installs it on Linux only): in a process where `import triton`
fails, as on macOS, dsq imports, loads the demo checkpoint, generates, runs `dsq demo`'s code path, and refuses
backend="triton" in one sentence that names what to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import io, sys
from pathlib import Path


class NoTriton:  # the import system of a machine without Triton
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ImportError(f"No module named {name!r}")


sys.meta_path.insert(0, NoTriton())
import torch
from rich.console import Console

import dsq
from dsq.demo import run_demo, write_demo_checkpoint

tmp = Path(sys.argv[1])
write_demo_checkpoint(tmp / "bf16")
model = dsq.load_quantized(tmp / "bf16", device="cpu", backend="torch")
out = model.generate([5, 6, 7], max_new_tokens=4)
assert len(out) == 4, out
run_demo(tmp / "demo", "cpu", Console(file=io.StringIO()), keep=False)
try:
    dsq.load_quantized(tmp / "bf16", device="cpu", backend="triton")
except dsq.DsqError as e:
    print("refused:", e)
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "triton" or m.startswith("dsq.kernels"))
print("loaded:", loaded)
"""


def test_the_torch_backend_runs_without_triton(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert "refused: backend 'triton' needs Triton (pip install triton" in run.stdout, run.stdout
    assert len([line for line in lines if line.startswith("refused:")]) == 1
    assert lines[-1] == "loaded: []"
