"""GenerationConfig against transformers 5.23: attributes, Mapping view, loading, and what generate() makes of it.

Models here are loaded fresh (not the shared `tiny_pair` ones), because the tests edit `model.generation_config`.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

import llava_next
from llava_next.compat.generation_config import FIELDS, GenerationConfig
from llava_next.compat.modeling import LlavaNextForConditionalGeneration as Ours

IDS = torch.tensor([[1, 101, 205, 307, 401], [0, 0, 1, 102, 206]])
INPUTS = dict(input_ids=IDS, attention_mask=(IDS != 0).long())


@pytest.fixture
def fresh_pair(tiny_checkpoint):
    """(ours, transformers) loaded from the tiny mistral checkpoint, private to the test."""
    folder, _ = tiny_checkpoint("mistral")
    theirs = transformers.LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return Ours.from_pretrained(folder), theirs


def test_exported_like_transformers():
    assert llava_next.GenerationConfig is GenerationConfig


def test_fields_are_transformers_fields():
    assert set(GenerationConfig().to_dict()) == set(transformers.GenerationConfig().to_dict())
    assert list(FIELDS)[:10] == list(transformers.GenerationConfig().to_dict())[:10]


def test_attributes_read_and_write_like_transformers():
    ours, theirs = GenerationConfig(max_new_tokens=5), transformers.GenerationConfig(max_new_tokens=5)
    for name in ("max_new_tokens", "max_length", "do_sample", "top_k", "num_beams", "pad_token_id", "temperature"):
        assert getattr(ours, name) == getattr(theirs, name), name  # unset fields read None in transformers 5.x
    ours.pad_token_id = theirs.pad_token_id = 7
    ours.do_sample = theirs.do_sample = True
    assert (ours.pad_token_id, ours.do_sample) == (7, True)
    assert ours.to_diff_dict() == {k: v for k, v in theirs.to_diff_dict().items() if k != "transformers_version"}
    assert dict(ours) == {"max_new_tokens": 5, "pad_token_id": 7, "do_sample": True}
    ours.do_sample = None  # None unsets, as in transformers (None means "not set")
    assert "do_sample" not in ours and ours.do_sample is None


def test_unknown_names_are_errors_not_ignored():
    config = GenerationConfig()
    with pytest.raises(AttributeError, match="no attribute 'max_new_token'"):
        config.max_new_token
    with pytest.raises(AttributeError, match="'max_new_token' is not a generation setting.*max_new_tokens"):
        config.max_new_token = 5
    assert len(config) == 0
    # transformers' update(): unknown names come back unused, or are stored with allow_custom_entries
    assert config.update(max_new_tokens=4, foo=1) == {"foo": 1}
    assert config.update(foo=1, allow_custom_entries=True) == {}
    assert (config.max_new_tokens, config.foo) == (4, 1)
    config.foo = 2  # a custom entry, once stored, can be set
    assert config["foo"] == 2
    assert config.update(max_new_tokens=9, top_k=3, defaults_only=True) == {}
    assert (config.max_new_tokens, config.top_k) == (4, 3)


def test_copy_equality_and_mapping():
    config = GenerationConfig(max_new_tokens=3, eos_token_id=[2, 5])
    clone = copy.deepcopy(config)
    clone.eos_token_id.append(9)
    assert config.eos_token_id == [2, 5] and clone != config
    assert copy.copy(config) == config == {"max_new_tokens": 3, "eos_token_id": [2, 5]}
    assert config.get("top_k", 50) == 50 and not GenerationConfig()
    assert "GenerationConfig" in repr(config)


def test_from_pretrained_and_save(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "do_sample": True,
                                                                  "temperature": 0.6, "transformers_version": "4.0"}))
    ours = GenerationConfig.from_pretrained(tmp_path, temperature=0.7)
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path, temperature=0.7)
    for name in ("bos_token_id", "do_sample", "temperature", "top_p", "max_length"):
        assert getattr(ours, name) == getattr(theirs, name), name
    ours.save_pretrained(tmp_path / "saved")
    assert GenerationConfig.from_pretrained(tmp_path / "saved") == ours
    with pytest.raises(TypeError, match="'colour'"):
        GenerationConfig.from_pretrained(tmp_path, colour="red")
    with pytest.raises(FileNotFoundError, match="nope.json not found"):
        GenerationConfig.from_pretrained(tmp_path, config_file_name="nope.json")


def test_model_generation_config_is_an_object(fresh_pair, tiny_checkpoint):
    ours, theirs = fresh_pair
    assert isinstance(ours.generation_config, GenerationConfig)
    drop = {"transformers_version"}
    assert ({k: v for k, v in ours.generation_config.to_diff_dict().items() if k not in drop}
            == {k: v for k, v in theirs.generation_config.to_diff_dict().items() if k not in drop})
    built = Ours(ours.config)  # no checkpoint: an empty config, still an object
    assert isinstance(built.generation_config, GenerationConfig) and len(built.generation_config) == 0
    built.generation_config.pad_token_id = 0
    assert dict(built.generation_config) == {"pad_token_id": 0}


def test_attributes_set_on_the_model_drive_generate_like_transformers(fresh_pair):
    ours, theirs = fresh_pair
    for model in (ours, theirs):
        model.generation_config.max_new_tokens = 6
        model.generation_config.pad_token_id = 0
    expected = theirs.generate(**INPUTS)
    assert expected.shape[1] == IDS.shape[1] + 6
    assert torch.equal(ours.generate(**INPUTS), expected)
    for model in (ours, theirs):
        model.generation_config.do_sample = False
        model.generation_config.num_beams = 2
    assert torch.equal(ours.generate(**INPUTS), theirs.generate(**INPUTS))
    for model in (ours, theirs):
        model.generation_config.max_new_tokens = None  # unset: transformers' default max_length 20
        model.generation_config.num_beams = None
    assert torch.equal(ours.generate(**INPUTS), theirs.generate(**INPUTS))


@pytest.mark.parametrize("settings", [dict(max_new_tokens=4), dict(max_new_tokens=5, num_beams=2, pad_token_id=0),
                                      dict(max_length=9, repetition_penalty=1.3)])
def test_generation_config_argument_matches_transformers(fresh_pair, settings):
    ours, theirs = fresh_pair
    got = ours.generate(**INPUTS, generation_config=llava_next.GenerationConfig(**settings))
    assert torch.equal(got, theirs.generate(**INPUTS, generation_config=transformers.GenerationConfig(**settings)))


def test_from_pretrained_generation_config_argument(tiny_checkpoint):
    folder, _ = tiny_checkpoint("mistral")
    model = Ours.from_pretrained(folder, generation_config=GenerationConfig(max_new_tokens=2))
    assert dict(model.generation_config) == {"max_new_tokens": 2}
    assert model.generate(**INPUTS).shape[1] == IDS.shape[1] + 2
    with pytest.raises(TypeError, match="generation_config"):
        Ours.from_pretrained(folder, generation_config=5)
