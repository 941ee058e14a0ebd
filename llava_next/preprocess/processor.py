"""LlavaNextProcessor: text + images -> model inputs, like transformers' `LlavaNextProcessor` (5.x).

It joins the tokenizer (`tokenizer.py`), the image processor (`image_processor.py`) and the chat template
(`chat_template.py`). Each `<image>` placeholder in the text is expanded to exactly the number of tokens the
model will produce for that image, taken from `anyres.AnyresGeometry.num_image_tokens` (the same function the
model uses to pack features, so the two cannot disagree):

    576 base features (+ num_additional_image_tokens, - 1 for strategy "default") + unpadded rows * (cols + 1)

Images are matched to placeholders in reading order across the whole batch of prompts. A count mismatch is an
`ImageTokenMismatchError` naming both counts; truncating inside an image run is a `ContextLengthError`.

Checkpoint layouts read by `from_pretrained`: the hub's (processor_config.json with patch_size & co,
preprocessor_config.json, chat_template.json, tokenizer files) and the one transformers 5.x saves
(processor_config.json with a nested "image_processor", chat_template.jinja).

`save_pretrained` writes transformers 5.x's layout (processor_config.json with the image processor nested, named
chat templates under additional_chat_templates/) and returns the written config file in a list, as transformers.

Leaves out: videos and audio, `return_mm_token_type_ids`, control-token
sanitizing, and processor classes other than LLaVA-NeXT's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llava_next.model.anyres import AnyresGeometry
from llava_next.preprocess.assistant_mask import assistant_masks, render_with_spans
from llava_next.preprocess.batch_feature import BatchFeature
from llava_next.preprocess.chat_messages import images_in, normalize_conversations
from llava_next.preprocess.prompt import check_placeholders, expand_image_tokens, image_sizes_as_ints
from llava_next.preprocess.chat_template import (
    CHAT_TEMPLATE_DIR,
    load_chat_template,
    render_chat_template,
    resolve_chat_template,
    template_variables,
)
from llava_next.errors import ImageTokenMismatchError
from llava_next.loading.hub import read_json
from llava_next.preprocess.image_processor import DEFAULTS as IMAGE_SETTINGS
from llava_next.preprocess.image_processor import LlavaNextImageProcessor, flatten_images
from llava_next.preprocess.images import DEFAULT_MAX_PIXELS, load_image
from llava_next.preprocess.tokenizer import Tokenizer, pop_tokenizer_settings, text_batch

PROCESSOR_FILES = ["*.json", "*.jinja", "chat_templates/*.jinja", "additional_chat_templates/*.jinja"]
# `from_pretrained` kwargs that override processor_config.json (the __init__ arguments other than the parts).
PROCESSOR_SETTINGS = frozenset({"patch_size", "vision_feature_select_strategy", "chat_template", "image_token",
                                "num_additional_image_tokens"})
TEXT_KWARGS = {"padding", "truncation", "max_length", "pad_to_multiple_of", "padding_side", "add_special_tokens",
               "return_attention_mask"}


class LlavaNextProcessor:
    """`processor(images, text, padding=, return_tensors=)`, `apply_chat_template(...)`, `decode(...)`."""

    def __init__(
        self,
        image_processor: LlavaNextImageProcessor | None = None,
        tokenizer: Tokenizer | None = None,
        patch_size: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | dict | None = None,
        image_token: str = "<image>",
        num_additional_image_tokens: int = 0,
    ):
        if tokenizer is None:
            raise ValueError("LlavaNextProcessor needs a tokenizer")
        self.image_processor = image_processor if image_processor is not None else LlavaNextImageProcessor()
        self.tokenizer = tokenizer
        self.patch_size = patch_size
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.num_additional_image_tokens = int(num_additional_image_tokens or 0)
        self.chat_template = chat_template
        # transformers: a tokenizer that declares its own image token wins over the processor's setting
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or tokenizer.backend_tokenizer.token_to_id(self.image_token) is None:
            raise ValueError(f"the image token {self.image_token!r} is not in the tokenizer's vocabulary")
        tokenizer.protected_token_ids = frozenset({self.image_token_id})
        if getattr(tokenizer, "chat_template", None) is None and chat_template is not None:
            tokenizer.chat_template = chat_template  # transformers: the tokenizer carries the template too

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> "LlavaNextProcessor":
        """Load from a local folder (never the network) or a hub id (only the small json/jinja files).

        kwargs as transformers: processor settings (`PROCESSOR_SETTINGS`, e.g. `num_additional_image_tokens`),
        tokenizer settings (`padding_side="left"`, `model_max_length`, `pad_token`, ...) and image processor
        settings (`do_pad`, `image_grid_pinpoints`, ...) override the files; hub options go to the hub;
        `use_fast` and `trust_remote_code` are ignored; anything else is a TypeError before any download.
        """
        from llava_next.loading.hub import hub_options, resolve_folder

        given_image_processor = kwargs.pop("image_processor", None)  # transformers: parts given as instances
        given_tokenizer = kwargs.pop("tokenizer", None)
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k in PROCESSOR_SETTINGS}
        tokenizer_settings = pop_tokenizer_settings(kwargs)
        if "image_token" in settings:  # transformers passes it to the tokenizer too, whose own image token wins
            tokenizer_settings["image_token"] = settings["image_token"]
        image_settings = {k: kwargs.pop(k) for k in list(kwargs) if k in IMAGE_SETTINGS}
        hub = hub_options(kwargs, f"{cls.__name__}.from_pretrained")
        folder = resolve_folder(name_or_path, allow_patterns=PROCESSOR_FILES, **hub)
        config = {**read_json(folder / "processor_config.json", required=False), **settings}
        tokenizer = given_tokenizer if given_tokenizer is not None else Tokenizer.from_pretrained(
            folder, **tokenizer_settings)
        # preprocessor_config.json, else the "image_processor" entry of processor_config.json (transformers 5.x)
        image_processor = given_image_processor if given_image_processor is not None else \
            LlavaNextImageProcessor.from_pretrained(folder, **image_settings)
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=config.get("patch_size"),
            vision_feature_select_strategy=config.get("vision_feature_select_strategy"),
            chat_template=settings["chat_template"] if "chat_template" in settings else load_chat_template(folder),
            image_token=config.get("image_token", "<image>"),
            num_additional_image_tokens=config.get("num_additional_image_tokens", 0),
        )

    def to_dict(self) -> dict:
        """processor_config.json's content as transformers 5.x writes it (the image processor nested in it)."""
        return {
            "image_processor": self.image_processor.to_dict(),
            "image_token": self.image_token,
            "num_additional_image_tokens": self.num_additional_image_tokens,
            "patch_size": self.patch_size,
            "processor_class": "LlavaNextProcessor",
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
        }

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        Path(json_file_path).write_text(self.to_json_string(), encoding="utf-8")

    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> list[str]:
        """Write transformers 5.x's layout: tokenizer files, processor_config.json (image processor nested),
        chat_template.jinja and named templates under additional_chat_templates/. Returns [processor_config.json],
        as transformers does."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        templates = self.chat_template
        if isinstance(templates, str):
            templates = {"default": templates}
        named = folder / CHAT_TEMPLATE_DIR
        for name, template in (templates or {}).items():
            path = folder / "chat_template.jinja" if name == "default" else named / f"{name}.jinja"
            if path.parent != folder and path.parent.resolve() != named.resolve():
                raise ValueError(f"invalid chat template name {name!r}")
            path.parent.mkdir(exist_ok=True)
            path.write_text(template, encoding="utf-8")
        config_file = folder / "processor_config.json"
        self.to_json_file(config_file)
        return [str(config_file)]

    # ------------------------------------------------------------------ image tokens

    @property
    def geometry(self) -> AnyresGeometry:
        """Pinpoints and tile size of the image processor, with the vision tower's patch size."""
        if self.patch_size is None:
            raise ValueError("patch_size is not set (processor_config.json); it is needed to count image tokens")
        tiles = self.image_processor.geometry()
        return AnyresGeometry(tiles.pinpoints, tile_size=tiles.tile_size, patch_size=int(self.patch_size),
                              floor_patches=True)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Placeholders one image of (height, width) pixels becomes (transformers' `_get_number_of_features`)."""
        extra = self.num_additional_image_tokens - (1 if self.vision_feature_select_strategy == "default" else 0)
        return self.geometry.num_image_tokens(int(height), int(width), extra_base_tokens=extra)

    # ------------------------------------------------------------------ __call__

    def __call__(self, images=None, text=None, padding: bool | str = False, return_tensors: str | None = None,
                 **kwargs) -> BatchFeature:
        """Tokenize `text` (str or list) with each `<image>` expanded, and preprocess `images` (in reading order)."""
        if _looks_like_text(images) and text is not None and not _looks_like_text(text):
            images, text = text, images  # processor(prompt, image): the order older transformers accepted
        elif _looks_like_text(images) and text is None:
            images, text = None, images
        if images is None and text is None:
            raise ValueError("give at least one of images= or text=")
        allow_local_network = bool(kwargs.pop("allow_local_network", False))
        text_kwargs, image_kwargs = self._split_kwargs(kwargs)
        texts = None if text is None else text_batch(text)[0]
        flat_images = flatten_images(images) if images is not None else []
        # URLs and paths are fetched here, with the caller's local-network choice (the image processor's own
        # loading refuses local addresses)
        flat_images = [load_image(im, max_pixels=getattr(self.image_processor, "max_pixels", DEFAULT_MAX_PIXELS),
                                  allow_local_network=allow_local_network) if isinstance(im, str) else im
                       for im in flat_images]
        if texts is not None:
            check_placeholders(texts, self.image_token, len(flat_images))

        data = {}
        image_inputs = {}
        if flat_images:
            image_inputs = self.image_processor.preprocess(flat_images, return_tensors=return_tensors, **image_kwargs)
        if texts is not None:
            if flat_images:
                counts = iter(self.num_image_tokens(h, w) for h, w in image_sizes_as_ints(image_inputs["image_sizes"]))
                texts = [expand_image_tokens(t, self.image_token, counts) for t in texts]
            encoded = self.tokenizer(texts, padding=padding, return_tensors=return_tensors, **text_kwargs)
            self._check_image_token_counts(texts, encoded["input_ids"])
            data.update(encoded)
        data.update(image_inputs)
        return BatchFeature(data, tensor_type=return_tensors)

    def _split_kwargs(self, kwargs: dict) -> tuple[dict, dict]:
        text_kwargs = dict(kwargs.pop("text_kwargs", None) or {})
        image_kwargs = dict(kwargs.pop("images_kwargs", None) or {})
        common = kwargs.pop("common_kwargs", None) or {}
        for key, value in {**common, **kwargs}.items():
            if key in TEXT_KWARGS:
                text_kwargs[key] = value
            elif key in IMAGE_SETTINGS:
                image_kwargs[key] = value
            elif key != "return_tensors":
                raise TypeError(f"LlavaNextProcessor got an unexpected keyword argument {key!r}")
        return text_kwargs, image_kwargs

    def _check_image_token_counts(self, texts: list[str], input_ids) -> None:
        """Every placeholder written into the text must come out as exactly one image-token id."""
        ids = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
        ids_count = [list(row).count(self.image_token_id) for row in ids]
        text_count = [t.count(self.image_token) for t in texts]
        if ids_count != text_count:
            raise ImageTokenMismatchError(
                f"image tokens in the text {text_count} and in input_ids {ids_count} differ: the tokenizer does "
                f"not keep {self.image_token!r} as one token"
            )

    # ------------------------------------------------------------------ chat template

    def apply_chat_template(
        self,
        conversation,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = False,
        return_tensors: str | None = None,
        return_dict: bool = False,
        processor_kwargs: dict | None = None,
        **kwargs,
    ):
        """Render the conversation(s) with the checkpoint's template; with tokenize=True run the full processor.

        Image parts ({"type": "image", "url"|"path"|"image"|"base64": ...}) are loaded when tokenizing.
        Keyword arguments the template does not read go to the processor (e.g. padding=True), as in transformers.
        """
        template = resolve_chat_template(self.chat_template, chat_template)
        variables = template_variables(template)
        processor_kwargs = dict(processor_kwargs or {})
        processor_kwargs.update({k: v for k, v in kwargs.items() if k not in variables})
        allow_local_network = bool(processor_kwargs.pop("allow_local_network", kwargs.pop("allow_local_network", False)))
        conversations, batched = normalize_conversations(conversation)
        track = bool(processor_kwargs.pop("return_assistant_tokens_mask", False))
        if track and (continue_final_message or not (tokenize and return_dict)):
            raise ValueError("return_assistant_tokens_mask=True needs tokenize=True and return_dict=True, and "
                             "cannot be combined with continue_final_message")
        render = render_with_spans if track else render_chat_template
        prompts = render(
            conversations, template, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tools=tools, documents=documents,
            **{**self.tokenizer.special_tokens_map, **kwargs},
        )
        prompts, spans = prompts if track else (prompts, None)
        if not tokenize:
            return prompts if batched else prompts[0]

        bos = self.tokenizer.bos_token
        if bos is not None and prompts[0].startswith(bos):
            processor_kwargs["add_special_tokens"] = False  # the template already wrote BOS
        images = processor_kwargs.pop("images", None)
        if images is not None:
            batch_images = images if batched else [images]
        else:
            batch_images = [images_in(conv, allow_local_network) for conv in conversations]
        has_images = any(im is not None for ims in batch_images for im in ims)
        out = self(images=batch_images if has_images else None, text=prompts if batched else prompts[0],
                   return_tensors=return_tensors, **processor_kwargs)
        if track:  # as transformers: a row per conversation, tensors when asked for
            masks = assistant_masks(self, prompts, spans, out, processor_kwargs.get("add_special_tokens", True),
                                    processor_kwargs.get("padding_side"))
            out = BatchFeature({**out, "assistant_masks": masks}, tensor_type=return_tensors)
        return out if return_dict else out["input_ids"]

    # ------------------------------------------------------------------ decoding

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        return self.tokenizer.decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys([*self.tokenizer.model_input_names, *self.image_processor.model_input_names]))

    def __repr__(self) -> str:
        return (f"LlavaNextProcessor(patch_size={self.patch_size}, num_additional_image_tokens="
                f"{self.num_additional_image_tokens}, vision_feature_select_strategy="
                f"{self.vision_feature_select_strategy!r}, image_token={self.image_token!r}, tokenizer={self.tokenizer!r})")


class AutoProcessor:
    """`AutoProcessor.from_pretrained(...)` returns a LlavaNextProcessor (the only processor here)."""

    @staticmethod
    def from_pretrained(name_or_path: str | os.PathLike, **kwargs) -> LlavaNextProcessor:
        return LlavaNextProcessor.from_pretrained(name_or_path, **kwargs)


def _looks_like_text(value) -> bool:
    return isinstance(value, str) and not _is_image_path(value) or (
        isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)
        and not all(_is_image_path(v) for v in value)
    )


def _is_image_path(value: str) -> bool:
    """A string that names an image (URL or existing file) rather than a prompt."""
    return value.startswith(("http://", "https://", "data:image/", "file://")) or (
        len(value) < 4096 and "\n" not in value and os.path.isfile(value)
    )


__all__ = ["LlavaNextProcessor", "AutoProcessor"]
