"""Bad model inputs and generation arguments: a typed error before any forward pass, and the next call works.

generate(): unknown or misspelled keyword arguments (transformers refuses them too), arguments of the wrong kind
(num_beams=1.5, pad_token_id out of the vocabulary, generator=5, ...), output_hidden_states/attentions, and
malformed tensors (ids out of range, wrong shapes, dtypes, NaN pixels). forward(): the same tensor checks, the
context length, and transformers' output_hidden_states / return_dict=False / num_items_in_batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from llava_next.model.anyres import AnyresGeometry
from llava_next.errors import ContextLengthError, GenerationArgumentError, ImageTokenMismatchError, InvalidImageError
from llava_next.errors import ModelInputError
from tiny import IMAGE_TOKEN, VOCAB

GEOMETRY = AnyresGeometry()
SIZE = (300, 200)


def _image_inputs():
    """One (300, 200) image and its prompt, as the processor would give them (5-D pixel_values)."""
    g = torch.Generator().manual_seed(0)
    ids = [1, 5] + [IMAGE_TOKEN] * GEOMETRY.num_image_tokens(*SIZE) + [6, 7]
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": torch.randn(1, GEOMETRY.num_tiles(*SIZE), 3, 336, 336, generator=g),
            "image_sizes": torch.tensor([SIZE])}


@pytest.fixture
def counted(tiny_pair, monkeypatch):
    """(our mistral model, list of decoder and vision passes): refusals must leave the list empty."""
    ours, _ = tiny_pair("mistral")
    calls = []
    for module in (ours.model.language_model, ours.model.vision_tower):
        forward = module.forward
        monkeypatch.setattr(module, "forward", lambda *a, _f=forward, **k: calls.append(1) or _f(*a, **k))
    return ours, calls


GOOD = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "max_new_tokens": 2}


@pytest.mark.parametrize("kwargs, names", [
    (dict(max_new_token=2), ["max_new_token"]),
    (dict(foo=1, temprature=0.5), ["foo", "temprature"]),
    (dict(labels=torch.tensor([[1, 5, 6, 7]])), ["labels"]),
])
def test_unknown_generate_kwargs_are_refused(counted, kwargs, names):
    ours, calls = counted
    with pytest.raises(GenerationArgumentError, match="does not use") as err:
        ours.generate(**GOOD, **kwargs)
    assert all(name in str(err.value) for name in names)
    assert calls == []
    # None means "not given" (as in transformers); bookkeeping fields of a GenerationConfig change nothing
    expected = ours.generate(**GOOD)
    assert torch.equal(ours.generate(**GOOD, foo=None, transformers_version="5.23.0", low_memory=True), expected)


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_beams=1.5), "num_beams"),
    (dict(pad_token_id="x"), "pad_token_id"),
    (dict(pad_token_id=VOCAB), "pad_token_id"),
    (dict(pad_token_id=-1), "pad_token_id"),
    (dict(num_beams=2, length_penalty=math.nan), "length_penalty"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(do_sample=True, generator=5), "generator"),
    (dict(stop_strings=5, tokenizer=object()), "stop_strings"),
    (dict(stop_strings=["x"]), "tokenizer"),
    (dict(streamer=5), "streamer"),
    (dict(max_time=-1), "max_time"),
    (dict(max_time=math.nan), "max_time"),
    (dict(max_length=7.5), "max_length"),
    (dict(output_hidden_states=True, return_dict_in_generate=True), "output_hidden_states"),
    (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions"),
    (dict(position_ids=torch.arange(4)[None]), "position_ids"),
    (dict(past_key_values=object()), "past_key_values"),
    (dict(logits_processor=[object()]), "logits_processor"),
    (dict(generation_config=5), "generation_config"),
])
def test_generate_arguments_of_the_wrong_kind(counted, kwargs, name):
    ours, calls = counted
    with pytest.raises(GenerationArgumentError, match=name):
        ours.generate(**{**GOOD, **kwargs})
    assert calls == []


@pytest.mark.parametrize("num_beams", [1, 2])
def test_max_time_stops_as_transformers(tiny_pair, num_beams):
    """transformers' MaxTimeCriteria: checked after each new token, so an elapsed budget still gives one token."""
    ours, theirs = tiny_pair("mistral")
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    kwargs = dict(input_ids=ids, max_new_tokens=12, min_new_tokens=12, num_beams=num_beams)
    expected = theirs.generate(**kwargs, max_time=1e-9)
    assert expected.shape[1] == ids.shape[1] + 1
    assert torch.equal(ours.generate(**kwargs, max_time=1e-9), expected)
    assert torch.equal(ours.generate(**kwargs, max_time=600.0), ours.generate(**kwargs))


