"""The prompt builder: text or ids + images -> ids with each image's placeholders, image spans, tiles, hash.

One copy of each step and check for every front door: the processor, the engine (engine/prepare.py) and the
transformers-shaped forward/generate (compat/input_checks.py, generation/args.py) use `expand_image_tokens`,
`check_placeholders`, `encode_prompt`, `image_sizes_as_ints`, `check_pixel_values`, `image_spans`, `check_room` (the one
ContextLengthError) and `mm_hash`.
Leaves out: tensors' devices and the value checks that need a host sync (the caller batches them), videos.
"""

from __future__ import annotations

import numpy as np
import torch
from blake3 import blake3

from llava_next.errors import ContextLengthError, ImageTokenMismatchError, InvalidImageError, ModelInputError


def expand_image_tokens(text: str, image_token: str, counts) -> str:
    """Each `image_token` in `text` repeated next(counts) times (the image's number of features)."""
    pieces = text.split(image_token)
    return pieces[0] + "".join(image_token * next(counts) + piece for piece in pieces[1:])


def check_placeholders(texts: list[str], image_token: str, num_images: int) -> None:
    """ImageTokenMismatchError unless the texts hold one `image_token` per image."""
    placeholders = sum(t.count(image_token) for t in texts)
    if placeholders != num_images:
        raise ImageTokenMismatchError(f"the prompts contain {placeholders} {image_token} placeholder(s) but "
                                      f"{num_images} image(s) were given; they must match (one per image, in order)")


def check_room(prompt_len: int, new_tokens: int, limit: int, new_name: str | None = "max_new_tokens",
               limit_name: str = "the model's context of") -> None:
    """ContextLengthError when the prompt plus the tokens to generate (`new_name`; None: a forward pass, no new
    tokens) do not fit `limit`."""
    if prompt_len + new_tokens > limit:
        asked, lower = (f" and {new_name} is {new_tokens}", f", or lower {new_name}") if new_name else ("", "")
        raise ContextLengthError(
            f"the prompt has {prompt_len} tokens (image tokens included){asked}: {prompt_len + new_tokens} > "
            f"{limit_name} {limit} tokens; shorten the prompt, use fewer or smaller images{lower}")


def image_sizes_as_ints(image_sizes) -> list[tuple[int, int]]:
    """(images, 2) tensor/array/list of (H, W) -> python ints (one host sync, never through a float cast);
    InvalidImageError for anything else."""
    if image_sizes is None:
        raise InvalidImageError("pixel_values were given without image_sizes")
    if torch.is_tensor(image_sizes) and (image_sizes.is_floating_point() or image_sizes.dtype is torch.bool):
        raise InvalidImageError(f"image_sizes must be integers, got {image_sizes.dtype}")
    shape = tuple(image_sizes.shape) if hasattr(image_sizes, "shape") else None
    try:
        sizes = [(int(h), int(w)) for h, w in (image_sizes.tolist() if shape is not None else image_sizes)]
    except (TypeError, ValueError):
        sizes = None
    if sizes is None or (shape is not None and (len(shape) != 2 or shape[1] != 2)) or not sizes:
        raise InvalidImageError(f"image_sizes must be (images, 2) of (height, width), got {shape or image_sizes!r}")
    return sizes


def check_pixel_values(geometry, vision, pixel_values: torch.Tensor, sizes: list[tuple[int, int]]) -> list[int]:
    """Tiles per image of `sizes` ((H, W) ints); InvalidImageError when pixel_values ((sum of tiles, C, S, S), or
    (images, max tiles, C, S, S) zero-padded) are not float tiles of the vision tower holding them."""
    tile = (vision.num_channels, vision.image_size, vision.image_size)
    if not pixel_values.is_floating_point():
        raise InvalidImageError(f"pixel_values must be floating point (the processor's normalised output), got "
                                f"{pixel_values.dtype}")
    if pixel_values.dim() not in (4, 5) or tuple(pixel_values.shape[-3:]) != tile:
        raise InvalidImageError(f"pixel_values must be (tiles, {tile[0]}, {tile[1]}, {tile[2]}) or (images, "
                                f"tiles, {tile[0]}, {tile[1]}, {tile[2]}), got {tuple(pixel_values.shape)}")
    if pixel_values.shape[0] == 0 and not sizes:
        return []
    if min(min(hw) for hw in sizes) < 1:
        raise InvalidImageError(f"image sizes must be positive, got {sizes}")
    tiles = [geometry.num_tiles(h, w) for h, w in sizes]
    if pixel_values.dim() == 5:
        if pixel_values.shape[0] != len(sizes):
            raise InvalidImageError(f"pixel_values has {pixel_values.shape[0]} images but image_sizes has "
                                    f"{len(sizes)}")
        if max(tiles) > pixel_values.shape[1]:
            raise InvalidImageError(f"an image needs {max(tiles)} tiles but pixel_values holds "
                                    f"{pixel_values.shape[1]}")
    elif pixel_values.shape[0] != sum(tiles):
        raise InvalidImageError(f"pixel_values has {pixel_values.shape[0]} tiles, image_sizes {sizes} imply "
                                f"{sum(tiles)}")
    return tiles


