"""End to end on a GPU (bench/gpu_check.sh runs these; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from tiny import make_tiny

import dsq

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("gpu"), "v2", kv_lora_rank=128, qk_rope_head_dim=64)


def test_triton_backend_matches_torch_backend_on_gpu(tiny):
    ids = torch.randint(0, 1000, (2, 33), generator=torch.Generator().manual_seed(0))
    ref = dsq.load_quantized(tiny, device="cuda", backend="torch", dtype=torch.float32).logits(ids)
    out = dsq.load_quantized(tiny, device="cuda", backend="triton", dtype=torch.float32).logits(ids)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-3


def test_decode_through_fp8_cache_kernel_matches_torch_path(tiny):
    prompts = [[5, 6, 7, 8], [9, 10]]
    gpu = dsq.load_quantized(tiny, device="cuda", dtype=torch.float32)
    cpu = dsq.load_quantized(tiny, device="cpu", dtype=torch.float32)
    out_gpu = gpu.generate(prompts, max_new_tokens=16)
    out_cpu = cpu.generate(prompts, max_new_tokens=16)
    same = sum(a == b for x, y in zip(out_gpu, out_cpu, strict=True) for a, b in zip(x, y, strict=True))
    assert same >= 0.9 * sum(len(x) for x in out_cpu)  # fp8 rounding may flip a near-tie late in a sequence


def test_graph_replay_equals_the_same_step_run_eagerly(tiny):
    """The runner captures a decode graph per bucket at start (CUDA, Triton backend). After an engine run whose
    decodes replayed bucket 4, the same step run eagerly from the graph's static inputs gives bit-equal logits:
    the same kernels on the same inputs, so what the capture recorded is the step."""
    from dsq.engine import Engine, SamplingParams
    from dsq.engine.runner import ModelRunner

    runner = ModelRunner(dsq.load_quantized(tiny, device="cuda").net, 8, 64, max_batch=4)
    assert sorted(runner.graphs) == [1, 2, 4]
    engine = Engine(runner)
    reqs = [engine.add_request(p, SamplingParams(max_tokens=8)) for p in ([5, 6, 7, 8], [9, 10], [11])]
    while engine.requests:
        engine.step()
    assert all(len(r.output) == 8 for r in reqs)
    decoder = runner.graphs[4]
    replayed = decoder.logits[:3].clone()
    with torch.inference_mode():
        assert torch.equal(decoder._step()[:3], replayed)
