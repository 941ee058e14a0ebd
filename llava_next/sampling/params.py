"""Sampling settings of transformers' generate(): the defaults, the refused arguments, the checked values.

`SamplingParams` is validated on construction, so an instance is always usable; `from_generate_kwargs` merges
keyword arguments with generation configs in transformers' priority order.

Leaves out: the processors themselves (logits.py) and vLLM's per-request SamplingParams (engine/).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from llava_next.errors import GenerationArgumentError

# transformers' `GenerationConfig._get_default_generation_params()` for the fields used here.
HF_DEFAULTS: dict[str, Any] = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "repetition_penalty": 1.0,
    "min_length": 0,
    "min_new_tokens": None,
}

# Arguments transformers accepts that this package does not implement, with their no-op values.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "num_beams": (1,),
    "num_beam_groups": (1,),
    "num_return_sequences": (1,),
    "penalty_alpha": (),
    "typical_p": (1.0,),
    "epsilon_cutoff": (0.0,),
    "eta_cutoff": (0.0,),
    "top_h": (),
    "no_repeat_ngram_size": (0,),
    "encoder_no_repeat_ngram_size": (0,),
    "encoder_repetition_penalty": (1.0,),
    "bad_words_ids": (),
    "force_words_ids": (),
    "constraints": (),
    "sequence_bias": (),
    "guidance_scale": (1.0,),
    "forced_bos_token_id": (),
    "forced_eos_token_id": (),
    "suppress_tokens": (),
    "begin_suppress_tokens": (),
    "exponential_decay_length_penalty": (),
    "renormalize_logits": (False,),
    "remove_invalid_values": (False,),
    "watermarking_config": (),
    "dola_layers": (),
    "prompt_lookup_num_tokens": (),
    "assistant_model": (),
    "assistant_early_exit": (),
    "diversity_penalty": (0.0,),
    "token_healing": (False,),
    "use_mtp": (False,),
    "speculation_type": (),
    # generate()'s own arguments in transformers
    "logits_processor": ([],),
    "stopping_criteria": ([],),
    "prefix_allowed_tokens_fn": (),
    "synced_gpus": (False,),
    "negative_prompt_ids": (),
    "negative_prompt_attention_mask": (),
    "custom_generate": (),
}


def check_number(name: str, value: Any, integer: bool = False) -> None:
    """Type and finiteness check; bools are refused (True is an int in Python)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        raise GenerationArgumentError(f"`{name}` must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise GenerationArgumentError(f"`{name}` must be finite, got {value!r}")


def validate_max_new_tokens(max_new_tokens: Any) -> int:
    """`max_new_tokens` must be an int > 0; returns it."""
    check_number("max_new_tokens", max_new_tokens, integer=True)
    if max_new_tokens <= 0:
        raise GenerationArgumentError(f"`max_new_tokens` must be greater than 0, got {max_new_tokens}")
    return max_new_tokens


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Defaults are transformers' (`top_k=50` only acts when sampling).

    Off values: temperature 1.0, top_k 0, top_p 1.0, min_p 0.0, repetition_penalty 1.0. Validated on
    construction, so an instance is always usable.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0  # EOS is suppressed until this many tokens are generated
    min_length: int = 0  # same, counting the (padded) prompt, like transformers

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `GenerationArgumentError` naming the first bad argument."""
        if not isinstance(self.do_sample, bool):
            raise GenerationArgumentError(f"`do_sample` must be a bool, got {self.do_sample!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            check_number(name, getattr(self, name))
        for name in ("top_k", "min_new_tokens", "min_length"):
            check_number(name, getattr(self, name), integer=True)
        if self.do_sample and self.temperature <= 0:
            raise GenerationArgumentError(
                f"`temperature` must be > 0 when sampling, got {self.temperature}; "
                "for greedy decoding set do_sample=False"
            )
        if not 0 < self.top_p <= 1:
            raise GenerationArgumentError(f"`top_p` must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GenerationArgumentError(f"`top_k` must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise GenerationArgumentError(f"`min_p` must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise GenerationArgumentError(f"`repetition_penalty` must be > 0, got {self.repetition_penalty}")
        if self.min_new_tokens < 0:
            raise GenerationArgumentError(f"`min_new_tokens` must be >= 0, got {self.min_new_tokens}")
        if self.min_length < 0:
            raise GenerationArgumentError(f"`min_length` must be >= 0, got {self.min_length}")

    @classmethod
    def from_generate_kwargs(
        cls, kwargs: Mapping[str, Any], generation_config: Any = None
    ) -> SamplingParams:
        """Build from `generate(**kwargs)` and a checkpoint's generation_config (dict or object with `to_dict`).

        Priority as in transformers' `_prepare_generation_config`: kwargs (an explicit None included) >
        a `generation_config` passed in kwargs > the checkpoint's generation_config.json > transformers'
        defaults. Keys not about sampling (max_new_tokens, pixel_values, streamer, ...) are ignored.
        """
        merged = dict(HF_DEFAULTS)
        for config in (generation_config, kwargs.get("generation_config")):
            if config is None:
                continue
            items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            merged.update({k: v for k, v in items.items() if v is not None})
        merged.update({k: v for k, v in kwargs.items() if k != "generation_config"})

        for name, noops in UNSUPPORTED.items():
            value = merged.get(name)
            if value is not None and value not in noops:
                raise GenerationArgumentError(f"`{name}`={value!r} is not supported by llava_next")

        def pick(name: str, off: Any) -> Any:  # None means "not applied" in transformers
            value = merged.get(name)
            return off if value is None else value

        return cls(
            do_sample=pick("do_sample", False),
            temperature=pick("temperature", 1.0),
            top_k=pick("top_k", 0),
            top_p=pick("top_p", 1.0),
            min_p=pick("min_p", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
            min_new_tokens=pick("min_new_tokens", 0),
            min_length=pick("min_length", 0),
        )
