"""A lone sequence's one-token step or prompt from position 0 without a host plan
(engine/attention_metadata.LoneSequence): it writes and reads exactly what the general step (plan_step +
StepAttention.build) does, falls back to it for a continuing chunk, blocks that are not consecutive or a
sliding window that cuts, and generate() at batch 1 (right-padded too) and a one-request engine take it and
still match transformers / generate()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_cases import case, reference, run

from llava_next.engine import model_runner
from llava_next.engine.attention_metadata import (
    LoneSequence,
    PagedKVCache,
    StepAttention,
    plan_step,
)
from llava_next.engine.llm_engine import LLMEngine
from llava_next.sampling.params import SamplingParams

BS, NUM_BLOCKS, HKV, H, HD = 4, 12, 2, 4, 8


def _cache(seed: int) -> PagedKVCache:
    cache = PagedKVCache(2, NUM_BLOCKS, BS, HKV, HD, torch.float32, "cpu")
    g = torch.Generator().manual_seed(seed)
    cache.keys.copy_(torch.randn(cache.keys.shape, generator=g))
    cache.values.copy_(torch.randn(cache.values.shape, generator=g))
    return cache


@pytest.mark.parametrize("blocks,start,n", [([3], 0, 1), ([3], 2, 1), ([3, 4], 4, 1), ([5, 6, 7], 9, 1),
                                            ([5, 6, 7], 11, 1), ([0, 1, 2, 9], 10, 1), ([3], 0, 3),
                                            ([5, 6, 7], 0, 10), ([5, 6, 7, 8], 0, 12)])
def test_lone_sequence_writes_and_reads_what_the_step_plan_does(blocks, start, n):
    g = torch.Generator().manual_seed(start + 7 * n)
    q = torch.randn(1, H, n, HD, generator=g)
    k, v = torch.randn(2, 1, HKV, n, HD, generator=g)
    lone_cache, plan_cache = _cache(1), _cache(1)
    lone = LoneSequence.of(lone_cache, [None], start, n, blocks)
    assert lone is not None and lone.slot - lone.first == start
    decodes = 1 if n == 1 else 0
    plan = plan_step(np.array([start]), np.array([n]), [blocks], BS, NUM_BLOCKS, [None], decodes, np.array([n - 1]))
    meta, positions, _, _ = StepAttention.build(plan_cache, [None], plan, "cpu")
    assert positions.tolist() == list(range(start, start + n))
    for layer in (0, 1):
        out = lone.attend(layer, q, k, v, None, 0.3, "sdpa")
        assert torch.equal(out, meta.attend(layer, q, k, v, None, 0.3, "sdpa"))
    assert torch.equal(lone_cache.keys, plan_cache.keys) and torch.equal(lone_cache.values, plan_cache.values)


def test_lone_sequence_falls_back_for_a_continuing_chunk_scattered_blocks_or_a_cutting_window():
    cache = _cache(0)
    assert LoneSequence.of(cache, [None], 9, 1, [5, 7, 6]) is None  # not consecutive
    assert LoneSequence.of(cache, [None], 9, 1, [7, 6, 5]) is None
    assert LoneSequence.of(cache, [None], 3, 1, [7, 2]) is not None  # only the blocks holding keys 0..start count
    assert LoneSequence.of(cache, [8], 9, 1, [5, 6, 7]) is None  # a sliding window of 8 cuts 10 keys
    assert LoneSequence.of(cache, [None, 16], 9, 1, [5, 6, 7]) is not None
    assert LoneSequence.of(cache, [None], 4, 3, [5, 6]) is None  # a chunk from position 4 needs an offset mask
    assert LoneSequence.of(cache, [None], 0, 7, [5, 6]) is not None


def _count_plans(monkeypatch) -> list:
    plans = []
    original = model_runner.plan_step
    monkeypatch.setattr(model_runner, "plan_step",
                        lambda *a, **k: plans.append((a[0].tolist(), a[1].tolist())) or original(*a, **k))
    return plans


@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_at_batch_one_runs_without_a_step_plan(tiny_pair, monkeypatch, side):
    """A 40-token prompt (three blocks of 16) and 12 new tokens: the prefill and every decode step are a
    LoneSequence, with the right-padded row's mask-derived RoPE positions (transformers' generate) too."""
    ours, hf = tiny_pair("mistral")
    g = torch.Generator().manual_seed(5)
    real = [1] + torch.randint(100, 30000, (39,), generator=g).tolist()
    ids = torch.tensor([[0, 0] + real if side == "left" else real + [0, 0]])
    mask = torch.tensor([[0, 0] + [1] * 40 if side == "left" else [1] * 40 + [0, 0]])
    plans = _count_plans(monkeypatch)
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert plans == []
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                               do_sample=False, pad_token_id=0)
    assert torch.equal(out, expected)


def test_one_request_engine_runs_without_a_step_plan(tiny_pair, monkeypatch):
    ours, _ = tiny_pair("mistral")
    prompt = case([(500, 316)], 1)
    want = reference(ours, prompt, 10)
    plans = _count_plans(monkeypatch)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    out = run(LLMEngine(ours, None, block_size=4), [prompt], params)
    assert out["0"].outputs[0].token_ids == want
    assert plans == []  # its prompt in one chunk from position 0, then nine decode steps
    chunked = run(LLMEngine(ours, None, block_size=4, max_num_batched_tokens=512), [prompt], params)
    assert chunked["0"].outputs[0].token_ids == want
    assert plans and all(start[0] > 0 and n[0] > 1 for start, n in plans)  # continuing chunks only
