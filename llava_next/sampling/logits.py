"""Logits processing and next-token choice, without host syncs.

Implements the part of transformers' generation that LLaVA-NeXT users reach for, with transformers'
arithmetic and in the order of `GenerationMixin._get_logits_processor`, so processed scores are bitwise
equal to the reference:

    repetition_penalty -> min_tokens (EOS gets -inf) -> [sampling only, i.e. not `params.greedy`:]
    temperature -> top_k -> top_p -> min_p

then greedy `argmax` or `softmax` + `torch.multinomial` (same RNG draws as transformers with the same
generator or global seed). Every per-token op is a torch op on the device; which steps run is decided
once, in `LogitsPipeline.__init__`, so the decode loop has no `.item()` and no branches on tensor values.

Repetition penalty, EOS suppression and temperature act per entry and keep order; screened_head.py relies on
that (`LogitsPipeline.monotone`, `LogitsPipeline.screen_k`). The repetition penalty's "seen" mask can be kept
incrementally (`seen_tokens` once, `mark_seen` per new token) instead of scattering the whole history each step.

The settings are the one SamplingParams (params.py, vLLM's fields); compat/generate_args.py converts
transformers' kwargs into it (do_sample=False -> greedy, min_length/min_new_tokens -> min_tokens).

The processors' math is a set of module functions (`repetition_penalty`, `temperature`, `top_k`, `top_p`,
`min_p`) taking a float or a per-row (B, 1) tensor: the pipeline calls them with its floats, the engine's
batched sampler (engine/sampler.py) with one row per sequence.

Beam search (beam_search.py) runs the same pipeline with transformers' min_tokens_to_keep.
Leaves out: num_return_sequences > 1, typical_p, epsilon/eta cutoff, top_h,
no_repeat_ngram_size, bad_words_ids, sequence_bias, guidance, forced BOS/EOS, suppress_tokens,
watermarking, renormalize_logits. Set to anything but their no-op value, they raise
`GenerationArgumentError` (compat/generate_args.py) instead of being silently ignored. Stop criteria: `stopping.py`.
"""

from __future__ import annotations

import math

import torch

from llava_next.sampling.params import SamplingParams


