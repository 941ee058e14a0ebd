"""Auto* aliases the transformers examples use: they resolve to the LLaVA-NeXT classes (the only model here)."""

from __future__ import annotations

from llava_next.config import LlavaNextConfig
from llava_next.compat.modeling import LlavaNextForConditionalGeneration


class AutoConfig:
    @staticmethod
    def from_pretrained(name_or_path, **kwargs) -> LlavaNextConfig:
        return LlavaNextConfig.from_pretrained(name_or_path, **kwargs)


class AutoModelForImageTextToText:
    @staticmethod
    def from_pretrained(name_or_path, **kwargs) -> LlavaNextForConditionalGeneration:
        return LlavaNextForConditionalGeneration.from_pretrained(name_or_path, **kwargs)


AutoModelForVision2Seq = AutoModelForImageTextToText
