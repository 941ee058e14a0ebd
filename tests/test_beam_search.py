"""Beam search parity with transformers 5.23's `generate(num_beams=...)` on tiny checkpoints of each backbone:
an image prompt, text only, a left-padded batch, length_penalty / early_stopping variants, EOS ids chosen so
hypotheses finish early, logits processors on the log-probs, beam sampling, and the return_dict fields."""

from __future__ import annotations

import pytest
import torch
import tiny  # tests/ is on sys.path through conftest.py

from llava_next.model.anyres import AnyresGeometry
from llava_next.errors import GenerationArgumentError

BEAMS = 3
NEW = 16
IMAGE_HW = (50, 1000)  # 4 tiles, 868 image tokens: the cheapest real anyres layout with the default pinpoints


def text_prompt(seed: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([1]), torch.randint(3, 30000, (length - 1,), generator=g)])


def image_inputs(seed: int = 0):
    geometry = AnyresGeometry()
    h, w = IMAGE_HW
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([text_prompt(seed, 4), torch.full((geometry.num_image_tokens(h, w),), tiny.IMAGE_TOKEN),
                     torch.randint(3, 30000, (5,), generator=g)])[None]
    pixel_values = torch.randn(1, geometry.num_tiles(h, w), 3, 336, 336, generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                image_sizes=torch.tensor([[h, w]]))


def padded_batch(seed: int = 0):
    rows = [text_prompt(seed, 9), text_prompt(seed + 1, 5)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    return dict(input_ids=ids, attention_mask=mask)


def text_inputs(seed: int = 0):
    ids = text_prompt(seed, 7)[None]
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def early_eos(hf, inputs, **kw) -> int:
    """A token on transformers' best beam at new-token index 3 (of the first row): as EOS, it ends hypotheses early."""
    out = hf.generate(**inputs, num_beams=BEAMS, max_new_tokens=4, **kw)
    return int(out[0, inputs["input_ids"].shape[1] + 3])


def both(ours, hf, inputs, **kw):
    kw = dict(num_beams=BEAMS, max_new_tokens=NEW, **kw)
    with torch.inference_mode():
        ref = hf.generate(**inputs, **kw)
    out = ours.generate(**inputs, **kw)
    return out, ref


def assert_same(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape)
    assert torch.equal(out, ref), torch.stack([out, ref], 1)


def finished_early(out, inputs, fill) -> bool:
    """Whether some returned row is shorter than the longest one (ends in fill values) or stopped before NEW."""
    new = out[:, inputs["input_ids"].shape[1]:]
    return new.shape[1] < NEW or bool((new[:, -1] == fill).any())


# ---- image prompt, each backbone --------------------------------------------------------------------


@pytest.mark.parametrize("backbone", tiny.BACKBONES)
def test_image_prompt(tiny_pair, backbone):
    ours, hf = tiny_pair(backbone)
    inputs = image_inputs()
    out, ref = both(ours, hf, inputs, eos_token_id=2)
    assert_same(out, ref)
    eos = int(ref[0, inputs["input_ids"].shape[1] + 3])  # on the best beam: as EOS it finishes hypotheses early
    out, ref = both(ours, hf, inputs, eos_token_id=eos, early_stopping=True)
    assert_same(out, ref)


# ---- text only and a left-padded batch: length_penalty x early_stopping, EOS forcing finished hypotheses ----


@pytest.mark.parametrize("backbone", tiny.BACKBONES)
def test_text_only(tiny_pair, backbone):
    ours, hf = tiny_pair(backbone)
    inputs = text_inputs()
    eos = early_eos(hf, inputs, eos_token_id=2)
    for search in (dict(), dict(length_penalty=0.5, early_stopping=True)):
        out, ref = both(ours, hf, inputs, eos_token_id=eos, **search)
        assert_same(out, ref)


SEARCH = [
    dict(pad_token_id=0),  # pad 0 is falsy: transformers then fills finished rows with the first EOS
    dict(length_penalty=0.5),
    dict(length_penalty=2.0, early_stopping=True),
    dict(early_stopping=True, pad_token_id=0),
    dict(length_penalty=2.0, early_stopping="never"),
    dict(length_penalty=-1.0, early_stopping="never"),
]


@pytest.mark.parametrize("backbone", tiny.BACKBONES)
def test_left_padded_batch(tiny_pair, backbone):
    ours, hf = tiny_pair(backbone)
    inputs = padded_batch()
    eos = early_eos(hf, inputs, eos_token_id=2)
    early = []
    for search in SEARCH:
        search = dict(dict(pad_token_id=5), **search)
        out, ref = both(ours, hf, inputs, eos_token_id=eos, **search)
        assert_same(out, ref)
        early.append(finished_early(out, inputs, search["pad_token_id"] or eos))
    assert any(early)  # some row finished before the others and was filled, as transformers fills it


def test_two_eos_ids(tiny_pair):
    """Two EOS ids: 3 * num_beams candidates per step."""
    ours, hf = tiny_pair("llama")
    inputs = padded_batch(1)
    eos = early_eos(hf, inputs, eos_token_id=2)
    out, ref = both(ours, hf, inputs, eos_token_id=[2, eos])
    assert_same(out, ref)


def test_batch_with_an_image(tiny_pair):
    """One row with an image, one text-only row, left padded: the image is encoded once for all beams."""
    ours, hf = tiny_pair("mistral")
    image = image_inputs(1)
    text = text_prompt(3, 6)
    T = image["input_ids"].shape[1]
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    ids[0], mask[0] = image["input_ids"][0], 1
    ids[1, T - len(text):], mask[1, T - len(text):] = text, 1
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=image["pixel_values"],
                  image_sizes=image["image_sizes"])
    eos = early_eos(hf, inputs, eos_token_id=2)
    out, ref = both(ours, hf, inputs, eos_token_id=eos, early_stopping=True)
    assert_same(out, ref)


