"""Chat messages -> what the chat template reads + the images in order: the one walker over content parts.

Parts: OpenAI's {"type": "text", "text"} and {"type": "image_url", "image_url": {"url"} | str}, transformers'
{"type": "image", "image" | "url" | "path" | "base64": ...} (each key present is one image, in transformers'
order); a str or None content is one text part. `normalize_conversations` + `images_in`: apply_chat_template's
view (blocks kept as given). `split_messages`: the engine's front doors, messages (dicts or pydantic models) ->
text and {"type": "image"} parts + [load(key, source)], the loader injected (`load_part` offline in LLM.chat,
the identity on the server, whose media policy fetches the URLs later in its own pool); `developer` is `system`.

Leaves out: audio and video parts, tool-call messages.
"""

from __future__ import annotations

from collections.abc import Mapping

from llava_next.errors import ChatTemplateError, ModelInputError
from llava_next.preprocess.images import load_image

IMAGE_KEYS = ("image", "url", "path", "base64")  # transformers' order


def load_part(key: str, source, allow_local_network: bool = False):
    """The image of one image part's `key: source` (a bare base64 payload gets a data: prefix)."""
    if key == "base64" and isinstance(source, str) and not source.startswith("data:"):
        source = "data:image/png;base64," + source  # the decoder sniffs the real format
    return load_image(source, allow_local_network=allow_local_network)


def image_sources(block) -> list[tuple[str, object]]:
    """[(key, source)] of an image part (an image_url part is key "url"); [] for anything else."""
    if not isinstance(block, Mapping):
        return []
    if block.get("type") == "image_url" and "image_url" in block:
        info = block["image_url"]
        return [("url", info.get("url", "") if isinstance(info, Mapping) else info)]
    if block.get("type") == "image":
        return [(key, block[key]) for key in IMAGE_KEYS if key in block]
    return []


def normalize_conversations(conversation) -> tuple[list[list[dict]], bool]:
    """One conversation or a batch -> (batch, is_batched); None-valued keys dropped, OpenAI image_url blocks mapped."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ChatTemplateError("a conversation must be a non-empty list of {'role', 'content'} messages")
    batched = isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
    conversations = conversation if batched else [conversation]
    out = []
    for conv in conversations:
        conv = getattr(conv, "messages", conv)
        messages = []
        for message in conv:
            if not isinstance(message, Mapping):
                raise ChatTemplateError(f"chat messages must be dicts, got {message!r}")
            message = {k: v for k, v in message.items() if v is not None}
            if isinstance(message.get("content"), list):
                message["content"] = [{"type": "image", "url": image_sources(block)[0][1]}
                                      if isinstance(block, Mapping) and block.get("type") == "image_url"
                                      and "image_url" in block else block for block in message["content"]]
            messages.append(message)
        out.append(messages)
    return out, batched


def images_in(conversation: list[dict], allow_local_network: bool = False) -> list:
    """The images of a conversation's image parts, loaded, in order (transformers' keys and order)."""
    return [load_part(key, source, allow_local_network) for message in conversation
            if isinstance(message.get("content"), list) for block in message["content"]
            for key, source in image_sources(block)]


def split_messages(conversation, load=lambda key, source: source,
                   image_token: str | None = None) -> tuple[list[dict], list]:
    """(messages for the chat template, [load(key, source)] per image in order); ModelInputError for a message
    that is not {"role", "content"}, an unknown or empty part, or (with `image_token`) the placeholder as text."""
    messages, images = [], []
    for i, message in enumerate(conversation):
        message = message.model_dump(exclude_none=True) if hasattr(message, "model_dump") else message
        if not isinstance(message, Mapping) or "role" not in message:
            raise ModelInputError("each chat message must be a dict with 'role' and 'content'")
        content, parts = message.get("content"), []
        for block in [{"type": "text", "text": content or ""}] if content is None or isinstance(content, str) \
                else content:
            sources = image_sources(block)
            if isinstance(block, Mapping) and block.get("type") == "text":
                if image_token and image_token in block.get("text", ""):
                    raise ModelInputError(f"messages[{i}] holds the image placeholder {image_token!r} as text; "
                                          "send images as image_url parts")
                parts.append({"type": "text", "text": block.get("text", "")})
            elif sources:
                images += [load(key, source) for key, source in sources]
                parts += [{"type": "image"}] * len(sources)
            else:
                kind = block.get("type") if isinstance(block, Mapping) else type(block).__name__
                raise ModelInputError(f"messages[{i}]: a content part is text, image_url or image (with its "
                                      f"image), got {str(kind)[:40]!r}")
        messages.append({"role": "system" if message["role"] == "developer" else message["role"], "content": parts})
    return messages, images
