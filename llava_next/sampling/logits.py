"""Generation arguments, logits processing and next-token choice, without host syncs.

Implements the part of transformers' generation that LLaVA-NeXT users reach for, with transformers'
arithmetic and in the order of `GenerationMixin._get_logits_processor`, so processed scores are bitwise
equal to the reference:

    repetition_penalty -> min_length / min_new_tokens (EOS gets -inf) -> [sampling only:]
    temperature -> top_k -> top_p -> min_p

then greedy `argmax` or `softmax` + `torch.multinomial` (same RNG draws as transformers with the same
generator or global seed). Every per-token op is a torch op on the device; which steps run is decided
once, in `LogitsPipeline.__init__`, so the decode loop has no `.item()` and no branches on tensor values.

Repetition penalty, EOS suppression and temperature act per entry and keep order; screened_head.py relies on
that (`LogitsPipeline.monotone`, `LogitsPipeline.screen_k`).

Beam search (beam_search.py) runs the same pipeline with transformers' min_tokens_to_keep.
Leaves out: num_return_sequences > 1, typical_p, epsilon/eta cutoff, top_h,
no_repeat_ngram_size, bad_words_ids, sequence_bias, guidance, forced BOS/EOS, suppress_tokens,
watermarking, renormalize_logits. Set to anything but their no-op value, they raise
`GenerationArgumentError` instead of being silently ignored. Stop criteria live in `stopping.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

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


class LogitsPipeline:
    """transformers' logits processors for one `generate` call, as a fixed list of torch ops.

    `eos_token_id` (int, list or tensor) is needed for min_new_tokens / min_length; `prompt_len` is the
    padded prompt length (transformers' `input_ids.shape[-1]` before the first new token);
    `min_tokens_to_keep` is transformers' for the sampling steps (1, or #EOS + 1 in beam sampling).
    """

    def __init__(
        self,
        params: SamplingParams,
        eos_token_id: int | list[int] | torch.Tensor | None = None,
        prompt_len: int = 0,
        min_tokens_to_keep: int = 1,
    ):
        params.validate()
        self.params = params
        self.keep = min_tokens_to_keep  # top_k / top_p / min_p keep at least this many (beam sampling: #EOS + 1)
        self._eos = None if eos_token_id is None else torch.as_tensor(eos_token_id, dtype=torch.long).reshape(-1)
        self._eos_mask: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._eos_ids: dict[tuple[int, torch.device], torch.Tensor] = {}
        # Both EOS processors do the same thing, so one threshold stands for both.
        self.eos_until = max(params.min_length, prompt_len + params.min_new_tokens)
        p = params
        steps = []
        if p.repetition_penalty != 1.0:
            steps.append(self._repetition_penalty)
        if self._eos is not None and self._eos.numel() > 0 and (p.min_length > 0 or p.min_new_tokens > 0):
            steps.append(self._min_length)
        if p.do_sample and p.temperature != 1.0:  # transformers' former "warpers" only act when sampling
            steps.append(self._temperature)
        self.monotone_steps = tuple(steps)  # per entry, order-keeping
        selection = []
        if p.do_sample:
            if p.top_k != 0:
                selection.append(self._top_k)
            if p.top_p < 1.0:
                selection.append(self._top_p)
            if p.min_p > 0.0:  # min_p == 0 removes nothing
                selection.append(self._min_p)
        self.selection_steps = tuple(selection)
        self.steps = self.monotone_steps + self.selection_steps
        # How many best entries of the monotone scores decide the token: 1 for greedy, top_k when sampling
        # with top_k (the later steps only look at what top_k keeps); None: every entry may matter.
        self.screen_k = 1 if not p.do_sample else (max(p.top_k, self.keep) if p.top_k != 0 else None)

    def __call__(
        self,
        input_ids: torch.Tensor,
        logits: torch.Tensor,
        valid: torch.Tensor | None = None,
        cur_len: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Processed float32 scores (B, V); `logits` is not modified.

        input_ids: (B, T) token history (prompt, image tokens included, plus generated tokens).
        valid: optional (B, T) bool, False at positions to ignore (padding, unused buffer slots).
        cur_len: sequence length as transformers counts it (padded prompt + generated); default T.
        """
        scores = self.monotone(input_ids, logits, valid, cur_len)
        cur_len = input_ids.shape[-1] if cur_len is None else cur_len
        for step in self.selection_steps:
            scores = step(scores, input_ids, valid, cur_len)
        return scores

    def monotone(self, input_ids: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor | None = None,
                 cur_len: int | torch.Tensor | None = None) -> torch.Tensor:
        """The per-entry, order-keeping steps of __call__ (all of it for greedy; screened_head.py bounds them)."""
        scores = logits.float()  # (B, V); matches HF, which processes a float32 copy
        cur_len = input_ids.shape[-1] if cur_len is None else cur_len
        for step in self.monotone_steps:
            scores = step(scores, input_ids, valid, cur_len)
        return scores

    def sample(self, scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_next_token(scores, self.params, generator)

    def choose(self, input_ids: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw logits (B, V) -> next tokens (B,): every step, then argmax or a draw."""
        return self.sample(self(input_ids, logits, valid), generator)

    # Each step: (scores (B, V), input_ids (B, T), valid (B, T) | None, cur_len) -> (B, V)

    def _repetition_penalty(self, scores, input_ids, valid, cur_len):
        B, V = scores.shape
        # Ids at or past V (embedding vocab larger than lm_head) and ignored positions go to a spare column V.
        ids = input_ids.clamp(max=V).masked_fill(input_ids < 0, V)  # (B, T)
        if valid is not None:
            ids = ids.masked_fill(~valid, V)
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=scores.device).scatter_(1, ids, True)[:, :V]
        penalty = self.params.repetition_penalty
        penalized = torch.where(scores < 0, scores * penalty, scores / penalty)  # matches HF
        return torch.where(seen, penalized, scores)

    def _min_length(self, scores, input_ids, valid, cur_len):
        V = scores.shape[-1]
        key = (V, scores.device)
        if key not in self._eos_mask:  # built once per (vocab, device), on the first step
            vocab = torch.arange(V, device=scores.device)
            self._eos_mask[key] = torch.isin(vocab, self._eos.to(scores.device))  # (V,)
            self._eos_ids[key] = self._eos_mask[key].nonzero().squeeze(1)  # (n,) the EOS ids inside the vocab
        if isinstance(cur_len, int):  # decided on the host: touch only the EOS entries
            return scores.index_fill(-1, self._eos_ids[key], -math.inf) if cur_len < self.eos_until else scores
        blocked = self._eos_mask[key] & (cur_len < self.eos_until)  # cur_len a 0-d device tensor: no sync
        return scores.masked_fill(blocked, -math.inf)

    def _temperature(self, scores, input_ids, valid, cur_len):
        return scores / self.params.temperature  # a division, not a multiply by 1/T: matches HF

    def _top_k(self, scores, input_ids, valid, cur_len):
        k = min(max(self.params.top_k, self.keep), scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1:]  # (B, 1); ties with the k-th are kept
        return scores.masked_fill(scores < kth, -math.inf)

    def _top_p(self, scores, input_ids, valid, cur_len):
        sorted_scores, order = torch.sort(scores, descending=False)  # (B, V), same sort as HF for ties
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - self.params.top_p)
        drop[..., -self.keep:] = False  # keep at least the most likely tokens
        drop = drop.scatter(1, order, drop)
        return scores.masked_fill(drop, -math.inf)

    def _min_p(self, scores, input_ids, valid, cur_len):
        probs = torch.softmax(scores, dim=-1)  # (B, V)
        threshold = self.params.min_p * probs.amax(dim=-1, keepdim=True)  # (B, 1)
        drop = probs < threshold
        drop.scatter_(-1, torch.topk(probs, min(self.keep, probs.shape[-1]), dim=-1).indices, False)
        return scores.masked_fill(drop, -math.inf)


def sample_next_token(
    scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, V) processed scores -> (B,) long. Greedy argmax, or softmax + one multinomial draw.

    With `generator=None` the global RNG is used, as transformers does, so `torch.manual_seed(s)` gives
    transformers' tokens. torch.multinomial with one sample checks its input with an async assert: no sync.
    """
    if not params.do_sample:
        return torch.argmax(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
