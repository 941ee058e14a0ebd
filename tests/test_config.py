"""Config parity: sparse hub-style config.json files load to the values transformers derives.

Each dict below carries only the fields the llava-hf config.json files carry (the rest comes from
per-model_type defaults), and is loaded both with transformers' `LlavaNextConfig.from_dict` and ours.
Architecture facts are compared on modules built on the meta device (same parameter names and shapes,
same biases) and on RoPE inverse frequencies, not only on config fields.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import transformers
from transformers import CLIPVisionConfig, LlamaConfig, MistralConfig, Qwen2Config

from llava_next.config import DEFAULTS, LLAVA_NEXT_VISION_DEFAULTS, LlavaNextConfig, TextConfig, VisionConfig
from llava_next.model.decoder import DecoderLayer, rope_inverse_frequencies
from llava_next.model.vision import VisionEmbeddings, VisionLayer

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_L = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
          "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
          "vocab_size": 32000}


def hub(text_config: dict, image_token_index: int = 32000, **top) -> dict:
    """A llava-hf style config.json: legacy top-level fields, sparse text_config, the CLIP-L vision_config."""
    return {"architectures": ["LlavaNextForConditionalGeneration"], "ignore_index": -100,
            "image_grid_pinpoints": PINPOINTS, "image_token_index": image_token_index, "model_type": "llava_next",
            "projector_hidden_act": "gelu", "text_config": text_config, "torch_dtype": "float16",
            "transformers_version": "4.39.0.dev0", "use_image_newline_parameter": True,
            "vision_config": dict(CLIP_L), "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
            **top}


HUB_CONFIGS = {
    "mistral-7b": hub({"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2", "architectures": ["MistralForCausalLM"],
                       "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
                       "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
                       "sliding_window": None, "torch_dtype": "bfloat16", "vocab_size": 32064}),
    "vicuna-7b": hub({"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                      "max_position_embeddings": 4096, "model_type": "llama", "pad_token_id": 0,
                      "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064}, pad_token_id=0),
    "vicuna-13b": hub({"_name_or_path": "lmsys/vicuna-13b-v1.5", "architectures": ["LlamaForCausalLM"],
                       "hidden_size": 5120, "intermediate_size": 13824, "max_position_embeddings": 4096,
                       "model_type": "llama", "num_attention_heads": 40, "num_hidden_layers": 40, "pad_token_id": 0,
                       "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064}),
    "34b": hub({"_name_or_path": "NousResearch/Nous-Hermes-2-Yi-34B", "architectures": ["LlamaForCausalLM"],
                "eos_token_id": 7, "hidden_size": 7168, "intermediate_size": 20480, "max_position_embeddings": 4096,
                "model_type": "llama", "num_attention_heads": 56, "num_hidden_layers": 60, "num_key_value_heads": 8,
                "pad_token_id": 0, "rms_norm_eps": 1e-05, "rope_theta": 5000000.0, "torch_dtype": "bfloat16",
                "use_cache": False, "vocab_size": 64064}, image_token_index=64000, vocab_size=64064),
    "llama3-8b": hub({"_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "architectures": ["LlamaForCausalLM"],
                      "bos_token_id": 128000, "eos_token_id": 128009, "intermediate_size": 14336,
                      "max_position_embeddings": 8192, "model_type": "llama", "num_key_value_heads": 8,
                      "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
                      "vocab_size": 128320}, image_token_index=128256),
    "72b": hub({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8192, "intermediate_size": 24576,
                "model_type": "qwen2", "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 64,
                "rope_theta": 1000000.0, "eos_token_id": 151645, "torch_dtype": "bfloat16", "vocab_size": 152064},
               image_token_index=151646),
    # A qwen2 text_config with only a few fields: num_key_value_heads falls back to Qwen2Config's default (32),
    # not to num_attention_heads as for Llama.
    "qwen2-few-fields": hub({"model_type": "qwen2", "hidden_size": 2048, "num_attention_heads": 64,
                             "num_hidden_layers": 4, "vocab_size": 152064}, image_token_index=151646),
    "110b": hub({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8192, "intermediate_size": 49152,
                 "model_type": "qwen2", "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
                 "rope_theta": 1000000.0, "bos_token_id": 151643, "eos_token_id": 151645, "max_window_layers": 70,
                 "use_sliding_window": False, "sliding_window": 32768, "torch_dtype": "bfloat16",
                 "vocab_size": 152064}, image_token_index=151646),
    # Variants a hub file could carry: Qwen2 sliding layers (window from the Qwen2 default), llama3 rope
    # scaling in the legacy form, linear scaling with the old "type" key, the newer rope_parameters/dtype form,
    # a list of feature layers, no text_config and no vision_config at all.
    "qwen2-sliding": hub({"model_type": "qwen2", "hidden_size": 256, "num_attention_heads": 4,
                          "num_key_value_heads": 4, "num_hidden_layers": 6, "use_sliding_window": True,
                          "max_window_layers": 4}),
    "qwen2-sliding-explicit": hub({"model_type": "qwen2", "hidden_size": 256, "num_attention_heads": 4,
                                   "num_key_value_heads": 2, "num_hidden_layers": 6, "use_sliding_window": True,
                                   "sliding_window": 128, "max_window_layers": 2}),
    "llama31-rope-scaling": hub({"model_type": "llama", "rope_theta": 500000.0, "max_position_embeddings": 131072,
                                 "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
    "llama-linear-type": hub({"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}}),
    "newer-form": {"model_type": "llama", "dtype": "bfloat16", "image_token_id": 32000,
                   "text_config": {"model_type": "llama", "rope_parameters": {"rope_type": "default",
                                                                              "rope_theta": 500000.0},
                                   "dtype": "bfloat16", "num_key_value_heads": 8, "head_dim": 64},
                   "vision_config": dict(CLIP_L), "vision_feature_layer": [-2, -5]},
    "mistral-head-dim": hub({"model_type": "mistral", "hidden_size": 5120, "num_attention_heads": 32,
                             "head_dim": 128, "num_hidden_layers": 40}),
    "bare": {"model_type": "llava_next"},
}
HUB_CONFIGS["newer-form"]["model_type"] = "llava_next"

TEXT_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
               "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout"]
VISION_FIELDS = ["hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
                 "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout"]
TOP_FIELDS = ["image_token_index", "projector_hidden_act", "vision_feature_select_strategy",
              "multimodal_projector_bias", "tie_word_embeddings", "image_seq_length"]


def hf_head_dim(tc) -> int:
    return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads


def hf_layer_windows(tc) -> list:
    """Sliding window per layer as transformers' modeling code applies it."""
    n = tc.num_hidden_layers
    if tc.model_type == "mistral":  # MistralAttention: config.sliding_window for every layer
        return [tc.sliding_window] * n
    if tc.model_type == "qwen2":  # Qwen2Attention: only layers typed "sliding_attention"
        return [tc.sliding_window if kind == "sliding_attention" else None for kind in tc.layer_types]
    return [None] * n  # llama: no sliding window


