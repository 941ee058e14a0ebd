"""llava_next: LLaVA-NeXT (LLaVA-1.6) in pure PyTorch, loading the llava-hf checkpoints as published.

The public names mirror transformers, so `from transformers import X` becomes `from llava_next import X`.
They are imported lazily: `import llava_next` stays fast (the CLI starts quickly) and only what is used loads.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LlavaNextConfig": "config",
    "AutoConfig": "compat.auto",
    "LlavaNextModel": "compat.modeling",
    "LlavaNextForConditionalGeneration": "compat.modeling",
    "AutoModelForImageTextToText": "compat.auto",
    "AutoModelForVision2Seq": "compat.auto",
    "LlavaNextImageProcessor": "preprocess.image_processor",
    "LlavaNextImageProcessorFast": "preprocess.image_processor_fast",
    "LlavaNextProcessor": "preprocess.processor",
    "AutoProcessor": "preprocess.processor",
    "GenerationConfig": "compat.generation_config",
    "BitsAndBytesConfig": "loading.quantization",
    "pipeline": "compat.pipeline",
    "TextStreamer": "compat.streaming",
    "TextIteratorStreamer": "compat.streaming",
    "BatchFeature": "preprocess.batch_feature",
    "load_image": "preprocess.images",
    "InvalidImageError": "errors",
    "ContextLengthError": "errors",
    "ImageTokenMismatchError": "errors",
    "GenerationArgumentError": "errors",
    "ModelInputError": "errors",
    "CheckpointError": "errors",
    "UnsafeCheckpointError": "errors",
    "ChatTemplateError": "errors",
    "DeviceUnavailableError": "errors",
    "SamplingParamsError": "errors",
    "TooManyImagesError": "errors",
    "KVCacheCapacityError": "errors",
    "EngineDeadError": "errors",
    "SamplingParams": "sampling.params",
    "StructuredOutputsParams": "sampling.structured_params",
    "StructuredOutputError": "errors",
    "LLM": "entrypoints.llm",
    "LLMEngine": "engine.llm_engine",
    "AsyncEngine": "engine.driver",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llava_next' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
