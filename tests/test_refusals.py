"""Hostile inputs, one table: each row damages a fresh copy of a tiny checkpoint, runs dsq commands on it,
and expects exit 1 with ONE stderr line that holds the row's fragment (which names the culprit), no
traceback, and (quantize) nothing under a final name in OUT. Every row runs in-process (fast); a few run
again as real processes under an address-space limit and a timeout, and the chat templates render in one
such process, so a refusal that fails shows up as a dead process, not a dead test machine."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from tiny import make_tiny
from typer.testing import CliRunner

from dsq.cli.main import app

LIMIT = 2 << 30  # address space of a case's process (the bound); dsq with torch imported maps ~0.8 GB
TIMEOUT = 120  # a safety net only: every refusal here comes in well under a second of work
INDEX = "model.safetensors.index.json"
GEN = ("generate", "--ids", "--prompt", "1 2", "--max-new-tokens", "1")
INSPECT, QUANTIZE = ("inspect",), ("quantize",)
ALL = (INSPECT, GEN, QUANTIZE)
LOAD = (GEN, QUANTIZE)  # commands that build a model or plan a run (inspect only reads headers)


# --- damage: each takes a fresh copy of the single-file (or, for index rows, sharded) checkpoint --------
def config(**changes) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        for k, v in changes.items():
            cfg.pop(k) if v is DROP else cfg.__setitem__(k, v)
        (folder / "config.json").write_text(json.dumps(cfg))
    return damage


DROP = object()


def index(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        idx = json.loads((folder / INDEX).read_text())
        fn(idx)
        (folder / INDEX).write_text(json.dumps(idx))
    return damage


def remap(tensor: str, shard: str) -> Callable[[Path], None]:
    return index(lambda idx: idx["weight_map"].__setitem__(tensor, shard))


def header(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite model.safetensors' JSON header (the data after it stays as it is)."""
    def damage(folder: Path) -> None:
        path = folder / "model.safetensors"
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        head = json.loads(raw[8:8 + n])
        fn(head)
        new = json.dumps(head).encode()
        path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    return damage


def header_bytes(first8: bytes) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / "model.safetensors"
        path.write_bytes(first8 + path.read_bytes()[8:])
    return damage


