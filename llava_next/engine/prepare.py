"""Preparing a request: everything that can fail on a bad prompt, before any model work (thread-safe, CPU only).

`RequestPreparer.prepare(prompt, params)` builds the prompt with preprocess/prompt.py (ids with `<image>`
expanded, tiles, each image's placeholder span and content hash) and checks the engine's limits: prompt +
max_tokens beyond `max_model_len` (ContextLengthError), more images than `limit_mm_per_prompt`
(TooManyImagesError), a request that could never fit the KV pool (KVCacheCapacityError), ids outside the
vocabulary or an empty prompt (ModelInputError), stop_token_ids outside the vocabulary (SamplingParamsError);
placeholders or tiles that do not match the images raise ImageTokenMismatchError / InvalidImageError. It reads
only its own settings and the processor, so a server may call it from many threads while the engine steps.

A prompt is a string, `{"prompt": str, "multi_modal_data": {"image": PIL | [PIL]}}`, or
`{"prompt_token_ids": [...], "multi_modal_data": ...}` whose ids already hold every image's placeholders; a dict
may carry vLLM's `"cache_salt": str` (prefix-cache isolation, see block_pool.py). An image may also be given
preprocessed as `{"pixel_values": (tiles, 3, S, S) tensor, "image_size": (H, W)}`.

Leaves out: videos, image embeddings as input, prompt truncation.
"""

from __future__ import annotations

import dataclasses

import torch

from llava_next.engine.request import ImageItem, PreparedRequest
from llava_next.errors import (ContextLengthError, InvalidImageError, KVCacheCapacityError, ModelInputError,
                               SamplingParamsError, TooManyImagesError)
from llava_next.preprocess.prompt import (check_pixel_values, check_room, encode_prompt, image_spans, mm_hash,
                                          preprocessed_image)
from llava_next.sampling.params import SamplingParams

DEFAULT_IMAGE_LIMIT = 8  # images per prompt when limit_mm_per_prompt is not given
MAX_CACHE_SALT = 1024  # characters


def image_limit(limit) -> int:
    if limit is None:
        return DEFAULT_IMAGE_LIMIT
    if isinstance(limit, dict):
        unknown = set(limit) - {"image"}
        if unknown:
            raise ValueError(f"limit_mm_per_prompt: only 'image' is supported, got {sorted(unknown)}")
        limit = limit.get("image", DEFAULT_IMAGE_LIMIT)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit_mm_per_prompt must be a non-negative int or {{'image': int}}, got {limit!r}")
    return limit

