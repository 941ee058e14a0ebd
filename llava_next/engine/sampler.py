"""Batched token choice for one engine step: every sampling row processed at once (vLLM's sampler shape).

Per step, one (R, 7) float32 tensor of per-row parameters (built on the host from values fixed at each
sequence's first step, one transfer) drives the processors of sampling/logits.py over all R rows together,
in the order the engine always used:

    presence/frequency penalties (vLLM's, over the output tokens) -> repetition penalty (transformers', over
    prompt + output) -> EOS and stop ids at -inf while min_tokens holds them -> [sampled rows:] temperature -> top-k -> top-p -> min-p -> softmax -> one draw

Greedy rows (temperature below 1e-5, vLLM's rule) take the argmax after the first four steps. Token counts
live on the device: a persistent (slots, V + 1) int32 count table of output tokens and a bool table of the
prompt's tokens, one slot per sequence with a penalty, filled once when the sequence first samples and updated
with one `index_put_` per step (column V collects ids outside the vocab and failed rows). Unseeded rows draw
together from the engine's generator; a row with a `seed` draws alone from its own torch.Generator, so a
seeded request gives the same tokens alone or in any crowd. `logprobs` are vLLM's default: log-softmax of
the raw logits, the sampled token plus the top k.

Containment: parameters are clamped to the finite float32 range (a repetition penalty of 1e-40 is raised to
float32's smallest normal number, 1.2e-38; a temperature or penalty of 1e300 lowered to its largest), and
scores past float32's range after temperature become its largest value, so edge values give finite
probabilities (a penalty that tiny makes the seen tokens with positive logits tie at the top: defined, if not
useful). A row whose scores are NaN or all -inf (NaN logits, a grammar mask allowing nothing) fails; if the
batched pass raises, each row is retried alone. A failed row's token is None and its reason is in `failures`
(key: request id, completion index); the engine ends that request with finish_reason "error".

Leaves out: logit_bias and grammar masks (sampling/structured.py applies both to the logits before this runs),
bad words, the Gumbel trick, prompt logprobs.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from llava_next.engine.outputs import Logprob
from llava_next.engine.request import Sequence
from llava_next.sampling.logits import (
    min_p,
    repetition_penalty,
    temperature,
    top_k,
    top_p,
)

logger = logging.getLogger(__name__)

F32_MAX = torch.finfo(torch.float32).max
F32_TINY = torch.finfo(torch.float32).tiny
T, K, DROP_AT, MIN_P, REP, PRES, FREQ = range(7)  # the columns of the per-row parameter tensor


@dataclasses.dataclass
class _Row:
    """What a sequence's rows need, fixed at its first sampling step."""

    seq: Sequence
    greedy: bool
    values: tuple  # (temperature, top_k or 0, 1 - top_p, min_p, repetition, presence, frequency), clamped
    stops: tuple[int, ...]  # EOS and stop ids inside the vocab, at -inf while min_tokens holds them back
    generator: torch.Generator | None  # its own RNG when seeded
    slot: int | None  # its row of the count tables when it has a penalty


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)  # for unseeded sampled requests
        self._rows: dict[tuple[str, int], _Row] = {}
        self._counts: torch.Tensor | None = None  # (slots, V + 1) int32: output token counts
        self._prompt: torch.Tensor | None = None  # (slots, V + 1) bool: tokens of the prompt
        self._free: list[int] = []
        self.failures: dict[tuple[str, int], str] = {}  # rows that failed in the last call, by (request id, index)

    # -- per-sequence state ------------------------------------------------------------------------------------
    def forget(self, seq: Sequence) -> None:
        row = self._rows.pop((seq.request_id, seq.index), None)
        if row is not None and row.slot is not None:
            self._free.append(row.slot)

    def _row(self, seq: Sequence, vocab: int) -> _Row:
        key = (seq.request_id, seq.index)
        row = self._rows.get(key)
        if row is not None and row.seq is seq:
            return row
        if row is not None:  # a finished request's id reused without forget(): start clean
            self.forget(row.seq)
        p = seq.params
        greedy = p.greedy
        values = (min(p.temperature, F32_MAX), min(p.top_k, vocab) if p.top_k > 0 else 0, 1 - p.top_p, p.min_p,
                  min(max(p.repetition_penalty, F32_TINY), F32_MAX), p.presence_penalty, p.frequency_penalty)
        stops = ()
        if p.min_tokens > 0:
            stops = tuple(sorted(t for t in set(seq.eos_token_ids) | seq.stop_token_ids if t < vocab))
        generator = None
        if p.seed is not None and not greedy:
            generator = torch.Generator(device=self.device).manual_seed(p.seed % 2**64)
        slot = None
        if values[REP] != 1.0 or values[PRES] != 0.0 or values[FREQ] != 0.0:
            slot = self._new_slot(seq, vocab)
        row = _Row(seq, greedy, values, stops, generator, slot)
        self._rows[key] = row
        return row

    def _new_slot(self, seq: Sequence, vocab: int) -> int:
        """A row of the count tables holding this sequence's prompt tokens and output counts (once)."""
        if self._counts is None:  # one vocabulary per sampler: the width of the model's logits
            self._counts = torch.zeros(8, vocab + 1, dtype=torch.int32, device=self.device)
            self._prompt = torch.zeros(8, vocab + 1, dtype=torch.bool, device=self.device)
            self._free = list(range(8))
        if not self._free:  # grow by doubling
            n = self._counts.shape[0]
            self._counts = torch.cat([self._counts, torch.zeros_like(self._counts)])
            self._prompt = torch.cat([self._prompt, torch.zeros_like(self._prompt)])
            self._free = list(range(n, 2 * n))
        slot = self._free.pop()
        prompt = torch.tensor(seq.token_ids[: seq.prompt_len], dtype=torch.long).clamp(max=vocab).to(self.device)
        output = torch.tensor(seq.output_ids, dtype=torch.long).clamp(max=vocab).to(self.device)
        self._prompt[slot].zero_().index_fill_(0, prompt, True)
        self._counts[slot].zero_().index_add_(0, output, torch.ones_like(output, dtype=torch.int32))
        return slot

    # -- a step ------------------------------------------------------------------------------------------------
    def __call__(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[int | None], list[dict | None]]:
        """logits (R, V) for R sampling sequences -> their next token ids and (when asked) logprob dicts. A row
        with nothing finite to choose from (NaN, or all -inf as a grammar mask allowing nothing leaves it)
        fails: token None, reason in `failures`."""
        self.failures = {}
        rows, keep = [], []
        for i, seq in enumerate(seqs):  # a sequence whose set-up fails is that request's failure only
            try:
                rows.append(self._row(seq, logits.shape[-1]))
                keep.append(i)
            except Exception as exc:  # noqa: BLE001 (contained and logged by _failed)
                self._failed(seq, exc)
        if len(keep) < len(seqs):
            logits = logits[keep]
        try:
            tokens, logprobs = self._sample(rows, logits) if rows else ([], [])
        except Exception:  # find the rows that fail: each alone
            logger.exception("batched sampling of %d rows failed; sampling each row alone", len(rows))
            tokens, logprobs = [], []
            for i, row in enumerate(rows):
                try:
                    one = self._sample([row], logits[i: i + 1])
                except Exception as exc:  # noqa: BLE001 (contained and logged by _failed)
                    self._failed(row.seq, exc)
                    one = [None], [None]
                tokens.append(one[0][0])
                logprobs.append(one[1][0])
        out_tokens: list[int | None] = [None] * len(seqs)
        out_logprobs: list[dict | None] = [None] * len(seqs)
        for i, row, token, lp in zip(keep, rows, tokens, logprobs):
            out_tokens[i], out_logprobs[i] = token, lp
            key = (row.seq.request_id, row.seq.index)
            if token is None and key not in self.failures:
                self.failures[key] = "sampling failed: no finite probabilities (NaN logits or nothing allowed)"
        return out_tokens, out_logprobs

    def _failed(self, seq: Sequence, exc: BaseException) -> None:
        logger.error("sampling failed for request %r", seq.request_id, exc_info=exc)
        self.failures[(seq.request_id, seq.index)] = f"sampling failed: {exc!r}"[:300]

    def scores(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """(R, V) float32: the scores greedy rows take the argmax of (penalties, min_tokens), for
        tests and inspection; no state changes beyond the rows' first-step set-up."""
        rows = [self._row(seq, logits.shape[-1]) for seq in seqs]
        return self._penalized(rows, logits.float(), self._values(rows, logits.device))[0]

    @staticmethod
    def _values(rows: list[_Row], dev: torch.device) -> torch.Tensor:
        return torch.tensor([r.values for r in rows], dtype=torch.float32).to(dev)  # (R, 7), one transfer

    def _penalized(self, rows: list[_Row], raw: torch.Tensor, values: torch.Tensor):
        """raw (R, V) float32 -> (scores after penalties and min_tokens, the penalty rows' (rows,
        slots) index tensors or None)."""
        V = raw.shape[-1]
        dev = raw.device
        scores = raw
        pen = [i for i, r in enumerate(rows) if r.slot is not None]
        where = None
        if pen:
            pen_rows = torch.tensor(pen).to(dev)  # (P,)
            slots = torch.tensor([rows[i].slot for i in pen]).to(dev)  # (P,)
            counts = self._counts[slots, :V]  # (P, V) int32
            sub = scores[pen_rows]  # (P, V)
            v = values[pen_rows]  # (P, 7)
            present = counts > 0  # (P, V)
            sub = sub - v[:, FREQ:FREQ + 1] * counts - v[:, PRES:PRES + 1] * present.float()
            sub = repetition_penalty(sub, self._prompt[slots, :V] | present, v[:, REP:REP + 1])
            scores = scores.index_copy(0, pen_rows, sub)  # out of place: raw stays for logprobs
            where = (pen_rows, slots)
        hold = [(i, t) for i, r in enumerate(rows) if r.stops and r.seq.num_output_tokens < r.seq.params.min_tokens
                for t in r.stops]
        if hold:
            at = torch.tensor(hold).to(dev)  # (n, 2): (row, token)
            scores = scores.index_put((at[:, 0], at[:, 1]), torch.tensor(-math.inf, device=dev))
        return scores, where

    def _sample(self, rows: list[_Row], logits: torch.Tensor):
        V = logits.shape[-1]
        dev = logits.device
        raw = logits.float()  # (R, V); kept unmodified for logprobs
        values = self._values(rows, dev)
        scores, pen = self._penalized(rows, raw, values)
        best, tokens = scores.max(-1)  # (R,) greedy rows keep these tokens (the first maximum, as argmax)
        bad = ~(best > -math.inf)  # (R,) NaN or all -inf: nothing to choose from
        sampled = [i for i, r in enumerate(rows) if not r.greedy]
        if sampled:
            idx = torch.tensor(sampled).to(dev)  # (S,)
            v = values[idx]  # (S, 7)
            sub = temperature(scores if len(sampled) == len(rows) else scores[idx], v[:, T:T + 1])  # (S, V)
            sub.clamp_(max=F32_MAX).masked_fill_(bad[idx, None], 0.0)  # finite above; a failing row draws
            # from a uniform row (its token is discarded)
            ks = [rows[i].values[K] for i in sampled]
            if max(ks) > 0:
                sub = top_k(sub, v[:, K:K + 1].long(), int(max(ks)))
            if any(rows[i].values[DROP_AT] > 0 for i in sampled):
                sub = top_p(sub, v[:, DROP_AT:DROP_AT + 1])
            if any(rows[i].values[MIN_P] > 0 for i in sampled):
                sub = min_p(sub, v[:, MIN_P:MIN_P + 1])
            probs = torch.softmax(sub, dim=-1)  # (S, V)
            drawn = torch.full((len(sampled),), -1, dtype=torch.long, device=dev)
            shared = [j for j, i in enumerate(sampled) if rows[i].generator is None]
            if shared:
                at = torch.tensor(shared).to(dev)
                drawn[at] = torch.multinomial(probs[at], 1, generator=self.generator).squeeze(1)
            own, picks = [], []
            for j, i in enumerate(sampled):  # seeded rows: each its own generator
                if rows[i].generator is not None:
                    try:
                        picks.append(torch.multinomial(probs[j: j + 1], 1, generator=rows[i].generator)[0])
                        own.append(j)
                    except Exception as exc:  # noqa: BLE001 (contained and logged by _failed)
                        self._failed(rows[i].seq, exc)
            if own:
                drawn[torch.tensor(own).to(dev)] = torch.cat(picks)
            tokens = tokens.index_copy(0, idx, drawn)
        tokens = torch.where(bad, -1, tokens)  # (R,) -1: failed (a seeded row whose draw raised is -1 too)
        if pen is not None:  # one scatter: this step's tokens into the count table (failed rows: spare column)
            pen_rows, slots = pen
            new = tokens[pen_rows]
            self._counts.index_put_((slots, torch.where(new < 0, V, new)),
                                    torch.ones_like(new, dtype=torch.int32), accumulate=True)
        picked = [t if t >= 0 else None for t in tokens.tolist()]
        return picked, self._logprobs(rows, raw, tokens, picked)

    @staticmethod
    def _logprobs(rows: list[_Row], raw: torch.Tensor, tokens: torch.Tensor, picked: list) -> list[dict | None]:
        """vLLM's default logprobs for the rows that ask: the sampled token's and the top k of the raw logits."""
        want = [i for i, r in enumerate(rows) if r.seq.params.logprobs is not None]
        out: list[dict | None] = [None] * len(rows)
        if not want:
            return out
        idx = torch.tensor(want).to(raw.device)
        lp = torch.log_softmax(raw[idx], dim=-1)  # (W, V)
        tok = tokens[idx].clamp(min=0)[:, None]  # (W, 1)
        tok_lp = lp.gather(1, tok)  # (W, 1)
        rank = (lp > tok_lp).sum(-1) + 1  # (W,)
        k_max = max(rows[i].seq.params.logprobs for i in want)
        top_v, top_i = torch.topk(lp, k_max) if k_max else (lp[:, :0], lp[:, :0].long())  # (W, k_max)
        tok_l, tok_lp_l, rank_l = tok[:, 0].tolist(), tok_lp[:, 0].tolist(), rank.tolist()
        top_v_l, top_i_l = top_v.tolist(), top_i.tolist()
        for j, i in enumerate(want):
            k = rows[i].seq.params.logprobs
            entry = {t: Logprob(v, r) for r, (t, v) in enumerate(zip(top_i_l[j][:k], top_v_l[j][:k]), start=1)}
            if tok_l[j] not in entry:
                entry = {tok_l[j]: Logprob(tok_lp_l[j], rank_l[j]), **entry}
            out[i] = entry if picked[i] is not None else None
        return out