def _bad_tensor_cases():
    good = _image_inputs()
    ids, pv = good["input_ids"], good["pixel_values"]
    return [
        ("id >= vocab", dict(input_ids=torch.cat([ids, torch.tensor([[VOCAB + 5]])], 1), attention_mask=None),
         ModelInputError, "vocabulary"),
        ("negative id", dict(input_ids=torch.cat([ids, torch.tensor([[-3]])], 1), attention_mask=None),
         ModelInputError, "vocabulary"),
        ("1-D ids", dict(input_ids=ids[0], attention_mask=None), ModelInputError, "2-D"),
        ("empty ids", dict(input_ids=ids[:, :0], attention_mask=None, pixel_values=None, image_sizes=None),
         ModelInputError, "empty"),
        ("batch 0", dict(input_ids=ids[:0], attention_mask=None, pixel_values=None, image_sizes=None),
         ModelInputError, "empty"),
        ("float ids", dict(input_ids=ids.float()), ModelInputError, "torch.long"),
        ("list ids", dict(input_ids=ids.tolist(), attention_mask=None), ModelInputError, "torch.Tensor"),
        ("short mask", dict(attention_mask=good["attention_mask"][:, :10]), ModelInputError, "attention_mask"),
        ("mask of 2s", dict(attention_mask=good["attention_mask"] * 2), ModelInputError, "0 and 1"),
        ("224 tiles", dict(pixel_values=torch.zeros(1, 3, 3, 224, 224)), InvalidImageError, "336"),
        ("1 channel", dict(pixel_values=torch.zeros(1, 3, 1, 336, 336)), InvalidImageError, "336"),
        ("uint8 pixels", dict(pixel_values=pv.to(torch.uint8)), InvalidImageError, "floating point"),
        ("numpy pixels", dict(pixel_values=pv.numpy()), InvalidImageError, "torch.Tensor"),
        ("NaN pixels", dict(pixel_values=torch.full_like(pv, math.nan)), InvalidImageError, "NaN"),
        ("too few tiles", dict(pixel_values=pv[:, :2]), InvalidImageError, "tiles"),
        ("sizes (2,)", dict(image_sizes=torch.tensor(SIZE)), InvalidImageError, "image_sizes"),
        ("float sizes", dict(image_sizes=torch.tensor([SIZE], dtype=torch.float32)), InvalidImageError, "integers"),
        ("no sizes", dict(image_sizes=None), InvalidImageError, "image_sizes"),
        ("placeholders", dict(input_ids=ids[:, :-30], attention_mask=None), ImageTokenMismatchError, "image tokens"),
        ("embeds width", dict(input_ids=None, inputs_embeds=torch.zeros(1, 5, 7), pixel_values=None,
                              image_sizes=None, attention_mask=None), ModelInputError, "inputs_embeds"),
        ("ids and embeds", dict(inputs_embeds=torch.zeros(1, ids.shape[1], 64)), ModelInputError, "exactly one"),
    ]


@pytest.mark.parametrize("entry", ["generate", "forward"])
@pytest.mark.parametrize("case", _bad_tensor_cases(), ids=lambda c: c[0])
def test_malformed_tensors_are_refused_before_any_work(counted, entry, case):
    ours, calls = counted
    _, change, error, fragment = case
    inputs = {**_image_inputs(), **change}
    with pytest.raises(error, match=fragment):
        if entry == "generate":
            ours.generate(**inputs, max_new_tokens=2)
        else:
            ours(**inputs)
    assert calls == []