class LogitsPipeline:
    """transformers' logits processors for one `generate` call, as a fixed list of torch ops.

    `eos_token_id` (int, list or tensor) is needed for min_tokens; `prompt_len` is the padded prompt length
    (transformers' `input_ids.shape[-1]` before the first new token): EOS is blocked while the sequence is
    shorter than prompt_len + min_tokens;
    `min_tokens_to_keep` is transformers' for the sampling steps (1, or #EOS + 1 in beam sampling).
    """

    def __init__(
        self,
        params: SamplingParams,
        eos_token_id: int | list[int] | torch.Tensor | None = None,
        prompt_len: int = 0,
        min_tokens_to_keep: int = 1,
    ):
        self.params = params  # validated on construction
        self.keep = min_tokens_to_keep  # top_k / top_p / min_p keep at least this many (beam sampling: #EOS + 1)
        self._eos = None if eos_token_id is None else torch.as_tensor(eos_token_id, dtype=torch.long).reshape(-1)
        self._eos_mask: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._eos_ids: dict[tuple[int, torch.device], torch.Tensor] = {}
        # transformers' min_length and min_new_tokens, as one threshold (compat/generate_args.py's min_tokens)
        self.eos_until = prompt_len + params.min_tokens
        p, sample = params, not params.greedy
        steps = []
        if p.repetition_penalty != 1.0:
            steps.append(self._repetition_penalty)
        if self._eos is not None and self._eos.numel() > 0 and p.min_tokens > 0:
            steps.append(self._min_tokens)
        if sample and p.temperature != 1.0:  # transformers' former "warpers" only act when sampling
            steps.append(lambda scores, *_: temperature(scores, p.temperature))
        self.monotone_steps = tuple(steps)  # per entry, order-keeping
        selection, keep = [], self.keep
        if sample:
            if p.top_k > 0:  # 0 or -1: off
                selection.append(lambda scores, *_: top_k(scores, min(max(p.top_k, keep), scores.shape[-1])))
            if p.top_p < 1.0:
                selection.append(lambda scores, *_: top_p(scores, 1 - p.top_p, keep))
            if p.min_p > 0.0:  # min_p == 0 removes nothing
                selection.append(lambda scores, *_: min_p(scores, p.min_p, keep))
        self.selection_steps = tuple(selection)
        self.steps = self.monotone_steps + self.selection_steps
        # How many best entries of the monotone scores decide the token: 1 for greedy, top_k when sampling
        # with top_k (the later steps only look at what top_k keeps); None: every entry may matter.
        self.screen_k = 1 if not sample else (max(p.top_k, self.keep) if p.top_k > 0 else None)

    def __call__(
        self,
        input_ids: torch.Tensor,
        logits: torch.Tensor,
        valid: torch.Tensor | None = None,
        cur_len: int | torch.Tensor | None = None,
        seen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Processed float32 scores (B, V); `logits` is not modified.

        input_ids: (B, T) token history (prompt, image tokens included, plus generated tokens).
        valid: optional (B, T) bool, False at positions to ignore (padding, unused buffer slots).
        cur_len: sequence length as transformers counts it (padded prompt + generated); default T.
        seen: optional (B, V + 1) bool from `seen_tokens`/`mark_seen`, the tokens the history holds; when
        given, the repetition penalty uses it instead of scattering input_ids.
        """
        scores = self.monotone(input_ids, logits, valid, cur_len, seen)
        cur_len = input_ids.shape[-1] if cur_len is None else cur_len
        for step in self.selection_steps:
            scores = step(scores, input_ids, valid, cur_len, seen)
        return scores

    def monotone(self, input_ids: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor | None = None,
                 cur_len: int | torch.Tensor | None = None, seen: torch.Tensor | None = None) -> torch.Tensor:
        """The per-entry, order-keeping steps of __call__ (all of it for greedy; screened_head.py bounds them)."""
        scores = logits.float()  # (B, V); matches HF, which processes a float32 copy
        cur_len = input_ids.shape[-1] if cur_len is None else cur_len
        for step in self.monotone_steps:
            scores = step(scores, input_ids, valid, cur_len, seen)
        return scores

    @property
    def uses_history(self) -> bool:
        """True when a step reads the token history (the repetition penalty)."""
        return self._repetition_penalty in self.monotone_steps

    @staticmethod
    def seen_tokens(input_ids: torch.Tensor, vocab: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, V + 1) bool: which of the V ids occur in input_ids (B, T) at valid positions; column V collects
        ids at or past V (an embedding vocab larger than the lm_head) and ignored positions."""
        ids = input_ids.clamp(max=vocab).masked_fill(input_ids < 0, vocab)  # (B, T)
        if valid is not None:
            ids = ids.masked_fill(~valid, vocab)
        return torch.zeros(input_ids.shape[0], vocab + 1, dtype=torch.bool, device=input_ids.device).scatter_(1, ids, True)

    @staticmethod
    def mark_seen(seen: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add one new token per row, tokens (B,), to a `seen_tokens` mask in place; rows where valid (B,) is
        False are not counted (their position is ignored, as in seen_tokens)."""
        spare = seen.shape[1] - 1
        ids = tokens.clamp(0, spare)
        if valid is not None:
            ids = ids.masked_fill(~valid, spare)
        seen.scatter_(1, ids[:, None], True)

    def sample(self, scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_next_token(scores, self.params, generator)

    def choose(self, input_ids: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor | None = None,
               generator: torch.Generator | None = None, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits (B, V) -> next tokens (B,): every step, then argmax or a draw."""
        return self.sample(self(input_ids, logits, valid, seen=seen), generator)

    # Each step: (scores (B, V), input_ids (B, T), valid (B, T) | None, cur_len, seen (B, V + 1) | None) -> (B, V);
    # the sampling-only steps (temperature and the selection) read the scores alone.

    def _repetition_penalty(self, scores, input_ids, valid, cur_len, seen):
        V = scores.shape[-1]
        if seen is None or seen.shape[1] != V + 1:
            seen = self.seen_tokens(input_ids, V, valid)
        return repetition_penalty(scores, seen[:, :V], self.params.repetition_penalty)

    def _min_tokens(self, scores, input_ids, valid, cur_len, seen):
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


# The processors' math, shared by LogitsPipeline (one float per call) and the engine's batched sampler
# (engine/sampler.py: one (B, 1) tensor per parameter, one row per sequence). A float and a (B, 1) float32
# tensor holding the same float32 value give bitwise equal scores: the ops are the same, only broadcast.

def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: seen (B, V) bool entries are multiplied by the penalty
    when negative, divided by it otherwise; penalty a float or (B, 1)."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)  # matches HF
    return torch.where(seen, penalized, scores)


def temperature(scores: torch.Tensor, value: float | torch.Tensor) -> torch.Tensor:
    return scores / value  # a division, not a multiply by 1/T: matches HF


def top_k(scores: torch.Tensor, k: int | torch.Tensor, k_max: int | None = None) -> torch.Tensor:
    """Keep the k best entries of each row (ties with the k-th kept). k: an int in [1, V], or (B, 1) long
    with 0 meaning "off" for that row and `k_max` >= every row's k (one topk of width k_max for the batch)."""
    if isinstance(k, int):
        kth = torch.topk(scores, k).values[..., -1:]  # (B, 1)
    else:
        best = torch.topk(scores, k_max).values  # (B, k_max), descending
        kth = best.gather(1, (k.clamp(1, k_max) - 1))  # (B, 1)
        kth = torch.where(k > 0, kth, -math.inf)
    return scores.masked_fill(scores < kth, -math.inf)


def top_p(scores: torch.Tensor, drop_at: float | torch.Tensor, keep: int = 1) -> torch.Tensor:
    """transformers' TopPLogitsWarper with drop_at = 1 - top_p (computed by the caller in float64, as a float
    or a (B, 1) float32 tensor; 0 for a row removes only entries whose probability is already exactly 0)."""
    sorted_scores, order = torch.sort(scores, descending=False)  # (B, V), same sort as HF for ties
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= drop_at
    drop[..., -keep:] = False  # keep at least the most likely tokens
    drop = drop.scatter(1, order, drop)
    return scores.masked_fill(drop, -math.inf)


def min_p(scores: torch.Tensor, value: float | torch.Tensor, keep: int = 1) -> torch.Tensor:
    """transformers' MinPLogitsWarper: drop entries below value x the row's top probability (value 0: none)."""
    probs = torch.softmax(scores, dim=-1)  # (B, V)
    threshold = value * probs.amax(dim=-1, keepdim=True)  # (B, 1)
    drop = probs < threshold
    drop.scatter_(-1, torch.topk(probs, min(keep, probs.shape[-1]), dim=-1).indices, False)
    return scores.masked_fill(drop, -math.inf)


def sample_next_token(
    scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, V) processed scores -> (B,) long. Greedy argmax, or softmax + one multinomial draw.

    With `generator=None` the global RNG is used, as transformers does, so `torch.manual_seed(s)` gives
    transformers' tokens. torch.multinomial with one sample checks its input with an async assert: no sync.
    """
    if params.greedy:
        return torch.argmax(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
