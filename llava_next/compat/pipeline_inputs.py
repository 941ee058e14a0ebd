"""A pipeline call's arguments and inputs, sorted out before the model runs (compat/pipeline.py runs them).

- `sanitize` splits a call's keyword arguments into preprocess / generate / postprocess settings as
  transformers' `_sanitize_parameters` does (generation arguments by name, `stop_sequence` as `stop_strings`,
  `return_full_text` / `return_tensors` as a `ReturnType`, the rest as chat-template variables); `merged` lays a
  call's settings over the pipeline's defaults; `with_generation_defaults` adds transformers'
  `max_new_tokens=256` and the tokenizer's pad id unless the call or the checkpoint sets them.
- Inputs: `Chat` (a conversation), `is_chat`, `as_dict_inputs` ({"images"/"image", "text"} items) and
  `load_images` (paths, URLs and PIL images in the nesting given).
- Batching: `batches` groups consecutive inputs with the same keys; `collate` left-pads their ids and mask
  and zero-pads `pixel_values` on the tile axis, so rows of different lengths and tile counts share a batch.

Leaves out: transformers' `tools` parsing and `num_workers` (see compat/pipeline.py).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from llava_next.compat.generate_args import BOOKKEEPING, GENERATION_ARGUMENTS
from llava_next.preprocess.batch_feature import BatchFeature
from llava_next.preprocess.images import load_image

DEFAULT_MAX_NEW_TOKENS = 256  # transformers' ImageTextToTextPipeline default when generation_config sets none


class ReturnType(enum.Enum):
    TENSORS = 0
    NEW_TEXT = 1
    FULL_TEXT = 2


# ---------------------------------------------------------------------- arguments


def sanitize(tokenizer, /, max_new_tokens=None, generate_kwargs=None, timeout=None, return_full_text=None,
             return_tensors=None, return_type=None, clean_up_tokenization_spaces=None, stop_sequence=None,
             continue_final_message=None, skip_special_tokens=None, processor_kwargs=None,
             allow_local_network=None, **kwargs) -> dict:
    """Split call arguments into preprocess / generate / postprocess settings (transformers' rules).

    `tokenizer` (the pipeline's, positional only: a call's own `tokenizer=` is a generation argument) goes
    with `stop_sequence` to generate()."""
    pre, post = {}, {}
    generate = dict(generate_kwargs or {})
    for key in list(kwargs):
        if key in GENERATION_ARGUMENTS:  # the rest reach the processor, which refuses what it does not know
            generate[key] = kwargs.pop(key)
    if "tools" in kwargs:
        post["tools"] = kwargs["tools"]
    pre["template_kwargs"] = kwargs  # template variables; the rest reaches the processor
    if timeout is not None:
        pre["timeout"] = timeout
    if allow_local_network is not None:  # image URLs may reach loopback/private addresses (off by default)
        pre["allow_local_network"] = bool(allow_local_network)
    if continue_final_message is not None:
        pre["continue_final_message"] = post["continue_final_message"] = continue_final_message
    if processor_kwargs is not None:
        pre["processor_kwargs"] = dict(processor_kwargs)
    if stop_sequence is not None:  # checked with the other generation arguments (check_generate_kwargs)
        generate["stop_strings"] = stop_sequence
        generate["tokenizer"] = tokenizer
    if max_new_tokens is not None:
        if "max_new_tokens" in (generate_kwargs or {}):
            raise ValueError("'max_new_tokens' is defined twice, once in 'generate_kwargs' and once as a direct "
                             "parameter, please use only one")
        generate["max_new_tokens"] = max_new_tokens
    if return_full_text is not None and return_type is None:
        if return_tensors is not None:
            raise ValueError("`return_full_text` is mutually exclusive with `return_tensors`")
        return_type = ReturnType.FULL_TEXT if return_full_text else ReturnType.NEW_TEXT
    if return_tensors is not None and return_type is None:
        return_type = ReturnType.TENSORS
    if return_type is not None:
        post["return_type"] = return_type
    if clean_up_tokenization_spaces is not None:
        post["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
    if skip_special_tokens is not None:
        post["skip_special_tokens"] = skip_special_tokens
    return {"pre": pre, "generate": generate, "post": post}

def merged(defaults: dict, call: dict) -> tuple[dict, dict, dict]:
    """A call's settings (`sanitize`d) over the pipeline's defaults: (preprocess, generate, postprocess)."""
    pre = {**defaults["pre"], **call["pre"]}
    pre["template_kwargs"] = {**defaults["pre"].get("template_kwargs", {}),
                              **call["pre"].get("template_kwargs", {})}
    generate = call["generate"]
    if "generation_config" not in generate:
        generate = {**defaults["generate"], **generate}
    post = {**defaults["post"], **call["post"]}
    return pre, generate, post

def with_generation_defaults(model, tokenizer, generate: dict) -> dict:
    """transformers' `_prepare_generate_kwargs`: max_new_tokens=256 and the tokenizer's pad id, unless set
    by the call or the checkpoint's generation_config.json."""
    config = getattr(model, "generation_config", None) or {}
    set_params = {k for k, v in dict(config).items() if k not in BOOKKEEPING and v is not None}
    override = generate.get("generation_config")
    if override is not None:
        items = override.to_dict() if hasattr(override, "to_dict") else dict(override)
        set_params |= {k for k, v in items.items() if v is not None}
    set_params |= set(generate)
    defaults = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS}
    if tokenizer.pad_token_id is not None:
        defaults["pad_token_id"] = tokenizer.pad_token_id
    added = {k: v for k, v in defaults.items()
             if k not in set_params and not (k == "max_new_tokens" and "max_length" in set_params)}
    return {**generate, **added}


