"""Every reader resolves a dsq folder the same way: transformers (default and dequantize mode), compressed-tensors'
own matching and model-free dequantizer, and dsq's Scheme; and `dsq quantize` says when a reader will not load one."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_quant import tensor_shapes
from rich.console import Console
from tiny import hf_model, make_tiny

import dsq
from dsq.checkpoint import Checkpoint
from dsq.config import Config
from dsq.formats import Scheme, from_args
from dsq.quant import fp8_dequantize_weight, int4_dequantize
from dsq.quantize.run import quantize
from dsq.quantize.scheme import CHOICES, Options, _target, quantization_config, reader_warnings, role_of

LINEAR_ROLES = (*CHOICES, "router")  # the roles whose modules are linear layers (embed and norm are not)
OPTIONS = {  # option sets that change targets or ignore
    "default": Options(),
    "fp8-experts": Options(experts="fp8"),
    "head-block-asym": Options(head="fp8", fp8_block=True, symmetric=False, group_size=64),
    "int4-only": Options(shared="bf16", dense="bf16", attention="bf16"),
    "fp8-attention-only": Options(experts="bf16", shared="bf16", dense="bf16"),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, Path]:
    """A V2-like tiny model (q_lora, so fused q_a + kv_a in vLLM) and its dsq output, sharded small so that one
    module's tensors can straddle shards."""
    root = tmp_path_factory.mktemp("readers")
    src = make_tiny(root / "src", "v2")
    quantize(src, root / "q", Options(), shard_size=300_000, console=Console(file=io.StringIO()))
    return src, root / "q"