def image_spans(ids: list[int], image_token_id: int, lengths: list[int]) -> list[int]:
    """The first position of each image's `lengths[i]` placeholders in `ids`; ImageTokenMismatchError when the
    count differs or a run is not contiguous."""
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(positions) != sum(lengths):
        raise ImageTokenMismatchError(f"the prompt holds {len(positions)} image tokens, the {len(lengths)} "
                                      f"image(s) give {sum(lengths)} features")
    starts, cursor = [], 0
    for length in lengths:
        span = positions[cursor: cursor + length]
        if span[-1] - span[0] != length - 1:
            raise ImageTokenMismatchError(f"image {len(starts)}'s {length} placeholders are not contiguous")
        starts.append(span[0])
        cursor += length
    return starts


def mm_hash(tiles: torch.Tensor, size: tuple[int, int]) -> str:
    """Content hash of one preprocessed image: its tiles' bytes, dtype, shape and original size. BLAKE3 (as
    vLLM's multimodal hasher): cryptographic, so no image can be made to collide with another's cache entry,
    and ~7x faster than hashlib's blake2b on one core (0.7 vs 4.9 ms for a 5-tile image), which is TTFT."""
    h = blake3(f"{tuple(tiles.shape)}|{tiles.dtype}|{size[0]}x{size[1]}|".encode())
    arr = tiles.detach().cpu().contiguous()
    h.update((arr if arr.dtype != torch.bfloat16 else arr.view(torch.int16)).numpy().view(np.uint8))  # no copy
    return h.hexdigest(16)


def preprocessed_image(processor, image) -> tuple[torch.Tensor, tuple[int, int]]:
    """(tiles (n, C, S, S), (H, W)) of a raw image, or of {"pixel_values", "image_size"} given preprocessed."""
    if isinstance(image, dict):
        if set(image) != {"pixel_values", "image_size"}:
            raise InvalidImageError("a preprocessed image is {'pixel_values': tensor, 'image_size': (H, W)}")
        tiles, size = torch.as_tensor(image["pixel_values"]), tuple(int(v) for v in image["image_size"])
        return (tiles[0] if tiles.dim() == 5 and tiles.shape[0] == 1 else tiles), size
    if processor is None:
        raise InvalidImageError("images other than {'pixel_values', 'image_size'} dicts need a processor")
    out = processor.image_processor.preprocess([image], return_tensors=None, do_pad=False)
    return torch.from_numpy(np.asarray(out["pixel_values"][0])), tuple(int(v) for v in out["image_sizes"][0])


def encode_prompt(processor, num_image_tokens, text: str, images: list) -> tuple[list[int], list]:
    """(ids with each `<image>` expanded, [(tiles, (H, W))]) of a text prompt; `num_image_tokens(h, w)` counts an
    image's features. A text that starts with BOS (a chat template wrote it) gets no second one."""
    if processor is None:
        raise ModelInputError("a text prompt needs the engine's processor; give prompt_token_ids instead")
    tok = processor.tokenizer
    kwargs = {"add_special_tokens": False} if tok.bos_token is not None and text.startswith(tok.bos_token) else {}
    if not images:
        return list(processor(text=text, **kwargs)["input_ids"][0]), []
    if all(isinstance(im, dict) for im in images):  # preprocessed: expanded here with the model's geometry
        prepared = [preprocessed_image(processor, im) for im in images]
        check_placeholders([text], processor.image_token, len(prepared))
        counts = iter(num_image_tokens(h, w) for _, (h, w) in prepared)
        return list(tok([expand_image_tokens(text, processor.image_token, counts)], **kwargs)["input_ids"][0]), \
            prepared
    if any(isinstance(im, dict) for im in images):
        raise InvalidImageError("mix of preprocessed and raw images in one prompt")
    out = processor(images=images, text=text, do_pad=False, **kwargs)
    return list(out["input_ids"][0]), [(torch.from_numpy(np.asarray(pv)), tuple(int(v) for v in hw))
                                       for pv, hw in zip(out["pixel_values"], out["image_sizes"])]