# ---------------------------------------------------------------------- inputs and batches


class Chat:
    """A conversation (transformers' `Chat`): a list of messages, each with "role" and "content"."""

    def __init__(self, messages):
        messages = list(messages)
        if not messages or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in messages):
            raise ValueError("When passing chat dicts as input, each dict must have a 'role' and 'content' key.")
        self.messages = messages


def plain(text):
    return text.messages if isinstance(text, Chat) else text


def is_chat(arg) -> bool:
    return isinstance(arg, (list, tuple)) and len(arg) > 0 and isinstance(arg[0], (list, tuple, Mapping))


def as_dict_inputs(images):
    """{"images"/"image": ..., "text": ...} or a list of them -> a list of {"images", "text"} items; else None."""
    candidates = [images] if isinstance(images, Mapping) else images
    if not isinstance(candidates, (list, tuple)) or not candidates:
        return None
    if not all(isinstance(c, Mapping) and "text" in c for c in candidates):
        return None
    return [{"images": c.get("images", c.get("image")), "text": c["text"], "input_text": c["text"]}
            for c in candidates]


def load_images(images, timeout, allow_local_network: bool = False):
    """Paths, URLs and PIL images, in the nesting given (one image, a list, a list of lists)."""
    if isinstance(images, (list, tuple)):
        return [load_images(image, timeout, allow_local_network) for image in images]
    if timeout is not None and isinstance(images, str):
        return load_image(images, timeout=timeout, allow_local_network=allow_local_network)
    return load_image(images, allow_local_network=allow_local_network)


def batches(prepared: list[dict], size: int):
    """Consecutive groups of at most `size` inputs that can share a batch (the same input keys)."""
    group: list[dict] = []
    for item in prepared:
        if group and (len(group) == size or set(item["inputs"].keys()) != set(group[0]["inputs"].keys())):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def collate(features: list[BatchFeature], pad_token_id) -> BatchFeature:
    """Left-pad input_ids/attention_mask; zero-pad pixel_values on the tile axis; concatenate the rest."""
    if len(features) == 1:
        return BatchFeature(dict(features[0]))
    for f in features:
        if "attention_mask" not in f:
            f["attention_mask"] = torch.ones_like(f["input_ids"])
    length = max(f["input_ids"].shape[1] for f in features)
    out = {}
    for key in features[0].keys():
        values = [f[key] for f in features]
        if key in ("input_ids", "attention_mask"):  # (rows, length): pad on the left
            fill = pad_token_id if key == "input_ids" else 0
            values = [F.pad(v, (length - v.shape[1], 0), value=fill) for v in values]
        elif key == "pixel_values" and values[0].dim() == 5:  # (rows, tiles, C, H, W): pad the tiles with zeros
            tiles = max(v.shape[1] for v in values)
            values = [F.pad(v, (0, 0, 0, 0, 0, 0, 0, tiles - v.shape[1])) for v in values]
        out[key] = torch.cat(values, dim=0)
    return BatchFeature(out)
