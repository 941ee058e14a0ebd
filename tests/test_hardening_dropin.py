"""Drop-in gaps against transformers 5.x (issue 15, item 6), each compared with transformers where it can be.

Covers: image processors loading a processor_config.json-only folder; list-valued config fields equal to lists and
to_dict() as transformers gives it; save_pretrained's return values; to_dict/to_json_string/to_json_file; the
processor's image_processor= and the tokenizer's padding=/max_length= kwargs; LlavaNextConfig from dict
sub-configs, pad_token_id and the image_token_id alias; the tokenizer's chat_template; named templates under
additional_chat_templates/ saved by transformers.

Leaves out: `return_assistant_tokens_mask` and attribute assignment on a config (not done; see the report).
"""

from __future__ import annotations

import json
import shutil

import pytest
from processor_fixtures import reference_processor, shared_processor_folder

from llava_next.config import LlavaNextConfig
from llava_next.preprocess.image_processor import LlavaNextImageProcessor
from llava_next.preprocess.image_processor_fast import LlavaNextImageProcessorFast
from llava_next.preprocess.processor import LlavaNextProcessor
from llava_next.preprocess.tokenizer import Tokenizer

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@pytest.mark.parametrize("cls", [LlavaNextImageProcessor, LlavaNextImageProcessorFast])
def test_image_processor_loads_a_processor_config_only_folder(cls, tmp_path):
    settings = LlavaNextImageProcessor(image_grid_pinpoints=[[336, 336], [336, 672]]).to_dict()
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": settings, "patch_size": 14}))
    loaded = cls.from_pretrained(tmp_path)
    assert loaded.image_grid_pinpoints == [[336, 336], [336, 672]]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        cls.from_pretrained(empty)


def test_config_lists_equal_lists_and_to_dict_matches_transformers(tmp_path):
    import transformers

    raw = {"model_type": "llava_next", "image_grid_pinpoints": PINPOINTS, "vision_feature_layer": [-2, -5],
           "text_config": {"model_type": "mistral", "hidden_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128},
           "vision_config": {"hidden_size": 32, "num_hidden_layers": 6, "num_attention_heads": 4,
                             "intermediate_size": 64, "image_size": 336, "patch_size": 14}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = LlavaNextConfig.from_pretrained(tmp_path)
    ref = transformers.LlavaNextConfig.from_pretrained(tmp_path)
    assert ours.image_grid_pinpoints == PINPOINTS and PINPOINTS == ours.image_grid_pinpoints
    assert ours.image_grid_pinpoints == ref.image_grid_pinpoints
    assert ours.vision_feature_layer == [-2, -5] == ref.vision_feature_layer
    assert ours.text_config.layer_types == ["full_attention"] * 2 or ours.text_config.layer_types == [
        "sliding_attention"] * 2
    a, b = ours.to_dict(), ref.to_dict()
    for key in ("image_grid_pinpoints", "vision_feature_layer", "image_token_index", "projector_hidden_act",
                "vision_feature_select_strategy", "image_seq_length", "multimodal_projector_bias"):
        assert a[key] == b[key] and type(a[key]) is type(b[key]), key
    assert isinstance(a["text_config"]["layer_types"], list)
    for key in ("hidden_size", "num_key_value_heads", "sliding_window"):
        assert a["text_config"][key] == b["text_config"][key] and type(a["text_config"][key]) is type(
            b["text_config"][key]), key
    assert json.loads(ours.to_json_string())["image_grid_pinpoints"] == PINPOINTS
    assert hash(ours.image_grid_pinpoints)  # still immutable and hashable


def test_config_from_dict_sub_configs_pad_token_and_alias():
    config = LlavaNextConfig(text_config={"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                          "num_attention_heads": 4}, vision_config={"hidden_size": 32,
                                          "num_attention_heads": 4, "num_hidden_layers": 4}, pad_token_id=0,
                             image_token_id=7, image_grid_pinpoints=[[336, 672]])
    assert config.text_config.hidden_size == 64 and config.vision_config.hidden_size == 32
    assert config.pad_token_id == 0 and config.image_token_index == 7 == config.image_token_id
    assert config.image_grid_pinpoints == [[336, 672]]


@pytest.mark.parametrize("cls", [LlavaNextImageProcessor, LlavaNextImageProcessorFast])
def test_image_processor_save_returns_files_and_json_helpers(cls, tmp_path):
    from transformers import LlavaNextImageProcessor as Reference

    ours = cls()
    files = ours.save_pretrained(tmp_path / "a")
    reference = Reference().save_pretrained(tmp_path / "b")
    assert [f.rsplit("/", 1)[-1] for f in files] == [str(f).rsplit("/", 1)[-1] for f in reference]
    assert json.loads(ours.to_json_string()) == ours.to_dict()
    ours.to_json_file(tmp_path / "x.json")
    assert cls.from_pretrained(tmp_path / "x.json").to_dict() == ours.to_dict()


def test_processor_save_layout_kwargs_and_templates_saved_by_transformers(tmp_path):
    reference = reference_processor(shared_processor_folder("mistral", "hub"))
    default = reference.chat_template
    reference.chat_template = {"default": default, "tool_use": "TOOL {{ messages[0]['role'] }}"}
    saved = tmp_path / "by-transformers"
    reference.save_pretrained(str(saved))
    assert (saved / "additional_chat_templates" / "tool_use.jinja").is_file()

    ours = LlavaNextProcessor.from_pretrained(saved)
    assert isinstance(ours.chat_template, dict) and ours.chat_template["tool_use"].startswith("TOOL")
    assert ours.tokenizer.chat_template is not None
    chat = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert ours.apply_chat_template(chat, chat_template="tool_use") == "TOOL user"

    files = ours.save_pretrained(tmp_path / "ours")
    assert [f.rsplit("/", 1)[-1] for f in files] == ["processor_config.json"]
    assert (tmp_path / "ours" / "additional_chat_templates" / "tool_use.jinja").is_file()
    again = LlavaNextProcessor.from_pretrained(tmp_path / "ours")
    assert again.chat_template == ours.chat_template
    import transformers

    back = transformers.AutoProcessor.from_pretrained(str(tmp_path / "ours"))
    assert back.chat_template == ours.chat_template
    assert json.loads(ours.to_json_string())["image_processor"] == ours.image_processor.to_dict()
    ours.to_json_file(tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text()) == ours.to_dict()

    custom = LlavaNextImageProcessor(image_grid_pinpoints=[[336, 336]])
    with_part = LlavaNextProcessor.from_pretrained(saved, image_processor=custom)
    assert with_part.image_processor is custom
    tokenizer = Tokenizer.from_pretrained(saved, padding="max_length", max_length=16)
    assert tokenizer.chat_template is not None


def test_hub_layout_still_loads_after_copy(tmp_path):
    folder = tmp_path / "hub"
    shutil.copytree(shared_processor_folder("mistral", "hub"), folder)
    assert LlavaNextProcessor.from_pretrained(folder).chat_template
