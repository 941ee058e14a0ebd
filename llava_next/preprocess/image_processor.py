"""LLaVA-NeXT anyres image preprocessing on PIL/numpy, equal to transformers' `LlavaNextImageProcessor`.

The reference is transformers 5.23's PIL backend (`LlavaNextImageProcessorPil`, which `LlavaNextImageProcessor`
resolves to when torchvision is absent). For each image:
1. convert to RGB (transformers' rule: alpha composited on white; see `images.to_rgb`), channels first;
2. pick the best pinpoint (`anyres.AnyresGeometry.best_resolution`), resize keeping the aspect ratio to fit it
   (PIL bicubic, `fit_size`), pad centred with zeros, cut into `crop_size` tiles, row by row;
3. prepend the base tile: the whole image resized (squashed, no crop) to `size` x `size`;
4. per tile: resize to `size` (shortest edge) and centre-crop to `crop_size` (no-ops for published checkpoints),
   rescale by 1/255 (float64, then float32), normalise with the CLIP mean/std in float32;
5. pad the tile axis across the batch with zero tiles.
`pixel_values` is (batch, max_tiles, 3, 336, 336) float32; `image_sizes` (batch, 2) int64 (H, W).

Arrays and tensors follow transformers' numpy path exactly, quirks included: floats in [0, 1] are quantised to
uint8 (x * 255, truncated) for every PIL resize, and `do_rescale=True` rescales them again (pass
`do_rescale=False` for float input, as with transformers). A centre crop larger than its tile leaves it as is.
Paths, URLs and bytes go through `images.load_image` (EXIF applied, size limits); transformers' own loader drops
alpha instead of compositing it on white, so RGBA *files* differ from transformers (PIL images do not).

Differences from transformers, on purpose: a bare `LlavaNextImageProcessor()` uses the llava-hf checkpoints'
values (size/crop 336) rather than transformers' class defaults (224), which no checkpoint uses; 2-D grayscale
arrays are accepted; `size` may only hold `shortest_edge` or `height`+`width`.
Leaves out: `data_format`/channels-last output, `longest_edge` sizes.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
from pathlib import Path

import numpy as np
from PIL import Image

from llava_next.model.anyres import DEFAULT_PINPOINTS, AnyresGeometry
from llava_next.preprocess.batch_feature import BatchFeature
from llava_next.loading.hub import read_json, resolve_file
from llava_next.errors import InvalidImageError
from llava_next.preprocess.arrays import array_to_chw
from llava_next.preprocess.images import DEFAULT_MAX_PIXELS, check_pixels, load_image, to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "preprocessor_config.json"
PROCESSOR_CONFIG_NAME = "processor_config.json"  # transformers >= 5.x nests the settings here ("image_processor")

# Every setting with its default (the llava-hf checkpoints' preprocessor_config.json), in transformers' names.
DEFAULTS: dict = {
    "do_resize": True,
    "size": {"shortest_edge": 336},
    "resample": 3,  # PIL.Image.BICUBIC
    "do_center_crop": True,
    "crop_size": {"height": 336, "width": 336},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(CLIP_MEAN),
    "image_std": list(CLIP_STD),
    "do_pad": True,
    "do_convert_rgb": True,
    "image_grid_pinpoints": [list(p) for p in DEFAULT_PINPOINTS],
}


def _size_dict(value, name: str) -> dict:
    """transformers' size forms: int (shortest edge for `size`, square for `crop_size`), (h, w), or a dict."""
    if isinstance(value, int):
        return {"shortest_edge": value} if name == "size" else {"height": value, "width": value}
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict):
        value = {k: int(v) for k, v in value.items() if v is not None}
        if set(value) in ({"shortest_edge"}, {"height", "width"}):
            return value
    raise ValueError(f"{name} must be an int, (height, width) or a dict with 'shortest_edge' or 'height' and "
                     f"'width', got {value!r}")


def fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """(H, W) of the image resized keeping its aspect ratio to fit (target_h, target_w): one side is exact.

    Same float arithmetic as transformers' `get_patch_output_size` (ceil of the scaled side, capped).
    """
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def resize_output_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """(H, W) for a `size` dict: exact height/width, or the shortest edge set and the other truncated."""
    if "height" in size:
        return size["height"], size["width"]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def base_and_tile_size(size: dict, crop_size: dict | None) -> tuple[tuple[int, int], int]:
    """(H, W) of the base tile and the side of the grid tiles, as transformers derives them from size/crop_size."""
    base = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    if crop_size and crop_size.get("height"):
        return base, crop_size["height"]
    return base, size.get("height") or size["shortest_edge"]


