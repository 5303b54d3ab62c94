"""The on-disk number formats (dsq/quant.py) against compressed-tensors' own packing."""

from __future__ import annotations

import pytest
import torch

from dsq import quant


def test_int4_pack_paths_agree_with_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = torch.randint(-8, 8, (24, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    fast = quant.int4_pack(q)  # the int16-view path
    portable = quant.int4_pack(q.to(torch.int32))  # the shift-and-sum path
    assert torch.equal(fast, portable) and torch.equal(fast, helpers.pack_to_int32(q, 4))
    assert torch.equal(quant.int4_pack(q, dim=0), helpers.pack_to_int32(q, 4, packed_dim=0))
    assert torch.equal(quant.int4_unpack(fast, 64), q)
    assert torch.equal(quant.int4_unpack(quant.int4_pack(q, 0), 24, 0), q)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_round_trip_error_is_about_half_a_step(symmetric):
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    t = quant.int4_quantize(w, 64, symmetric)
    d = quant.int4_dequantize(t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"))
    step = t["weight_scale"].float().repeat_interleave(64, dim=1)
    # Half a step, plus what the bf16 rounding of the scale (<= 2^-8 relative) moves the group's extreme
    # value past the last level: 7.5 steps x 2^-8 = 0.03 of a step.
    assert ((d - w).abs() <= 0.53 * step).all()


@pytest.mark.parametrize("block", [False, True])
def test_fp8_weight_round_trip(block):
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(2))
    q, s = quant.fp8_quantize_weight(w, block)
    assert s.shape == ((3, 2) if block else (300, 1))
    rel = ((quant.fp8_dequantize_weight(q, s) - w).norm() / w.norm()).item()
    assert rel < 0.04  # e4m3 keeps 3 mantissa bits: ~2.6% relative error on Gaussian weights
