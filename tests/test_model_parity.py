"""Model parity with transformers on tiny random checkpoints (fp32, CPU).

Matrix: backbone (mistral, llama, qwen2) x vision_feature_layer (int -2, a list) x pinpoints (default,
OTHER_PINPOINTS); for each, a prompt with one image, a prompt with two images of different sizes, and a
left-padded batch of 3 rows (two images of different sizes, one text-only row). Inputs are built by hand:
placeholders counted by anyres.py and checked against transformers' processor count.
"""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from llava_next.model.anyres import AnyresGeometry
from llava_next.errors import ImageTokenMismatchError
from llava_next.compat.modeling import LlavaNextForConditionalGeneration

LOGITS_ATOL = 1e-4
LOSS_ATOL = 1e-5
PAD = 0

LIST_LAYERS = {"mistral": [-2, -3], "llama": [0, -2], "qwen2": [-1, 1]}
CONFIGS = [(bb, layer, pins) for bb in tiny.BACKBONES for layer in ("int", "list") for pins in ("default", "other")]

# (H, W) pools: small sizes (576..1526 tokens) with edge cases (no unpadded rows, one column, tiny images).
SMALL = [(336, 336), (300, 200), (50, 1000), (1000, 60), (500, 316), (1, 4000), (4000, 1), (600, 200), (30, 40),
         (200, 300), (120, 900)]
# A few large cases: 2340 / 2928 tokens with the default pinpoints; 5832 (10 tiles, past mistral's 4096
# sliding window) with OTHER_PINPOINTS.
LARGE_TWO = {("mistral", "int", "other"): ((1000, 1000), (300, 200)), ("llama", "list", "default"): ((750, 1000), (1, 4000))}
LARGE_BATCH = {("qwen2", "list", "other"): ((1000, 1000), (200, 300))}
# Batches scored at every position with the loss (the rest: hidden states everywhere, logits sampled).
FULL_BATCH = {("mistral", "int", "default"), ("llama", "int", "other"), ("qwen2", "list", "default")}


def config_kwargs(backbone, layer, pins):
    return dict(vision_feature_layer=-2 if layer == "int" else LIST_LAYERS[backbone],
                pinpoints=tiny.OTHER_PINPOINTS if pins == "other" else None)


# Batches score every position of every row (full logits + loss): keep their images at <= ~1000 tokens.
BATCH = [(1, 4000), (4000, 1), (50, 1000), (1000, 60), (300, 200), (600, 200)]


def case_sizes(index: int):
    """(one image, two images, batch images) for the index-th config: each config sees different sizes."""
    n, m = len(SMALL), len(BATCH)
    return (SMALL[index % n], (SMALL[(index + 3) % n], SMALL[(index + 5) % n]),
            (BATCH[index % m], BATCH[(index + 2) % m]))


def geometry(model) -> AnyresGeometry:
    return model.model.geometry


def text_ids(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(1, tiny.IMAGE_TOKEN, (n,), generator=g).tolist()


def image_run(geo: AnyresGeometry, size, hf_processor, pinpoints) -> list[int]:
    """Placeholders for one image, counted by anyres.py and checked against transformers' processor."""
    n = geo.num_image_tokens(*size)
    hf_n = hf_processor(pinpoints)._get_num_multimodal_tokens(image_sizes=[size]).num_image_tokens[0]
    assert n == hf_n, f"{size}: anyres says {n} image tokens, transformers' processor says {hf_n}"
    return [tiny.IMAGE_TOKEN] * n


def pixels(geo: AnyresGeometry, sizes, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, max_tiles, 3, 336, 336) random, zero tiles past each image's own count; image_sizes (N, 2) int64."""
    tiles = [geo.num_tiles(*s) for s in sizes]
    pv = torch.zeros(len(sizes), max(tiles), 3, 336, 336)
    for i, n in enumerate(tiles):
        pv[i, :n] = torch.randn(n, 3, 336, 336, generator=g)
    return pv, torch.tensor(sizes, dtype=torch.int64)


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, T - len(row):] = torch.tensor(row)
        mask[i, T - len(row):] = 1
    return ids, mask


