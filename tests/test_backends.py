"""backend="triton" (the kernels, interpreted on CPU) against backend="torch" (the references), end to end
on a tiny model quantized by `dsq quantize`: FP8 W8A8 projections, INT4 experts, the paged FP8/BF16 cache."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
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
