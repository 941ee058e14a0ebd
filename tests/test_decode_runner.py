"""The decode runner's static (CUDA-graph) step and the image-feature cache, checked on the CPU.

The static step is what the GPU captures into a graph; run eagerly here it must give the same logits as
the dynamic step, for padded batches and sliding windows too. The feature cache must never change results.
"""

from __future__ import annotations

import pytest
import torch

from llava_next.model.anyres import AnyresGeometry
from llava_next.generation.prefill import Prefill
from llava_next.compat.modeling import LlavaNextForConditionalGeneration
from llava_next.model.layers import KERNELS, rms_norm
from tiny import IMAGE_TOKEN, save_tiny


def _padded_batch():
    rows = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13], [1, 14, 15, 16, 17]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_static_step_equals_dynamic_step(tmp_path):
    """The runner's two decode steps, called as generate() calls them: "eager" (the filled slots of a fresh
    cache) and "static" (a pooled cache read over all its slots, masked: what the GPU captures as a graph)."""
    # A sliding window shorter than the sequence exercises the window mask of the static step.
    folder, _ = save_tiny(tmp_path / "m", "mistral", text_overrides=dict(sliding_window=6))
    model = LlavaNextForConditionalGeneration.from_pretrained(folder)
    ids, mask = _padded_batch()
    with torch.inference_mode():
        runs = []
        for mode in ("eager", "static"):
            runner = model.decode_runner(mode=mode)
            prefill = Prefill(model, ids, mask, None, None, None, extra_slots=8)
            cache, logits, position = prefill.cache, prefill.logits, prefill.next_position
            assert cache.max_len % 512 == 0 and (mode == "static") == any(c is cache for c, _ in runner._pool.values())
            out = []
            for _ in range(6):
                tokens = logits.argmax(-1)
                logits = runner.step(tokens, position, cache)
                position = position + 1
                out.append(logits)
            assert cache.length == ids.shape[1] + 6  # the runner claimed one slot per step
            runs.append(torch.stack(out))
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
    assert (cache.hits, cache.misses) == (2, 1)
    # A different image of the same size is a miss, not a collision.
    other = pixels.clone()
    other[0, 0, 0, 0, 0] += 1.0
    with torch.inference_mode():
        model.model.get_image_features(other, torch.tensor([[h, w]]))
    assert cache.misses == 2
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
    remembered_cache = engine._last[1]
    second = model.generate(input_ids=turn2, max_new_tokens=6, reuse_prefix=True, **image)
    assert engine._last[1] is remembered_cache  # the cache was continued, not rebuilt
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
    assert cache.misses == 2
    state = {k: v + 0.01 for k, v in reference.state_dict().items() if "vision_tower" in k}
    reference.load_state_dict(state, strict=False)
    ours = {k.replace("model.vision_tower.vision_model.", "model.vision_tower."): v for k, v in state.items()}
    missing_vision = [k for k in ours if k not in model.state_dict()]
    model.load_state_dict({k: v for k, v in ours.items() if k not in missing_vision}, strict=False)
    with torch.no_grad():
        model.model.image_newline.add_(0.5)
        reference.model.image_newline.add_(0.5)
    logits_match()
    assert cache.misses == 3
    logits_match()  # unchanged weights: served from the cache
    assert cache.hits >= 1 and cache.misses == 3
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


def test_static_kv_cache_slots_rows_and_truncation():
    """StaticKVCache's own bookkeeping, through its methods: reserve, row_view + filled, reorder, truncate."""
    from llava_next.generation.kv_cache import StaticKVCache

    cache = StaticKVCache(num_layers=1, batch=2, num_kv_heads=1, max_len=8, head_dim=2, dtype=torch.float32,
                          device="cpu")
    slots = cache.reserve(3, torch.tensor([[False, True, True], [True, True, True]]))
    assert slots.tolist() == [0, 1, 2] and cache.length == 3 and cache.has_padding
    k = torch.arange(12.0).view(2, 1, 3, 2)
    keys, _ = cache.write(0, slots, k, -k)
    assert torch.equal(keys, k)  # the filled part only
    row = cache.row_view(slice(1, 2), 3)  # row 1 alone, from slot 3 on
    row_slots = row.reserve(2)
    row.write(0, row_slots, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    cache.filled(5)
    assert cache.key_valid[1].tolist() == [True] * 5 + [False] * 3 and torch.equal(cache.keys[0, 1, 0, 3:5], torch.ones(2, 2))
    assert cache.key_valid[0, 3:5].tolist() == [False, False]  # the other row was not touched
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.keys[0, 0, :, :5], cache.keys[0, 1, :, :5]) and cache.key_valid[0].tolist() == cache.key_valid[1].tolist()
    cache.truncate(2)
    assert cache.length == 2 and not cache.key_valid[:, 2:].any()
    with pytest.raises(RuntimeError, match="KV cache full"):
        cache.reserve(7)