def labels_for(ids: torch.Tensor, mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Text labels; -100 on padding, image placeholders and a random quarter of the text.

    A row's first real token is -100 too: it would be scored from the last pad position's logits, which
    carry no meaning (and differ between implementations by design).
    """
    labels = ids.clone()
    labels[mask == 0] = -100
    first = mask.argmax(dim=1)  # (B,) index of each row's first real token
    labels[torch.arange(ids.shape[0]), first] = -100
    labels[ids == tiny.IMAGE_TOKEN] = -100
    labels[torch.rand(ids.shape, generator=g) < 0.25] = -100
    return labels


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def assert_parity(ours, hf, ids, pv, sizes, mask=None, g=None):
    """Full logits (non-pad positions) within LOGITS_ATOL and loss within LOSS_ATOL of transformers."""
    mask = torch.ones_like(ids) if mask is None else mask
    labels = labels_for(ids, mask, g or torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = ours(input_ids=ids, pixel_values=pv, image_sizes=sizes, attention_mask=mask,
                   position_ids=hf_positions(mask), labels=labels)
        ref = hf(input_ids=ids, pixel_values=pv, image_sizes=sizes, attention_mask=mask,
                 position_ids=hf_positions(mask), labels=labels)
    assert out.logits.shape == ref.logits.shape
    first = mask.argmax(dim=1).tolist()  # left padding: row i is real from first[i] on
    diff = max((out.logits[i, f:] - ref.logits[i, f:]).abs().max().item() for i, f in enumerate(first))
    assert diff <= LOGITS_ATOL, f"max |logits - transformers| = {diff:.3g} over {int(mask.sum())} positions"
    assert abs(out.loss.item() - ref.loss.item()) <= LOSS_ATOL, (out.loss.item(), ref.loss.item())


def sampled_positions(ids: torch.Tensor, mask: torch.Tensor, every: int = 29) -> torch.Tensor:
    """Sequence indices to score: every text position, both ends of each image run, every `every`-th image token."""
    T = ids.shape[1]
    image = (ids == tiny.IMAGE_TOKEN).any(0)  # (T,)
    text = ((ids != tiny.IMAGE_TOKEN) & mask.bool()).any(0)
    edges = image & ~torch.cat([image[1:], image.new_zeros(1)]) | image & ~torch.cat([image.new_zeros(1), image[:-1]])
    strided = image & (torch.arange(T) % every == 0)
    return (text | edges | strided).nonzero().flatten()


def assert_parity_sampled(ours, hf, ids, pv, sizes, mask=None):
    """For long inputs: last hidden states at every non-pad position and logits at `sampled_positions` (through
    `logits_to_keep`), so no (B, T, 32064) logits tensor is built. Hidden states are captured at each final norm."""
    mask = torch.ones_like(ids) if mask is None else mask
    positions = sampled_positions(ids, mask)
    captured = {}
    hooks = [ours.model.language_model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("ours", o)),
             hf.model.language_model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("hf", o))]
    try:
        with torch.no_grad():
            out = ours(input_ids=ids, pixel_values=pv, image_sizes=sizes, attention_mask=mask, logits_to_keep=positions)
            ref = hf(input_ids=ids, pixel_values=pv, image_sizes=sizes, attention_mask=mask,
                     position_ids=hf_positions(mask), logits_to_keep=positions)
    finally:
        for hook in hooks:
            hook.remove()
    keep = mask.bool()
    diff = (captured["ours"][keep] - captured["hf"][keep]).abs().max().item()
    assert diff <= LOGITS_ATOL, f"max |hidden - transformers| = {diff:.3g} over {int(keep.sum())} positions"
    assert out.logits.shape == ref.logits.shape == (ids.shape[0], len(positions), hf.config.text_config.vocab_size)
    keep = mask[:, positions].bool()
    diff = (out.logits[keep] - ref.logits[keep]).abs().max().item()
    assert diff <= LOGITS_ATOL, f"max |logits - transformers| = {diff:.3g} over {int(keep.sum())} sampled positions"


@pytest.fixture(scope="module", params=CONFIGS, ids=["-".join(c) for c in CONFIGS])
def setup(request, tiny_pair):
    backbone, layer, pins = request.param
    kwargs = config_kwargs(backbone, layer, pins)
    ours, hf = tiny_pair(backbone, **kwargs)
    return request.param, CONFIGS.index(request.param), kwargs["pinpoints"], ours, hf


def test_one_image(setup, hf_processor):
    key, index, pins, ours, hf = setup
    g = torch.Generator().manual_seed(index)
    size = case_sizes(index)[0]
    geo = geometry(ours)
    ids = torch.tensor([text_ids(g, 5) + image_run(geo, size, hf_processor, pins) + text_ids(g, 9)])
    pv, sizes = pixels(geo, [size], g)
    assert_parity(ours, hf, ids, pv, sizes, g=g)


def test_two_images(setup, hf_processor):
    key, index, pins, ours, hf = setup
    g = torch.Generator().manual_seed(100 + index)
    a, b = LARGE_TWO.get(key, case_sizes(index)[1])
    assert a != b
    geo = geometry(ours)
    ids = torch.tensor([text_ids(g, 3) + image_run(geo, a, hf_processor, pins) + text_ids(g, 4)
                        + image_run(geo, b, hf_processor, pins) + text_ids(g, 6)])
    pv, sizes = pixels(geo, [a, b], g)
    assert_parity_sampled(ours, hf, ids, pv, sizes)


def test_left_padded_batch(setup, hf_processor):
    key, index, pins, ours, hf = setup
    g = torch.Generator().manual_seed(200 + index)
    a, b = LARGE_BATCH.get(key, case_sizes(index)[2])
    assert a != b
    geo = geometry(ours)
    rows = [text_ids(g, 4) + image_run(geo, a, hf_processor, pins) + text_ids(g, 7),
            text_ids(g, 2) + image_run(geo, b, hf_processor, pins) + text_ids(g, 3),
            text_ids(g, 11)]  # text-only row
    ids, mask = left_pad(rows)
    assert (mask == 0).any(dim=1).sum() >= 2  # at least two rows really are padded
    pv, sizes = pixels(geo, [a, b], g)
    if key in FULL_BATCH:
        assert_parity(ours, hf, ids, pv, sizes, mask=mask, g=g)
    else:
        assert_parity_sampled(ours, hf, ids, pv, sizes, mask=mask)


# -- single behaviours -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mistral(tiny_pair):
    return tiny_pair("mistral")


def one_image_inputs(model, size=(500, 316), seed=0):
    g = torch.Generator().manual_seed(seed)
    geo = geometry(model)
    ids = torch.tensor([text_ids(g, 4) + [tiny.IMAGE_TOKEN] * geo.num_image_tokens(*size) + text_ids(g, 5)])
    pv, sizes = pixels(geo, [size], g)
    return ids, pv, sizes


def test_stacked_4d_pixel_values_equal_5d(mistral):
    ours, hf = mistral
    g = torch.Generator().manual_seed(3)
    geo = geometry(ours)
    a, b = (1, 4000), (50, 1000)  # 3 and 4 tiles: the 5-D form has a zero tile after the first image
    ids = torch.tensor([text_ids(g, 2) + [tiny.IMAGE_TOKEN] * geo.num_image_tokens(*a) + text_ids(g, 2)
                        + [tiny.IMAGE_TOKEN] * geo.num_image_tokens(*b) + text_ids(g, 2)])
    pv5, sizes = pixels(geo, [a, b], g)
    pv4 = torch.cat([pv5[0, :geo.num_tiles(*a)], pv5[1, :geo.num_tiles(*b)]])  # (sum of tiles, 3, 336, 336)
    keep = sampled_positions(ids, torch.ones_like(ids))
    with torch.no_grad():
        l5 = ours(input_ids=ids, pixel_values=pv5, image_sizes=sizes, logits_to_keep=keep).logits
        l4 = ours(input_ids=ids, pixel_values=pv4, image_sizes=sizes, logits_to_keep=keep).logits
        ref4 = hf(input_ids=ids, pixel_values=pv4, image_sizes=sizes, logits_to_keep=keep).logits
    torch.testing.assert_close(l4, l5, atol=1e-6, rtol=0)
    assert (l4 - ref4).abs().max().item() <= LOGITS_ATOL


def test_inputs_embeds_path_matches_input_ids(mistral):
    """inputs_embeds instead of input_ids: placeholders found by their embedding, as transformers does."""
    ours, hf = mistral
    ids, pv, sizes = one_image_inputs(ours, size=(1, 4000))
    with torch.no_grad():
        by_ids = ours(input_ids=ids, pixel_values=pv, image_sizes=sizes, logits_to_keep=16).logits
        embeds = ours.get_input_embeddings()(ids)
        by_embeds = ours(inputs_embeds=embeds, pixel_values=pv, image_sizes=sizes, logits_to_keep=16).logits
        ref = hf(inputs_embeds=hf.get_input_embeddings()(ids), pixel_values=pv, image_sizes=sizes,
                 logits_to_keep=16).logits
    torch.testing.assert_close(by_embeds, by_ids, atol=1e-6, rtol=0)
    assert (by_embeds - ref).abs().max().item() <= LOGITS_ATOL


def test_explicit_positions_and_all_ones_mask_change_nothing(mistral):
    ours, hf = mistral
    ids = torch.tensor([text_ids(torch.Generator().manual_seed(5), 30)])
    with torch.no_grad():
        plain = ours(input_ids=ids).logits
        masked = ours(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        positioned = ours(input_ids=ids, position_ids=torch.arange(30)[None]).logits
        ref = hf(input_ids=ids).logits
    torch.testing.assert_close(masked, plain, atol=0, rtol=0)
    torch.testing.assert_close(positioned, plain, atol=0, rtol=0)
    assert (plain - ref).abs().max().item() <= LOGITS_ATOL


@pytest.mark.parametrize("backbone,overrides", [
    ("mistral", {"sliding_window": 300}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 300, "max_window_layers": 1}),  # layer 1 only
], ids=["mistral-window-300", "qwen2-layer1-window-300"])
def test_sliding_window_parity_in_padded_batch(tiny_pair, hf_processor, backbone, overrides):
    """Windows shorter than the image runs, with left padding: the window counts slots, as in transformers."""
    ours, hf = tiny_pair(backbone, text_overrides=overrides)
    assert [ours.config.text_config.layer_window(i) for i in range(2)] == \
        ([300, 300] if backbone == "mistral" else [None, 300])
    g = torch.Generator().manual_seed(11)
    geo = geometry(ours)
    rows = [text_ids(g, 3) + image_run(geo, (300, 200), hf_processor, None) + text_ids(g, 5),
            text_ids(g, 9) + image_run(geo, (1, 4000), hf_processor, None) + text_ids(g, 2)]
    ids, mask = left_pad(rows)
    pv, sizes = pixels(geo, [(300, 200), (1, 4000)], g)
    assert_parity_sampled(ours, hf, ids, pv, sizes, mask=mask)


@pytest.mark.parametrize("backbone,layer,pins", [("mistral", "int", "default"), ("llama", "list", "other"),
                                                 ("qwen2", "list", "default")])
def test_get_image_features_match_pooler_output(tiny_pair, backbone, layer, pins):
    ours, hf = tiny_pair(backbone, **config_kwargs(backbone, layer, pins))
    g = torch.Generator().manual_seed(4)
    sizes_list = [(500, 316), (1, 4000), (30, 40)]
    pv, sizes = pixels(geometry(ours), sizes_list, g)
    with torch.no_grad():
        feats = ours.get_image_features(pv, sizes)
        ref = hf.get_image_features(pixel_values=pv, image_sizes=sizes).pooler_output
    assert isinstance(feats, list) and len(feats) == len(ref) == len(sizes_list)
    for size, f, r in zip(sizes_list, feats, ref):
        assert f.shape == r.shape == (geometry(ours).num_image_tokens(*size), ours.config.text_config.hidden_size)
        assert (f - r).abs().max().item() <= 1e-5, size


@pytest.mark.parametrize("delta", [-1, +1])
def test_placeholder_count_mismatch_names_both_counts(mistral, delta):
    ours, _ = mistral
    ids, pv, sizes = one_image_inputs(ours)
    n = int((ids == tiny.IMAGE_TOKEN).sum())
    if delta < 0:
        ids = ids[:, ids[0] != tiny.IMAGE_TOKEN]
        ids = torch.cat([ids[:, :2], torch.full((1, n - 1), tiny.IMAGE_TOKEN), ids[:, 2:]], dim=1)
    else:
        ids = torch.cat([ids, torch.tensor([[tiny.IMAGE_TOKEN]])], dim=1)
    with pytest.raises(ImageTokenMismatchError) as err, torch.no_grad():
        ours(input_ids=ids, pixel_values=pv, image_sizes=sizes)
    assert str(n + delta) in str(err.value) and str(n) in str(err.value), str(err.value)


def test_placeholders_for_two_images_but_one_image_given(mistral):
    ours, _ = mistral
    geo = geometry(ours)
    ids, pv, sizes = one_image_inputs(ours)
    n = geo.num_image_tokens(500, 316)
    ids = torch.cat([ids, torch.full((1, n), tiny.IMAGE_TOKEN)], dim=1)
    with pytest.raises(ImageTokenMismatchError) as err, torch.no_grad():
        ours(input_ids=ids, pixel_values=pv, image_sizes=sizes)
    assert str(2 * n) in str(err.value) and str(n) in str(err.value), str(err.value)


def test_image_given_to_text_only_prompt(mistral):
    ours, _ = mistral
    _, pv, sizes = one_image_inputs(ours)
    n = geometry(ours).num_image_tokens(500, 316)
    with pytest.raises(ImageTokenMismatchError) as err, torch.no_grad():
        ours(input_ids=torch.tensor([[1, 2, 3]]), pixel_values=pv, image_sizes=sizes)
    assert "0" in str(err.value) and str(n) in str(err.value), str(err.value)


def test_strategy_full_refused_at_load(mistral, tiny_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(tiny_checkpoint("mistral")[0])
    config = json.loads((folder / "config.json").read_text())
    config["vision_feature_select_strategy"] = "full"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="full") as err:
        LlavaNextForConditionalGeneration.from_pretrained(folder)
    assert "577" in str(err.value) or "CLS" in str(err.value), str(err.value)


def test_float_image_sizes_raise(mistral):
    ours, _ = mistral
    ids, pv, sizes = one_image_inputs(ours)
    with pytest.raises(ValueError, match="image_sizes"), torch.no_grad():
        ours(input_ids=ids, pixel_values=pv, image_sizes=sizes.to(torch.float16))
    with pytest.raises(ValueError, match="image_sizes"), torch.no_grad():
        ours.get_image_features(pv, sizes.float())


def test_logits_to_keep_matches_transformers(mistral):
    ours, hf = mistral
    ids, pv, sizes = one_image_inputs(ours, size=(1, 4000))
    with torch.no_grad():
        full = ours(input_ids=ids, pixel_values=pv, image_sizes=sizes).logits
        for keep in (1, 7):
            out = ours(input_ids=ids, pixel_values=pv, image_sizes=sizes, logits_to_keep=keep).logits
            ref = hf(input_ids=ids, pixel_values=pv, image_sizes=sizes, logits_to_keep=keep).logits
            assert out.shape == ref.shape == (1, keep, full.shape[-1])
            assert (out - ref).abs().max().item() <= LOGITS_ATOL
            # one float32 rounding step apart at most: a GEMM over 1 row and over T rows may round differently
            torch.testing.assert_close(out, full[:, -keep:], atol=1e-6, rtol=1e-6)


def test_padded_row_equals_row_alone(mistral):
    """Left padding changes a row only by rounding (RoPE is relative), and not at all with the mask-derived
    positions generate() uses."""
    ours, _ = mistral
    g = torch.Generator().manual_seed(9)
    short, long = text_ids(g, 6), text_ids(g, 20)
    ids, mask = left_pad([short, long])
    with torch.no_grad():
        batched = ours(input_ids=ids, attention_mask=mask).logits
        positioned = ours(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        alone = ours(input_ids=torch.tensor([short])).logits
    torch.testing.assert_close(batched[0, -6:], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(positioned[0, -6:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_every_position_of_a_padded_batch_matches_transformers(mistral, side):
    """Padding positions too: transformers numbers positions 0..T-1 in forward() and masks padding keys
    only, so a right-pad query sees the real tokens before it and a left-pad query sees nothing. The loss
    with padding left in the labels and a right-padded generate() depend on those positions."""
    ours, hf = mistral
    g = torch.Generator().manual_seed(11)
    rows = [text_ids(g, 5), text_ids(g, 17), text_ids(g, 9)]
    width = max(map(len, rows))
    pad = [[0] * (width - len(r)) for r in rows]
    ids = torch.tensor([p + r if side == "left" else r + p for p, r in zip(pad, rows)])
    mask = torch.tensor([[0] * len(p) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(p)
                         for p, r in zip(pad, rows)])
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask, labels=ids)
        ref = hf(input_ids=ids, attention_mask=mask, labels=ids)
    assert (out.logits - ref.logits).abs().max().item() <= 1e-5
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5
    # generate() samples the first new token at the last position, a padding one for right-padded rows
    assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5),
                       hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0))


@pytest.mark.parametrize("backbone", ["mistral", "qwen2"])
def test_real_rope_theta_parity(tiny_pair, backbone):
    """rope_theta = 1e6, the published Mistral-7B-v0.2 / Qwen2 value (the other fixtures use 1e4 or 5e5): logits
    of an image prompt and greedy tokens as transformers'."""
    ours, hf = tiny_pair(backbone, text_overrides=dict(rope_theta=1e6))
    assert ours.config.text_config.rope_theta == hf.config.text_config.rope_parameters["rope_theta"] == 1e6
    ids, pv, sizes = one_image_inputs(ours, size=(640, 480), seed=3)
    assert_parity(ours, hf, ids, pv, sizes)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, pixel_values=pv, image_sizes=sizes, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours.generate(input_ids=ids, pixel_values=pv, image_sizes=sizes, max_new_tokens=12), expected)
