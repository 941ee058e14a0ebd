"""generate()'s runner (compat/paged_rows.py: the engine's ModelRunner over a paged pool) and the image-feature
cache, checked on the CPU.

The static step is what the GPU captures into a graph; run eagerly here it must give the same logits as
the dynamic step, for padded batches and sliding windows too. Block tables grow, fork (beam search: shared
full blocks, copied partial blocks) and go back to the pool. The feature cache must never change results.
"""

from __future__ import annotations

import pytest
import torch
from tiny import IMAGE_TOKEN, save_tiny

from llava_next.compat.modeling import LlavaNextForConditionalGeneration
from llava_next.compat.paged_rows import BLOCK_SIZE, prefill
from llava_next.model.anyres import AnyresGeometry
from llava_next.model.layers import KERNELS, rms_norm


def _padded_batch():
    rows = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13], [1, 14, 15, 16, 17]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_static_step_equals_dynamic_step(tmp_path):
    """The runner's two decode steps, called as generate() calls them: "eager" (each step at its own shapes)
    and "static" (padded to a batch and key-length bucket, static buffers: what the GPU captures as a graph)."""
    # A sliding window shorter than the sequence exercises the window mask of the static step.
    folder, _ = save_tiny(tmp_path / "m", "mistral", text_overrides=dict(sliding_window=6))
    model = LlavaNextForConditionalGeneration.from_pretrained(folder)
    ids, mask = _padded_batch()
    with torch.inference_mode():
        runs = []
        for mode in ("eager", "static"):
            runner = model.decode_runner(mode=mode)
            rows, logits = prefill(runner, model.model.embed(ids), mask, 8, False, True)
            out = []
            for _ in range(6):
                tokens = logits.argmax(-1)
                logits = rows.decode(tokens)
                out.append(logits)
            assert rows.lengths.tolist() == (mask.sum(1) + 6).tolist()  # one slot per step, padding stripped
            assert (mode == "static") == bool(runner.runner.steps)  # the bucketed static step ran
            runs.append(torch.stack(out))
            rows.release()
            assert runner.pool.num_free == runner.pool.num_blocks
        model.decode_runner(mode=None)
    assert torch.allclose(runs[0], runs[1], atol=1e-5, rtol=0), (runs[0] - runs[1]).abs().max()


def test_feature_cache_reuses_images_without_changing_results(tmp_path):
    folder, reference = save_tiny(tmp_path / "m", "mistral")
    model = LlavaNextForConditionalGeneration.from_pretrained(folder)
    geometry = AnyresGeometry()
    h, w = 300, 500
    pixels = torch.randn(1, geometry.num_tiles(h, w), 3, 336, 336)
    image_tokens = [IMAGE_TOKEN] * geometry.num_image_tokens(h, w)
    for question in range(3):
        ids = torch.tensor([[1, 40 + question] + image_tokens + [50, 60 + question]])
        kwargs = dict(input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([[h, w]]), max_new_tokens=8)
        assert torch.equal(model.generate(**kwargs), reference.generate(**kwargs))
    cache = model.model.feature_cache
    assert (cache.num_hits, cache.num_encoded) == (2, 1)
    # A different image of the same size is a miss, not a collision.
    other = pixels.clone()
    other[0, 0, 0, 0, 0] += 1.0
    with torch.inference_mode():
        model.model.get_image_features(other, torch.tensor([[h, w]]))
    assert cache.num_encoded == 2
    # Under autograd the cache is bypassed, so gradients reach the vision tower.
    with torch.enable_grad():
        model.model.vision_tower.embeddings.patch_embedding.weight.requires_grad_(True)
        feats = model.model.get_image_features(pixels, torch.tensor([[h, w]]))
        feats[0].sum().backward()
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad is not None


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_prefix_reuse_continues_a_conversation_exactly(tmp_path, mode):
    folder, reference = save_tiny(tmp_path / "m", "llama")
    model = LlavaNextForConditionalGeneration.from_pretrained(folder)
    model.decode_runner(mode=mode)  # "static": the pooled GPU-path caches
    _two_turns(model, reference)