def hf_modules(tc):
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[tc.model_type]
    module = getattr(transformers.models, tc.model_type)
    modeling = getattr(module, f"modeling_{tc.model_type}")
    return getattr(modeling, f"{prefix}DecoderLayer"), getattr(modeling, f"{prefix}RotaryEmbedding")


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def compare_text(ours: TextConfig, tc) -> list[str]:
    diffs = [f"{f}: ours {getattr(ours, f)!r}, transformers {getattr(tc, f)!r}" for f in TEXT_FIELDS
             if getattr(ours, f) != getattr(tc, f)]
    if ours.model_type != tc.model_type:
        diffs.append(f"model_type: ours {ours.model_type}, transformers {tc.model_type}")
    if ours.head_dim != hf_head_dim(tc):
        diffs.append(f"head_dim: ours {ours.head_dim}, transformers {hf_head_dim(tc)}")
    theirs_rope = dict(tc.rope_parameters)
    if theirs_rope.get("type") == theirs_rope.get("rope_type"):
        theirs_rope.pop("type", None)  # transformers keeps the legacy alias next to rope_type
    if ours.rope_parameters != theirs_rope:
        diffs.append(f"rope_parameters: ours {ours.rope_parameters}, transformers {theirs_rope}")
    ours_windows = [ours.layer_window(i) for i in range(ours.num_hidden_layers)]
    if ours_windows != hf_layer_windows(tc):
        diffs.append(f"per-layer sliding window: ours {ours_windows}, transformers {hf_layer_windows(tc)}")
    # Architecture: one decoder layer on the meta device, same parameter names and shapes (biases included).
    hf_layer_cls, hf_rope_cls = hf_modules(tc)
    with torch.device("meta"):
        theirs_layer, ours_layer = hf_layer_cls(tc, layer_idx=0), DecoderLayer(ours, 0)
    if shapes(ours_layer) != shapes(theirs_layer):
        diffs.append(f"decoder layer parameters: ours {shapes(ours_layer)}, transformers {shapes(theirs_layer)}")
    if ours_layer.input_layernorm.eps != theirs_layer.input_layernorm.variance_epsilon:
        diffs.append("RMSNorm eps")
    theirs_inv = hf_rope_cls(config=tc).inv_freq
    ours_inv = rope_inverse_frequencies(ours)
    if ours_inv.shape != theirs_inv.shape or not torch.allclose(ours_inv, theirs_inv, rtol=1e-6, atol=0):
        diffs.append(f"RoPE inverse frequencies differ: ours {ours_inv[:4]}..., transformers {theirs_inv[:4]}...")
    return diffs


