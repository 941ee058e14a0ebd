"""LLaVA-NeXT's own math: vision tower -> projector -> anyres packing -> merge into the token embeddings.

`LlavaNextCore` holds the parameters under transformers' names (`vision_tower`, `multi_modal_projector`,
`image_newline`, `language_model`) and does the math only: `encode_images` runs the tower over tiles and packs
each image (base tile first, then the tile grid laid out as one (rows*24, cols*24) feature map, unpadded with
anyres.py's extent, `image_newline` after every row); `merge` puts features into the placeholder positions.
Inputs are assumed valid: checks, caches and transformers' options live in compat/modeling.py.

Leaves out: vision_feature_select_strategy "full" on a CLIP tower (577 features per tile cannot form the
24x24 grid unpadding needs; transformers fails there with a reshape error, we refuse at build time).
"""

from __future__ import annotations

import torch
from torch import nn

from llava_next.config import LlavaNextConfig
from llava_next.model.anyres import AnyresGeometry
from llava_next.model.decoder import Decoder
from llava_next.model.layers import ACTIVATIONS
from llava_next.model.vision import VisionTower


class MultiModalProjector(nn.Module):
    """linear -> activation -> linear, from vision width (x feature layers) to decoder width."""

    def __init__(self, cfg: LlavaNextConfig):
        super().__init__()
        vision_dim = cfg.vision_config.hidden_size * len(cfg.vision_feature_layers)
        text_dim = cfg.text_config.hidden_size
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=cfg.multimodal_projector_bias)
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=cfg.multimodal_projector_bias)
        self.act = ACTIVATIONS[cfg.projector_hidden_act]

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaNextCore(nn.Module):
    """Vision tower + projector + image_newline + decoder."""

    def __init__(self, config: LlavaNextConfig):
        super().__init__()
        if config.vision_feature_select_strategy == "full":
            raise ValueError(
                "vision_feature_select_strategy='full' keeps CLIP's CLS token, giving "
                f"{config.vision_config.num_positions} features per tile, which cannot be laid out as the "
                "square grid anyres unpadding needs. Use 'default' (what every published checkpoint uses)."
            )
        self.config = config
        self.geometry: AnyresGeometry = config.geometry
        self.vision_tower = VisionTower(config.vision_config, config.vision_feature_layers)
        self.multi_modal_projector = MultiModalProjector(config)
        self.image_newline = nn.Parameter(torch.zeros(config.text_config.hidden_size))
        self.language_model = Decoder(config.text_config)

    def encode_images(self, tiles: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """tiles (sum of tiles, 3, S, S) of images of `sizes` (H, W) -> packed features per image, each
        (num_image_tokens_i, D). One tower pass over every tile."""
        counts = [self.geometry.num_tiles(h, w) for h, w in sizes]
        feats = self.vision_tower(tiles)  # (N, 1 + P, Dv * layers)
        feats = self.multi_modal_projector(feats[:, 1:])  # strategy "default": drop CLS -> (N, P, D)
        return [self.pack(f, h, w) for f, (h, w) in zip(feats.split(counts, dim=0), sizes)]

    def pack(self, tiles: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(n_tiles, side*side, D) of one image -> (num_image_tokens, D): base tile, then unpadded rows + newline."""
        side, D = self.geometry.side, tiles.shape[-1]
        newline = self.image_newline.to(tiles.dtype)
        base = tiles[0]  # (side*side, D)
        if tiles.shape[0] == 1:
            packed = torch.cat([base, newline[None]], dim=0)
        else:
            best_h, best_w = self.geometry.best_resolution(height, width)
            rows, cols = best_h // self.geometry.tile_size, best_w // self.geometry.tile_size
            grid = tiles[1:].view(rows, cols, side, side, D).permute(0, 2, 1, 3, 4)
            grid = grid.reshape(rows * side, cols * side, D)  # (H', W', D) feature map
            top, bottom, left, right = self.geometry.unpadded_grid(height, width)
            grid = grid[top:bottom, left:right]
            grid = torch.cat([grid, newline.expand(grid.shape[0], 1, D)], dim=1)  # newline ends each row
            packed = torch.cat([base, grid.reshape(-1, D)], dim=0)
            expected = self.geometry.num_image_tokens(height, width)
            assert packed.shape[0] == expected, f"packed {packed.shape[0]} features, anyres says {expected}"
        return packed

    @staticmethod
    def merge(embeds: torch.Tensor, placeholders: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """embeds (B, T, D) with the positions where placeholders (B, T) is True replaced, in order, by the rows
        of the features (their total length must equal the number of placeholders)."""
        if not features:
            return embeds
        feats = torch.cat(features, dim=0).to(embeds.device, embeds.dtype)
        return embeds.masked_scatter(placeholders[..., None].to(embeds.device), feats)


class WithLMHead(nn.Module):
    """LlavaNextCore (or a subclass, `core`) as `.model` plus `.lm_head`, under transformers' names; `device` and
    `dtype` are the head's. The transformers class (compat/) and the engine's loading wrapper both build on it."""

    core = LlavaNextCore

    def __init__(self, config: LlavaNextConfig):
        super().__init__()
        self.config = config
        self.model = self.core(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype
