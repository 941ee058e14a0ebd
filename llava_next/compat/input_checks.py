"""Input checks of the transformers-shaped model classes: shapes, dtypes, devices, then value ranges in one sync.

`check_inputs` refuses malformed input_ids / inputs_embeds / attention_mask / position_ids / pixel_values /
image_sizes with a typed error (ModelInputError, InvalidImageError, ContextLengthError,
ImageTokenMismatchError) before any forward pass; the value checks (ids in the vocabulary, finite pixels, a 0/1
mask, positions in the context, placeholders = image features) are one reduction and one host sync.

Leaves out: generation arguments (compat/generate_args.py) and processor-side checks (preprocess/).
"""

from __future__ import annotations

import torch

from llava_next.errors import ContextLengthError, ImageTokenMismatchError, InvalidImageError, ModelInputError
from llava_next.preprocess.prompt import check_pixel_values, check_room, image_sizes_as_ints


def _tensor(name: str, value, dims: int, what: str, device: torch.device | None = None) -> torch.Tensor:
    """`value` as a `dims`-D tensor (on `device` unless None), else ModelInputError saying what was expected."""
    if not isinstance(value, torch.Tensor):
        raise ModelInputError(f"{name} must be a torch.Tensor {what}, got {type(value).__name__}; ask the processor "
                              "for return_tensors='pt'")
    if value.dim() != dims:
        raise ModelInputError(f"{name} must be {dims}-D {what}, got shape {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ModelInputError(f"{name} is on {value.device}, the model on {device}; move it with .to(model.device)")
    return value


def check_inputs(model, input_ids=None, attention_mask=None, pixel_values=None, image_sizes=None,
                 inputs_embeds=None, position_ids=None) -> None:
    """Refuse malformed model inputs before any work: shapes, dtypes and devices on the host, then value
    ranges (ids in the vocabulary, finite pixels, 0/1 mask, positions inside the context) in one reduction
    and one host sync. ModelInputError, InvalidImageError (pixels, sizes) or ContextLengthError."""
    tokens = _token_tensor(model, input_ids, inputs_embeds)
    B, T = tokens.shape[:2]
    vocab = model.language_model.embed_tokens.weight.shape[0]
    context = model.config.text_config.max_position_embeddings
    bad = {}  # name -> 0-d bool tensor, True when the values are wrong; read back in one sync
    if input_ids is not None:
        bad["input_ids"] = ((tokens < 0) | (tokens >= vocab)).any()
    else:
        bad["inputs_embeds"] = ~tokens.isfinite().all()
    if attention_mask is not None:
        mask = _tensor("attention_mask", attention_mask, 2, "of (batch, sequence) 0/1 entries")
        if tuple(mask.shape) != (B, T):
            hint = "; forward() keeps no KV cache, so decode with generate()" if mask.shape[-1] > T else ""
            raise ModelInputError(f"attention_mask has shape {tuple(mask.shape)}, the input is ({B}, {T}): they "
                                  f"must match (one 0/1 entry per token){hint}")
        bad["attention_mask"] = ((mask != 0) & (mask != 1)).any()
    if position_ids is not None:
        positions = _tensor("position_ids", position_ids, 2, "of (batch, sequence) positions", tokens.device)
        if positions.is_floating_point() or positions.dtype == torch.bool or positions.shape[0] not in (1, B) \
                or positions.shape[1] != T:
            raise ModelInputError(f"position_ids must be an integer ({B} or 1, {T}) tensor, got "
                                  f"{tuple(positions.shape)} {positions.dtype}")
        bad["position_ids"] = ((positions < 0) | (positions >= context)).any()
    n_features = 0 if pixel_values is None else count_image_features(model, pixel_values, image_sizes)
    if n_features:
        bad["pixel_values"] = ~pixel_values.isfinite().all()
    if input_ids is not None and n_features:
        bad["placeholders"] = (tokens == model.config.image_token_index).sum() != n_features
    found = dict(zip(bad, torch.stack([v.to(tokens.device) for v in bad.values()]).tolist()))
    _raise_found(model, found, tokens, vocab, context, position_ids, n_features)


def _token_tensor(model, input_ids, inputs_embeds) -> torch.Tensor:
    """input_ids (B, T) or inputs_embeds (B, T, D), checked for kind, shape, dtype, device, emptiness and the
    context length."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ModelInputError("pass exactly one of input_ids or inputs_embeds")
    weight = model.language_model.embed_tokens.weight
    width = weight.shape[1]
    if input_ids is not None:
        tokens = _tensor("input_ids", input_ids, 2, "of (batch, sequence) token ids", weight.device)
        if tokens.dtype not in (torch.long, torch.int32):
            raise ModelInputError(f"input_ids must be a torch.long tensor of token ids, got {tokens.dtype}")
    else:
        tokens = _tensor("inputs_embeds", inputs_embeds, 3, "of (batch, sequence, hidden)", weight.device)
        if tokens.shape[2] != width or tokens.dtype != weight.dtype:
            raise ModelInputError(f"inputs_embeds must be (batch, sequence, {width}) {weight.dtype}, got "
                                  f"{tuple(tokens.shape)} {tokens.dtype}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ModelInputError(f"the input is empty (shape {tuple(tokens.shape)}): give at least one token per row")
    context = model.config.text_config.max_position_embeddings
    check_room(tokens.shape[1], 0, context, None)
    return tokens


def _raise_found(model, found: dict, tokens, vocab: int, context: int, position_ids, n_features: int) -> None:
    """The typed error of the first value check that failed (`found`: name -> bool from check_inputs)."""
    if found.get("input_ids"):
        low, high = int(tokens.min()), int(tokens.max())
        raise ModelInputError(f"input_ids hold ids from {low} to {high}; the vocabulary has {vocab} "
                              f"(0..{vocab - 1})")
    if found.get("inputs_embeds"):
        raise ModelInputError("inputs_embeds hold NaN or infinite values")
    if found.get("attention_mask"):
        raise ModelInputError("attention_mask must hold only 0 and 1")
    if found.get("position_ids"):
        low, high = int(position_ids.min()), int(position_ids.max())
        error = ContextLengthError if high >= context else ModelInputError
        raise error(f"position_ids must lie in 0..{context - 1} (the model's context of {context} tokens), "
                    f"got {low}..{high}")
    if found.get("pixel_values"):
        raise InvalidImageError("pixel_values hold NaN or infinite values")
    if found.get("placeholders"):
        placeholders = int((tokens == model.config.image_token_index).sum())
        raise ImageTokenMismatchError(
            f"Image features and image tokens do not match: {placeholders} image tokens in the prompt, "
            f"{n_features} image features from the images' sizes"
        )


def count_image_features(model, pixel_values, image_sizes) -> int:
    """Kind, device and shape checks of pixel_values and image_sizes (preprocess/prompt.check_pixel_values);
    returns the number of image features they give."""
    if not isinstance(pixel_values, torch.Tensor):
        raise InvalidImageError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}; "
                                "ask the processor for return_tensors='pt'")
    if pixel_values.device != model.image_newline.device:
        raise InvalidImageError(f"pixel_values are on {pixel_values.device}, the vision tower on "
                                f"{model.image_newline.device}; move them with .to(model.device)")
    sizes = image_sizes_as_ints(image_sizes) if pixel_values.dim() and pixel_values.shape[0] else []
    check_pixel_values(model.geometry, model.config.vision_config, pixel_values, sizes)
    return sum(model.geometry.num_image_tokens(h, w) for h, w in sizes)

