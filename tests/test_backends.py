"""backend="triton" (the kernels, interpreted on CPU) against backend="torch" (the references), end to end
on a tiny model quantized by `dsq quantize`: FP8 W8A8 projections, INT4 experts, the paged FP8/BF16 cache."""

from __future__ import annotations

import io
import shutil

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from tiny import make_tiny

import dsq
from dsq.quantize.run import quantize
from dsq.quantize.scheme import Options


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    src = make_tiny(tmp_path_factory.mktemp("src"), "v2")
    out = tmp_path_factory.mktemp("q") / "out"
    quantize(src, out, Options(), console=Console(file=io.StringIO()))
    return out


def test_triton_backend_logits_equal_torch_backend(quantized):
    ids = torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(0))
    torch_ = dsq.load_quantized(quantized, backend="torch").logits(ids)
    triton_ = dsq.load_quantized(quantized, backend="triton").logits(ids)
    assert ((triton_ - torch_).norm() / torch_.norm()).item() < 1e-5


@pytest.mark.parametrize("cache", ["fp8", "bf16"])
def test_triton_decode_through_the_cache_kernels(quantized, cache):
    """Greedy decode: cache-write and MLA-decode kernels, fused MoE decode path, FP8 GEMMs at M=2."""
    prompts = [[5, 6, 7], [8, 9]]
    want = dsq.load_quantized(quantized, backend="torch", kv_cache_dtype=cache).generate(prompts, max_new_tokens=3)
    got = dsq.load_quantized(quantized, backend="triton", kv_cache_dtype=cache).generate(prompts, max_new_tokens=3)
    assert got == want


def test_quantize_on_load_equals_dsq_quantize(quantized, tmp_path):
    """load_quantized(quantize="fp8-int4") makes, tensor by tensor, what `dsq quantize` writes (from a BF16
    source, as published checkpoints are: the quantizer stores the unquantized tensors in BF16)."""
    src = make_tiny(tmp_path / "fp32", "v2")
    bf16 = tmp_path / "bf16"
    shutil.copytree(src, bf16)
    save_file({k: v.bfloat16() for k, v in load_file(src / "model.safetensors").items()}, bf16 / "model.safetensors",
              metadata={"format": "pt"})
    quantize(bf16, tmp_path / "q", Options(), console=Console(file=io.StringIO()))
    offline = dsq.load_quantized(tmp_path / "q")
    online = dsq.load_quantized(bf16, quantize="fp8-int4")
    on = dict(online.net.state_dict())
    for name, t in offline.net.state_dict().items():
        assert torch.equal(t, on[name]), name
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(online.logits(ids), offline.logits(ids))
    with pytest.raises(dsq.DsqError, match="already quantized"):
        dsq.load_quantized(quantized, quantize="fp8-int4")
