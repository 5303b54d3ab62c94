"""The storage formats: their spec is what they store, their compressed-tensors arguments read back as
themselves, their split units are the stored layouts' granularity, and FP8 projections of one input that
share an activation quantization give what each gives alone."""

from __future__ import annotations

import pytest
import torch

from dsq.formats import BF16, FP8Block, FP8Channel, Int4Group, Scheme, from_args
from dsq.layers import Linear, project

FORMATS = [BF16, FP8Channel(), FP8Block(), Int4Group(32), Int4Group(64, symmetric=False)]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_spec_is_what_quantize_stores(fmt):
    w = torch.randn(200, 256, generator=torch.Generator().manual_seed(0))
    got = fmt.quantize(w).tensors
    spec = fmt.spec(200, 256, torch.float32)
    assert list(got) == list(spec)
    for name, s in spec.items():
        assert (tuple(got[name].shape), got[name].dtype) == (s.shape, s.dtype), name


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_args_read_back_as_the_same_format(fmt):
    args = fmt.args()
    assert (from_args(args[0], "test") if args else BF16) == fmt
    qcfg = {"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": ["Linear"], "weights": args[0],
            "input_activations": args[1]}}} if args else None
    assert Scheme(qcfg).format("model.layers.0.mlp.gate_proj") == fmt


def test_split_units():
    assert [f.split_unit(0)[0] for f in FORMATS] == [1, 1, 128, 1, 8]
    assert [f.split_unit(1)[0] for f in FORMATS] == [1, 1, 128, 32, 64]
    assert "zero points" in Int4Group(64, symmetric=False).split_unit(0)[1]


@pytest.mark.parametrize("fmt", [FP8Channel(), FP8Block()], ids=str)
def test_shared_activation_quantization_equals_separate_calls(fmt):
    gen = torch.Generator().manual_seed(1)
    mods = [Linear(160, out, fmt, dtype=torch.float32, backend="triton") for out in (96, 48)]
    for m in mods:
        for k, v in m.quantize(torch.randn(m.out_features, 160, generator=gen)).items():
            m.tensors()[k].copy_(v)
    x = torch.randn(2, 20, 160, generator=gen)  # 40 rows: past the in-GEMM quantization of small batches
    for got, m in zip(project(x, *mods), mods, strict=True):
        assert torch.equal(got, m(x))
