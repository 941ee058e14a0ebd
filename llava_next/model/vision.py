"""CLIP vision tower, built only up to the deepest layer LLaVA-NeXT reads features from.

With `vision_feature_layer=-2` on a 24-layer CLIP-L the last layer and `post_layernorm` are never
computed, so they are not built and their checkpoint tensors are skipped (weights.py lists them).
Hidden state i is the output after i encoder layers; hidden state 0 is the `pre_layrnorm` output, as in
transformers. Parameter names are HF's (`embeddings.patch_embedding.weight`, `encoder.layers.N...`).

Leaves out: position-embedding interpolation, the pooled output, the text tower.
"""

from __future__ import annotations

import torch
from torch import nn

from llava_next.model.attention import attend
from llava_next.model.layers import ACTIVATIONS, Checkpointed
from llava_next.config import VisionConfig


def layers_needed(feature_layers: tuple[int, ...], num_layers: int) -> int:
    """Encoder layers to run so every requested hidden state (negative = from the end) exists."""
    return max(layer if layer >= 0 else num_layers + 1 + layer for layer in feature_layers)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, 1 + P, D)."""
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)  # (N, P, D)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim, self.scale = cfg.num_attention_heads, cfg.head_dim, cfg.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.backend = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        q, k, v = (proj(x).view(N, T, self.heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (N, H, T, Hd)
        out = attend(q, k, v, None, self.scale, self.backend)
        return self.out_proj(out.transpose(1, 2).reshape(N, T, D))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(Checkpointed, nn.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int):
        super().__init__()
        self.init_checkpointing()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(num_layers))


class VisionTower(nn.Module):
    """CLIP vision transformer truncated after the deepest feature layer."""

    def __init__(self, cfg: VisionConfig, feature_layers: tuple[int, ...]):
        super().__init__()
        self.config = cfg
        self.feature_layers = tuple(l if l >= 0 else cfg.num_hidden_layers + 1 + l for l in feature_layers)
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: HF's name
        self.encoder = VisionEncoder(cfg, layers_needed(feature_layers, cfg.num_hidden_layers))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> selected hidden states concatenated on the last axis: (N, 1 + P, D * len(layers))."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = {0: x} if 0 in self.feature_layers else {}
        for i, layer in enumerate(self.encoder.layers, start=1):
            x = self.encoder.run_layer(i - 1, layer, x)
            if i in self.feature_layers:
                states[i] = x
        selected = [states[i] for i in self.feature_layers]
        return selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