def _two_turns(model, reference):
    geometry = AnyresGeometry()
    h, w = 400, 300
    pixels = torch.randn(1, geometry.num_tiles(h, w), 3, 336, 336)
    image = dict(pixel_values=pixels, image_sizes=torch.tensor([[h, w]]))
    turn1 = torch.tensor([[1, 40] + [IMAGE_TOKEN] * geometry.num_image_tokens(h, w) + [50, 60]])
    first = model.generate(input_ids=turn1, max_new_tokens=6, reuse_prefix=True, **image)
    assert torch.equal(first, reference.generate(input_ids=turn1, max_new_tokens=6, **image))
    turn2 = torch.cat([first, torch.tensor([[70, 80, 90]])], dim=1)  # the answer, then a new question
    engine = model.decode_runner()
    remembered_rows = engine._last[1]
    calls = []
    forward = engine.runner.forward
    engine.runner.forward = lambda starts, *a, **k: calls.append(starts.tolist()) or forward(starts, *a, **k)
    second = model.generate(input_ids=turn2, max_new_tokens=6, reuse_prefix=True, **image)
    del engine.runner.forward
    assert engine._last[1] is remembered_rows  # the blocks were continued, not rebuilt
    assert calls[0] == [turn1.shape[1] + 5]  # the prefill starts after the first turn (its last token is new)
    expected = reference.generate(input_ids=turn2, max_new_tokens=6, **image)
    assert torch.equal(second, expected)
    # A different image under the same placeholders must not reuse the old keys and values.
    other = dict(image, pixel_values=pixels + 1.0)
    third = model.generate(input_ids=turn2, max_new_tokens=6, reuse_prefix=True, **other)
    assert torch.equal(third, reference.generate(input_ids=turn2, max_new_tokens=6, **other))


def test_fused_projections_keep_logits(tmp_path):
    folder, reference = save_tiny(tmp_path / "m", "qwen2")  # q/k/v bias exercises the fused bias too
    model = LlavaNextForConditionalGeneration.from_pretrained(folder)
    ids, mask = _padded_batch()
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=mask).logits
        model.model.language_model.fuse_projections()
        assert model.model.language_model.layers[0].self_attn.qkv_proj is not None
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8),
                       reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8))


def test_static_engine_with_compiled_kernels_matches_transformers(tmp_path):
    """The GPU decode path (pooled static cache, fused projections, torch.compile'd kernels), minus the CUDA
    graph itself, run on the CPU: a padded batch with images must still give transformers' tokens."""
    folder, reference = save_tiny(tmp_path / "m", "mistral", text_overrides=dict(sliding_window=700))
    model = LlavaNextForConditionalGeneration.from_pretrained(folder)
    runner = model.decode_runner(mode="static")
    assert runner.kernels["rms_norm"] is not rms_norm  # compiled, for this runner only
    assert KERNELS["rms_norm"] is rms_norm  # the shared table is untouched
    geometry = AnyresGeometry()
    sizes = [(300, 500), (336, 336)]
    rows = [[1, 7] + [IMAGE_TOKEN] * geometry.num_image_tokens(h, w) + [8, 9] for h, w in sizes] + [[1, 5, 6]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    tiles = [geometry.num_tiles(h, w) for h, w in sizes]
    pixels = torch.zeros(2, max(tiles), 3, 336, 336)
    for i, n in enumerate(tiles):
        pixels[i, :n] = torch.randn(n, 3, 336, 336)
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=torch.tensor(sizes),
                  max_new_tokens=12)
    assert torch.equal(model.generate(**kwargs), reference.generate(**kwargs))
    assert model.model.language_model.layers[0].mlp.gate_up_proj is not None  # the fused path ran


def test_a_second_static_engine_on_a_fused_model_still_matches_transformers(tmp_path):
    """Engines are rebuilt (another mode, another device); fusing the projections again must be a no-op."""
    folder, reference = save_tiny(tmp_path / "m", "mistral")
    model = LlavaNextForConditionalGeneration.from_pretrained(folder)
    ids, mask = _padded_batch()
    expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8)
    for _ in range(2):
        model.decode_runner(mode="static")
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8), expected)


