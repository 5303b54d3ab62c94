"""The memory planner: exact weight bytes, the cache it leaves, and its refusal for a model that cannot fit."""

from __future__ import annotations

import pytest
import torch
from tiny import make_tiny

import dsq
from dsq.config import Config
from dsq.errors import DsqError
from dsq.formats import Scheme
from dsq.loader import read_config
from dsq.memory import memory_plan as plan
from dsq.memory import weight_bytes
from dsq.quantize.scheme import Options, quantization_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantize", [None, "fp8-int4"])
def test_weight_bytes_equal_the_loaded_model(tmp_path, dtype, quantize):
    path = make_tiny(tmp_path, "v2")
    net = dsq.load_quantized(path, dtype=dtype, quantize=quantize).net
    loaded = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()]) - net.inv_freq.nbytes
    scheme = Scheme(quantization_config(Options())) if quantize else None
    assert sum(weight_bytes(read_config(path)[0], scheme, dtype).values()) == loaded


def test_lite_fits_a_12_gb_card_with_32k_context():
    cfg = Config.preset("deepseek-v2-lite")
    p = plan(cfg, weights=int(9.2e9), total=int(12e9), free=int(11.8e9), utilization=0.95, need_tokens=32768,
             prefill_tokens=2048)
    assert p.cache_tokens >= 32768
    assert p.cache_per_token == 27 * 656  # FP8 layout: 656 B per token and layer


def test_refusal_says_what_is_needed_and_what_to_change():
    cfg = Config.preset("deepseek-v2")
    with pytest.raises(DsqError) as e:
        plan(cfg, weights=int(129e9), total=int(24e9), free=int(23e9), need_tokens=8192)
    msg = str(e.value)
    assert "does not fit" in msg and "129.0 GB" in msg and "24.0 GB" in msg and "--tp" in msg
    assert "\n" not in msg
    with pytest.raises(DsqError, match="INT4 routed experts"):
        plan(cfg, weights=int(470e9), total=int(141e9), free=int(141e9), int4_experts=False)


def test_generation_beyond_the_planned_cache_is_refused(tmp_path):
    """The engine's page pool is what the planner left room for: requests that fit it one at a time all run
    (they share it, queueing or preempted), one that cannot fit it even alone is refused in one sentence."""
    model = dsq.load_quantized(make_tiny(tmp_path, "lite"))
    model.net.cache_tokens = 192  # as the planner would set it on a small GPU: three pages of 64, one of them
    # the runner's scratch page (CUDA graphs' spare rows write there), so two for sequences
    assert len(model.generate([1, 2, 3], max_new_tokens=20)) == 20
    assert [len(t) for t in model.generate([[1, 2, 3]] * 2, max_new_tokens=100)] == [100, 100]
    with pytest.raises(DsqError, match=r"prompt \(3 tokens\) \+ max_tokens \(200\) needs 4 pages of 64 tokens; "
                                       r"the cache holds 2: ask for fewer tokens"):
        model.generate([1, 2, 3], max_new_tokens=200)
