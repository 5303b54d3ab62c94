"""Bad input ends in one line naming the culprit and a non-zero exit, never a traceback; good input in
its other shapes (shards, published configs, Hub ids) loads."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_tiny
from typer.testing import CliRunner

import dsq
import dsq.cache
from dsq.cache import available_memory, bytes_per_token
from dsq.cli.main import app
from dsq.config import Config
from dsq.errors import DsqError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("good"), "lite")


@pytest.fixture
def broken(tiny, tmp_path) -> Path:
    """A fresh copy of the good checkpoint for a test to damage."""
    return Path(shutil.copytree(tiny, tmp_path / "broken"))


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, subprocess_env: dict | None = None) -> Run:
    """`dsq ARGS` in-process (fast), or as a real process when an environment is given."""
    if subprocess_env is not None:
        run = subprocess.run([sys.executable, "-m", "dsq.cli.main", *args], capture_output=True, text=True,
                             timeout=120, env=subprocess_env)
        return Run(run.returncode, run.stdout, run.stderr)
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # an escaped exception is a bug: show it
    return Run(result.exit_code, result.stdout, result.stderr)


def assert_one_line_error(run: Run, *needles: str) -> None:
    assert run.returncode != 0
    assert "Traceback" not in run.stderr + run.stdout
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), run.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def edit_tensors(folder: Path, fn) -> None:
    sd = load_file(folder / "model.safetensors")
    fn(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def generate(folder: Path) -> Run:
    return cli("generate", str(folder), "--prompt", "1 2 3", "--ids", "--max-new-tokens", "2")


def test_good_checkpoint_generates(tiny):
    run = cli("generate", str(tiny), "--prompt", "1 2 3", "--ids", "--max-new-tokens", "2",
              subprocess_env=dict(os.environ))
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.split()) == 2


def test_missing_tensor(broken):
    edit_tensors(broken, lambda sd: sd.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    assert_one_line_error(generate(broken), "missing", "model.layers.1.mlp.experts.3.up_proj.weight")


def test_unexpected_tensor(broken):
    edit_tensors(broken, lambda sd: sd.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    assert_one_line_error(generate(broken), "unexpected", "model.layers.0.mlp.extra.weight")


def test_wrong_shape(broken):
    edit_tensors(broken, lambda sd: sd.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(128, 60)}))
    assert_one_line_error(generate(broken), "model.layers.0.self_attn.o_proj.weight", "[128, 60]")


def test_nan_tensor(broken):
    edit_tensors(broken, lambda sd: sd["model.norm.weight"].__setitem__(0, float("nan")))
    assert_one_line_error(generate(broken), "model.norm.weight", "NaN")


def test_truncated_file(broken):
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(generate(broken), "model.safetensors")


@pytest.mark.parametrize("changes, needle", [
    ({"model_type": "deepseek_v3"}, "deepseek_v3"),
    ({"scoring_func": "sigmoid"}, "sigmoid"),
    ({"topk_method": "noaux_tc"}, "noaux_tc"),
    ({"n_group": 3}, "n_group"),
])
def test_unsupported_config(broken, changes, needle):
    edit_config(broken, **changes)
    assert_one_line_error(generate(broken), "config.json", needle)


def test_sharded_checkpoint_and_missing_shard(tmp_path):
    from transformers import DeepseekV2ForCausalLM

    one = make_tiny(tmp_path / "one", "v2")
    sharded = tmp_path / "sharded"
    DeepseekV2ForCausalLM.from_pretrained(one).save_pretrained(sharded, max_shard_size="1MB")
    shutil.copy(one / "config.json", sharded / "config.json")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 1000, (2, 9))
    assert torch.equal(dsq.load_quantized(sharded).logits(ids), dsq.load_quantized(one).logits(ids))
    shards[1].unlink()
    assert_one_line_error(generate(sharded), "model.safetensors.index.json", shards[1].name)


def test_pickled_weights_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(make_tiny(tmp_path / "src", "lite") / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    assert_one_line_error(generate(folder), "pytorch_model.bin", "safetensors")


def test_offline_hub_id_not_cached(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = cli("generate", "deepseek-ai/DeepSeek-V2-Lite", "--prompt", "1", "--ids", subprocess_env=env)
    assert_one_line_error(run, "deepseek-ai/DeepSeek-V2-Lite", "HF_HUB_OFFLINE")


def test_names_that_are_no_model(tiny):
    """A revision cannot pin a local folder (ignoring it would load what was not asked for); a name that is no
    folder, repo id or preset lists the presets."""
    assert_one_line_error(cli("generate", str(tiny), "--prompt", "1", "--ids", "--revision", "main"),
                          str(tiny), "--revision")
    with raises_one_line("is a local folder, which has no revision 'v1' to pin"):
        dsq.load_quantized(tiny, revision="v1")
    assert_one_line_error(cli("inspect", "deepseek-v3"), "deepseek-v3", "deepseek-v2-lite, deepseek-v2")


def test_bad_flags(tiny):
    assert_one_line_error(cli("generate", str(tiny), "--prompt", "1 x", "--ids"), "--prompt")
    assert_one_line_error(cli("generate", str(tiny), "--prompt", "1", "--ids", "--top-p", "0"), "--top-p")
    with pytest.raises(DsqError, match="bogus"):
        dsq.load_quantized(tiny, bogus=1)


def raises_one_line(fragment: str):
    return pytest.raises(DsqError, match=rf"^[^\n]*{re.escape(fragment)}[^\n]*$")


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(device="foo"), "device='foo': dsq runs on 'cpu', 'cuda' or 'cuda:N'"),
    (dict(device="meta"), "device='meta': dsq runs on"),
    (dict(device="gpu"), "device='gpu': dsq runs on"),
    (dict(device="mps"), "device='mps': dsq runs on"),
    (dict(device=torch.device("meta")), "device=device(type='meta'): dsq runs on"),
    (dict(tp=0), "tp=0: give an integer >= 1"),
    (dict(tp=-2), "tp=-2: give an integer >= 1"),
    (dict(tp=1.5), "tp=1.5: give an integer >= 1"),
])
def test_load_quantized_arguments(tiny, kwargs, fragment):
    with raises_one_line(fragment):
        dsq.load_quantized(tiny, **kwargs)


@pytest.fixture(scope="module")
def model(tiny) -> dsq.Model:
    return dsq.load_quantized(tiny)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(seed=2**63), f"seed={2**63}: give an integer in [0, 2**63)"),
    (dict(seed=-1), "seed=-1: give an integer in [0, 2**63)"),
    (dict(stop=[""]), "stop=['']: give a list of non-empty strings"),
    (dict(stop="x"), "stop='x': give a list of non-empty strings"),
])
def test_generate_and_chat_arguments(model, kwargs, fragment):
    with raises_one_line(fragment):
        model.generate([1, 2], max_new_tokens=1, **kwargs)
    with raises_one_line(fragment):
        next(model.chat([{"role": "user", "content": "hi"}], **kwargs))


def test_sampling_refusals_name_the_api_arguments(model):
    with raises_one_line("max_new_tokens=0: give an integer >= 1"):
        model.generate([1, 2], max_new_tokens=0)
    with raises_one_line("top_p=0: give"):
        next(model.chat([{"role": "user", "content": "hi"}], top_p=0))


def test_cpu_cache_larger_than_memory_is_refused_before_allocating(model, monkeypatch):
    """A cache of twice the memory available now (so memory freed meanwhile cannot make it fit) is one
    sentence saying what to change, and no pool is allocated."""
    monkeypatch.setattr(dsq.cache, "alloc_pool", lambda *args, **kwargs: pytest.fail("the pool was allocated"))
    pages = 2 * available_memory() // bytes_per_token(model.cfg, model.net.kv_cache_dtype) // 64
    with raises_one_line(f"latent cache of {pages * 64:,} tokens needs") as e:
        model.net.new_cache(pages, 64)
    assert "GB of memory available; give a shorter context (--context, max_seq_len)" in str(e.value)


def test_inspect_reports_roles(tiny):
    run = cli("inspect", str(tiny))
    assert run.returncode == 0, run.stderr
    for role in ("attention", "dense", "shared", "experts", "embed", "head"):
        assert role in run.stdout


@pytest.mark.skipif(not REFERENCE.exists(), reason="../shared/reference is not present")
@pytest.mark.parametrize("name, preset", [("deepseek-v2-lite-chat", "deepseek-v2-lite"),
                                          ("deepseek-v2-chat", "deepseek-v2")])
def test_presets_equal_published_configs(name, preset):
    published = Config.from_file(REFERENCE / f"{name}.config.json")
    assert published == Config.preset(preset)
    assert abs(published.softmax_scale * published.qk_head_dim**0.5 - 1.5896) < 1e-4  # the YaRN m^2