def compare_vision(ours: VisionConfig, vc) -> list[str]:
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionEmbeddings

    diffs = [f"{f}: ours {getattr(ours, f)!r}, transformers {getattr(vc, f)!r}" for f in VISION_FIELDS
             if getattr(ours, f) != getattr(vc, f)]
    with torch.device("meta"):
        pairs = [(VisionLayer(ours), CLIPEncoderLayer(vc)), (VisionEmbeddings(ours), CLIPVisionEmbeddings(vc))]
    for mine, theirs in pairs:
        if shapes(mine) != shapes(theirs):
            diffs.append(f"{type(theirs).__name__} parameters: ours {shapes(mine)}, transformers {shapes(theirs)}")
    return diffs


def compare(ours: LlavaNextConfig, theirs) -> list[str]:
    diffs = [f"{f}: ours {getattr(ours, f)!r}, transformers {getattr(theirs, f)!r}" for f in TOP_FIELDS
             if getattr(ours, f) != getattr(theirs, f)]
    layer = theirs.vision_feature_layer
    if ours.vision_feature_layers != ((layer,) if isinstance(layer, int) else tuple(layer)):
        diffs.append(f"vision_feature_layer: ours {ours.vision_feature_layer}, transformers {layer}")
    if [list(p) for p in ours.image_grid_pinpoints] != [list(p) for p in theirs.image_grid_pinpoints]:
        diffs.append("image_grid_pinpoints")
    theirs_dtype = None if theirs.dtype is None else str(theirs.dtype).removeprefix("torch.")
    if ours.dtype != theirs_dtype:
        diffs.append(f"dtype: ours {ours.dtype!r}, transformers {theirs_dtype!r}")
    return diffs + compare_text(ours.text_config, theirs.text_config) + compare_vision(ours.vision_config,
                                                                                     theirs.vision_config)


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_hub_config_loads_to_transformers_values(name, tmp_path):
    raw = HUB_CONFIGS[name]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = LlavaNextConfig.from_pretrained(tmp_path)
    theirs = transformers.LlavaNextConfig.from_dict(copy.deepcopy(raw))
    diffs = compare(ours, theirs)
    assert not diffs, f"{name}:\n  " + "\n  ".join(diffs)
    assert LlavaNextConfig.from_dict(copy.deepcopy(raw)) == ours


def test_hub_mistral_known_values():
    """What the llava-v1.6-mistral-7b-hf file implies (FACTS.md): 4096/32/32/8, head 128, no sliding window."""
    cfg = LlavaNextConfig.from_dict(copy.deepcopy(HUB_CONFIGS["mistral-7b"]))
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (4096, 32, 32, 8)
    assert (t.head_dim, t.vocab_size, t.rope_theta, t.rms_norm_eps) == (128, 32064, 1e6, 1e-5)
    assert [t.layer_window(i) for i in range(32)] == [None] * 32
    assert (v.hidden_size, v.num_hidden_layers, v.hidden_act, v.image_size, v.patch_size) == (1024, 24, "quick_gelu",
                                                                                            336, 14)
    assert (cfg.image_token_index, cfg.dtype, cfg.vision_feature_layers) == (32000, "float16", (-2,))


def test_hub_34b_and_llama3_known_values():
    c34 = LlavaNextConfig.from_dict(copy.deepcopy(HUB_CONFIGS["34b"]))
    t = c34.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == \
        (7168, 60, 56, 8, 128)
    assert (t.rope_theta, t.vocab_size, c34.image_token_index, t.eos_token_id) == (5e6, 64064, 64000, 7)
    l3 = LlavaNextConfig.from_dict(copy.deepcopy(HUB_CONFIGS["llama3-8b"])).text_config
    assert (l3.rope_theta, l3.vocab_size, l3.eos_token_id, l3.num_key_value_heads) == (5e5, 128320, 128009, 8)