def _image_prompt(h: int, w: int, question: int = 0):
    geometry = AnyresGeometry()
    pixels = torch.randn(1, geometry.num_tiles(h, w), 3, 336, 336)
    ids = torch.tensor([[1, 40 + question] + [IMAGE_TOKEN] * geometry.num_image_tokens(h, w) + [50, 60]])
    return dict(input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([[h, w]]))


def test_feature_cache_follows_weight_changes(tmp_path):
    """Cached image features belong to the weights that made them: edits in place, load_state_dict and a
    cast must re-encode the image, so logits stay equal to transformers' after the same change."""
    folder, reference = save_tiny(tmp_path / "m", "mistral")
    model = LlavaNextForConditionalGeneration.from_pretrained(folder)
    inputs = _image_prompt(300, 500)
    cache = model.model.feature_cache

    def logits_match():
        with torch.inference_mode():
            ours, theirs = model(**inputs).logits, reference(**inputs).logits
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()

    logits_match()  # fills the cache
    with torch.no_grad():  # in place, on both models
        model.model.multi_modal_projector.linear_2.weight.mul_(1.5)
        reference.model.multi_modal_projector.linear_2.weight.mul_(1.5)
    logits_match()
    assert cache.num_encoded == 2
    state = {k: v + 0.01 for k, v in reference.state_dict().items() if "vision_tower" in k}
    reference.load_state_dict(state, strict=False)
    ours = {k.replace("model.vision_tower.vision_model.", "model.vision_tower."): v for k, v in state.items()}
    missing_vision = [k for k in ours if k not in model.state_dict()]
    model.load_state_dict({k: v for k, v in ours.items() if k not in missing_vision}, strict=False)
    with torch.no_grad():
        model.model.image_newline.add_(0.5)
        reference.model.image_newline.add_(0.5)
    logits_match()
    assert cache.num_encoded == 3
    logits_match()  # unchanged weights: served from the cache
    assert cache.num_hits >= 1 and cache.num_encoded == 3
    model.to(torch.float64)  # a cast makes new tensors: the float32 features must not be reused
    with torch.inference_mode():
        cast = model(**inputs).logits
        cache.clear()
        fresh = model(**inputs).logits
    assert cast.dtype == torch.float64 and torch.equal(cast, fresh)


def test_prefix_reuse_is_dropped_when_decoder_weights_change(tmp_path):
    folder, reference = save_tiny(tmp_path / "m", "llama")
    model = LlavaNextForConditionalGeneration.from_pretrained(folder)
    inputs = _image_prompt(400, 300)
    first = model.generate(**inputs, max_new_tokens=6, reuse_prefix=True)
    with torch.no_grad():
        model.model.language_model.layers[0].mlp.down_proj.weight.mul_(-1.0)
        reference.model.language_model.layers[0].mlp.down_proj.weight.mul_(-1.0)
    turn2 = dict(inputs, input_ids=torch.cat([first, torch.tensor([[70, 80, 90]])], dim=1))
    assert torch.equal(model.generate(**turn2, max_new_tokens=6, reuse_prefix=True),
                       reference.generate(**turn2, max_new_tokens=6))


