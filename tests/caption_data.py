"""A tiny image-caption set and the training collator the README shows, for the PEFT and Trainer tests.

`pairs(n)`: n (PIL image, caption) pairs, small random images (few image tokens) of two sizes, captions from
a fixed word list. `CaptionCollator(processor)`: mistral [INST] prompts with the image, the caption after it;
labels are the input ids with -100 on the prompt, the image placeholders and the padding (right padding, as
training pads), so only caption tokens are learned.
"""

from __future__ import annotations

import numpy as np
import torch

WORDS = ["red", "blue", "green", "square", "noise", "stripes", "bright", "dark", "small", "wide"]
PROMPT = "[INST] <image>\nDescribe the image. [/INST]"


def pairs(n: int = 10, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (8, 600) if i % 2 else (10, 500)  # wide: few image tokens (~650), fast steps
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        caption = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3))
        out.append({"image": Image.fromarray(pixels), "caption": caption})
    return out


class CaptionCollator:
    """Batches of {"image", "caption"} -> model inputs with labels (prompt, image and padding masked)."""

    def __init__(self, processor):
        self.processor = processor
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")

    def __call__(self, examples: list[dict]) -> dict:
        images = [e["image"] for e in examples]
        texts = [f"{PROMPT} {e['caption']}</s>" for e in examples]
        batch = self.processor(images=images, text=texts, padding=True, padding_side="right", return_tensors="pt")
        prompt_lengths = [len(ids) for ids in self.processor(images=images, text=[PROMPT] * len(examples))["input_ids"]]
        labels = batch["input_ids"].clone()
        for row, n in enumerate(prompt_lengths):
            labels[row, :n] = -100  # the prompt (and its image) is given, not learned
        labels[batch["attention_mask"] == 0] = -100
        labels[batch["input_ids"] == self.image_token_id] = -100
        batch["labels"] = labels
        return dict(batch)


def as_float(batch: dict) -> dict:
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}


def png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()