@pytest.mark.parametrize("model_type,cls", [("llama", LlamaConfig), ("mistral", MistralConfig), ("qwen2", Qwen2Config)])
def test_text_defaults_match_transformers(model_type, cls):
    """DEFAULTS entries equal the transformers class defaults, and a bare {"model_type": ...} derives the same."""
    hf_fields = {f.name: f.default for f in dataclasses.fields(cls)}
    diffs = []
    for key, value in DEFAULTS[model_type].items():
        if key == "rope_theta":
            theirs = cls().rope_parameters["rope_theta"]
        elif key in hf_fields:
            theirs = hf_fields[key]
        else:
            continue  # not a field of that class (bias flags of architectures that hard-code them)
        if value != theirs:
            diffs.append(f"DEFAULTS[{model_type!r}][{key!r}] = {value!r}, {cls.__name__} default {theirs!r}")
    diffs += compare_text(TextConfig.from_dict({"model_type": model_type}), cls())
    assert not diffs, "\n".join(diffs)


def test_vision_defaults_match_transformers():
    hf_fields = {f.name: f.default for f in dataclasses.fields(CLIPVisionConfig)}
    diffs = [f"{k}: ours {v!r}, CLIPVisionConfig {hf_fields[k]!r}" for k, v in DEFAULTS["clip_vision_model"].items()
             if hf_fields.get(k, "<missing>") != v]
    diffs += compare_vision(VisionConfig.from_dict({}), CLIPVisionConfig())
    # No vision_config at all: LlavaNextConfig builds CLIP-L/14-336.
    theirs = transformers.LlavaNextConfig().vision_config
    diffs += compare_vision(VisionConfig.from_dict(None), theirs)
    assert all(getattr(theirs, k) == v for k, v in LLAVA_NEXT_VISION_DEFAULTS.items())
    assert not diffs, "\n".join(diffs)


def test_every_accepted_activation_is_in_the_model_table_and_matches_transformers():
    from transformers.activations import ACT2FN

    from llava_next.config import PROJECTOR_ACTIVATIONS, TEXT_ACTIVATIONS, VISION_ACTIVATIONS
    from llava_next.model.layers import ACTIVATIONS

    x = torch.linspace(-6, 6, 101)
    for name in {*TEXT_ACTIVATIONS, *VISION_ACTIVATIONS, *PROJECTOR_ACTIVATIONS}:
        assert name in ACTIVATIONS, name
        torch.testing.assert_close(ACTIVATIONS[name](x), ACT2FN[name](x), rtol=0, atol=1e-6, msg=name)


def test_newer_form_reads_rope_parameters_and_dtype():
    cfg = LlavaNextConfig.from_dict(copy.deepcopy(HUB_CONFIGS["newer-form"]))
    assert cfg.text_config.rope_theta == 500000.0 and cfg.text_config.rope_parameters["rope_type"] == "default"
    assert cfg.dtype == "bfloat16"
    assert cfg.image_token_index == 32000 and cfg.vision_feature_layers == (-2, -5)
    assert cfg.text_config.head_dim == 64


def test_legacy_and_newer_rope_forms_agree():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    legacy = TextConfig.from_dict({"model_type": "llama", "rope_theta": 5e5, "rope_scaling": dict(scaling)})
    newer = TextConfig.from_dict({"model_type": "llama", "rope_parameters": dict(scaling, rope_theta=5e5)})
    assert legacy.rope_parameters == newer.rope_parameters
    assert torch.equal(rope_inverse_frequencies(legacy), rope_inverse_frequencies(newer))


def test_unknown_fields_kept_in_extra():
    raw = copy.deepcopy(HUB_CONFIGS["mistral-7b"])
    raw["my_field"] = {"a": 1}
    raw["text_config"]["my_text_field"] = 3
    raw["vision_config"]["my_vision_field"] = "x"
    cfg = LlavaNextConfig.from_dict(raw)
    assert cfg.extra["my_field"] == {"a": 1}
    assert cfg.extra["ignore_index"] == -100 and cfg.extra["use_image_newline_parameter"] is True
    assert cfg.text_config.extra == {"my_text_field": 3}
    assert cfg.vision_config.extra["my_vision_field"] == "x" and cfg.vision_config.extra["vocab_size"] == 32000
    out = cfg.to_dict()
    assert out["my_field"] == {"a": 1} and out["text_config"]["my_text_field"] == 3


def test_tiny_checkpoint_config_round_trip(tiny_checkpoint):
    """What transformers 5 writes (rope_parameters, dtype, head_dim, full field set) reads back identically."""
    for backbone in ("mistral", "llama", "qwen2"):
        folder, hf = tiny_checkpoint(backbone)
        diffs = compare(LlavaNextConfig.from_pretrained(folder), hf.config)
        assert not diffs, f"{backbone}: " + "; ".join(diffs)