class RequestPreparer:
    """The checks and preprocessing of LLMEngine.prepare, over the engine's fixed settings."""

    def __init__(self, config, processor, vocab_size: int, max_model_len: int, image_limit: int, block_size: int,
                 num_blocks: int, structured=None):
        self.structured = structured  # sampling/structured.StructuredDecoding: compiles grammars here
        self.config, self.processor = config, processor
        self.geometry = config.geometry
        self.image_token_id = config.image_token_index
        self.vocab_size, self.max_model_len, self.image_limit = vocab_size, max_model_len, image_limit
        self.block_size, self.num_blocks = block_size, num_blocks

    def prepare(self, prompt, params: SamplingParams | None = None) -> PreparedRequest:
        """Validate and preprocess one prompt (see the module docstring); raises a typed ValueError."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be llava_next.SamplingParams, got {type(params).__name__}")
        params = dataclasses.replace(params)  # a private, re-validated copy
        if any(i >= self.vocab_size for i in params.stop_token_ids or ()):
            raise SamplingParamsError(f"SamplingParams.stop_token_ids must lie in the vocabulary "
                                      f"(0..{self.vocab_size - 1})")
        text, ids, images = self._parse_prompt(prompt)
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if salt is not None and (not isinstance(salt, str) or not 1 <= len(salt) <= MAX_CACHE_SALT):
            raise ModelInputError(f"cache_salt must be a string of 1 to {MAX_CACHE_SALT} characters")
        if len(images) > self.image_limit:
            raise TooManyImagesError(f"the prompt has {len(images)} images; at most {self.image_limit} are allowed "
                                     f"per prompt (limit_mm_per_prompt)")
        if ids is None:
            ids, tiles = encode_prompt(self.processor, self.geometry.num_image_tokens, text, images)
        else:
            ids = self._check_ids(ids)
            tiles = [preprocessed_image(self.processor, im) for im in images]
        items = self._spans(ids, tiles)
        n = len(ids)
        if n == 0:
            raise ModelInputError("the prompt is empty: give at least one token")
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - n
        check_room(n, params.max_tokens, self.max_model_len, "max_tokens", "max_model_len")
        if params.max_tokens < 1:
            raise ContextLengthError(f"the prompt has {n} tokens: no room is left in max_model_len "
                                     f"{self.max_model_len} to generate")
        if params.min_tokens > params.max_tokens:  # max_tokens=None became the room left (found by fuzzing)
            raise SamplingParamsError(f"SamplingParams.min_tokens ({params.min_tokens}) must be <= max_tokens "
                                      f"({params.max_tokens}, the room left in max_model_len)")
        blocks = -(-(n + params.max_tokens) // self.block_size)
        if blocks > self.num_blocks:
            raise KVCacheCapacityError(
                f"the request needs {blocks} KV blocks ({n} prompt + {params.max_tokens} new tokens) but the pool "
                f"holds {self.num_blocks}; lower max_tokens or raise kv_cache_memory_bytes")
        if params.logit_bias and max(params.logit_bias) >= self.vocab_size:
            raise ModelInputError(f"logit_bias names token {max(params.logit_bias)}, outside the vocabulary of "
                                  f"{self.vocab_size}")
        grammar = None
        if params.structured_outputs is not None:
            grammar = self.structured.compile(params.structured_outputs)  # cached; raises StructuredOutputError
        return PreparedRequest(text, ids, items, params, grammar, salt)

    def _parse_prompt(self, prompt):
        if isinstance(prompt, str):
            return prompt, None, []
        if not isinstance(prompt, dict):
            raise ModelInputError(f"a prompt must be a string or a dict with 'prompt' or 'prompt_token_ids', got "
                                  f"{type(prompt).__name__}")
        unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data", "cache_salt"}
        if unknown:
            raise ModelInputError(f"unknown prompt keys {sorted(unknown)}")
        mm = prompt.get("multi_modal_data") or {}
        if not isinstance(mm, dict) or set(mm) - {"image"}:
            raise ModelInputError("multi_modal_data must be a dict with one key, 'image'")
        images = mm.get("image", [])
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
            raise ModelInputError("a prompt dict needs exactly one of 'prompt' or 'prompt_token_ids'")
        if "prompt" in prompt:
            if not isinstance(prompt["prompt"], str):
                raise ModelInputError("'prompt' must be a string")
            return prompt["prompt"], None, images
        return None, prompt["prompt_token_ids"], images

    def _check_ids(self, ids) -> list[int]:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ModelInputError("prompt_token_ids must be a list of ints")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ModelInputError(f"prompt_token_ids hold ids outside the vocabulary (0..{self.vocab_size - 1}): "
                                  f"{bad[:5]}")
        return list(ids)

    def _spans(self, ids: list[int], images) -> list[ImageItem]:
        """Each image's contiguous run of placeholders, in order, its tiles checked and hashed."""
        vision = self.config.vision_config
        for tiles, size in images:
            check_pixel_values(self.geometry, vision, tiles, [size])
            if not bool(tiles.isfinite().all()):
                raise InvalidImageError("pixel values hold NaN or infinite values")
        lengths = [self.geometry.num_image_tokens(h, w) for _, (h, w) in images]
        starts = image_spans(ids, self.image_token_id, lengths)
        return [ImageItem(tiles.float() if tiles.dtype == torch.float64 else tiles, size, start, length,
                          mm_hash(tiles, size)) for (tiles, size), start, length in zip(images, starts, lengths)]