def test_block_tables_grow_fork_copy_on_write_and_return_to_the_pool(tmp_path):
    """Rows' bookkeeping through its methods: prefill allocates, decode grows at block boundaries, fork shares
    full blocks and copies a partial one only for a parent's second child, truncate and release free blocks."""
    folder, _ = save_tiny(tmp_path / "m", "llama")
    model = LlavaNextForConditionalGeneration.from_pretrained(folder)
    runner = model.decode_runner()
    ids = torch.tensor([[1] + list(range(5, 5 + BLOCK_SIZE + 3))] * 2)  # 20 tokens: one full block + 4
    with torch.inference_mode():
        rows, logits = prefill(runner, model.model.embed(ids), None, 30, False, True)
        pool = runner.pool
        assert [len(t) for t in rows.tables] == [2, 2] and pool.num_used == 4
        rows.decode(logits.argmax(-1))
        rows.fork([1, 1])  # both beams continue row 1: the full block shared, the partial block copied once
        full, partial = rows.tables[0][0], rows.tables[0][1]
        assert rows.tables[1][0] == full and rows.tables[1][1] != partial
        assert pool.ref_count[full] == 2 and pool.num_used == 3  # row 0's two blocks went back, one copy made
        bs = BLOCK_SIZE
        cache = runner.cache
        src, dst = slice(partial * bs, partial * bs + 5), slice(rows.tables[1][1] * bs, rows.tables[1][1] * bs + 5)
        assert torch.equal(cache.keys[:, :, src], cache.keys[:, :, dst])  # the copy holds the parent's keys
        after = rows.decode(logits.argmax(-1))
        assert torch.equal(after[0], after[1])  # two identical beams: identical next logits
        rows.fork([0, 1])  # nobody moved: no copy
        assert pool.num_used == 3
        rows.truncate(10)
        assert [len(t) for t in rows.tables] == [1, 1] and rows.lengths.tolist() == [10, 10] and pool.num_used == 1
        rows.release()
        assert pool.num_free == pool.num_blocks


def test_engine_caches_follow_weight_changes(tmp_path):
    """The engine's encoder cache and prefix cache belong to the weights that filled them: after an in-place
    edit the same prompt is encoded again, hits no block, and still gives generate()'s tokens."""
    from engine_cases import case, run

    from llava_next.engine.llm_engine import LLMEngine
    from llava_next.sampling.params import SamplingParams

    folder, _ = save_tiny(tmp_path / "m", "mistral")
    model = LlavaNextForConditionalGeneration.from_pretrained(folder)
    engine = LLMEngine(model, None, block_size=16)
    prompt = case([(500, 316)], 1)
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    run(engine, [prompt], greedy)
    again = run(engine, [prompt], greedy)["0"]
    assert again.num_cached_tokens > 0 and engine.stats()["images_encoded"] == 1  # both caches hit
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.weight.mul_(1.5)
        model.model.language_model.layers[0].mlp.down_proj.weight.mul_(-1.0)
    out = run(engine, [prompt], greedy)["0"]
    assert out.num_cached_tokens == 0 and engine.stats()["images_encoded"] == 2
    image = prompt["multi_modal_data"]["image"][0]
    expected = model.generate(input_ids=torch.tensor([prompt["prompt_token_ids"]]), max_new_tokens=4,
                              pixel_values=image["pixel_values"][None], image_sizes=torch.tensor([image["image_size"]]))
    assert out.outputs[0].token_ids == expected[0, len(prompt["prompt_token_ids"]):].tolist()


def test_a_failed_call_leaves_no_blocks_behind(tmp_path, monkeypatch):
    """A call that fails after its prefill (here: the first token choice) holds blocks it never gives back;
    the next call still finds every block free and matches transformers."""
    import llava_next.compat.generate as generate_module

    folder, reference = save_tiny(tmp_path / "m", "llama")
    model = LlavaNextForConditionalGeneration.from_pretrained(folder)
    ids = torch.tensor([[1] + list(range(5, 60))])
    model.generate(input_ids=ids, max_new_tokens=4)
    pool_blocks = model.decode_runner().pool.num_blocks

    def boom(*args, **kwargs):
        raise RuntimeError("token choice failed")

    monkeypatch.setattr(generate_module, "_token_picker", boom)
    with pytest.raises(RuntimeError, match="token choice failed"):
        model.generate(input_ids=ids, max_new_tokens=4)
    assert model.decode_runner().pool.num_used > 0  # the failed call's prefill blocks
    monkeypatch.undo()
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=400),
                       reference.generate(input_ids=ids, max_new_tokens=400))
    runner = model.decode_runner()
    assert runner.pool.num_free == runner.pool.num_blocks and runner.pool.num_blocks == pool_blocks
