"""Greedy generate() against transformers' generate(), and the argument checks that run before any forward pass.

Per backbone: one image, two images, text only, and a left-padded batch of 4 with mixed image sizes, 32 new
tokens, token for token; each row of the batch must also equal its prompt generated alone.
"""

from __future__ import annotations

import threading

import pytest
import torch

from llava_next.compat.paged_rows import Rows
from llava_next.model.anyres import AnyresGeometry
from llava_next.errors import ContextLengthError, GenerationArgumentError
from tiny import BACKBONES, IMAGE_TOKEN

GEOMETRY = AnyresGeometry()
NEW = 32


def _image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(GEOMETRY.num_tiles(h, w), 3, 336, 336, generator=g)


def _row(sizes, text_seed):
    """Token ids of one prompt: BOS, then per image its placeholders and a few text tokens."""
    ids = [1, 100 + text_seed]
    for h, w in sizes:
        ids += [IMAGE_TOKEN] * GEOMETRY.num_image_tokens(h, w) + [200 + text_seed, 300]
    return ids + [400 + text_seed]


def _inputs(rows, images):
    """Left-padded batch from (ids, [(h, w), ...]) rows; pixel_values padded on the tile axis."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([[0] * (width - len(ids)) + ids for ids, _ in rows])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in rows])
    out = {"input_ids": input_ids, "attention_mask": mask}
    if images:
        tiles = max(t.shape[0] for t, _ in images)
        out["pixel_values"] = torch.stack([torch.cat([t, t.new_zeros(tiles - t.shape[0], *t.shape[1:])])
                                           for t, _ in images])
        out["image_sizes"] = torch.tensor([size for _, size in images])
    return out


def _screened_steps(model):
    screen = model.decode_runner()._screen
    return 0 if screen is None else screen.screened_steps


def _same_as_transformers(ours, theirs, inputs, **kwargs):
    expected = theirs.generate(**inputs, max_new_tokens=NEW, do_sample=False, **kwargs)
    before = _screened_steps(ours)
    got = ours.generate(**inputs, max_new_tokens=NEW, do_sample=False, **kwargs)
    assert torch.equal(got, expected), f"first difference at {(got != expected).nonzero()[:1].tolist()}"
    assert _screened_steps(ours) > before  # greedy on a float32 CPU head takes screened_head.py's path
    return got


@pytest.mark.parametrize("backbone", BACKBONES)
def test_greedy_matches_transformers(tiny_pair, backbone):
    ours, theirs = tiny_pair(backbone)
    one = ((500, 316), _image(500, 316, 1))
    two = [((200, 300), _image(200, 300, 2)), ((336, 1008), _image(336, 1008, 3))]
    # one image
    _same_as_transformers(ours, theirs, _inputs([(_row([one[0]], 1), [one[0]])], [(one[1], one[0])]))
    # two images in one prompt (pixel_values 4-D: all tiles stacked, as transformers also accepts)
    inputs = _inputs([(_row([s for s, _ in two], 2), None)], [])
    inputs["pixel_values"] = torch.cat([t for _, t in two])
    inputs["image_sizes"] = torch.tensor([s for s, _ in two])
    _same_as_transformers(ours, theirs, inputs)
    # text only, no attention mask
    _same_as_transformers(ours, theirs, {"input_ids": torch.tensor([[1, 5, 6, 7, 8, 9]])})


BATCHES = {
    # mixed sizes, one short text-only row
    "mixed": [((500, 316), 1), ((200, 300), 2), (None, 3), ((750, 1000), 4)],
    # long rows, 1,464 to 2,358 tokens; the first two equally long (one prefill run)
    "long": [((200, 300), 2), ((200, 300), 6), ((750, 1000), 4), ((336, 1008), 5)],
}
@pytest.mark.parametrize("batch_name", BATCHES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_left_padded_batch_matches_transformers_and_rows_alone(tiny_pair, backbone, batch_name, monkeypatch):
    """A padded batch is stripped of its padding: one engine step prefills each row's real tokens only."""
    ours, theirs = tiny_pair(backbone)
    specs = BATCHES[batch_name]
    views = []
    prefill = Rows.prefill
    monkeypatch.setattr(Rows, "prefill", lambda self, e, n, h: views.append(n.tolist()) or prefill(self, e, n, h))
    rows, images = [], []
    for size, seed in specs:
        sizes = [size] if size else []
        rows.append((_row(sizes, seed), sizes))
        if size:
            images.append((_image(*size, seed), size))
    batch = _same_as_transformers(ours, theirs, _inputs(rows, images))
    assert views[0] == [len(ids) for ids, _ in rows]  # the batch's first call: real tokens only, one step
    width = max(len(ids) for ids, _ in rows)
    image_index = 0
    for (ids, sizes), row_out in zip(rows, batch):
        row_images = images[image_index:image_index + len(sizes)]
        image_index += len(sizes)
        alone = ours.generate(**_inputs([(ids, sizes)], row_images), max_new_tokens=NEW, do_sample=False)
        new_alone = alone[0, len(ids):]
        assert torch.equal(row_out[width:width + len(new_alone)], new_alone)