def flatten_images(images) -> list:
    """A flat list of single images from one image, a list, a list of lists, or a 4-D array/tensor batch."""
    if isinstance(images, (list, tuple)):
        return [one for item in images for one in flatten_images(item)]
    if hasattr(images, "ndim") and images.ndim == 4:  # (batch, ...) numpy array or torch tensor
        return list(images)
    return [images]


def _pil_resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Resize a (C, H, W) array with PIL exactly as transformers' `image_transforms.resize` does.

    uint8 goes straight through PIL. Other dtypes are quantised to uint8 first: floats in [0, 1] as x * 255
    (truncated) and back / 255 after; integral values in [0, 255] as they are.
    """
    if image.dtype == np.uint8 and image.shape[1:] == (height, width):
        return image  # PIL returns a copy when the size does not change
    hwc = np.moveaxis(image, 0, -1)
    hwc = hwc[..., 0] if hwc.shape[-1] == 1 else hwc
    rescaled = False
    if hwc.dtype != np.uint8:
        if np.allclose(hwc, hwc.astype(int)):
            if hwc.min() < 0 or hwc.max() > 255:
                raise ValueError(f"image values must lie in [0, 255], got [{hwc.min()}, {hwc.max()}]")
        elif hwc.min() >= 0 and hwc.max() <= 1:
            rescaled = True
            hwc = (hwc.astype(np.float64) * 255).astype(np.float32)
        else:
            raise ValueError(f"float image values must lie in [0, 1], got [{hwc.min()}, {hwc.max()}]")
    out = np.asarray(Image.fromarray(hwc.astype(np.uint8)).resize((width, height), resample=resample))
    out = np.moveaxis(out[..., None] if out.ndim == 2 else out, -1, 0)  # (C, h, w)
    return (out.astype(np.float64) * (1 / 255)).astype(np.float32) if rescaled else out


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop of a (C, H, W) array; an image smaller than the crop is returned as is (transformers' quirk)."""
    h, w = image.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    if top < 0 or left < 0:
        return image
    return image[..., top:top + height, left:left + width]


def anyres_tiles(image, s: dict, geometry: AnyresGeometry, resize, pad) -> list:
    """The tiles of one image (C, H, W), or of a batch of same-size images (n, C, H, W), numpy or torch: the base
    tile (the whole image squashed to `size`), then the image resized to fit its pinpoint, padded centred with
    zeros and cut into `crop_size` tiles row by row; each tile then resized to `size` and centre-cropped to
    `crop_size`. `resize(x, h, w)` and `pad(x, top, bottom, left, right)` are the processor's (PIL or torch)."""
    (base_h, base_w), tile = base_and_tile_size(s["size"], s["crop_size"])
    height, width = image.shape[-2:]
    best_h, best_w = geometry.best_resolution(height, width)
    new_h, new_w = fit_size(height, width, best_h, best_w)
    top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
    padded = pad(resize(image, new_h, new_w), top, best_h - new_h - top, left, best_w - new_w - left)
    tiles = [resize(image, base_h, base_w)]  # base: the whole image, squashed
    tiles += [padded[..., i:i + tile, j:j + tile] for i in range(0, best_h, tile) for j in range(0, best_w, tile)]
    for k, t in enumerate(tiles):
        if s["do_resize"]:
            t = resize(t, *resize_output_size(*t.shape[-2:], s["size"]))
        if s["do_center_crop"] and s["crop_size"]:
            t = _center_crop(t, s["crop_size"]["height"], s["crop_size"]["width"])  # slicing: tensors too
        tiles[k] = t
    shapes = {tuple(t.shape) for t in tiles}
    if len(shapes) > 1:
        raise ValueError(f"tiles of different shapes {sorted(shapes)}: size/crop_size do not fit image_grid_pinpoints")
    return tiles


def _rescale_normalize(x: np.ndarray, s: dict) -> np.ndarray:
    """transformers' rescale (float64 multiply, cast to float32) then normalise in the image's float dtype."""
    if s["do_rescale"]:
        x = (x.astype(np.float64) * s["rescale_factor"]).astype(np.float32)
    if s["do_normalize"]:
        if x.shape[1] != len(s["image_mean"]):
            raise ValueError(f"cannot normalise {x.shape[1]}-channel images with {len(s['image_mean'])} means; "
                             "pass do_convert_rgb=True")
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        shape = (-1,) + (1,) * (x.ndim - 2)  # channels on axis 1
        x = (x - np.array(s["image_mean"], dtype=x.dtype).reshape(shape)) / np.array(s["image_std"], dtype=x.dtype).reshape(shape)
    return x