def tensors(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        sd = load_file(folder / "model.safetensors")
        fn(sd)
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return damage


def second_shard(make: Callable[[Path], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / "model-00002-of-00002.safetensors"
        path.unlink()
        make(path)
    return damage


def edit(key: str, fn: Callable) -> Callable[[dict], None]:
    return lambda d: d.__setitem__(key, fn(d[key]))


NORM, HEAD, O_PROJ = "model.norm.weight", "lm_head.weight", "model.layers.0.self_attn.o_proj.weight"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"

# id, sharded?, damage, commands, fragment (naming the culprit)
ROWS = [
    # the index (point 3)
    ("index-wrong-shard", True, remap(HEAD, SHARD1), ALL, f"lists tensor {HEAD} in {SHARD1}"),
    ("index-not-mapping", True, index(lambda i: i.__setitem__("weight_map", [1])), ALL, "weight_map must map"),
    ("index-not-json", True, lambda f: (f / INDEX).write_text("{"), ALL, f"{INDEX}: not a valid safetensors index"),
    ("index-unlisted", True, index(lambda i: i["weight_map"].pop(HEAD)), ALL, f"does not list tensor {HEAD}"),
    ("index-climbs", True, remap(NORM, "../../x.safetensors"), ALL, "'../../x.safetensors', which is not a plain"),
    ("index-absolute", True, remap(NORM, "/etc/passwd"), ALL, "'/etc/passwd', which is not a plain path"),
    ("shard-fifo", True, second_shard(os.mkfifo), ALL, f"{SHARD2}: not a regular file"),
    ("shard-dev-zero", True, second_shard(lambda p: p.symlink_to("/dev/zero")), ALL, f"{SHARD2}: not a regular file"),
    ("shard-missing", True, second_shard(lambda p: None), ALL, f"names shard {SHARD2}, which is missing"),
    # safetensors headers
    ("header-length", False, header_bytes((1 << 60).to_bytes(8, "little")), ALL, "model.safetensors: not a valid"),
    ("header-not-json", False, header_bytes((5).to_bytes(8, "little")), ALL, "header is not JSON"),
    ("header-dtype", False, header(edit(NORM, lambda m: dict(m, dtype="X9"))), ALL, f"{NORM} has dtype 'X9'"),
    ("header-shape", False, header(edit(NORM, lambda m: dict(m, shape=[-1]))), ALL, f"{NORM} has shape [-1]"),
    ("header-offsets", False, header(edit(NORM, lambda m: dict(m, data_offsets=[0, 1 << 40]))), ALL,
     f"{NORM} has byte range"),
    ("tensor-0d", False, tensors(lambda sd: sd.__setitem__(O_PROJ, sd[O_PROJ][0, 0].clone())), LOAD,
     f"{O_PROJ} has shape []"),
    # config.json fields (point 2)
    ("cfg-no-heads", False, config(num_attention_heads=DROP), ALL, "missing field(s) num_attention_heads"),
    ("cfg-null-size", False, config(hidden_size=None), ALL, "hidden_size must be an integer in [1, 32,768], got None"),
    ("cfg-str-size", False, config(hidden_size="128"), ALL, "hidden_size must be an integer"),
    ("cfg-bool-size", False, config(intermediate_size=True), ALL, "intermediate_size must be an integer"),
    ("cfg-float-size", False, config(v_head_dim=16.0), ALL, "v_head_dim must be an integer"),
    ("cfg-negative", False, config(kv_lora_rank=-32), ALL, "kv_lora_rank must be an integer in [1, 8,192]"),
    ("cfg-moe-freq-0", False, config(moe_layer_freq=0), ALL, "moe_layer_freq must be an integer in [1, 3]"),
    ("cfg-nan-theta", False, config(rope_theta=math.nan), ALL, "rope_theta must be a number"),
    ("cfg-list-rope", False, config(rope_scaling=[1]), ALL, "rope_scaling must be an object or null"),
    ("cfg-eos-empty", False, config(eos_token_id=[]), ALL, "eos_token_id is an empty list"),
    ("cfg-quant-not-dict", False, config(quantization_config=[1]), ALL, "quantization_config must be an object"),
    ("cfg-quant-groups", False, config(quantization_config={"quant_method": "compressed-tensors",
                                                            "config_groups": [1]}), ALL,
     "quantization_config.config_groups must be an object"),
    ("cfg-rope-factor-0", False, config(rope_scaling={"type": "yarn", "factor": 0}), ALL,
     "rope_scaling.factor must be a number in [1, 10000]"),
    ("cfg-negative-eps", False, config(rms_norm_eps=-1e-6), ALL, "rms_norm_eps must be a number in (0, 1]"),
    ("cfg-hidden-1e7", False, config(hidden_size=10**7), ALL, "hidden_size must be an integer in [1, 32,768]"),
    ("cfg-vocab-1e12", False, config(vocab_size=10**12), ALL, "vocab_size must be an integer in [1, 1,048,576]"),
    ("cfg-kv-lora-1e9", False, config(kv_lora_rank=10**9), ALL, "kv_lora_rank must be an integer"),
    ("cfg-layers-1e6", False, config(num_hidden_layers=10**6), ALL,
     "num_hidden_layers must be an integer in [1, 1,024]"),
    ("cfg-layers-1e9", False, config(num_hidden_layers=10**9), ALL, "num_hidden_layers must be an integer"),
    ("cfg-experts-1e9", False, config(n_routed_experts=10**9), ALL,
     "n_routed_experts must be an integer in [0, 4,096]"),
    # a config that lies about the weights, within the ranges: refused from the headers, before building
    ("lie-hidden", False, config(hidden_size=256), LOAD, "model.embed_tokens.weight has shape [1000, 128]"),
    ("lie-vocab", False, config(vocab_size=4000), LOAD, "model.embed_tokens.weight has shape [1000, 128]"),
    ("lie-kv-lora", False, config(kv_lora_rank=64), LOAD, "kv_a_proj_with_mqa.weight has shape [48, 128]"),
    ("lie-heads", False, config(num_attention_heads=8, num_key_value_heads=8), LOAD, "kv_b_proj.weight has shape"),
    ("lie-layers", False, config(num_hidden_layers=30), LOAD, "holds 3 layers, config.json says num_hidden_layers=30"),
    ("lie-experts", False, config(n_routed_experts=64), LOAD, "layer 1 holds 8 routed experts"),
    # --tp checked against the model before any rank is spawned (issue 11 point 6)
    ("tp-over-heads", False, lambda folder: None, ((*GEN, "--tp", "64"),),
     "--tp 64: cannot split 4 attention heads over 64 ranks; use fewer ranks"),
    # issue 11 point 4 / issue 12 point 5: quantize checks its source as the loader does (the same messages),
    # refuses what its options cannot do, and an unfinished quantize output (what a killed `dsq quantize SRC
    # DIR` leaves: shards and .dsq-progress.json, no config.json yet) says how to finish it
    ("cfg-not-json", False, lambda f: (f / "config.json").write_text("{"), ALL, "config.json: not valid JSON"),
    ("src-missing-tensor", False, tensors(lambda sd: sd.pop("model.layers.1.mlp.experts.3.up_proj.weight")), LOAD,
     "missing tensor(s) model.layers.1.mlp.experts.3.up_proj.weight;"),
    ("src-extra-tensor", False, tensors(lambda sd: sd.__setitem__("model.layers.0.mlp.extra.weight", sd[NORM] + 1)),
     LOAD, "unexpected tensor(s) model.layers.0.mlp.extra.weight;"),
    ("src-shape", False, tensors(edit("model.layers.0.input_layernorm.weight", lambda t: t[:64].clone())), LOAD,
     "model.layers.0.input_layernorm.weight has shape [64], the config implies [128]"),
    ("src-int-dtype", False, tensors(edit("model.layers.0.input_layernorm.weight", lambda t: t.int())), (QUANTIZE,),
     "model.layers.0.input_layernorm.weight has dtype I32"),
    ("unfinished-output", False, lambda f: ((f / "config.json").unlink(), (f / ".dsq-progress.json").write_text(
        json.dumps({"command": "dsq quantize SRC OUT --experts fp8"}))), ALL,
     "is an unfinished dsq quantize output (no config.json yet); run `dsq quantize SRC OUT --experts fp8` again"),
    ("asymmetric-fp8", False, lambda f: None, (("quantize", "--experts", "fp8", "--asymmetric"),),
     "--asymmetric: applies to INT4 experts only, not --experts fp8"),
]
SUBPROCESS = {"cfg-vocab-1e12": GEN, "shard-dev-zero": QUANTIZE, "header-length": INSPECT}  # under LIMIT


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[bool, Path]:
    """The good checkpoints the rows copy: one file, and the same tensors in two shards with an index."""
    one = make_tiny(tmp_path_factory.mktemp("one"), "lite")
    two = Path(shutil.copytree(one, tmp_path_factory.mktemp("two") / "ckpt"))
    sd = load_file(two / "model.safetensors")
    (two / "model.safetensors").unlink()
    rest = sorted(set(sd) - {HEAD})
    weight_map = {}
    for shard, part in ((SHARD1, rest[::2]), (SHARD2, [*rest[1::2], HEAD])):  # the rows move HEAD to SHARD1
        save_file({n: sd[n] for n in part}, two / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (two / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {False: one, True: two}


def run_cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # an escaped exception is a bug: show it
    assert "Traceback" not in result.stdout
    return result.exit_code, result.stderr


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def run_process(args: list[str]) -> tuple[int, str]:
    run = subprocess.run([sys.executable, "-m", "dsq.cli.main", *args], capture_output=True, text=True,
                         timeout=TIMEOUT, preexec_fn=_limit)
    assert "Traceback" not in run.stdout
    return run.returncode, run.stderr


def assert_refused(code: int, err: str, fragment: str) -> None:
    assert code == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert fragment in lines[0], lines[0]


def assert_nothing_final(out: Path) -> None:
    """Nothing under a final name: at most the unfinished-run record and temporary files."""
    left = [p.name for p in out.iterdir()] if out.exists() else []
    assert all(n == ".dsq-progress.json" or n.endswith(".tmp") for n in left), left


def command_args(command: tuple[str, ...], folder: Path, out: Path) -> list[str]:
    head, *rest = command
    return [head, str(folder), *([str(out)] if head == "quantize" else []), *rest]


@pytest.mark.parametrize("row, sharded, damage, commands, fragment", ROWS, ids=[r[0] for r in ROWS])
def test_refused(templates, tmp_path, row, sharded, damage, commands, fragment):
    folder = Path(shutil.copytree(templates[sharded], tmp_path / "ckpt", symlinks=True))
    damage(folder)
    for command in commands:
        out = tmp_path / f"out-{command[0]}"
        assert_refused(*run_cli(command_args(command, folder, out)), fragment)
        if command == QUANTIZE:
            assert_nothing_final(out)
    if row in SUBPROCESS:
        out = tmp_path / "out-process"
        assert_refused(*run_process(command_args(SUBPROCESS[row], folder, out)), fragment)
        assert_nothing_final(out)


def test_good_checkpoints_pass(templates, tmp_path):
    """The templates the rows damage are themselves accepted (so each refusal is the damage's doing)."""
    for sharded, folder in templates.items():
        code, err = run_cli(["inspect", str(folder)])
        assert code == 0, err
        code, err = run_cli(["quantize", str(folder), str(tmp_path / f"q{sharded}"), "--experts", "fp8"])
        assert code == 0, err
        code, err = run_cli(["generate", str(tmp_path / f"q{sharded}"), *GEN[1:]])
        assert code == 0, err


# --- chat templates (point 1): rendered through the Python API in one process under LIMIT -----------------
TEMPLATES = [
    ("folded-repeat", "{{ 'x' * 10**10 }}", "repeating a value would make more than"),
    ("content-repeat", "{{ messages[0]['content'] * 10**10 }}", "repeating a value"),
    ("list-repeat", "{{ [0] * 10**10 }}", "repeating a value"),
    ("center", "{{ messages[0]['content'].center(10**10) }}", "center: argument 10000000000 is larger"),
    ("center-filter", "{{ 'x'|center(10**9) }}", "filter center: argument"),
    ("recursive-macro", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "calls nest deeper than"),
    ("nested-ranges", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "rendering took more than"),
    ("lipsum", "{{ lipsum(n=10**7) }}", "larger than"),
    ("doubling", "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                 "{% endfor %}", "joining text would make more than"),
    ("printf-width", "{{ '%999999999d' % 1 }}", "%-formatting would make more than"),
    ("format-width", "{{ '{:>999999999}'.format(1) }}", "str.format would make more than"),
    ("replace", "{% set s = 'x' * 100000 %}{{ s.replace('x', s) }}", "str.replace would make more than"),
    ("shared-list", "{% set s = 'x' * 1000000 %}{{ [s, s, s, s, s, s, s, s] }}", "an output expression would"),
    ("int", 5, "the chat template must be a string, got int"),
    ("list", [{"name": "default", "template": ["x"]}], "the chat template must be a string, got list"),
    ("surrogate", "hi \ud800", "lone surrogate"),
    ("syntax", "{% for %}", "does not compile"),
    ("raise", "{{ raise_exception('bad role') }}", "bad role"),
    # what ordinary templates use still renders (the bounds sit far above it)
    ("ordinary", "{% for m in messages %}{{ loop.index }}:{{ m['content']|upper|center(6) }}{% endfor %}"
                 "{{ messages|tojson(indent=1)|length }} {{ '%d-%s' % (3, 'x') }} {{ '{}!'.format(4) * 2 }} "
                 "{{ ', '.join(messages|map(attribute='content')) }} {{ [1, 2, 3]|slice(2, fill_with=0)|list }}",
     "rendered 1:  HI  45 3-x 4!4! hi [[1, 2], [3, 0]]"),
]
SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from dsq.demo import write_tokenizer
    from dsq.errors import DsqError
    from dsq.tokenizer import Tokenizer

    folder, results = Path(sys.argv[1]), {}
    write_tokenizer(folder, 300)
    base = json.loads((folder / "tokenizer_config.json").read_text())
    for name, template in json.loads(sys.argv[2]).items():
        (folder / "tokenizer_config.json").write_text(json.dumps(dict(base, chat_template=template)))
        try:
            results[name] = "rendered " + Tokenizer(folder).render([{"role": "user", "content": "hi"}])
        except DsqError as e:
            results[name] = str(e)
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tok")
    cases = json.dumps({name: t for name, t, _ in TEMPLATES})
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), cases], capture_output=True, text=True,
                         timeout=TIMEOUT, preexec_fn=_limit)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("name, template, fragment", TEMPLATES, ids=[t[0] for t in TEMPLATES])
def test_template(rendered, name, template, fragment):
    message = rendered[name]
    if fragment.startswith("rendered "):
        assert message == fragment
        return
    assert "\n" not in message and fragment in message, message
    assert "tokenizer_config.json: " in message, message  # the file the template came from
