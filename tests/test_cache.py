"""The paged MLA cache end to end on tiny models: FP8 against BF16 and against an ideal fake-quant."""

from __future__ import annotations

import pytest
import torch
from tiny import make_tiny

import dsq
from dsq.cache import PagedCache
from dsq.kernels.mla_cache import write_latent_cache_ref


class FakeQuantCache(PagedCache):
    """The FP8 scheme written the plain way: exact fp32 latents, then rounded to e4m3 with a scale per token
    and 128-channel group (amax / 448), and the rope part rounded to bf16."""

    def write(self, layer, pos, kv_a, norm_weight, eps, cos, sin):
        pool = self.pools[layer]
        slots = self._slots(pos)
        half = cos.shape[-1]
        write_latent_cache_ref(pool, kv_a.reshape(-1, kv_a.shape[-1]), norm_weight, eps,
                               cos.reshape(-1, half).float(), sin.reshape(-1, half).float(), slots)
        c = pool.kv.shape[-1]
        lat = pool.kv.view(-1, c)[slots].view(len(slots), -1, min(128, c))
        scale = lat.abs().amax(-1, keepdim=True) / 448.0
        pool.kv.view(-1, c)[slots] = ((lat / scale).to(torch.float8_e4m3fn).float() * scale).view(len(slots), c)
        pe = pool.pe.view(-1, pool.pe.shape[-1])
        pe[slots] = pe[slots].bfloat16().float()


def run(model, ids, cache) -> torch.Tensor:
    """Logits of every position, each attending through the cache (the absorbed path)."""
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    return model.net(ids, pos, cache, absorb=True)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("kind", ["lite", "v2"])
def test_fp8_cache_against_bf16_and_fake_quant(tmp_path, kind):
    model = dsq.load_quantized(make_tiny(tmp_path, kind), kv_cache_dtype="fp32")
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    new = lambda k: PagedCache(cfg, 4, 64, k, block_size=16)
    exact, bf16, fp8 = run(model, ids, new("fp32")), run(model, ids, new("bf16")), run(model, ids, new("fp8"))
    ideal = run(model, ids, FakeQuantCache(cfg, 4, 64, "fp32", block_size=16))
    # dsq's FP8 cache is the scheme itself: within fp32 rounding of the plain fake-quant.
    assert ((fp8 - ideal).norm() / ideal.norm()).item() < 1e-4
    # Against BF16 (BRIEF section 7: random tiny models have tiny logit margins, so top-1 is loose): measured
    # here mean KL 3e-6 (Lite-like) / 2e-5 (V2-like), top-1 0.98 / 0.96; bounds leave ~5x / 3x room.
    assert kl(bf16, fp8) < 1e-4
    assert (fp8.argmax(-1) == bf16.argmax(-1)).float().mean() > 0.85
    # BF16 itself is near exact.
    assert kl(exact, bf16) < kl(exact, fp8)


def test_pages_in_any_order_give_the_same_logits(tmp_path):
    model = dsq.load_quantized(make_tiny(tmp_path, "v2"), kv_cache_dtype="fp32")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    straight = PagedCache(model.cfg, 2, 48, "fp8", block_size=16)
    shuffled = PagedCache(model.cfg, 2, 48, "fp8", block_size=16)
    shuffled.block_table = torch.randperm(6, generator=torch.Generator().manual_seed(2)).int().view(2, 3)
    assert torch.equal(run(model, ids, straight), run(model, ids, shuffled))


def test_chunked_prefill_equals_one_pass(tmp_path):
    from dsq.generate import steps

    model = dsq.load_quantized(make_tiny(tmp_path, "lite"), kv_cache_dtype="fp32")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (23, 9, 16)]
    whole = list(steps(model.net, prompts, 12))
    assert list(steps(model.net, prompts, 12, prefill_chunk=5)) == whole
    assert list(steps(model.net, prompts, 12, prefill_chunk=8)) == whole