# ---- logits processors, sampling, outputs -----------------------------------------------------------


def test_processors_on_log_probs(tiny_pair):
    """repetition_penalty and min_new_tokens act on the log-probs (a penalty multiplies negative scores)."""
    ours, hf = tiny_pair("qwen2")
    inputs = padded_batch(4)
    eos = early_eos(hf, inputs, eos_token_id=2)
    for kw in (dict(repetition_penalty=1.5), dict(repetition_penalty=0.7),
               dict(min_new_tokens=6, repetition_penalty=1.3)):
        out, ref = both(ours, hf, inputs, eos_token_id=eos, **kw)
        assert_same(out, ref)


def test_qwen2_without_eos(tiny_pair):
    """The qwen2 tiny checkpoint has no EOS at all: every hypothesis runs to max_new_tokens."""
    ours, hf = tiny_pair("qwen2")
    inputs = padded_batch(2)
    out, ref = both(ours, hf, inputs)
    assert_same(out, ref)
    assert out.shape[1] == inputs["input_ids"].shape[1] + NEW


@pytest.mark.parametrize("kw", [dict(temperature=0.7, top_k=5), dict(top_p=0.9, top_k=0), dict(min_p=0.2)])
def test_beam_sampling(tiny_pair, kw):
    """do_sample with beams: the warpers keep len(eos) + 1 tokens, then multinomial over the beam scores."""
    ours, hf = tiny_pair("mistral")
    inputs = padded_batch(5)
    eos = early_eos(hf, inputs, eos_token_id=2)
    for seed in (0,):
        torch.manual_seed(seed)
        ref = hf.generate(**inputs, num_beams=BEAMS, max_new_tokens=NEW, do_sample=True, eos_token_id=eos, **kw)
        torch.manual_seed(seed)
        out = ours.generate(**inputs, num_beams=BEAMS, max_new_tokens=NEW, do_sample=True, eos_token_id=eos, **kw)
        assert_same(out, ref)


