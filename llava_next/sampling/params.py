"""The one `SamplingParams`: vLLM's per-request fields, used by the engine, the server, `LLM` and generate().

Fields and meanings are vLLM's: `temperature` below 1e-5 is greedy (`greedy`; temperature, top_k, top_p and
min_p then do not act), `top_k` 0 or -1 is off, `stop` strings are cut from the text (not included),
`stop_token_ids` end a completion like EOS, `min_tokens` holds EOS and stop ids back for that many new tokens,
`max_tokens=None` means "up to the context". Validated on construction (`SamplingParamsError`, a ValueError naming
the field), with caps that bound one request's cost: n <= 16, logprobs <= 20, at most 16 stop strings of at most
256 characters.

Only values the sampler can compute pass (each a 400 at the server, which maps to this class): a temperature
below 1e-5 (1e-300, 5e-324 underflow to 0 in float32) is greedy, vLLM's rule; repetition_penalty
is > 0 as in transformers and vLLM (the sampler clamps it to float32's normal range, so 1e-300 is defined: the
seen tokens with positive logits tie at the top); stop_token_ids and seeds fit int64, and so does the last
child seed of an n > 1 request (seed + n - 1, vLLM's parallel sampling); the vocabulary bound of
stop_token_ids is checked by engine/prepare.py, which knows the vocabulary.

transformers' generation kwargs (do_sample, top_k=50, min_length, ...) are converted into this class by
compat/generate_args.py, as vLLM maps a generation_config.json; the logits pipeline of generate()
(sampling/logits.py) and the engine's batched sampler read the same fields.

`structured_outputs` (sampling/structured_params.StructuredOutputsParams: json, regex, choice, grammar,
json_object) constrains the output with llguidance; a dict is accepted and turned into one. `logit_bias`
({token id: bias in [-100, 100]}, at most 1024 entries) is added to the logits before sampling.

Leaves out: best_of, beam search, prompt_logprobs, include_stop_str_in_output, bad_words, truncate_prompt_tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from llava_next.errors import SamplingParamsError
from llava_next.sampling.structured_params import StructuredOutputsParams

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_SEED = 2**63 - 1
MAX_LOGIT_BIAS = 1024
GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below it samples greedily (dividing by it would overflow)


def check_number(name: str, value: Any, integer: bool = False, low: float | None = None, high: float | None = None,
                 low_open: bool = False, error: type[ValueError] = SamplingParamsError,
                 label: str = "SamplingParams.{}") -> None:
    """Type, finiteness and bounds of one number; bools are refused (True is an int in Python). The error names
    it as `label` formats `name` (generate()'s arguments: GenerationArgumentError, "`{}`")."""
    kinds = (int,) if integer else (int, float)
    name = label.format(name)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise error(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise error(f"{name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise error(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise error(f"{name} must be <= {high}, got {value!r}")


@dataclasses.dataclass
class SamplingParams:
    """How one request is sampled and when it stops (vLLM's fields and defaults)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise SamplingParamsError naming the first bad field; normalises `stop` to a list."""
        check_number("n", self.n, integer=True, low=1, high=MAX_N)
        check_number("temperature", self.temperature, low=0.0)
        check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_number("top_k", self.top_k, integer=True, low=-1)
        check_number("min_p", self.min_p, low=0.0, high=1.0)
        if self.seed is not None:
            check_number("seed", self.seed, integer=True, low=-MAX_SEED - 1, high=MAX_SEED)
            if self.seed + self.n - 1 > MAX_SEED:  # completion i is seeded with seed + i
                raise SamplingParamsError(f"SamplingParams.seed + n - 1 (the seed of the last completion) must be "
                                          f"<= {MAX_SEED}, got seed={self.seed} with n={self.n}")
        if self.max_tokens is not None:
            check_number("max_tokens", self.max_tokens, integer=True, low=1)
        check_number("min_tokens", self.min_tokens, integer=True, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(f"SamplingParams.min_tokens ({self.min_tokens}) must be <= max_tokens "
                                      f"({self.max_tokens})")
        if self.logprobs is not None:
            check_number("logprobs", self.logprobs, integer=True, low=0, high=MAX_LOGPROBS)
        check_number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        check_number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        check_number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(f"SamplingParams.{name} must be a bool, got {getattr(self, name)!r}")
        stop = self.stop
        if stop is not None:
            stop = [stop] if isinstance(stop, str) else stop
            if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
                raise SamplingParamsError(f"SamplingParams.stop must be a string or a list of strings, got {self.stop!r}")
            if len(stop) > MAX_STOP_STRINGS:
                raise SamplingParamsError(f"SamplingParams.stop holds {len(stop)} strings; at most {MAX_STOP_STRINGS}")
            for s in stop:
                if not s or len(s) > MAX_STOP_LENGTH:
                    raise SamplingParamsError(f"SamplingParams.stop strings must hold 1 to {MAX_STOP_LENGTH} "
                                              f"characters, got one of {len(s)}")
            self.stop = list(stop)
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if not isinstance(ids, (list, tuple)) or len(ids) > 64 or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= MAX_SEED for i in ids):
                raise SamplingParamsError(f"SamplingParams.stop_token_ids must be a list of at most 64 token ids, "
                                          f"got {str(ids)[:200]}")
            self.stop_token_ids = list(ids)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise SamplingParamsError("SamplingParams.structured_outputs must be a StructuredOutputsParams")
        if self.logit_bias is not None:
            bias = self.logit_bias
            if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
                raise SamplingParamsError(f"SamplingParams.logit_bias must be a dict of at most {MAX_LOGIT_BIAS} "
                                          "{token id: bias}")
            clean = {}
            for key, value in bias.items():
                token = int(key) if isinstance(key, str) and key.isdigit() else key
                if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                    raise SamplingParamsError(f"SamplingParams.logit_bias keys must be token ids, got {key!r}")
                check_number("logit_bias", value, low=-100.0, high=100.0)
                clean[token] = float(value)
            self.logit_bias = clean or None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def child(self, index: int) -> SamplingParams:
        """The params of completion `index` of an n > 1 request: n = 1, seed + index (vLLM's parallel sampling;
        it fits int64, checked on construction, so the copy is not validated again)."""
        child = copy.copy(self)
        child.n, child.seed = 1, None if self.seed is None else self.seed + index
        return child