def image_to_chw(image, do_convert_rgb: bool = True, input_data_format: str | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One input image (PIL, array, tensor, path, URL or bytes) as a (C, H, W) array, RGB when asked.

    Every kind gets `load_image`'s pixel limit, checked before any pixel is converted or resized."""
    if isinstance(image, (str, bytes, bytearray, memoryview, os.PathLike)):
        image = load_image(image, max_pixels=max_pixels)
    if isinstance(image, Image.Image):
        check_pixels(image.width, image.height, max_pixels)
        image = to_rgb(image) if do_convert_rgb else image
        array = np.array(image)  # a writable copy (np.asarray of a PIL image is read-only)
        return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    if isinstance(image, np.ndarray) or hasattr(image, "detach"):
        return array_to_chw(image, do_convert_rgb, input_data_format, max_pixels)
    raise InvalidImageError(f"unsupported image type {type(image).__name__}: expected a PIL image, numpy array, "
                            "torch tensor, path, URL or bytes")


class LlavaNextImageProcessor:
    """Exact LLaVA-NeXT preprocessing (PIL + numpy). `processor(images, return_tensors="pt")`."""

    model_input_names = ["pixel_values", "image_sizes"]
    image_processor_type = "LlavaNextImageProcessor"
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # per input image, as load_image; set None on an instance to lift it

    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown image processor settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        settings = self._settings({**copy.deepcopy(DEFAULTS), **kwargs})
        for key, value in settings.items():
            setattr(self, key, value)
        self.extra_config: dict = {}  # keys of a loaded config we do not use, written back by save_pretrained

    # ----- settings -----
    @staticmethod
    def _settings(s: dict) -> dict:
        """Validated, normalised settings (size dicts, 3-float mean/std lists, int pinpoint lists)."""
        s = dict(s)
        s["size"] = _size_dict(s["size"], "size")
        s["crop_size"] = _size_dict(s["crop_size"], "crop_size") if s["crop_size"] is not None else None
        for key in ("image_mean", "image_std"):
            value = s[key]
            values = value if isinstance(value, (list, tuple)) else [value] * 3
            if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in values):
                raise ValueError(f"{key} must hold finite numbers, got {value!r}")
            s[key] = [float(v) for v in values]
            if len(s[key]) != 3:
                raise ValueError(f"{key} must have 3 values (RGB), got {value!r}")
        if any(v == 0 for v in s["image_std"]):
            raise ValueError(f"image_std must not contain zeros, got {s['image_std']!r}")
        s["image_grid_pinpoints"] = [[int(h), int(w)] for h, w in s["image_grid_pinpoints"]]
        s["resample"] = int(s["resample"])
        if s["do_rescale"] and s["rescale_factor"] is None:
            raise ValueError("rescale_factor must be set when do_rescale is True")
        factor = s["rescale_factor"]
        if factor is not None and not (isinstance(factor, numbers.Real) and math.isfinite(factor)):
            raise ValueError(f"rescale_factor must be a finite number, got {factor!r}")
        return s

    def _resolve(self, overrides: dict) -> dict:
        unknown = set(overrides) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"preprocess() got unknown arguments {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        base = {key: getattr(self, key) for key in DEFAULTS}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return self._settings(base)

    def to_dict(self) -> dict:
        """The preprocessor_config.json content, in transformers' format."""
        out = {**self.extra_config, **{key: copy.deepcopy(getattr(self, key)) for key in DEFAULTS}}
        out["image_processor_type"] = self.image_processor_type
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, config: dict, **overrides):
        known = {k: v for k, v in config.items() if k in DEFAULTS}
        processor = cls(**{**known, **overrides})
        processor.extra_config = {k: v for k, v in config.items() if k not in DEFAULTS and k != "image_processor_type"}
        return processor

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        """Read preprocessor_config.json from a local folder (never the network) or a hub id.

        kwargs that are settings override the file; the others (revision, token, cache_dir, ...) go to the hub.
        """
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in DEFAULTS}
        path = Path(name_or_path)
        if path.is_file():
            config_path = path
        else:
            config_path = resolve_file(name_or_path, CONFIG_NAME, required=False, **kwargs)
            if config_path is None:  # transformers >= 5.x: the settings nested in processor_config.json
                nested = resolve_file(name_or_path, PROCESSOR_CONFIG_NAME, required=False, **kwargs)
                config = read_json(nested) if nested is not None else {}
                if not isinstance(config.get("image_processor"), dict):
                    raise FileNotFoundError(
                        f"{CONFIG_NAME} not found in {str(name_or_path)!r}, and no 'image_processor' entry in "
                        f"its {PROCESSOR_CONFIG_NAME}")
                return cls.from_dict(config["image_processor"], **overrides)
        try:
            config = read_json(config_path)
        except (OSError, ValueError) as e:
            raise OSError(f"cannot read {config_path}: {e}") from e
        return cls.from_dict(config, **overrides)

    @classmethod
    def from_json_file(cls, json_file) -> LlavaNextImageProcessor:
        """From one preprocessor_config.json file (transformers' `from_json_file`: the file's settings only)."""
        try:
            config = read_json(Path(json_file))
        except (OSError, ValueError) as e:
            raise OSError(f"cannot read {json_file}: {e}") from e
        return cls.from_dict(config)

    def save_pretrained(self, folder, **kwargs) -> list[str]:
        """Write preprocessor_config.json; the written files as a list, as transformers returns them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CONFIG_NAME
        self.to_json_file(path)
        return [str(path)]

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path) -> None:
        Path(json_file_path).write_text(self.to_json_string(), encoding="utf-8")

    def geometry(self, s: dict | None = None) -> AnyresGeometry:
        """The pinpoint choice for these settings (patch_size=1: only best_resolution/grid/num_tiles are used)."""
        s = s or self._resolve({})
        _, tile = base_and_tile_size(s["size"], s["crop_size"])
        return AnyresGeometry(tuple(map(tuple, s["image_grid_pinpoints"])), tile_size=tile, patch_size=1)

    def __repr__(self):
        return f"{type(self).__name__}({json.dumps(self.to_dict())})"

    # ----- processing -----
    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def _begin(self, images, return_tensors, overrides: dict) -> tuple[dict, list]:
        """Checks shared by both processors: settings for this call and the flat list of images."""
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        settings = self._resolve(overrides)
        flat = flatten_images(images)
        if not flat:
            raise ValueError("no images given")
        return settings, flat

    def preprocess(self, images, return_tensors: str | None = None, input_data_format: str | None = None,
                   **kwargs) -> BatchFeature:
        """images: one image, a list, or a list of lists (flattened into one batch).

        kwargs: any setting of `DEFAULTS` for this call (do_pad, size, image_grid_pinpoints, do_rescale, ...).
        Returns BatchFeature with `pixel_values` (batch, max_tiles, 3, H, W) and `image_sizes` (batch, 2) (H, W).
        """
        s, flat = self._begin(images, return_tensors, kwargs)
        arrays = [image_to_chw(image, s["do_convert_rgb"], input_data_format, self.max_pixels) for image in flat]
        geometry = self.geometry(s)
        pixel_values = [self._process_one(array, s, geometry) for array in arrays]  # each (tiles, C, H, W)
        image_sizes = [tuple(int(v) for v in array.shape[-2:]) for array in arrays]
        if s["do_pad"]:
            most = max(len(pv) for pv in pixel_values)
            pixel_values = [np.pad(pv, ((0, most - len(pv)),) + ((0, 0),) * 3) for pv in pixel_values]
        if return_tensors is None:
            return BatchFeature({"pixel_values": pixel_values, "image_sizes": image_sizes})
        if len({pv.shape for pv in pixel_values}) > 1:
            raise ValueError("images have different tile counts and do_pad=False: cannot stack them into one "
                             "tensor; pass do_pad=True or return_tensors=None")
        data = {"pixel_values": np.stack(pixel_values), "image_sizes": np.array(image_sizes, dtype=np.int64)}
        return BatchFeature(data, tensor_type=return_tensors)

    def _process_one(self, image: np.ndarray, s: dict, geometry: AnyresGeometry) -> np.ndarray:
        """(C, H, W) -> (tiles, C, th, tw): base tile first, then the grid row by row."""
        tiles = anyres_tiles(image, s, geometry, lambda x, h, w: _pil_resize(x, h, w, s["resample"]),
                             lambda x, top, bottom, left, right: np.pad(x, ((0, 0), (top, bottom), (left, right))))
        stacked = np.stack(tiles)  # (tiles, C, th, tw)
        if stacked.dtype != np.uint8 or not (s["do_rescale"] or s["do_normalize"]):
            return _rescale_normalize(stacked, s)
        # uint8: the same arithmetic on the 256 possible values, then a table look-up (bit-identical, faster).
        channels = stacked.shape[1]
        lut = _rescale_normalize(np.broadcast_to(np.arange(256, dtype=np.uint8), (1, channels, 256)).copy(), s)[0]
        return np.stack([lut[c][stacked[:, c]] for c in range(channels)], axis=1)
