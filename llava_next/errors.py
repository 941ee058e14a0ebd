"""Typed errors for bad input. Every one is a ValueError (or OSError for files) so callers can catch broadly."""


class LlavaNextError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidImageError(LlavaNextError, ValueError):
    """An image could not be used: unreadable, truncated, too large, unsupported format or source."""


class ContextLengthError(LlavaNextError, ValueError):
    """A prompt (image tokens included) plus the tokens to generate does not fit the model's context."""


class ImageTokenMismatchError(LlavaNextError, ValueError):
    """The number of `<image>` placeholders does not match the images or their features."""


class ModelInputError(LlavaNextError, ValueError):
    """input_ids / attention_mask / inputs_embeds / position_ids, or a forward() option, the model cannot use."""


class GenerationArgumentError(LlavaNextError, ValueError):
    """A generation argument is out of range (max_new_tokens, temperature, top_p, top_k, ...)."""


class CheckpointError(LlavaNextError, ValueError):
    """A checkpoint's tensors or config do not fit the model: names every missing, extra or misshaped tensor."""


class SaveError(LlavaNextError, ValueError):
    """A model that cannot be written as asked (quantized weights, pickle format, a file for a folder)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint was found and the caller did not opt in with allow_pickle=True."""


class ChatTemplateError(LlavaNextError, ValueError):
    """A chat template is missing, failed to render, or tried to escape its sandbox."""


class DeviceUnavailableError(LlavaNextError, ValueError, RuntimeError):
    """A device was asked for that this machine does not have (e.g. "cuda" without a CUDA GPU or build).
    Also a RuntimeError, the kind torch raises for a missing CUDA, so code written for transformers still catches it."""


class SamplingParamsError(GenerationArgumentError):
    """A `SamplingParams` field is out of range or of the wrong type (the message names the field)."""


class TooManyImagesError(LlavaNextError, ValueError):
    """A prompt carries more images than the engine's `limit_mm_per_prompt` allows."""


class KVCacheCapacityError(LlavaNextError, ValueError):
    """A request could never fit the engine's KV-cache pool, even running alone."""


class EngineDeadError(LlavaNextError, RuntimeError):
    """The engine's background thread failed: open streams end with this error and new requests are refused."""


class StructuredOutputError(LlavaNextError, ValueError):
    """A structured-output constraint (JSON schema, regex, choice, grammar) is invalid, too large or does not compile."""
