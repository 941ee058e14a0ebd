"""Block pool, prefix cache, encoder cache and scheduler invariants of the engine."""

from __future__ import annotations

import pytest

from engine_cases import case, reference, run
from llava_next.engine.block_pool import BlockPool, hash_block
from llava_next.engine.llm_engine import LLMEngine
from llava_next.engine.scheduler import Scheduler
from llava_next.sampling.params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


def test_block_pool_refcounts_lru_and_conservation():
    pool = BlockPool(4, 2)
    a = pool.allocate(2)
    b = pool.allocate(2)
    assert pool.num_free == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.register(a[0], b"h0")
    pool.register(a[1], b"h1")
    pool.touch(pool.lookup([b"h0", b"h1", b"h2"]))  # shared by a second holder
    assert pool.ref_count[a[0]] == 2
    pool.release(a)
    assert pool.num_free == 0  # still referenced once
    pool.release(a)
    pool.release(b)
    assert pool.num_free == 4 and pool.lookup([b"h0", b"h1"]) == a  # freed blocks keep their hashes
    # LRU: the first block allocated next is the least recently freed; a's tail block was queued before its head
    first = pool.allocate(1)[0]
    assert first == a[1] and pool.lookup([b"h0", b"h1"]) == [a[0]]
    pool.release([first])
    assert pool.num_allocated == pool.num_released


def test_hash_block_depends_on_parent_tokens_and_image():
    h = hash_block(None, [1, 2])
    assert h == hash_block(None, [1, 2])
    assert h != hash_block(b"x", [1, 2]) != hash_block(None, [1, 3])
    assert hash_block(None, [5, 5], (("img-a", 0),)) != hash_block(None, [5, 5], (("img-b", 0),))
    assert hash_block(None, [5, 5], (("img-a", 0),)) != hash_block(None, [5, 5], (("img-a", 2),))


@pytest.mark.parametrize("block_size", [16, 64])
def test_prefix_hits_are_counted_exactly(tiny_pair, block_size):
    model, _ = tiny_pair("mistral")
    engine = LLMEngine(model, None, block_size=block_size)
    first = case([(500, 316)], 1)
    ids = first["prompt_token_ids"]
    run(engine, [first], GREEDY)
    assert engine.stats()["prefix_cache_hit_tokens"] == 0
    # same image, same prefix, a different question after it: the common full blocks are reused
    second = dict(first, prompt_token_ids=ids[:-2] + [777, 778, 779])
    common = len(ids) - 2
    out = run(engine, [second], GREEDY)["0"]
    assert out.num_cached_tokens == (common // block_size) * block_size
    assert out.outputs[0].token_ids == reference(model, second, 4)  # a prefix hit changes no token
    # the same size but other pixels: nothing inside the image span may hit (only the text before it)
    other = case([(500, 316)], 1, image_seed=99)
    out = run(engine, [other], GREEDY)["0"]
    assert out.num_cached_tokens == (2 // block_size) * block_size == 0
    stats = engine.stats()
    assert stats["prefix_cache_hit_tokens"] == (common // block_size) * block_size
    assert stats["prefix_cache_queried_tokens"] == len(ids) + len(second["prompt_token_ids"]) + len(ids)
    # without prefix caching nothing hits
    off = LLMEngine(model, None, block_size=block_size, enable_prefix_caching=False)
    run(off, [first], GREEDY)
    assert run(off, [second], GREEDY)["0"].num_cached_tokens == 0


def test_encoder_runs_once_per_distinct_image(tiny_pair):
    model, _ = tiny_pair("mistral")
    engine = LLMEngine(model, None, enable_prefix_caching=False, max_num_batched_tokens=300)
    calls = []
    encode = model.model.encode_images

    def counting(tiles, sizes):
        calls.append(len(sizes))
        return encode(tiles, sizes)

    model.model.encode_images = counting
    try:
        same = [case([(200, 300)], s, image_seed=7) for s in (1, 2, 3)]  # one image, three questions
        other = case([(200, 300)], 4, image_seed=8)
        run(engine, same + [other], GREEDY)
    finally:
        del model.model.encode_images
    stats = engine.stats()
    assert sum(calls) == 2 and stats["images_encoded"] == 2 and stats["encoder_cache_hits"] >= 2  # lookups served: at least the 2 repeats


def test_scheduler_never_exceeds_budget_or_max_num_seqs(tiny_pair, monkeypatch):
    model, _ = tiny_pair("mistral")
    seen = []
    schedule = Scheduler.schedule

    def spy(self):
        out = schedule(self)
        seen.append((out.num_batched_tokens, len(self.running), len(out.scheduled)))
        return out

    monkeypatch.setattr(Scheduler, "schedule", spy)
    engine = LLMEngine(model, None, max_num_batched_tokens=64, max_num_seqs=3)
    prompts = [case([], s) for s in range(6)] + [case([(336, 336)], 9)]
    run(engine, prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert max(t for t, _, _ in seen) <= 64
    assert max(r for _, r, _ in seen) == 3  # the cap was reached, never passed
    assert max(s for _, _, s in seen) <= 3
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_allocated"] == stats["kv_blocks_released"]


def test_encoder_cache_at_capacity_keeps_images_until_prefilled(tiny_pair):
    """A cache of one feature row (always over capacity), two images each prefilled over several 256-token chunks:
    an image still referenced by a sequence that has not prefilled it must never be evicted (it would be encoded
    again for its next chunk), while every released one goes at once."""
    model, _ = tiny_pair("mistral")
    engine = LLMEngine(model, None, enable_prefix_caching=False, max_num_batched_tokens=256, max_num_seqs=2,
                       encoder_cache_tokens=1)
    prompts = [case([(200, 300)], 1, image_seed=7), case([(300, 200)], 2, image_seed=8)]
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    outs, sizes = {}, []
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        outs.update((out.request_id, out) for out in engine.step() if out.finished)
        sizes.append(engine.stats()["encoder_cache_entries"])
    assert engine.stats()["images_encoded"] == 2  # each image once, though the cache is always "full"
    assert max(sizes) == 1  # a held image stays though it is over the capacity of one row
    stats = engine.stats()
    assert stats["encoder_cache_entries"] == 0 and not stats["encoder_cache_held"]  # all released, evicted
    for i, prompt in enumerate(prompts):
        assert outs[str(i)].outputs[0].token_ids == reference(model, prompt, 4)
