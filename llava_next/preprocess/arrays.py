"""One routine per kind for "an image array or tensor -> RGB channels-first", used by both image processors.

`channel_layout`/`array_layout` infer the channel axis as transformers does (1, 3 or 4 channels; channels-first
wins a tie) and refuse empty or oversized images from the shape alone; `array_to_chw` (numpy: the exact
processor) and `tensor_to_chw` (torch, on any device: the fast processor) then give (C, H, W), 1 channel -> 3,
RGBA composited on white by the one `_on_white` formula.

Leaves out: PIL images and sources (paths, URLs, bytes) — `image_processor.image_to_chw` and `images.py` — and
`images.array_to_pil`, which makes a PIL image (8-bit, Pillow's own RGBA compositing) for `load_image`.
"""

from __future__ import annotations

import numpy as np
import torch

from llava_next.errors import InvalidImageError
from llava_next.preprocess.images import DEFAULT_MAX_PIXELS, check_pixels


def _on_white(rgb, alpha, integer: bool, low: float, high: float):
    """alpha * rgb + (1 - alpha) * white, for numpy arrays or torch tensors (float64); a float RGBA image must lie in
    [0, 1] (low/high: its extremes), an integer one is 0..255."""
    if not integer and (low < 0 or high > 1):
        raise ValueError(f"a float RGBA image must lie in [0, 1], got [{low}, {high}]")
    white = 255.0 if integer else 1.0
    alpha = alpha / white
    return alpha * rgb + (1 - alpha) * white


def channel_layout(shape: tuple, input_data_format: str | None) -> str:
    """"channels_first" or "channels_last" for a 3-D image shape, inferred as transformers does (first wins a tie)."""
    if len(shape) != 3:
        raise InvalidImageError(f"an image must have 2 or 3 dimensions, got shape {shape}")
    if input_data_format is not None:
        return input_data_format
    if shape[0] in (1, 3, 4):
        return "channels_first"
    if shape[-1] in (1, 3, 4):
        return "channels_last"
    raise InvalidImageError(f"cannot tell the channel axis of an image of shape {shape}: need 1, 3 or 4 channels")


def array_layout(shape: tuple, input_data_format: str | None, max_pixels: int | None) -> str:
    """The channel layout of an array/tensor image (2-D: grayscale, "channels_first" once a channel axis is added),
    after refusing an empty one or one over `max_pixels`, from the shape alone (nothing is copied yet)."""
    if len(shape) == 2:
        shape, input_data_format = (1, *shape), "channels_first"
    layout = channel_layout(shape, input_data_format)
    height, width = shape[1:] if layout == "channels_first" else shape[:2]
    check_pixels(width, height, max_pixels)
    return layout


def array_to_chw(array, do_convert_rgb: bool, input_data_format: str | None,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """transformers' numpy path: infer channels (1, 3 or 4; first wins a tie), 1 -> 3 channels, RGBA -> white."""
    input_data_format = array_layout(tuple(array.shape), input_data_format, max_pixels)
    if hasattr(array, "detach"):  # torch.Tensor; numpy has no bfloat16 (its values are exact in float32)
        array = array.detach().cpu()
        array = (array.float() if str(array.dtype) == "torch.bfloat16" else array).numpy()
    array = np.asarray(array)
    if array.dtype.kind not in "buif":  # complex, object, strings, ...
        raise InvalidImageError(f"unsupported image dtype {array.dtype}: use uint8, another integer type or float")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidImageError("the image holds NaN or infinite values")
    if array.ndim == 2:
        array = array[None]  # grayscale (H, W) -> (1, H, W)
    hwc = array if input_data_format == "channels_last" else np.moveaxis(array, 0, -1)
    if do_convert_rgb:
        if hwc.shape[-1] == 1:
            hwc = np.repeat(hwc, 3, axis=-1)
        elif hwc.shape[-1] == 4:
            integer = np.issubdtype(hwc.dtype, np.integer)
            blend = _on_white(hwc[..., :3], hwc[..., 3:4], integer, float(hwc.min()), float(hwc.max()))
            hwc = np.round(blend).astype(hwc.dtype) if integer else blend.astype(hwc.dtype)
    return np.moveaxis(hwc, -1, 0)


def tensor_to_chw(t: torch.Tensor, device: torch.device, do_convert_rgb: bool, input_data_format: str | None,
                   max_pixels: int | None) -> torch.Tensor:
    """A tensor image as (C, H, W) on `device`: channels inferred like transformers, 1 -> 3, RGBA on white.

    Empty, too large (`max_pixels`), complex and NaN/inf images are refused before anything is copied."""
    input_data_format = array_layout(tuple(t.shape), input_data_format, max_pixels)
    if t.is_complex():
        raise InvalidImageError(f"unsupported image dtype {t.dtype}: use uint8, another integer type or float")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise InvalidImageError("the image holds NaN or infinite values")
    t = t.detach().to(device)
    if t.ndim == 2:
        t = t[None]
    if input_data_format == "channels_last":
        t = t.permute(2, 0, 1)
    if do_convert_rgb:
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        elif t.shape[0] == 4:
            integer = not t.is_floating_point()
            blend = _on_white(t[:3].double(), t[3:4].double(), integer, t.min().item(), t.max().item())
            t = blend.round().to(t.dtype) if integer else blend.to(t.dtype)
    return t
