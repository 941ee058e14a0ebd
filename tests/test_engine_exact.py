"""Greedy tokens through the engine equal our generate() (and so transformers) on each request alone.

A mixed set per backbone (several image sizes, two images in one prompt, text only), submitted at once and
staggered, block sizes 16 and 64, a token budget small enough to cut chunks inside image spans, a KV pool
small enough to force preemption by recompute.
"""

from __future__ import annotations

import pytest

from engine_cases import MIXED, case, reference, run
from llava_next.engine.llm_engine import LLMEngine
from llava_next.engine.scheduler import Scheduler
from llava_next.sampling.params import SamplingParams
from tiny import BACKBONES

NEW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW)


def _check_all(model, done, prompts):
    for i, prompt in enumerate(prompts):
        got = done[str(i)].outputs[0].token_ids
        want = reference(model, prompt, NEW)
        assert got == want, f"request {i}: engine {got} != generate {want}"


@pytest.mark.parametrize("backbone", BACKBONES)
def test_mixed_batch_at_once_matches_generate(tiny_pair, backbone):
    model, _ = tiny_pair(backbone)
    prompts = [case(sizes, seed) for sizes, seed in MIXED]
    engine = LLMEngine(model, None, block_size=16)
    _check_all(model, run(engine, prompts, GREEDY), prompts)
    assert engine.stats()["kv_blocks_used"] == 0  # every block came back


@pytest.mark.parametrize("block_size,budget,stagger", [(16, 97, 3), (64, 256, 2), (64, 4096, 1)])
def test_chunked_and_staggered_matches_generate(tiny_pair, monkeypatch, block_size, budget, stagger):
    model, _ = tiny_pair("mistral")
    prompts = [case(sizes, seed) for sizes, seed in MIXED]
    cut_inside_image = []
    schedule = Scheduler.schedule

    def spy(self):
        out = schedule(self)
        assert out.num_batched_tokens <= self.max_num_batched_tokens
        for seq, start, n in out.scheduled:
            end = start + n
            if end < seq.num_tokens and any(im.offset < end < im.end for im in seq.images):
                cut_inside_image.append(end)
        return out

    monkeypatch.setattr(Scheduler, "schedule", spy)
    engine = LLMEngine(model, None, block_size=block_size, max_num_batched_tokens=budget)
    _check_all(model, run(engine, prompts, GREEDY, stagger=stagger), prompts)
    if budget < 1000:
        assert cut_inside_image, "the budget should have cut a chunk inside an image"
    assert engine.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("backbone", ["qwen2", "llama"])
def test_preemption_by_recompute_is_exact(tiny_pair, backbone):
    model, _ = tiny_pair(backbone)
    prompts = [case(sizes, seed) for sizes, seed in MIXED]
    # The largest request (two images, ~3,100 tokens) needs ~195 blocks of 16: 260 blocks hold it alone, never all.
    engine = LLMEngine(model, None, block_size=16, num_kv_blocks=260, max_num_batched_tokens=512)
    _check_all(model, run(engine, prompts, GREEDY), prompts)
    stats = engine.stats()
    assert stats["num_preemptions"] > 0
    assert stats["kv_blocks_used"] == 0
    assert stats["kv_blocks_allocated"] == stats["kv_blocks_released"]


def test_sliding_window_is_respected(tiny_pair):
    """Mistral with a 300-token window: prompts of 1,500-3,100 tokens, chunks of 128, decodes past the window."""
    model, _ = tiny_pair("mistral", text_overrides={"sliding_window": 300})
    assert set(model.model.language_model.windows) == {300}
    prompts = [case(sizes, seed) for sizes, seed in MIXED[:3]]
    engine = LLMEngine(model, None, block_size=16, max_num_batched_tokens=128)
    _check_all(model, run(engine, prompts, GREEDY, stagger=2), prompts)
