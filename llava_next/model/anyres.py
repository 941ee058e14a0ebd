"""Anyres geometry: the one source of truth for how many tokens an image becomes.

Pure integer arithmetic shared by the image processor (how many tiles to cut), the processor (how many
`<image>` placeholders to write) and the model (how to unpad and pack the tile features). Sizes and
pinpoints are (height, width), as in transformers.

Leaves out: any tensor work; the model slices with `unpadded_grid` and the processor counts with
`num_image_tokens`, so the two can never disagree (transformers #33261, #35775; vLLM #11800).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The pinpoint (H, W) that keeps the most of the image's pixels, ties broken by least wasted area."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    best, best_effective, best_wasted = None, 0, float("inf")
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        # Integer-truncated downscaled size, as transformers and the original LLaVA code compute it.
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_w * pin_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(pin_h), int(pin_w)), effective, wasted
    if best is None:
        raise ValueError(f"no usable pinpoint in {list(pinpoints)!r}")
    return best


def unpad_extent(height: int, width: int, grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """Rows and columns of a (grid_h, grid_w) feature grid covered by the real image, not the padding.

    Returns (top, bottom, left, right) such that grid[top:bottom, left:right] is the unpadded region.
    NOTE: `int(round(x, 7))` is load-bearing: it is what the transformers model does, and plain `int(x)`
    or integer division give a different row count for some sizes.
    """
    if width / height > grid_w / grid_h:
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        return pad, grid_h - pad, 0, grid_w
    new_w = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_w) // 2
    return 0, grid_h, pad, grid_w - pad


@dataclass(frozen=True)
class AnyresGeometry:
    """Tiling of one vision tower: pinpoints (H, W), tile side (CLIP image size) and patch side."""

    pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS
    tile_size: int = 336
    patch_size: int = 14
    # A processor may be set up with a patch that does not divide the tile: transformers' processor floors the
    # per-side count (336 // 128 = 2), as CLIP's strided patch convolution does. Models stay strict.
    floor_patches: bool = False

    def __post_init__(self):
        pins = tuple((int(h), int(w)) for h, w in self.pinpoints)
        if not pins:
            raise ValueError("image_grid_pinpoints must not be empty")
        object.__setattr__(self, "pinpoints", pins)
        if self.patch_size > self.tile_size or (self.tile_size % self.patch_size and not self.floor_patches):
            raise ValueError(f"tile size {self.tile_size} is not a multiple of patch size {self.patch_size}")

    @property
    def side(self) -> int:
        """Features per tile side (24 for CLIP-L/14 at 336); floored when the patch does not divide the tile, as
        CLIP's strided patch convolution and transformers' processor count (336 // 128 = 2)."""
        return self.tile_size // self.patch_size

    def best_resolution(self, height: int, width: int) -> tuple[int, int]:
        return select_best_resolution(height, width, self.pinpoints)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Tiles (rows, cols) the resized image is cut into (a partial tile counts as a tile)."""
        best_h, best_w = self.best_resolution(height, width)
        return -(-best_h // self.tile_size), -(-best_w // self.tile_size)

    def num_tiles(self, height: int, width: int) -> int:
        """Tiles in pixel_values for this image: the grid plus the base (whole-image) tile."""
        rows, cols = self.grid(height, width)
        return rows * cols + 1

    def unpadded_grid(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the feature grid (rows*side, cols*side) kept after unpadding."""
        best_h, best_w = self.best_resolution(height, width)
        # NOTE: the model reshapes features as (best // tile) tiles; partial tiles cannot occur with pinpoints
        # that are multiples of the tile size, which all published checkpoints use.
        rows, cols = best_h // self.tile_size, best_w // self.tile_size
        return unpad_extent(height, width, rows * self.side, cols * self.side)

    def num_image_tokens(self, height: int, width: int, extra_base_tokens: int = 0) -> int:
        """Placeholders one image of (height, width) becomes.

        Base tile (side*side + extra_base_tokens) + unpadded rows * (cols + 1 newline per row).
        `extra_base_tokens` is 0 for strategy "default" on a CLS tower (the CLS is dropped).
        """
        top, bottom, left, right = self.unpadded_grid(height, width)
        rows, cols = bottom - top, right - left
        return self.side * self.side + extra_base_tokens + rows * (cols + 1)