def test_generation_arguments_are_checked_before_any_forward_pass(tiny_pair, monkeypatch):
    ours, _ = tiny_pair("mistral")
    ids = torch.tensor([[1, 5, 6]])
    calls = []
    monkeypatch.setattr(ours.model.language_model, "forward", lambda *a, **k: calls.append(1))
    bad = [dict(max_new_tokens=0), dict(max_new_tokens=-3), dict(do_sample=True, temperature=0.0),
           dict(do_sample=True, top_p=1.5), dict(do_sample=True, top_k=-1), dict(do_sample=True, temperature=float("nan")),
           dict(repetition_penalty=float("inf")), dict(num_beams=0)]
    for kwargs in bad:
        with pytest.raises(GenerationArgumentError) as err:
            ours.generate(input_ids=ids, **kwargs)
        assert any(name in str(err.value) for name in kwargs), (kwargs, err.value)
    context = ours.config.text_config.max_position_embeddings
    with pytest.raises(ContextLengthError, match="context"):
        ours.generate(input_ids=ids, max_new_tokens=context)
    assert calls == []


def test_image_placeholders_must_match_images(tiny_pair):
    ours, _ = tiny_pair("mistral")
    h, w = 300, 300
    ids = torch.tensor([_row([(h, w)], 1)[:-50]])  # a truncated image run
    with pytest.raises(ValueError, match="image tokens"):
        ours.generate(input_ids=ids, pixel_values=_image(h, w, 1)[None], image_sizes=torch.tensor([[h, w]]),
                      max_new_tokens=2)
    # the next good request still works
    assert ours.generate(input_ids=torch.tensor([[1, 5, 6]]), max_new_tokens=2).shape == (1, 5)


def test_concurrent_generate_is_serialised_not_cross_wired(tiny_pair):
    ours, _ = tiny_pair("llama")
    prompts = [torch.tensor([[1, 10 + i, 20 + i, 30]]) for i in range(4)]
    expected = [ours.generate(input_ids=p, max_new_tokens=12) for p in prompts]
    results = [None] * len(prompts)

    def work(i):
        results[i] = ours.generate(input_ids=prompts[i], max_new_tokens=12)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_default_length_and_eos_padding_follow_transformers(tiny_pair):
    ours, theirs = tiny_pair("qwen2")
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12]])
    assert torch.equal(ours.generate(input_ids=ids), theirs.generate(input_ids=ids))  # 20 new tokens by default
    # An EOS that the greedy path emits early: the row stops there, as in transformers.
    first = theirs.generate(input_ids=ids, max_new_tokens=8)[0, ids.shape[1] + 2].item()
    assert torch.equal(ours.generate(input_ids=ids, max_new_tokens=8, eos_token_id=first),
                       theirs.generate(input_ids=ids, max_new_tokens=8, eos_token_id=first))


@pytest.mark.parametrize("num_beams", [1, 2])
def test_inputs_embeds_alone_matches_transformers(tiny_pair, num_beams):
    """A prompt given only as embeddings: new tokens only, min_length without the prompt, padding as transformers."""
    ours, theirs = tiny_pair("mistral")
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [0, 0, 1, 12, 13, 14, 15, 16]])
    mask = (ids != 0).long()
    with torch.no_grad():
        embeds = theirs.get_input_embeddings()(ids)
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12, num_beams=num_beams,
                  do_sample=False, repetition_penalty=1.3, min_length=10, eos_token_id=[2, 40])
    expected = theirs.generate(**kwargs)
    got = ours.generate(**kwargs)
    assert expected.shape[1] <= 12 and torch.equal(got, expected)
