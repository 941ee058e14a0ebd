"""Tiny random LLaVA-NeXT checkpoints written by transformers itself (`save_pretrained`), for parity tests.

Real image geometry (CLIP 336/14, real pinpoints), so sequence lengths and packing are the real ones; tiny
widths and depths so a forward pass takes milliseconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BACKBONES = ("mistral", "llama", "qwen2")
IMAGE_TOKEN = 32000
VOCAB = 32064
OTHER_PINPOINTS = [[336, 336], [336, 672], [672, 336], [672, 672], [336, 1008], [1008, 336], [336, 1344],
                   [1344, 336], [1008, 1008]]


def hf_config(backbone: str = "mistral", vision_feature_layer=-2, pinpoints=None, text_overrides=None,
              vision_overrides=None, tie_word_embeddings=False):
    """A transformers LlavaNextConfig of the tiny shape."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, MistralConfig, Qwen2Config

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, initializer_range=0.1, max_position_embeddings=8192)
    if backbone == "llama":
        text.update(num_key_value_heads=4, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 64},
                    rope_theta=500000.0)
    text.update(text_overrides or {})
    text_cls = {"mistral": MistralConfig, "llama": LlamaConfig, "qwen2": Qwen2Config}[backbone]
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=336,
                  patch_size=14, projection_dim=32, initializer_range=0.1)
    vision.update(vision_overrides or {})
    kwargs = {}
    if pinpoints is not None:
        kwargs["image_grid_pinpoints"] = pinpoints
    return LlavaNextConfig(text_config=text_cls(**text), vision_config=CLIPVisionConfig(**vision),
                           image_token_index=IMAGE_TOKEN, vision_feature_layer=vision_feature_layer,
                           tie_word_embeddings=tie_word_embeddings, **kwargs)


def hf_model(config, seed: int = 0):
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    randomize(model)
    return model


def randomize(model):
    """Every parameter random, none at HF's constant init: a norm weight of 1, a bias or `image_newline` of 0
    would let an implementation that drops it pass the parity tests. Matrices are larger than HF's init, so
    greedy argmaxes are not near-ties; norm weights are 1 + N(0, 0.1) (same sign, visibly not 1), biases
    N(0, 0.05), image_newline N(0, 0.5) (of the order of the projected features it sits between)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15 if "vision" in name else 0.1)
            elif name.endswith("image_newline"):
                p.normal_(0, 0.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
            elif "norm" in name:  # RMSNorm / LayerNorm weights (CLIP's pre_layrnorm too)
                p.normal_(1.0, 0.1)
            else:  # CLIP's class_embedding
                p.normal_(0, 0.15)
    return model


def save_tiny(folder: Path, backbone: str = "mistral", seed: int = 0, **config_kwargs):
    """Write a tiny checkpoint with transformers' save_pretrained; return (folder, the transformers model)."""
    model = hf_model(hf_config(backbone, **config_kwargs), seed)
    model.save_pretrained(folder)
    return Path(folder), model


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())
