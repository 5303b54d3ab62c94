"""naive_qk (kernels/mla_prefill.py) against its torch reference: bit-exact, since both copy the nope dims and
rope the pairs with the same fp32 ops in the same order (FMA contraction off) and round once."""

from __future__ import annotations

import pytest
import torch

from dsq.kernels.mla_prefill import naive_qk
from dsq.rope import naive_qk_ref

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
CUDA = torch.cuda.is_available()


def _inputs(t: int, s: int, h: int, p: int, r: int, v: int, dtype: torch.dtype, device: str = "cpu"):
    """Views shaped as dsq.model.MLA makes them: q rows of the joined q + kv_a GEMM's output, k_nope a split of
    kv_b's [S, H, P+V] output, k_pe the last columns of kv_a's rows; cos/sin scaled as YaRN scales them."""
    gen = torch.Generator().manual_seed(t * 1000 + s)
    q_out = (torch.randn(t, h * (p + r) + 40, generator=gen) * 3).to(dtype)
    q = q_out[:, :h * (p + r)].view(t, h, p + r)
    k_nope = torch.randn(s, h, p + v, generator=gen).to(dtype)[..., :p]
    k_pe = torch.randn(s, 24 + r, generator=gen).to(dtype)[:, 24:]
    angle = torch.randint(0, 9000, (t, 1), generator=gen).float() * torch.rand(r // 2, generator=gen)
    cos, sin = angle.cos() * 1.2, angle.sin() * 1.2
    return [x.to(device) for x in (q, k_nope, k_pe, cos, sin)]


@pytest.mark.skipif(CUDA, reason="interpreter test; the gpu test covers CUDA")
@pytest.mark.parametrize(("t", "s", "h", "p", "r", "v"), [
    (1, 1, 1, 16, 16, 16),
    (37, 37, 3, 24, 10, 40),  # ragged P, a rope of 5 pairs, rows across two 32-row tiles
    (5, 70, 2, 128, 64, 128),  # a chunk continuing a cached prefix: T < S, V2-Lite's head dims
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_naive_qk_bit_exact(t: int, s: int, h: int, p: int, r: int, v: int, dtype: torch.dtype) -> None:
    q, k_nope, k_pe, cos, sin = _inputs(t, s, h, p, r, v, dtype)
    fresh = t == s
    qo, ko = naive_qk(q, k_nope, k_pe, cos, sin, fresh)
    want_q, want_k = naive_qk_ref(q, k_nope, k_pe, cos, sin, fresh)
    assert qo.shape == (h, t, p + r) and ko.shape == (h, s, p + r) and qo.is_contiguous() and ko.is_contiguous()
    assert torch.equal(qo, want_q) and torch.equal(ko, want_k)
    if fresh:  # the rope of k was applied (a kernel that skipped it would copy k_pe unchanged)
        assert not torch.equal(ko[0, :, p:], k_pe)


def test_naive_qk_refuses_a_roped_key_of_another_length() -> None:
    q, k_nope, k_pe, cos, sin = _inputs(3, 8, 2, 16, 16, 16, torch.float32)
    with pytest.raises(AssertionError, match="fresh chunk"):
        naive_qk(q, k_nope, k_pe, cos, sin, rope_k=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("t", "s"), [(512, 512), (64, 4096)])
def test_gpu_naive_qk_bit_exact(t: int, s: int) -> None:
    """V2-Lite's heads and dims, a fresh 512-token chunk and one continuing a 4K prefix."""
    q, k_nope, k_pe, cos, sin = _inputs(t, s, 16, 128, 64, 128, torch.bfloat16, "cuda")
    qo, ko = naive_qk(q, k_nope, k_pe, cos, sin, t == s)
    want_q, want_k = naive_qk_ref(q, k_nope, k_pe, cos, sin, t == s)
    assert torch.equal(qo, want_q) and torch.equal(ko, want_k)
