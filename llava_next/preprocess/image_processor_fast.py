"""LLaVA-NeXT anyres preprocessing in torch ops only: batched, on CPU or GPU (`device=`).

Same settings, API and output layout as `image_processor.LlavaNextImageProcessor` (it subclasses it for the
config, from_pretrained and save_pretrained), and the same tiling (`image_processor.anyres_tiles`, given torch's
resize and pad: the pinpoint, the resized size, centred zero padding, base tile first), zero tiles padding the batch.

Resizing is `F.interpolate(mode="bicubic", antialias=True)`, PIL's bicubic filter (a = -0.5, widened when
shrinking), run as Pillow runs it: two 1-D passes in the installed Pillow's order (`_vertical_first`), rounded to 8 bits
after each (torch's uint8 kernel on CPU, float + round on GPU). Images of one size share one interpolate call.

Deviation from the exact (PIL) processor, in normalised units (tests/test_image_processor.py, 62 photos,
random images from 1x1 to 4000x40, every Pillow mode, array layouts): mean absolute deviation 4.7e-5 overall,
1.6e-4 for the worst image (budget 0.02); largest single value 0.030, i.e. two 8-bit levels / std, on a few
pixels of random-noise images. On an H100 (CUDA float path, 16 images): MAD 1.0e-5, max 0.030; on a 1000x750
photo 3.7e-6, where transformers' own torchvision backend is 1.8e-3 from its PIL backend. The residue is PIL's fixed-point filter weights. Float inputs
in [0, 1] are quantised once (x * 255, truncated) rather than at every resize as transformers does (~1 level).
Only resample 0, 2, 3 (nearest, bilinear, bicubic) exist here; the others raise ValueError.

Leaves out: torchvision. Unlike the exact processor, `return_tensors` defaults to "pt"; None gives lists of tensors.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import PIL
import torch
import torch.nn.functional as F

from llava_next.preprocess.batch_feature import BatchFeature
from llava_next.preprocess.arrays import tensor_to_chw
from llava_next.preprocess.image_processor import LlavaNextImageProcessor, anyres_tiles, image_to_chw


_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}  # PIL resample code -> interpolate mode


# Pillow >= 13 may run the vertical pass first; older Pillow always runs the horizontal one first. Follow the
# installed Pillow, which the exact processor (and transformers) use.
_PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13


def _vertical_first(height: int, width: int, out_h: int, out_w: int) -> bool:
    """Pillow's pass order (13: Resample.c, ImagingResampleInner): vertical first when the height shrinks by
    more than twice as many pixels as the width. The order matters: 8-bit rounding happens between passes."""
    return _PILLOW_13 and height - out_h > 0 and height - out_h > 2 * (width - out_w)


def _resize(x: torch.Tensor, height: int, width: int, resample: int = 3) -> torch.Tensor:
    """(N, C, H, W) uint8 -> (N, C, height, width) uint8, PIL's filter (bicubic a = -0.5; antialiased), pass by pass.

    One 1-D pass per call, in Pillow's order, rounding to 8 bits in between as Pillow does. CPU uses torch's
    uint8 kernel (a port of Pillow's); other devices (no uint8 bicubic) compute in float and round.
    """
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (height, width):
        return x
    if resample not in _MODES:
        raise ValueError(f"the fast processor supports resample 0 (nearest), 2 (bilinear) and 3 (bicubic), got "
                         f"{resample}; use LlavaNextImageProcessor for the others")
    mode = _MODES[resample]
    if mode == "nearest-exact":  # one step, no filter: Pillow samples the pixel centres too
        return F.interpolate(x if x.device.type == "cpu" else x.float(), size=(height, width), mode=mode).to(torch.uint8)
    sizes = [(in_h, width), (height, width)]  # horizontal, then vertical
    if _vertical_first(in_h, in_w, height, width):
        sizes = [(height, in_w), (height, width)]
    on_cpu = x.device.type == "cpu"
    if on_cpu:
        x = x.contiguous(memory_format=torch.channels_last)  # torch's fast (AVX) uint8 path wants channels last
    for size in sizes:
        if tuple(x.shape[-2:]) == size:
            continue
        if on_cpu:
            x = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
        else:
            y = F.interpolate(x.float(), size=size, mode=mode, antialias=True, align_corners=False)
            x = y.round_().clamp_(0, 255).to(torch.uint8)
    return x


def _unit_scale(t: torch.Tensor) -> float:
    """255 for a float image in [0, 1] (transformers scales it to 8 bits to resize), else 1 (values in 0..255)."""
    if t.dtype == torch.uint8:
        return 1.0
    t = t.double()
    if torch.allclose(t, t.trunc()):  # integral values: used as they are, like transformers
        if t.min() < 0 or t.max() > 255:
            raise ValueError(f"image values must lie in [0, 255], got [{t.min().item()}, {t.max().item()}]")
        return 1.0
    if t.min() < 0 or t.max() > 1:
        raise ValueError(f"float image values must lie in [0, 1], got [{t.min().item()}, {t.max().item()}]")
    return 255.0


class LlavaNextImageProcessorFast(LlavaNextImageProcessor):
    """LLaVA-NeXT preprocessing on torch tensors. `processor(images, return_tensors="pt", device="cuda")`."""

    def preprocess(self, images, return_tensors: str | None = "pt", input_data_format: str | None = None,
                   device=None, **kwargs) -> BatchFeature:
        """As `LlavaNextImageProcessor.preprocess`; `device` is where the work and the output happen
        (default: the device of the first tensor given, else CPU)."""
        s, flat = self._begin(images, return_tensors, kwargs)
        if device is None:
            device = next((x.device for x in flat if isinstance(x, torch.Tensor)), torch.device("cpu"))
        try:
            device = torch.device(device)
            torch.empty(0, device=device)  # an unknown type or an absent GPU fails here, not mid-batch
        except (RuntimeError, AssertionError, TypeError) as e:
            raise ValueError(f"device {str(device)!r} cannot be used here: {e}") from e

        chw, scales = [], []  # each (C, H, W) uint8 on device; the unit scale per image
        for image in flat:
            if isinstance(image, torch.Tensor):
                t = tensor_to_chw(image, device, s["do_convert_rgb"], input_data_format, self.max_pixels)
            else:
                t = image_to_chw(image, s["do_convert_rgb"], input_data_format, self.max_pixels)
                t = torch.from_numpy(np.ascontiguousarray(t)).to(device)
            scale = _unit_scale(t)
            if t.dtype != torch.uint8:  # 8 bits as transformers makes them before resizing: x * 255, truncated
                t = (t.double() * scale).float().to(torch.uint8)
            chw.append(t)
            scales.append(scale)

        tiles = self._tiles(chw, s)  # per image (tiles, C, th, tw) uint8
        image_sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in chw]
        # 8-bit values in (uint8, or whole numbers in any dtype) and neither rescale nor normalise: uint8 out,
        # as the exact processor and transformers
        out_dtype = (torch.uint8 if all(sc == 1.0 for sc in scales) and not (s["do_rescale"] or s["do_normalize"])
                     else torch.float32)
        most = max(len(t) for t in tiles)
        if s["do_pad"] or len({t.shape for t in tiles}) == 1:
            out = torch.zeros((len(tiles), most) + tuple(tiles[0].shape[1:]), dtype=out_dtype, device=device)
            for i, (t, scale) in enumerate(zip(tiles, scales)):  # zero tiles pad the tile axis
                out[i, :len(t)] = self._normalize(t, scale, s)
            pixel_values = list(out) if return_tensors is None else out  # (B, max_tiles, C, th, tw)
        else:
            pixel_values = [self._normalize(t, scale, s).to(out_dtype) for t, scale in zip(tiles, scales)]
            if return_tensors is not None:
                raise ValueError("images have different tile counts and do_pad=False: cannot stack them into one "
                                 "tensor; pass do_pad=True or return_tensors=None")
        if return_tensors is None:
            return BatchFeature({"pixel_values": pixel_values, "image_sizes": image_sizes})
        data = {"pixel_values": pixel_values,
                "image_sizes": torch.tensor(image_sizes, dtype=torch.int64, device=device)}  # (B, 2) (H, W)
        return BatchFeature(data, tensor_type=return_tensors)

    def _tiles(self, images: list[torch.Tensor], s: dict) -> list[torch.Tensor]:
        """Base tile + grid tiles for each image; images of the same size are resized in one call."""
        geometry = self.geometry(s)
        groups = defaultdict(list)
        for i, image in enumerate(images):
            groups[tuple(image.shape)].append(i)
        result: list = [None] * len(images)
        for members in groups.values():
            batch = torch.stack([images[i] for i in members])  # (n, C, H, W) uint8
            parts = anyres_tiles(batch, s, geometry, lambda x, h, w: _resize(x, h, w, s["resample"]),
                                 lambda x, top, bottom, left, right: F.pad(x, (left, right, top, bottom)))
            stacked = torch.stack(parts, dim=1)  # (n, tiles, C, th, tw)
            for k, i in enumerate(members):
                result[i] = stacked[k]
        return result

    @staticmethod
    def _normalize(x: torch.Tensor, unit_scale: float, s: dict) -> torch.Tensor:
        """(tiles, C, h, w) uint8 -> rescaled and normalised, fused into one multiply-add per channel."""
        factor = (s["rescale_factor"] if s["do_rescale"] else 1.0) / unit_scale
        if not s["do_normalize"]:
            return x * factor if factor != 1.0 else x
        x = x.float()
        if x.shape[1] != len(s["image_mean"]):
            raise ValueError(f"cannot normalise {x.shape[1]}-channel images with {len(s['image_mean'])} means")
        mean = torch.tensor(s["image_mean"], dtype=torch.float64)
        std = torch.tensor(s["image_std"], dtype=torch.float64)
        scale = (factor / std).to(x.dtype).to(x.device).view(1, -1, 1, 1)
        shift = (-mean / std).to(x.dtype).to(x.device).view(1, -1, 1, 1)
        return torch.addcmul(shift, x, scale)  # (x * factor - mean) / std
