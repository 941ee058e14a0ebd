"""GenerationConfig: the settings object of `model.generation_config`, like transformers' (5.x).

Fields are attributes: `model.generation_config.pad_token_id = tokenizer.pad_token_id` works. As in
transformers 5.x, a known field that was never set reads as None (generate() then uses its own default:
max_length 20, do_sample False, top_k 50, ...), and setting one to None unsets it. Reading a name that is not
a field is an AttributeError; so is assigning one (a typo such as `max_new_token` would otherwise be silently
ignored by generate()); a json file or the constructor may still carry custom entries, which are kept.

It is also a read-only Mapping over the fields that are set, so `dict(config)` gives what a
generation_config.json would hold; `to_dict()` lists every field (None when unset), as transformers does.

Leaves out: validation at assignment (generate() validates what it uses, naming the argument),
`from_model_config`, watermarking and compile configs as objects, `push_to_hub`.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llava_next.compat.generate_args import BOOKKEEPING

CONFIG_NAME = "generation_config.json"

# transformers 5.23's GenerationConfig fields, in its order.
FIELDS = (
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "early_stopping", "max_time", "stop_strings",
    "do_sample", "num_beams", "use_mtp", "use_cache", "cache_implementation", "cache_config", "max_cache_len",
    "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "encoder_repetition_penalty", "length_penalty", "no_repeat_ngram_size", "bad_words_ids",
    "renormalize_logits", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
    "token_healing", "guidance_scale", "watermarking_config", "num_return_sequences", "output_attentions",
    "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate", "pad_token_id",
    "bos_token_id", "eos_token_id", "encoder_no_repeat_ngram_size", "decoder_start_token_id", "is_assistant",
    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "prompt_lookup_num_tokens", "max_matching_ngram_size", "assistant_early_exit", "assistant_lookbehind",
    "target_lookbehind", "assistant_ensemble_weight", "speculation_type", "compile_config", "disable_compile",
    "continuous_batching_config", "low_memory", "penalty_alpha", "dola_layers", "diversity_penalty",
    "num_beam_groups", "constraints", "force_words_ids", "prefill_chunk_size", "_from_model_config",
    "transformers_version",
)
_KNOWN = frozenset(FIELDS)
# Fields that record where a config came from, not how to generate (transformers leaves them out of comparisons).


class GenerationConfig(Mapping):
    """`GenerationConfig(max_new_tokens=64, do_sample=False)`; attributes, `update`, `to_dict`, `from_pretrained`."""

    def __init__(self, **kwargs):
        object.__setattr__(self, "_values", {})
        for key, value in kwargs.items():
            if value is not None:
                self._values[key] = copy.deepcopy(value)

    # ------------------------------------------------------------------ attributes

    def __getattr__(self, name: str):
        values = self.__dict__.get("_values")
        if values is None:  # during copy/unpickling, before __init__ ran
            raise AttributeError(name)
        if name in values:
            return values[name]
        if name in _KNOWN:
            return None
        raise AttributeError(f"'GenerationConfig' object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name not in _KNOWN and name not in self._values:
            close = difflib.get_close_matches(name, FIELDS, n=3)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise AttributeError(f"{name!r} is not a generation setting{hint} "
                                 "(use update(..., allow_custom_entries=True) to store a custom entry)")
        if value is None:
            self._values.pop(name, None)
        else:
            self._values[name] = value

    def __delattr__(self, name: str) -> None:
        self._values.pop(name, None)

    def __dir__(self):
        return sorted(set(super().__dir__()) | _KNOWN | set(self._values))

    # ------------------------------------------------------------------ Mapping over the set fields

    def __getitem__(self, key: str):
        return self._values[key]

    def __iter__(self):
        return iter(list(self._values))

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other) -> bool:
        if isinstance(other, GenerationConfig):
            other = other._values
        return isinstance(other, Mapping) and _settings(self._values) == _settings(dict(other))

    __hash__ = None

    def __copy__(self) -> "GenerationConfig":
        return GenerationConfig(**self._values)

    def __deepcopy__(self, memo) -> "GenerationConfig":
        return GenerationConfig(**copy.deepcopy(self._values, memo))

    def __repr__(self) -> str:
        return f"GenerationConfig {json.dumps(self.to_diff_dict(), indent=2, sort_keys=True, default=str)}\n"

    # ------------------------------------------------------------------ transformers' methods

    def update(self, defaults_only: bool = False, allow_custom_entries: bool = False, **kwargs) -> dict[str, Any]:
        """Set the given fields (only unset ones with `defaults_only`); return the kwargs that are not fields
        (stored too with `allow_custom_entries`), as transformers does."""
        unused = {}
        for key, value in kwargs.items():
            if key in _KNOWN or key in self._values or allow_custom_entries:
                if not defaults_only or getattr(self, key, None) is None:
                    if value is None:
                        self._values.pop(key, None)
                    else:
                        self._values[key] = value
            else:
                unused[key] = value
        return unused

    def to_diff_dict(self) -> dict[str, Any]:
        """The fields that are set (what generation_config.json holds)."""
        return copy.deepcopy(self._values)

    def to_dict(self) -> dict[str, Any]:
        """Every field, None where unset, plus custom entries (transformers' `to_dict`)."""
        out = {name: None for name in FIELDS}
        out.update(copy.deepcopy(self._values))
        return out

    def to_json_string(self, use_diff: bool = True) -> str:
        data = self.to_diff_dict() if use_diff else self.to_dict()
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any], **kwargs) -> "GenerationConfig":
        return cls(**{**dict(config_dict), **kwargs})

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, config_file_name: str = CONFIG_NAME,
                        **kwargs) -> "GenerationConfig":
        """Read generation_config.json from a folder or hub id; kwargs naming fields override it, hub options
        (revision, token, ...) go to the hub, anything else is a TypeError."""
        from llava_next.loading.hub import hub_options, read_json, resolve_file

        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in _KNOWN}
        hub = hub_options(kwargs, "GenerationConfig.from_pretrained")
        path = resolve_file(name_or_path, config_file_name, **hub)
        return cls.from_dict(read_json(path), **overrides)

    def save_pretrained(self, folder: str | os.PathLike, config_file_name: str = CONFIG_NAME) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / config_file_name
        path.write_text(self.to_json_string(), encoding="utf-8")
        return path


def _settings(values: dict) -> dict:
    """Values that matter for equality (transformers ignores its version stamp)."""
    return {k: v for k, v in values.items() if k not in BOOKKEEPING and v is not None}


__all__ = ["GenerationConfig"]
