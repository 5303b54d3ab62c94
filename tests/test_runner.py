"""The engine over the real model (ModelRunner): a ragged batch of greedy prompts gives each prompt's tokens
alone and transformers' generate, with or without preemption."""

from __future__ import annotations

import torch
from tiny import hf_model, make_tiny

import dsq
from dsq.engine import Engine, SamplingParams
from dsq.engine.runner import ModelRunner


def test_engine_over_the_model_equals_alone_and_transformers(tmp_path):
    path = make_tiny(tmp_path, "lite")
    net, ref = dsq.load_quantized(path, kv_cache_dtype="fp32").net, hf_model(path)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (21, 3, 12, 1)]
    params = SamplingParams(max_tokens=12)
    want = [ref.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    alone = [Engine(ModelRunner(net, 4, 16)).generate([p], params)[0].output for p in prompts]
    assert alone == want
    batched = Engine(ModelRunner(net, 16, 16), max_batch_tokens=16)  # chunked prefill mixed with decodes
    assert [r.output for r in batched.generate(prompts, params)] == want
    tight = Engine(ModelRunner(net, 4, 16))  # 4 pages: not all four requests at once
    assert [r.output for r in tight.generate(prompts, params)] == want
    assert tight.scheduler.preemptions > 0
    assert tight.pool.used == 0
