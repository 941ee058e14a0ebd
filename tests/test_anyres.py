"""Anyres geometry against transformers for >= 5,000 image sizes and two pinpoint sets.

Three numbers must agree for every size: our `num_image_tokens` (what our processor writes placeholders
for), transformers' processor count (what its processor writes) and the packed length of our model's
`pack()` (what the model fills the placeholders with). The tile count must equal transformers'
`image_size_to_num_patches`; on a subset, our packed features must equal transformers' `pack_image_features`.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import tiny
from llava_next.model.anyres import DEFAULT_PINPOINTS, AnyresGeometry, select_best_resolution

PINS = {"default": [list(p) for p in DEFAULT_PINPOINTS], "other": tiny.OTHER_PINPOINTS}


def all_sizes() -> list[tuple[int, int]]:
    """Seeded random (H, W) in [1, 4000] (uniform and log-uniform) plus edge cases; 5,000+ distinct sizes."""
    rng = random.Random(1234)
    sizes = {(1, 1), (1, 4000), (4000, 1), (4000, 4000), (2, 3999), (3999, 2), (500, 316), (750, 1000),
             (200, 300), (300, 200), (899, 1024), (1024, 899), (2048, 2049), (2049, 2048)}
    sizes |= {(s, s) for s in (1, 2, 13, 335, 336, 337, 671, 672, 673, 1007, 1008, 1009, 2000, 3999, 4000)}
    sizes |= {(336 * a, 336 * b) for a in range(1, 5) for b in range(1, 5)}  # exact pinpoints and multiples
    sizes |= {(336 * a + d, 336 * b - d) for a in range(1, 4) for b in range(1, 4) for d in (-1, 1)}
    while len(sizes) < 3000:
        sizes.add((rng.randint(1, 4000), rng.randint(1, 4000)))
    while len(sizes) < 5200:
        sizes.add((int(round(10 ** rng.uniform(0, 3.602))), int(round(10 ** rng.uniform(0, 3.602)))))
    return sorted((min(max(h, 1), 4000), min(max(w, 1), 4000)) for h, w in sizes)


def rounding_sensitive_sizes(pins, limit: int = 4000, tile: int = 336, side: int = 24) -> list[tuple[int, int]]:
    """(H, W) whose unpadded side is an exact integer k that float arithmetic computes as k - epsilon.

    There plain `int(x)` (original LLaVA) loses a row or column that transformers' `int(round(x, 7))` keeps
    (FACTS.md: three rounding rules). Enumerated exactly: for every grid side g a pinpoint gives and every
    divisor-side d <= limit, n = d*k/g integer; kept when the float product truncates below k.
    """
    out = set()
    for gh, gw in {(h // tile * side, w // tile * side) for h, w in pins}:
        for g, wide in ((gw, True), (gh, False)):  # wide: new_h = h * (gw / w); else new_w = w * (gh / h)
            den = np.arange(1, limit + 1)[:, None]
            k = np.arange(1, g + 1)[None, :]
            num = den * k // g
            x = num * (g / den)  # the float transformers rounds
            hit = ((den * k) % g == 0) & (num >= 1) & (num <= limit) & (x.astype(np.int64) != k)
            d, n = np.broadcast_to(den, hit.shape)[hit].tolist(), num[hit].tolist()
            out |= set(zip(n, d)) if wide else set(zip(d, n))
    return sorted(out)


def truncating_count(geo: AnyresGeometry, h: int, w: int) -> int:
    """Token count under the original LLaVA rule `int(x)` (not transformers'): the rule the sizes must catch."""
    best_h, best_w = geo.best_resolution(h, w)
    gh, gw = best_h // geo.tile_size * geo.side, best_w // geo.tile_size * geo.side
    if w / h > gw / gh:
        pad = (gh - int(h * (gw / w))) // 2
        rows, cols = gh - 2 * pad, gw
    else:
        pad = (gw - int(w * (gh / h))) // 2
        rows, cols = gh, gw - 2 * pad
    return geo.side * geo.side + rows * (cols + 1)


SIZES = all_sizes()


@pytest.fixture(scope="module", params=list(PINS))
def setup(request, tiny_pair):
    pins = PINS[request.param]
    ours, hf = tiny_pair("mistral", pinpoints=None if request.param == "default" else pins)
    return pins, ours, hf


@pytest.fixture(scope="module")
def sizes(setup):
    """The 5,000+ shared sizes plus this pinpoint set's rounding-sensitive ones."""
    return sorted(set(SIZES) | set(rounding_sensitive_sizes(setup[0])))


def test_size_set_is_large_and_in_range():
    assert len(set(SIZES)) >= 5000
    assert all(1 <= h <= 4000 and 1 <= w <= 4000 for h, w in SIZES)
    assert (1, 4000) in SIZES and (4000, 1) in SIZES


def test_rounding_sensitive_sizes_discriminate(setup, sizes):
    """The size set includes sizes where int(x) instead of int(round(x, 7)) changes the token count."""
    pins, ours, _ = setup
    geo = ours.model.geometry
    assert len(sizes) >= 5000 + 1000
    assert sum(truncating_count(geo, *s) != geo.num_image_tokens(*s) for s in sizes) >= 50


def test_best_resolution_matches_transformers(setup, sizes):
    pins, _, _ = setup
    bad = [(s, select_best_resolution(*s, pins), hf_select_best_resolution(s, pins)) for s in sizes
           if select_best_resolution(*s, pins) != tuple(hf_select_best_resolution(s, pins))]
    assert not bad, f"{len(bad)} sizes differ, e.g. (size, ours, transformers) {bad[:5]}"


def test_token_count_matches_transformers_processor(setup, sizes, hf_processor):
    pins, ours, _ = setup
    geo = ours.model.geometry
    theirs = hf_processor(pins)._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    bad = [(s, geo.num_image_tokens(*s), t) for s, t in zip(sizes, theirs) if geo.num_image_tokens(*s) != t]
    assert not bad, f"{len(bad)} sizes differ, e.g. (size, ours, transformers) {bad[:5]}"


def test_tile_count_matches_transformers(setup, sizes):
    pins, ours, _ = setup
    geo = ours.model.geometry
    bad = [(s, geo.num_tiles(*s), image_size_to_num_patches(s, pins, 336)) for s in sizes
           if geo.num_tiles(*s) != image_size_to_num_patches(s, pins, 336)]
    assert not bad, f"{len(bad)} sizes differ, e.g. (size, ours, transformers) {bad[:5]}"


@pytest.fixture(scope="module")
def narrow_model(setup):
    """Our model for the same geometry with a 4-wide decoder (random init, no checkpoint): pack() on 5,000 sizes
    is then cheap. Only geometry and image_newline matter to pack()."""
    from llava_next.config import LlavaNextConfig
    from llava_next.compat.modeling import LlavaNextForConditionalGeneration

    pins, ours, _ = setup
    text = dict(hidden_size=4, intermediate_size=8, num_attention_heads=1, num_key_value_heads=1, head_dim=4)
    config = tiny.hf_config("mistral", pinpoints=pins, text_overrides=text)
    model = LlavaNextForConditionalGeneration(LlavaNextConfig.from_dict(config.to_dict()))
    assert model.model.geometry == ours.model.geometry
    return model


def test_packed_length_equals_token_count(narrow_model, sizes):
    """pack() of a zero feature grid gives exactly num_image_tokens rows, for every size."""
    ours = narrow_model
    geo, D = ours.model.geometry, ours.config.text_config.hidden_size
    zeros = torch.zeros(max(geo.num_tiles(*s) for s in sizes), geo.side * geo.side, D)
    bad = []
    with torch.no_grad():
        for h, w in sizes:
            n = ours.model.pack(zeros[: geo.num_tiles(h, w)], h, w).shape[0]
            if n != geo.num_image_tokens(h, w):
                bad.append(((h, w), n, geo.num_image_tokens(h, w)))
    assert not bad, f"{len(bad)} sizes differ, e.g. (size, packed, num_image_tokens) {bad[:5]}"


def test_pack_equals_transformers_pack_image_features(setup):
    """Random tile features, ~250 sizes: our pack() equals transformers' pack_image_features, value for value."""
    pins, ours, hf = setup
    geo, D = ours.model.geometry, ours.config.text_config.hidden_size
    rng = random.Random(7)
    sensitive = [s for s in rounding_sensitive_sizes(pins) if truncating_count(geo, *s) != geo.num_image_tokens(*s)]
    subset = sorted(set(rng.sample(SIZES, 190)) | set(rng.sample(sensitive, 40)) | {(1, 4000), (4000, 1), (1, 1), (500, 316), (4000, 4000),
                                                   (750, 1000), (200, 300), (672, 672), (336, 1008), (1008, 336)})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for h, w in subset:
            feats = torch.randn(geo.num_tiles(h, w), geo.side * geo.side, D, generator=g)
            ours_packed = ours.model.pack(feats, h, w)
            theirs, lens = hf.model.pack_image_features([feats], torch.tensor([[h, w]]), "default",
                                                        image_newline=hf.model.image_newline)
            assert ours_packed.shape == theirs[0].shape, (h, w)
            assert torch.equal(ours_packed, theirs[0]), (h, w)


# -- known values (FACTS.md test vectors; sizes are (H, W)) ------------------------------------------------

@pytest.mark.parametrize("size,tokens,tiles", [((500, 316), 1526, 3), ((750, 1000), 2340, 5),
                                               ((200, 300), 1464, 3), ((1000, 1000), 2928, 5),
                                               ((337, 337), 2928, 5), ((4000, 4000), 2928, 5)])
def test_known_token_counts_default_pinpoints(size, tokens, tiles, hf_processor):
    geo = AnyresGeometry()
    assert geo.num_image_tokens(*size) == tokens
    assert geo.num_tiles(*size) == tiles
    assert hf_processor(None)._get_num_multimodal_tokens(image_sizes=[size]).num_image_tokens == [tokens]


def test_squares_above_one_tile_give_2928_and_small_squares_1176(hf_processor):
    """"Any square -> 2928" holds for sides > 336; a square <= 336 fits 336x672 with equal kept pixels and
    less waste, so it gets 2 tiles + base and 1176 tokens (transformers agrees)."""
    geo = AnyresGeometry()
    assert {geo.num_image_tokens(s, s) for s in range(337, 4001)} == {2928}
    assert {geo.num_image_tokens(s, s) for s in range(1, 337)} == {1176}
    theirs = hf_processor(None)._get_num_multimodal_tokens(image_sizes=[(s, s) for s in (1, 336, 337, 4000)])
    assert theirs.num_image_tokens == [1176, 1176, 2928, 2928]


def test_extra_base_tokens_and_side():
    geo = AnyresGeometry()
    assert geo.side == 24
    assert geo.num_image_tokens(500, 316, extra_base_tokens=1) == 1527


@pytest.mark.parametrize("bad", [(0, 10), (10, 0), (-1, 5)])
def test_non_positive_sizes_raise(bad):
    with pytest.raises(ValueError):
        AnyresGeometry().num_image_tokens(*bad)


def test_bad_geometry_raises():
    with pytest.raises(ValueError):
        AnyresGeometry(pinpoints=())
    with pytest.raises(ValueError):
        AnyresGeometry(tile_size=336, patch_size=15)