@pytest.mark.parametrize("bad,match", [({"model_type": "llava"}, "LLaVA-NeXT"),
                                       ({"text_config": {"model_type": "gemma"}}, "gemma"),
                                       ({"vision_config": {"model_type": "siglip_vision_model"}}, "siglip"),
                                       ({"vision_feature_select_strategy": "cls"}, "strategy"),
                                       ({"vision_feature_layer": -30}, "vision_feature_layer")])
def test_bad_configs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        LlavaNextConfig.from_dict(bad)


# -- from_pretrained keyword arguments ----------------------------------------------------------------------

@pytest.fixture
def config_folder(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    transformers.LlavaNextConfig(text_config=MistralConfig(rope_theta=1e6).to_dict()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("overrides", [
    {"vision_feature_layer": -3},
    {"vision_feature_layer": [-2, -5], "vision_feature_select_strategy": "full"},
    {"image_grid_pinpoints": [[336, 672], [672, 336]], "image_token_index": 7, "image_seq_length": 100},
    {"image_token_id": 9, "projector_hidden_act": "silu", "multimodal_projector_bias": False},
    {"text_config": {"num_hidden_layers": 3, "rms_norm_eps": 0.01}, "vision_config": {"image_size": 224}},
])
def test_from_pretrained_field_kwargs_override_like_transformers(config_folder, overrides):
    from llava_next import AutoConfig

    ours = AutoConfig.from_pretrained(config_folder, **overrides)
    ref = transformers.AutoConfig.from_pretrained(config_folder, **overrides)
    for key in ("vision_feature_layer", "vision_feature_select_strategy", "image_token_index", "image_seq_length",
                "projector_hidden_act", "multimodal_projector_bias"):
        want = getattr(ref, key)
        assert getattr(ours, key) == (tuple(want) if isinstance(want, list) else want), key
    assert ours.image_grid_pinpoints == tuple(map(tuple, ref.image_grid_pinpoints))
    for key in ("num_hidden_layers", "rms_norm_eps", "hidden_size"):
        assert getattr(ours.text_config, key) == getattr(ref.text_config, key), key
    assert len(ours.text_config.layer_types) == ref.text_config.num_hidden_layers
    assert ours.text_config.rope_theta == 1e6
    assert ours.vision_config.image_size == ref.vision_config.image_size


def test_from_pretrained_kwargs_dtype_instances_and_unused(config_folder):
    ours = LlavaNextConfig.from_pretrained(config_folder, dtype=torch.bfloat16)
    assert ours.dtype == "bfloat16"
    text = TextConfig.from_dict({"model_type": "llama", "num_hidden_layers": 1})
    assert LlavaNextConfig.from_pretrained(config_folder, text_config=text).text_config == text
    config, unused = LlavaNextConfig.from_pretrained(config_folder, return_unused_kwargs=True, foo=1,
                                                     trust_remote_code=True, vision_feature_layer=-1)
    ref_config, ref_unused = transformers.AutoConfig.from_pretrained(config_folder, return_unused_kwargs=True, foo=1,
                                                                     vision_feature_layer=-1)
    assert unused == ref_unused == {"foo": 1} and config.vision_feature_layer == ref_config.vision_feature_layer


def test_from_pretrained_bad_kwargs_are_typed_errors(config_folder):
    with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\) 'output_hidden_state'"):
        LlavaNextConfig.from_pretrained(config_folder, output_hidden_state=True)
    with pytest.raises(ValueError, match="vision_feature_layer must be an int"):
        LlavaNextConfig.from_pretrained(config_folder, vision_feature_layer="last")
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        LlavaNextConfig.from_pretrained(config_folder, vision_feature_select_strategy="cls")
    with pytest.raises(TypeError, match="text_config must be a dict or a TextConfig"):
        LlavaNextConfig.from_pretrained(config_folder, text_config=5)


def test_from_pretrained_hub_kwargs_reach_the_hub_only(config_folder, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: calls.append((repo, kw)) or str(config_folder))
    from llava_next import AutoConfig

    config = AutoConfig.from_pretrained("llava-hf/llava-v1.6-mistral-7b-hf", revision="r", token="t",
                                        trust_remote_code=True, vision_feature_layer=-1)
    assert config.vision_feature_layer == -1
    assert calls == [("llava-hf/llava-v1.6-mistral-7b-hf", {"allow_patterns": ["config.json"], "revision": "r",
                                                            "token": "t"})]
    with pytest.raises(TypeError, match="'bogus'"):
        AutoConfig.from_pretrained("llava-hf/llava-v1.6-mistral-7b-hf", bogus=1)
    assert len(calls) == 1
