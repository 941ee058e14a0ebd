"""`apply_chat_template(..., return_assistant_tokens_mask=True)`: which tokens the assistant wrote.

As transformers: the template marks assistant text with `{% generation %}...{% endgeneration %}`; the rendered
character spans of those blocks are shifted past every `<image>` the processor expands before them, and a
token is in the mask (1) when its character offsets overlap a span. Zero-width tokens (BOS, padding) never are.
The result is `assistant_masks`, one row per conversation, laid out as `input_ids` (same padding side).

Leaves out: templates without generation blocks give all-zero masks (transformers does the same, silently).
"""

from __future__ import annotations

from llava_next.errors import ChatTemplateError
from llava_next.preprocess.chat_template import (
    GENERATION_END,
    GENERATION_START,
    TRACK_GENERATION,
    render_chat_template,
)
from llava_next.preprocess.prompt import expand_image_tokens, image_sizes_as_ints


def render_with_spans(conversations, template: str, **kwargs) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Rendered prompts and, per prompt, the (start, end) character spans of its generation blocks."""
    prompts, spans = [], []
    for text in render_chat_template(conversations, template, **{**kwargs, TRACK_GENERATION: True}):
        clean, found, start = [], [], None
        for char in text:
            if char == GENERATION_START:
                start = sum(map(len, clean))
            elif char == GENERATION_END:
                if start is None:
                    raise ChatTemplateError("unbalanced {% generation %} blocks in the chat template")
                found.append((start, sum(map(len, clean))))
                start = None
            else:
                clean.append(char)
        prompts.append("".join(clean))
        spans.append(found)
    return prompts, spans


def _shifted(span: tuple[int, int], prompt: str, image_token: str, counts: list[int]) -> tuple[int, int]:
    """A span of the prompt moved to where it lands once each `<image>` is written `count` times."""
    def move(char: int) -> int:
        before = prompt.count(image_token, 0, char)
        return char + sum((n - 1) * len(image_token) for n in counts[:before])
    return move(span[0]), move(span[1])


def assistant_masks(processor, prompts: list[str], spans, batch, add_special_tokens: bool,
                    padding_side: str | None = None) -> list[list[int]]:
    """One 0/1 row per prompt, aligned with batch["input_ids"] (its padding included)."""
    sizes = batch.get("image_sizes")
    sizes = [] if sizes is None else image_sizes_as_ints(sizes)
    counts = [processor.num_image_tokens(h, w) for h, w in sizes]
    token = processor.image_token
    ids = batch["input_ids"]
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    masks, used = [], 0
    for prompt, prompt_spans, row in zip(prompts, spans, ids):
        n_images = prompt.count(token)
        mine = counts[used:used + n_images]
        used += n_images
        expanded = expand_image_tokens(prompt, processor.image_token, iter(mine)) if n_images else prompt
        encoding = processor.tokenizer.backend_tokenizer.encode(expanded, add_special_tokens=add_special_tokens)
        moved = [_shifted(s, prompt, token, mine) for s in prompt_spans]
        mask = [int(any(a < end and b > start for start, end in moved) and b > a) for a, b in encoding.offsets]
        pad = len(row) - len(mask)
        if pad < 0:
            raise ChatTemplateError("return_assistant_tokens_mask cannot be used with truncation")
        left = (padding_side or processor.tokenizer.padding_side) == "left"
        masks.append([0] * pad + mask if left else mask + [0] * pad)
    return masks