@pytest.mark.parametrize("backbone", ["mistral", "qwen2"])  # qwen2's tiny checkpoint has no EOS: keep 2
@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=0.01, top_k=0), dict(min_p=1.0, top_k=0)])
def test_beam_sampling_min_tokens_to_keep(tiny_pair, backbone, kw):
    """Warpers that would keep one token keep transformers' min_tokens_to_keep (#EOS + 1, or 2 without EOS)."""
    ours, hf = tiny_pair(backbone)
    inputs = padded_batch(2)
    eos = {"eos_token_id": 2} if backbone == "mistral" else {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        ref = hf.generate(**inputs, num_beams=BEAMS, max_new_tokens=NEW, do_sample=True, **eos, **kw)
        torch.manual_seed(seed)
        out = ours.generate(**inputs, num_beams=BEAMS, max_new_tokens=NEW, do_sample=True, **eos, **kw)
        assert_same(out, ref)


def test_return_dict(tiny_pair):
    ours, hf = tiny_pair("llama")
    inputs = padded_batch(6)
    eos = early_eos(hf, inputs, eos_token_id=2)
    kw = dict(eos_token_id=eos, return_dict_in_generate=True, output_scores=True, output_logits=True,
              length_penalty=0.5)
    out, ref = both(ours, hf, inputs, **kw)
    assert_same(out.sequences, ref.sequences)
    assert_same(out.beam_indices, ref.beam_indices)
    # generate() strips the left padding (each row prefilled alone, as the engine runs it), transformers
    # computes the padded row with masked pad keys: float32 sums in another order, so the padded batch's scores
    # agree to ~2e-6, not bit for bit; an unpadded prompt (below) still matches bit for bit.
    assert torch.allclose(out.sequences_scores, ref.sequences_scores, atol=1e-5, rtol=0)
    assert len(out.scores) == len(ref.scores) and len(out.logits) == len(ref.logits)
    for a, b in zip(out.scores + out.logits, ref.scores + ref.logits):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    unpadded = text_inputs(6)
    kw["eos_token_id"] = early_eos(hf, unpadded, eos_token_id=2)
    out1, ref1 = both(ours, hf, unpadded, **kw)
    for a, b in zip((out1.sequences, out1.beam_indices, out1.sequences_scores, *out1.scores, *out1.logits),
                    (ref1.sequences, ref1.beam_indices, ref1.sequences_scores, *ref1.scores, *ref1.logits)):
        assert_same(a, b)
    plain = ours.generate(**inputs, num_beams=BEAMS, max_new_tokens=NEW, eos_token_id=eos, length_penalty=0.5,
                          return_dict_in_generate=True)
    assert plain.sequences_scores is None and plain.scores is None  # as transformers: only with output_scores
    assert torch.equal(plain.sequences, out.sequences)


def test_inputs_embeds_only(tiny_pair):
    """Without input_ids, transformers returns only the new tokens."""
    ours, hf = tiny_pair("mistral")
    inputs = padded_batch(7)
    embeds = hf.get_input_embeddings()(inputs["input_ids"]).detach()
    eos = early_eos(hf, inputs, eos_token_id=2)
    with torch.inference_mode():
        ref = hf.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], num_beams=BEAMS,
                          max_new_tokens=NEW, eos_token_id=eos)
    out = ours.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], num_beams=BEAMS,
                        max_new_tokens=NEW, eos_token_id=eos)
    assert_same(out, ref)


def test_refused_arguments(tiny_pair):
    ours, _ = tiny_pair("mistral")
    inputs = text_inputs()
    with pytest.raises(GenerationArgumentError, match="early_stopping"):
        ours.generate(**inputs, num_beams=2, max_new_tokens=4, early_stopping="sometimes")
    with pytest.raises(GenerationArgumentError, match="streamer"):
        ours.generate(**inputs, num_beams=2, max_new_tokens=4, streamer=object())
    with pytest.raises(GenerationArgumentError, match="num_return_sequences"):
        ours.generate(**inputs, num_beams=2, max_new_tokens=4, num_return_sequences=2)