def dsq_dequantized(stored: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """dsq's dequantization of one `.weight`; INT4 in the bf16 of its scales, as compressed-tensors multiplies in
    the scale's dtype (dsq's fp32 product is exact, so one rounding separates them)."""
    module = name.removesuffix(".weight")
    if f"{module}.weight_packed" in stored:
        return int4_dequantize(stored[f"{module}.weight_packed"], stored[f"{module}.weight_scale"],
                               stored.get(f"{module}.weight_zero_point")).to(torch.bfloat16).float()
    if f"{module}.weight_scale" in stored:
        return fp8_dequantize_weight(stored[name], stored[f"{module}.weight_scale"])
    return stored[name]


# --- transformers, both modes, against dsq ----------------------------------------------------------------------
def test_transformers_reads_both_modes_within_the_schemes_error(folder):
    """transformers loads the folder in its default mode (compressed-tensors applies the scheme: dequantized
    weights, dynamic FP8 activations) and in dequantize mode (dequantized weights, no activation rounding).

    The bound is the scheme's own error here, e = ||L_dsq - L_src|| (dsq's logits against the unquantized
    source's, same prompts). Asserted:
    - dequantize mode: ||L_tf - L_src|| <= e. It runs the scheme's weights without its activation rounding,
      so its error is the weight part of the scheme's error alone.
    - both modes: ||L_tf - L_dsq|| <= e. Both readers multiply by the same stored weights, so the weight error
      (the larger part of e) cancels in the difference; what is left is activation rounding (dsq's, and in the
      default mode compressed-tensors' own), a part of what e measures.
    With the triangle inequality, each mode is then within 2e of the source. A module read with the wrong
    scheme, or left at its random init, breaks these by orders of magnitude."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src, out = folder
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(1))
    modes = {"default": {}, "dequantize": {"quantization_config": CompressedTensorsConfig(dequantize=True)}}
    with torch.no_grad():
        ref = hf_model(src)(ids).logits.float()
        ours = dsq.load_quantized(out, kv_cache_dtype="fp32").logits(ids).float()
        tf = {}
        for mode, kwargs in modes.items():
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                                         **kwargs).eval()
            if mode == "default":  # compressed-tensors attached the FP8 scheme to every linear module but the head
                schemes = {n: getattr(m, "quantization_scheme", None) for n, m in model.named_modules()
                           if isinstance(m, torch.nn.Linear)}
                assert schemes.pop("lm_head") is None
                assert {(s.weights.num_bits, s.weights.type) for s in schemes.values()} == {(8, "float")}
            tf[mode] = model(ids).logits.float()

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / ref.norm()).item()

    scheme = err(ours, ref)
    errors = {mode: (err(t, ref), err(t, ours)) for mode, t in tf.items()}
    assert errors["dequantize"][0] <= scheme, (scheme, errors)
    for mode, (_, vs_dsq) in errors.items():
        assert vs_dsq <= scheme, (mode, scheme, errors)


# --- compressed-tensors' model-free dequantizer -----------------------------------------------------------------
def test_model_free_dequantizer_converts_the_sharded_folder(folder, tmp_path):
    """compressed-tensors' checkpoint converter (per shard, gathering each module's tensors across shards by
    its dependencies) turns the folder into dense weights equal to dsq's dequantization, tensor by tensor."""
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer, convert_checkpoint

    _, out = folder
    ckpt = Checkpoint(out)
    stored = {n: ckpt.get(n) for n in ckpt.files}
    assert len(set(ckpt.files.values())) > 1
    convert_checkpoint(out, tmp_path / "dense", CompressedTensorsDequantizer(out, dtype=torch.float32), max_workers=1)
    dense = Checkpoint(tmp_path / "dense")
    weights = [n for n in stored if n.endswith(".weight") or n.endswith(".weight_packed")]
    assert sorted(dense.files) == sorted(n.replace(".weight_packed", ".weight") for n in weights)
    for name in dense.files:
        got, want = dense.get(name), dsq_dequantized(stored, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name


# --- one answer per module, whoever matches ---------------------------------------------------------------------
def old_style(qcfg: dict, opts: Options) -> dict:
    """The config dsq wrote before: every FP8 role by regex instead of the class `Linear`, embeddings and norms
    not in `ignore`."""
    old = copy.deepcopy(qcfg)
    for group in old["config_groups"].values():
        if group["targets"] == ["Linear"]:
            group["targets"] = [_target(r) for r in CHOICES if opts.format(r) == "fp8"]
    old["ignore"] = [t for t in old["ignore"] if t not in (_target("embed"), _target("norm"))]
    return old


def ct_group(name: str, module: torch.nn.Module, qcfg: dict) -> str | None:
    """The group compressed-tensors gives a module when it applies a config (transformers' default mode):
    `ignore` by name or class, then the first of the matching targets ordered exact name, regex, class."""
    from compressed_tensors.utils.match import is_match, match_targets

    if is_match(name, module, qcfg["ignore"]):
        return None
    group_of = {t: g for g, grp in qcfg["config_groups"].items() for t in grp["targets"]}
    hits = match_targets(name, module, group_of)
    return group_of[hits[0]] if hits else None


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_every_reader_resolves_every_module_alike(opts):
    """On every module name of V2 and V2-Lite, the format the options give its role is what compressed-tensors'
    matching, transformers' dequantize mode (dense and experts scheme), dsq's Scheme on this config, and dsq's
    Scheme on the old-style config all resolve; and embeddings and norms are claimed by no group."""
    from compressed_tensors.quantization import QuantizationConfig
    from transformers.integrations.compressed_tensors import get_dense_scheme, get_experts_scheme

    qcfg = quantization_config(opts)
    parsed = QuantizationConfig.model_validate(qcfg)
    groups = qcfg["config_groups"]
    kind = {"pack-quantized": "int4", "float-quantized": "fp8"}
    want_group = {kind[g["format"]]: name for name, g in groups.items()}
    assert list(want_group) == [k for k in ("int4", "fp8") if k in want_group]  # the experts' regex group first
    if "fp8" in want_group:  # transformers' dequantize mode reads every non-expert module with this group
        assert get_dense_scheme(parsed) == parsed.config_groups[want_group["fp8"]]
    if opts.format("experts") != "keep":
        assert get_experts_scheme(parsed) == parsed.config_groups[want_group[opts.format("experts")]]
    new, old = Scheme(qcfg), Scheme(old_style(qcfg, opts))
    linear, other = torch.nn.Linear(1, 1, device="meta"), torch.nn.Embedding(1, 1, device="meta")
    for preset in ("deepseek-v2", "deepseek-v2-lite"):
        for name in tensor_shapes(Config.preset(preset), layers=2, experts=4):
            module, role = name.removesuffix(".weight"), role_of(name)
            if role not in LINEAR_ROLES:
                assert ct_group(module, other, qcfg) is None, name
                continue
            fmt = opts.format(role) if role in CHOICES else "keep"
            group = None if fmt == "keep" else want_group[fmt]
            assert ct_group(module, linear, qcfg) == group, name
            make = from_args(groups[group]["weights"] if group else None, name)
            assert new.format(module) == old.format(module) == make, name


# --- what dsq quantize says about vLLM ------------------------------------------------------------------------
def test_quantize_warns_when_another_reader_will_not_load(folder, tmp_path):
    """`--asymmetric` (vLLM's compressed-tensors MoE methods assert symmetric weights; transformers drops the
    experts' zero points) and `--lm-head fp8` (vLLM builds the LM head unquantized) each add a warning after the
    final report; the defaults add none."""
    src, _ = folder
    assert reader_warnings(Options()) == [] and reader_warnings(Options(experts="fp8", symmetric=False)) == []
    asym, head = reader_warnings(Options(symmetric=False)), reader_warnings(Options(head="fp8"))
    assert len(asym) == len(head) == 1 and "vLLM" in asym[0] and "vLLM" in head[0]
    run = subprocess.run([sys.executable, "-m", "dsq.cli.main", "quantize", str(src), str(tmp_path / "q"),
                          "--asymmetric", "--lm-head", "fp8"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    report = run.stdout
    assert report.index("total") < report.index(asym[0]) < report.index(head[0])  # after the final report
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["weights"]["symmetric"] is False and "lm_head" not in cfg["ignore"]
