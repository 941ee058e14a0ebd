"""The last drop-in gaps, each compared with transformers: LlavaNextImageProcessor.from_json_file,
apply_chat_template(return_assistant_tokens_mask=True), a processor with patch_size=128 over 336 tiles,
LlavaNextConfig.attribute_map, image_grid_pinpoints given as tuples of tuples (and handed to transformers'
helpers), from_pretrained(dtype=torch.int8) refused, and a bounded CheckpointError for a checkpoint that does
not fit at all."""

from __future__ import annotations

import copy
import json

import numpy as np
import processor_fixtures
import pytest
import tiny
import torch

from llava_next.compat.modeling import LlavaNextForConditionalGeneration
from llava_next.config import LlavaNextConfig
from llava_next.errors import CheckpointError
from llava_next.preprocess.image_processor import LlavaNextImageProcessor
from llava_next.preprocess.processor import LlavaNextProcessor

GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %} [/INST]{% else %}{% generation %} {{ message['content'][0]['text'] }}</s>"
    "{% endgeneration %}{% endif %}{% endfor %}")


def image(h, w, seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_image_processor_from_json_file(tmp_path):
    from transformers import LlavaNextImageProcessor as HF

    settings = {"image_grid_pinpoints": [[336, 672], [672, 336]], "do_pad": True, "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 336},
                "crop_size": {"height": 336, "width": 336}, "resample": 3}
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(settings))
    ours, theirs = LlavaNextImageProcessor.from_json_file(path), HF.from_json_file(path)
    img = image(300, 500)
    a = ours(img, return_tensors="pt")
    b = theirs(img, return_tensors="pt")
    assert a["pixel_values"].shape == b["pixel_values"].shape
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=0, atol=1e-4)
    with pytest.raises(OSError):
        LlavaNextImageProcessor.from_json_file(tmp_path / "missing.json")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_assistant_tokens_mask_matches_transformers(padding_side):
    folder = processor_fixtures.shared_processor_folder("mistral", "hub")
    ours = LlavaNextProcessor.from_pretrained(folder)
    theirs = processor_fixtures.reference_processor(folder)
    chats = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
         {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Yes, quite sure."}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Hello"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Hi there"}]}],
    ]
    kwargs = {"chat_template": GENERATION_TEMPLATE, "tokenize": True, "return_dict": True, "padding": True,
              "padding_side": padding_side, "return_assistant_tokens_mask": True, "images": [[image(40, 600)], []]}
    a = ours.apply_chat_template(chats, return_tensors="pt", **kwargs)
    b = theirs.apply_chat_template(chats, return_tensors="pt", **kwargs)
    assert torch.equal(torch.as_tensor(a["input_ids"]), torch.as_tensor(b["input_ids"]))
    mask = torch.as_tensor(a["assistant_masks"])
    assert torch.equal(mask, torch.as_tensor(b["assistant_masks"]))
    assert 0 < int(mask[0].sum()) < int(a["attention_mask"][0].sum())  # some tokens are the assistant's
    with pytest.raises(ValueError, match="return_dict"):
        ours.apply_chat_template(chats[1:], chat_template=GENERATION_TEMPLATE, tokenize=True,
                                 return_assistant_tokens_mask=True)


def test_processor_with_patch_128_counts_as_transformers(hf_processor):
    folder = processor_fixtures.shared_processor_folder("mistral", "hub")
    ours = LlavaNextProcessor.from_pretrained(folder, patch_size=128)
    theirs = copy.copy(hf_processor())  # the factory's processor is shared by other test files: never edit it
    theirs.patch_size = 128
    sizes = [(336, 336), (300, 500), (50, 1000), (1000, 60), (1, 4000)]
    expected = theirs._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    assert [ours.num_image_tokens(h, w) for h, w in sizes] == expected
    with pytest.raises(ValueError):  # the model's own geometry stays strict
        LlavaNextConfig(vision_config={"patch_size": 128, "image_size": 336}).geometry  # noqa: B018


def test_config_attribute_map_and_tuple_pinpoints():
    from transformers import LlavaNextConfig as HFConfig
    from transformers.models.llava_next.modeling_llava_next import (
        image_size_to_num_patches,
    )

    assert LlavaNextConfig.attribute_map == HFConfig.attribute_map
    pins = ((336, 672), (672, 336), (672, 672))
    config = LlavaNextConfig(image_grid_pinpoints=pins)
    assert config.image_grid_pinpoints == [list(p) for p in pins] and isinstance(config.image_grid_pinpoints, list)
    # transformers' own helper (its integration tests call it with model.config) accepts our value
    for size in [(300, 500), (1000, 60)]:
        ours = config.geometry.num_tiles(*size)
        assert image_size_to_num_patches(size, config.image_grid_pinpoints, 336) == ours
    with pytest.raises(TypeError):
        config.image_grid_pinpoints.append([1, 1])  # still frozen
    assert json.loads(config.to_json_string())["image_grid_pinpoints"] == [list(p) for p in pins]


def test_int8_dtype_is_refused_as_transformers_does(tiny_checkpoint):
    from transformers import LlavaNextForConditionalGeneration as HF

    folder, _ = tiny_checkpoint("mistral")
    with pytest.raises(ValueError, match="floating-point"):
        HF.from_pretrained(folder, dtype=torch.int8)
    for dtype in (torch.int8, "int8", torch.bool):
        with pytest.raises(ValueError, match="floating-point"):
            LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=dtype)


def test_checkpoint_that_does_not_fit_names_a_few_and_counts(tiny_checkpoint, tmp_path):
    from safetensors.torch import save_file

    folder, _ = tiny_checkpoint("mistral")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((folder / "config.json").read_text())
    save_file({f"something.else.{i}.weight": torch.zeros(2) for i in range(40)}, str(other / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        LlavaNextForConditionalGeneration.from_pretrained(other)
    message = str(err.value)
    assert len(message) < 2000, len(message)
    n_params = len(dict(LlavaNextForConditionalGeneration(LlavaNextConfig.from_dict(tiny.read_config(folder)))
                        .named_parameters()))
    assert f"missing tensors ({n_params}): " in message and f"and {n_params - 5} more" in message
    assert "unexpected tensors (40): something.else.0.weight" in message and "and 35 more" in message
