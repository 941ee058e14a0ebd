"""generate()'s arguments: names and kinds checked, then resolved into a GenerationPlan before any forward pass.

Priority as transformers': explicit keyword arguments > a `generation_config=` argument > the checkpoint's
generation_config.json > transformers' defaults. A typo or an unknown name is refused (transformers'
`_validate_model_kwargs`); the prompt (image tokens included) plus `max_new_tokens` is checked against the
context (ContextLengthError); `num_beams` is capped (MAX_BEAMS) so one call cannot exhaust memory.

The sampling kwargs become the one SamplingParams (sampling/params.py, vLLM's fields), as vLLM maps a
generation_config.json (`sampling_params`): checked transformers-style first (GenerationArgumentError naming the
argument), then do_sample=False -> greedy (temperature 0: top_k / top_p / min_p do not act, as transformers'
warpers), top_k None -> 0 (off), min_new_tokens or else min_length -> min_tokens. Sampling needs temperature >= 1e-5
(below it the one class is greedy); transformers also samples at smaller positive temperatures.

Leaves out: the generation_config object itself (compat/generation_config.py); generate() only reads it as a
mapping.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from llava_next.errors import GenerationArgumentError
from llava_next.preprocess.prompt import check_room
from llava_next.sampling.params import GREEDY_BELOW, SamplingParams
from llava_next.sampling.params import check_number as _check_number
from llava_next.sampling.stopping import StopStrings, eos_token_tensor

# transformers' `GenerationConfig._get_default_generation_params()` for the sampling fields.
HF_DEFAULTS: dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None,
                               "repetition_penalty": 1.0, "min_length": 0, "min_new_tokens": None}
_OFF = {**HF_DEFAULTS, "top_k": 0, "min_p": 0.0, "min_new_tokens": 0}  # what None ("not applied") means
# Arguments transformers accepts that this package does not implement, with their no-op values (() for none).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "num_beams": (1,), "num_beam_groups": (1,), "num_return_sequences": (1,), "penalty_alpha": (),
    "typical_p": (1.0,), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,), "top_h": (), "no_repeat_ngram_size": (0,),
    "encoder_no_repeat_ngram_size": (0,), "encoder_repetition_penalty": (1.0,), "bad_words_ids": (),
    "force_words_ids": (), "constraints": (), "sequence_bias": (), "guidance_scale": (1.0,),
    "forced_bos_token_id": (), "forced_eos_token_id": (), "suppress_tokens": (), "begin_suppress_tokens": (),
    "exponential_decay_length_penalty": (), "renormalize_logits": (False,), "remove_invalid_values": (False,),
    "watermarking_config": (), "dola_layers": (), "prompt_lookup_num_tokens": (), "assistant_model": (),
    "assistant_early_exit": (), "diversity_penalty": (0.0,), "token_healing": (False,), "use_mtp": (False,),
    "speculation_type": (),
    # generate()'s own arguments in transformers
    "logits_processor": ([],), "stopping_criteria": ([],), "prefix_allowed_tokens_fn": (), "synced_gpus": (False,),
    "negative_prompt_ids": (), "negative_prompt_attention_mask": (), "custom_generate": (),
}

# transformers GenerationConfig bookkeeping fields: they never change a token.
BOOKKEEPING = ("transformers_version", "_from_model_config")
MAX_BEAMS = 64  # beams per prompt; each beam is a full KV cache and a row of every decode step

# generate() keyword arguments that are about the loop, not about picking tokens.
_LOOP_ARGS = ("max_new_tokens", "max_length", "eos_token_id", "pad_token_id", "bos_token_id", "stop_strings",
              "streamer", "tokenizer", "generator", "return_dict_in_generate", "output_scores", "output_logits",
              "use_cache", "num_beams", "length_penalty", "early_stopping", "output_attentions",
              "output_hidden_states", "generation_config", "cache_implementation", "max_time", "reuse_prefix")
# transformers GenerationConfig fields that change no token here: bookkeeping, compile and cache settings, and
# assisted-decoding knobs that only act with an assistant model (refused in UNSUPPORTED).
_IGNORED = BOOKKEEPING + ("decoder_start_token_id", "is_assistant",
                "disable_compile", "compile_config", "cache_config", "max_cache_len", "low_memory",
                "prefill_chunk_size", "continuous_batching_config", "num_assistant_tokens",
                "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind",
                "target_lookbehind", "assistant_ensemble_weight", "max_matching_ngram_size")
# Model inputs transformers' generate() passes on to forward(): checked, or refused unless None.
_MODEL_KWARGS = ("position_ids", "past_key_values", "vision_feature_layer", "vision_feature_select_strategy")
# Every keyword generate() takes besides its named inputs; a name outside this set (a typo) is refused.
GENERATION_ARGUMENTS = frozenset(_LOOP_ARGS) | set(HF_DEFAULTS) | set(UNSUPPORTED) | set(_IGNORED)


def check_number(name: str, value: Any, integer: bool = False) -> None:
    """Type and finiteness check of a generate() argument (params.check_number's, GenerationArgumentError)."""
    _check_number(name, value, integer, error=GenerationArgumentError, label="`{}`")


def validate_max_new_tokens(max_new_tokens: Any) -> int:
    """`max_new_tokens` must be an int > 0; returns it."""
    check_number("max_new_tokens", max_new_tokens, integer=True)
    if max_new_tokens <= 0:
        raise GenerationArgumentError(f"`max_new_tokens` must be greater than 0, got {max_new_tokens}")
    return max_new_tokens


def check_sampling_args(values: Mapping[str, Any]) -> dict[str, Any]:
    """transformers-style checks of the sampling arguments in `values` (missing or None: not applied); raises
    GenerationArgumentError naming the first bad one. Only the temperature bound is for sampling alone.
    Returns every sampling argument, those not applied at their "off" value."""
    v = {**_OFF, **{k: x for k, x in values.items() if k in _OFF and x is not None}}
    if not isinstance(v["do_sample"], bool):
        raise GenerationArgumentError(f"`do_sample` must be a bool, got {v['do_sample']!r}")
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        check_number(name, v[name])
    for name in ("top_k", "min_new_tokens", "min_length"):
        check_number(name, v[name], integer=True)
    if v["do_sample"] and v["temperature"] < GREEDY_BELOW:
        raise GenerationArgumentError(f"`temperature` must be >= {GREEDY_BELOW} when sampling (> 0 in transformers; "
                                      f"below it decoding is greedy), got {v['temperature']}; for greedy decoding "
                                      "set do_sample=False")
    ranges = (("top_p", 0 < v["top_p"] <= 1, "in (0, 1]"), ("top_k", v["top_k"] >= 0, ">= 0 (0 turns it off)"),
              ("min_p", 0 <= v["min_p"] <= 1, "in [0, 1]"), ("repetition_penalty", v["repetition_penalty"] > 0, "> 0"),
              ("min_new_tokens", v["min_new_tokens"] >= 0, ">= 0"), ("min_length", v["min_length"] >= 0, ">= 0"))
    for name, ok, rule in ranges:
        if not ok:
            raise GenerationArgumentError(f"`{name}` must be {rule}, got {v[name]}")
    return v


def sampling_params(kwargs: Mapping[str, Any], generation_config: Any = None, prompt_len: int = 0) -> SamplingParams:
    """`generate(**kwargs)` and a checkpoint's generation_config (dict or object with `to_dict`) -> SamplingParams.

    Priority as transformers' `_prepare_generation_config`: kwargs (an explicit None included: the step is off) >
    a `generation_config` in kwargs > the checkpoint's > transformers' defaults; keys not about sampling are
    ignored. min_tokens: min_new_tokens when set (transformers' `_prepare_generated_length` then replaces
    min_length by prompt_len + min_new_tokens), else max(min_length - prompt_len, 0), prompt_len the padded prompt
    (inputs_embeds' length when they come alone). max_tokens is None (the GenerationPlan holds max_new_tokens).
    """
    merged = {**HF_DEFAULTS, **_merged_config(generation_config, kwargs)}
    merged.update({k: v for k, v in kwargs.items() if k != "generation_config"})
    for name, noops in UNSUPPORTED.items():
        value = merged.get(name)
        if value is not None and value not in noops:
            raise GenerationArgumentError(f"`{name}`={value!r} is not supported by llava_next")
    v = check_sampling_args(merged)
    set_min_new = merged.get("min_new_tokens") is not None
    min_tokens = v["min_new_tokens"] if set_min_new else max(v["min_length"] - prompt_len, 0)
    common = {"repetition_penalty": v["repetition_penalty"], "max_tokens": None, "min_tokens": min_tokens}
    if not v["do_sample"]:  # greedy; the warpers' values do not act (vLLM resets them too)
        return SamplingParams(temperature=0.0, **common)
    return SamplingParams(temperature=v["temperature"], top_k=v["top_k"], top_p=v["top_p"], min_p=v["min_p"], **common)


@dataclass
class GenerationPlan:
    """Everything resolved from arguments + generation_config before any forward pass."""

    max_new_tokens: int
    eos: torch.Tensor | None
    pad_token_id: int
    sampling: SamplingParams
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    stop: StopStrings | None = None
    deadline: float | None = None  # time.monotonic() past which generation stops (max_time)

    def out_of_time(self) -> bool:
        """transformers' MaxTimeCriteria, on the host: True once max_time has passed since generate() began."""
        return self.deadline is not None and time.monotonic() > self.deadline


def _merged_config(checkpoint, kwargs) -> dict:
    """The checkpoint's generation_config updated by a `generation_config=` in kwargs (dicts or objects with
    `to_dict`; None entries are unset)."""
    config = {}
    for part in (checkpoint, kwargs.get("generation_config")):
        if part is not None:
            items = part.to_dict() if hasattr(part, "to_dict") else dict(part)
            config.update({k: v for k, v in items.items() if v is not None})
    return config


def check_generate_kwargs(model, kwargs: dict) -> None:
    """Refuse unknown names (typos) and arguments of the wrong kind before any work, as transformers'
    `_validate_model_kwargs` does; a None value means "not given", as there."""
    unknown = sorted(k for k, v in kwargs.items()
                     if v is not None and k not in GENERATION_ARGUMENTS and k not in _MODEL_KWARGS)
    if unknown:
        raise GenerationArgumentError(f"generate() got arguments it does not use: {unknown} (check for typos)")
    for name in ("position_ids", "past_key_values"):
        if kwargs.get(name) is not None:
            raise GenerationArgumentError(f"`{name}` is not supported by generate(): positions come from "
                                          "attention_mask and the KV cache is generate()'s own")
    model.model._check_overrides(kwargs.get("vision_feature_layer"), kwargs.get("vision_feature_select_strategy"))
    if kwargs.get("output_hidden_states"):
        raise GenerationArgumentError("`output_hidden_states=True` is not supported by generate(); run "
                                      "model(sequences, output_hidden_states=True) on its output instead")
    if kwargs.get("output_attentions"):
        raise GenerationArgumentError("`output_attentions=True` is not supported: attention runs in fused kernels "
                                      "that never form the attention weights")
    config = kwargs.get("generation_config")
    if config is not None and not isinstance(config, dict) and not hasattr(config, "to_dict"):
        raise GenerationArgumentError(f"`generation_config` must be a GenerationConfig or a dict, got {config!r}")
    streamer = kwargs.get("streamer")
    if streamer is not None and not all(callable(getattr(streamer, m, None)) for m in ("put", "end")):
        raise GenerationArgumentError(f"`streamer` must have put() and end() methods, got {streamer!r}")
    generator = kwargs.get("generator")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise GenerationArgumentError(f"`generator` must be a torch.Generator, got {generator!r}")
        if generator.device.type != model.device.type:
            raise GenerationArgumentError(f"`generator` is on {generator.device}, the model on {model.device}")
    strings = kwargs.get("stop_strings")
    if strings is not None:
        if not isinstance(strings, (str, list, tuple)) or not all(isinstance(x, str) for x in strings):
            raise GenerationArgumentError(f"`stop_strings` must be a string or a list of strings, got {strings!r}")
        if kwargs.get("tokenizer") is None:
            raise GenerationArgumentError("stop_strings needs tokenizer= (e.g. processor.tokenizer)")


def plan_generation(model, prompt_len: int, kwargs: dict) -> GenerationPlan:
    """Check the arguments, then resolve lengths, special ids and sampling settings (transformers' priority order).

    prompt_len: input_ids' padded length, or inputs_embeds' when they come alone (then, as transformers, the output
    holds only the new tokens and min_length does not count the prompt: min_tokens is the same either way)."""
    start = time.monotonic()  # transformers' MaxTimeCriteria counts from here, before the prefill
    check_generate_kwargs(model, kwargs)
    gen = _merged_config(getattr(model, "generation_config", None), kwargs)

    def pick(name, default=None):
        if kwargs.get(name) is not None:
            return kwargs[name]
        return gen.get(name, default) if gen.get(name) is not None else default

    max_new = _max_new_tokens(pick("max_new_tokens"), pick("max_length"), prompt_len,
                              model.config.text_config.max_position_embeddings)
    eos, pad = _special_ids(model, pick)
    num_beams, length_penalty, early_stopping = _beam_settings(pick)
    sampling_kwargs = {k: v for k, v in kwargs.items() if k not in _LOOP_ARGS}
    gen_sampling = {k: v for k, v in gen.items() if k not in _LOOP_ARGS}
    sampling = sampling_params(sampling_kwargs, gen_sampling, prompt_len)
    stop = None if kwargs.get("stop_strings") is None else StopStrings(kwargs["tokenizer"], kwargs["stop_strings"])
    max_time = pick("max_time")
    if max_time is not None:
        check_number("max_time", max_time)
        if max_time <= 0:
            raise GenerationArgumentError(f"`max_time` must be > 0 seconds, got {max_time}")
    deadline = None if max_time is None else start + max_time
    return GenerationPlan(max_new, eos, pad, sampling, num_beams, length_penalty, early_stopping, stop, deadline)


def _max_new_tokens(max_new, max_length, prompt_len: int, context: int) -> int:
    """max_new_tokens from it or max_length (transformers: 20 when neither is set), checked against the context."""
    if max_length is not None:
        check_number("max_length", max_length, integer=True)
    if max_new is None and max_length is None:
        max_new = max(1, min(20, context - prompt_len))
    elif max_new is None:
        max_new = max_length - prompt_len
        if max_new <= 0:
            raise GenerationArgumentError(
                f"the prompt has {prompt_len} tokens, already at max_length={max_length}; set max_new_tokens instead"
            )
    max_new = validate_max_new_tokens(max_new)
    check_room(prompt_len, max_new, context)
    return max_new


def _special_ids(model, pick) -> tuple[torch.Tensor | None, int]:
    """(EOS ids on the model's device or None, pad id): as transformers, pad falls back to the first EOS id."""
    text_cfg = model.config.text_config
    eos = eos_token_tensor(pick("eos_token_id", text_cfg.eos_token_id), device=model.device)
    pad = pick("pad_token_id", text_cfg.pad_token_id)
    if pad is None:
        pad = int(eos[0]) if eos is not None else 0
    vocab = model.get_input_embeddings().num_embeddings  # finished rows feed the pad id back in
    check_number("pad_token_id", pad, integer=True)
    if not 0 <= pad < vocab:
        raise GenerationArgumentError(f"`pad_token_id` must be a token id in 0..{vocab - 1}, got {pad}")
    return eos, pad


def _beam_settings(pick) -> tuple[int, float, bool | str]:
    """num_beams (1..MAX_BEAMS), length_penalty, early_stopping (True, False or "never")."""
    num_beams = pick("num_beams", 1)
    check_number("num_beams", num_beams, integer=True)
    if not 1 <= num_beams <= MAX_BEAMS:
        raise GenerationArgumentError(f"`num_beams` must be between 1 and {MAX_BEAMS}, got {num_beams}")
    length_penalty = pick("length_penalty", 1.0)
    check_number("length_penalty", length_penalty)
    early_stopping = pick("early_stopping", False)
    if early_stopping not in (True, False, "never"):
        raise GenerationArgumentError(f"`early_stopping` must be True, False or 'never', got {early_stopping!r}")
    return num_beams, float(length_penalty), early_stopping