def test_good_request_after_bad_ones(tiny_pair):
    ours, theirs = tiny_pair("mistral")
    good = _image_inputs()
    with pytest.raises(InvalidImageError):
        ours.generate(**{**good, "pixel_values": torch.full_like(good["pixel_values"], math.nan)}, max_new_tokens=2)
    with pytest.raises(ModelInputError):
        ours.generate(**{**good, "input_ids": good["input_ids"] + VOCAB}, max_new_tokens=2)
    assert torch.equal(ours.generate(**good, max_new_tokens=4), theirs.generate(**good, max_new_tokens=4))


def test_forward_refuses_inputs_past_the_context(counted):
    ours, calls = counted
    context = ours.config.text_config.max_position_embeddings
    with pytest.raises(ContextLengthError, match="context"):
        ours(input_ids=torch.ones(1, context + 1, dtype=torch.long))
    with pytest.raises(ContextLengthError, match="position_ids"):
        ours(input_ids=torch.ones(1, 3, dtype=torch.long), position_ids=torch.tensor([[0, 1, context]]))
    with pytest.raises(ModelInputError, match="position_ids"):
        ours(input_ids=torch.ones(1, 3, dtype=torch.long), position_ids=torch.tensor([[0.0, 1.0, 2.0]]))
    assert calls == []


def test_forward_refuses_what_it_cannot_honour(counted):
    ours, calls = counted
    ids = torch.tensor([[1, 5, 6, 7]])
    with pytest.raises(ModelInputError, match="generate"):
        ours(input_ids=ids, past_key_values=object())
    with pytest.raises(ModelInputError, match="output_attentions"):
        ours(input_ids=ids, output_attentions=True)
    with pytest.raises(ModelInputError, match="output_hidden_state"):
        ours(input_ids=ids, output_hidden_state=True)  # a typo
    with pytest.raises(ModelInputError, match="KV cache"):  # a manual decode loop's second step
        ours(input_ids=ids[:, :1], attention_mask=torch.ones(1, 5, dtype=torch.long))
    assert calls == []
    assert ours(input_ids=ids, output_attentions=False, use_cache=True).logits.shape == (1, 4, VOCAB)


def test_hidden_states_match_transformers(tiny_pair):
    """transformers 5.23: the embeddings (images merged in), each layer's output, the last one after the norm."""
    ours, theirs = tiny_pair("mistral")
    good = _image_inputs()
    text = torch.tensor([[0] * (good["input_ids"].shape[1] - 4) + [1, 8, 9, 10]])
    inputs = {"input_ids": torch.cat([good["input_ids"], text]), "attention_mask": torch.cat(
        [good["attention_mask"], (text != 0).long()]), "pixel_values": good["pixel_values"],
        "image_sizes": good["image_sizes"]}
    position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # ours derives these from the mask
    with torch.no_grad():
        out = ours(**inputs, output_hidden_states=True)
        ref = theirs(**inputs, position_ids=position_ids, output_hidden_states=True)
        base = ours.model(**inputs, output_hidden_states=True)
    layers = ours.config.text_config.num_hidden_layers
    assert len(out.hidden_states) == len(ref.hidden_states) == layers + 1
    real = inputs["attention_mask"].bool()
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert a.shape == b.shape and (a - b)[real].abs().max() <= 1e-4
    assert torch.equal(out.hidden_states[-1], base.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, base.hidden_states))
    assert "hidden_states" not in ours(**inputs)


def test_return_dict_false_and_num_items_in_batch_match_transformers(tiny_pair):
    ours, theirs = tiny_pair("mistral")
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        (logits,) = ours(input_ids=ids, return_dict=False)
        loss, logits_l = ours(input_ids=ids, labels=ids, return_dict=False)
        ref_loss, ref_logits = theirs(input_ids=ids, labels=ids, return_dict=False)[:2]
        assert isinstance(ours.model(input_ids=ids, return_dict=False), tuple)
        summed = ours(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(10)).loss
        ref_summed = theirs(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(10)).loss
    assert torch.equal(logits, logits_l) and (logits - ref_logits).abs().max() <= 1e-4
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    assert abs(summed.item() - ref_summed.item()) <= 1e-5 and abs(summed.item() - loss.item()) > 1e-3
