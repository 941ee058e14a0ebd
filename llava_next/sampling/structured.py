"""Constrained decoding with llguidance: compile a constraint once, mask every constrained row of a step at once.

`StructuredDecoding` is one per engine. Its llguidance tokenizer is built on first use from the checkpoint's own
`tokenizer.json` text (the `tokenizers` backend our Tokenizer wraps: no transformers), over the model's
vocabulary (ids the tokenizer lacks, e.g. padding rows of the embedding, are never allowed; special tokens such as
`<image>` never match grammar text).

- `compile(params)` turns a StructuredOutputsParams into a `Grammar` (a pristine llguidance matcher) or raises
  StructuredOutputError naming the reason. It is thread-safe and cached by the constraint's canonical text
  (failures too, so a hostile schema costs its compile once); the engine calls it from `prepare`, which a
  server runs in its worker threads, never on the engine thread. llguidance's parser limits bound the time
  and memory one compile takes; structured_params.py caps sizes before that.
- `Grammar.matcher()` is a fresh matcher for one sequence (a copy of the pristine one: microseconds).
- `constrain(logits, matchers, biases)`: one step, in place, on the logits of the sampling rows (R, V), before
  the sampler (as vLLM applies its bitmask: logprobs see the mask); `matchers[i]` is row i's matcher or None,
  `biases[i]` its logit_bias {id: bias} or None. Biases are added in one scatter. The token bitmask of every
  constrained row is filled in one llguidance call (parallel, GIL released) into a preallocated host buffer
  (rows without a grammar: all ones) and applied to all rows in one write: on a CPU each mask byte is looked
  up in a (256, 8) table of 0 / -inf and the result added (branch-free, ~0.2 ms at 64 rows; torch's CPU
  masked_fill on such masks, what the sampler's `allowed` hook does, was ~4-8x slower); on a GPU the packed int32 words are copied
  over and unpacked there, then one masked_fill. A matcher in an error state allows nothing: the sampler
  finds the row all -inf, fails it, and the engine ends that request only (finish_reason "error").
- `advance(matcher, token)`: after sampling; None (go on), "end" (the grammar is complete: finish with
  "stop") or "error" (the token was rejected: that request ends with "error").

Leaves out: fast-forward (forced) tokens, speculative draft masks, jump-ahead decoding, other backends.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from llava_next.errors import StructuredOutputError
from llava_next.sampling.structured_params import ANY_OBJECT, StructuredOutputsParams

logger = logging.getLogger("llava_next.structured")

CACHE_SIZE = 256
_ADD = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, 0.0, -np.inf).astype(np.float32)  # (256, 8):
# byte value -> what is added to the logits of its 8 tokens (bit j of a mask byte allows its j-th token)
MAX_ERROR_CHARS = 240


def _llguidance():
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - the dependency is declared in the serve/structured extras
        raise StructuredOutputError("structured outputs need the llguidance package: pip install "
                                    "'llava_next[structured]'") from exc
    return llguidance


class Grammar:
    """A compiled constraint: `matcher()` gives each sequence its own copy."""

    def __init__(self, key: str, pristine, compile_s: float):
        self.key, self._pristine, self.compile_s = key, pristine, compile_s

    def matcher(self):
        return self._pristine.deep_copy()


class StructuredDecoding:
    def __init__(self, tokenizer_json: Callable[[], str | None], vocab_size: int, eos_token_ids,
                 device: torch.device, max_rows: int = 16):
        self._tokenizer_json = tokenizer_json
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self.eos_token_ids = list(eos_token_ids)
        self.words = (vocab_size + 31) // 32  # int32 words per bitmask row
        self._lock = threading.Lock()
        self._tokenizer = None
        self._executor = None
        self._cache: collections.OrderedDict[str, Grammar | str] = collections.OrderedDict()
        self._host = torch.empty(0, self.words, dtype=torch.int32)  # (rows, W) bitmask buffer, grown on demand
        self._max_rows = max_rows
        self._shifts = None  # (32,) int32 bit positions on the GPU

    # -- compiling (any thread) ------------------------------------------------------------------------------
    def _ll_tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                text = self._tokenizer_json()
                if text is None:
                    raise StructuredOutputError("structured outputs need the model's tokenizer (a processor)")
                ll = _llguidance()
                self._tokenizer = ll.LLTokenizer(text, n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None)
                self._executor = ll.LLExecutor(num_threads=2)
            return self._tokenizer

    def compile(self, params: StructuredOutputsParams) -> Grammar:
        """The Grammar of `params` (cached by its canonical text); StructuredOutputError when it cannot compile."""
        key = params.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is None:
            hit = self._compile(params, key)
            with self._lock:
                self._cache[key] = hit
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        if isinstance(hit, str):
            raise StructuredOutputError(hit)
        return hit

    def _compile(self, params: StructuredOutputsParams, key: str) -> Grammar | str:
        ll = _llguidance()
        tokenizer = self._ll_tokenizer()
        kind = params.kind()
        start = time.perf_counter()
        try:
            if kind in ("json", "json_object"):
                spacing = ({"whitespace_flexible": False} if params.whitespace_pattern is None else
                           {"whitespace_flexible": True, "whitespace_pattern": params.whitespace_pattern})
                text = ll.LLMatcher.grammar_from_json_schema(json.dumps(params.json if kind == "json" else ANY_OBJECT),
                                                             overrides=spacing)
            elif kind == "regex":
                text = ll.LLMatcher.grammar_from_regex(params.regex)
            elif kind == "choice":
                text = ll.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in params.choice))
            else:
                text = ll.grammar_from("grammar", params.grammar)  # Lark, or GBNF converted to Lark
        except (ValueError, TypeError, RuntimeError) as exc:
            return f"the {kind} constraint is invalid: {_short(exc)}"
        limits = ll.LLParserLimits(verbose_errors=False)
        matcher = ll.LLMatcher(tokenizer, text, log_level=0, limits=limits)
        if matcher.is_error():
            return f"the {kind} constraint does not compile: {_short(matcher.get_error())}"
        return Grammar(key, matcher, time.perf_counter() - start)

    # -- one step (engine thread) ----------------------------------------------------------------------------
    def _buffer(self, rows: int) -> torch.Tensor:
        if self._host.shape[0] < rows:
            size = max(rows, self._max_rows)
            self._host = torch.empty(size, self.words, dtype=torch.int32,
                                     pin_memory=self.device.type == "cuda")
        return self._host[:rows]  # (rows, W), contiguous

    def constrain(self, logits: torch.Tensor, matchers: list, biases: list) -> None:
        """One step, in place on logits (R, V): every row's logit_bias (one scatter), then the grammar masks
        (see the module docstring)."""
        if any(b for b in biases):
            rows, cols, vals = [], [], []
            for i, bias in enumerate(biases):
                if bias:
                    rows.extend([i] * len(bias))
                    cols.extend(bias.keys())
                    vals.extend(bias.values())
            index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
            logits.index_put_(index, torch.tensor(vals, device=logits.device, dtype=logits.dtype), accumulate=True)
        constrained = [(m, i) for i, m in enumerate(matchers) if m is not None]
        if not constrained:
            return
        R, V = logits.shape
        if V > 32 * self.words:
            raise ValueError(f"logits have {V} columns; the grammar masks cover {32 * self.words}")
        bitmask = self._buffer(R)  # (R, W) int32: rows without a grammar allow everything
        if len(constrained) < R:
            bitmask.fill_(-1)
        self._executor.unsafe_compute_mask_ptr(constrained, bitmask.data_ptr(), self.words * 4, R)
        for m, i in constrained:
            if m.is_error():  # its mask would allow only EOS and hide the failure: allow nothing, the row fails
                bitmask[i] = 0
        if logits.device.type == "cpu":
            apply_on_cpu(logits, bitmask)
        else:
            if self._shifts is None or self._shifts.device != logits.device:
                self._shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
            apply_on_device(logits, bitmask.to(logits.device, non_blocking=True), self._shifts)

    @staticmethod
    def advance(matcher, token: int) -> str | None:
        if not matcher.consume_token(token):
            return "error"
        return "end" if matcher.is_stopped() else None


def apply_on_cpu(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits (R, V) += 0 / -inf by the host bitmask (R, W): branch-free (torch's CPU masked_fill on masks with
    scattered allowed tokens is ~4-8x slower)."""
    R, V = logits.shape
    add = np.take(_ADD, bitmask.numpy().view(np.uint8), axis=0)  # (R, 4W, 8): a byte -> its 8 tokens
    logits.add_(torch.from_numpy(add.reshape(R, -1)[:, :V]))  # (R, V) float32: -inf where not allowed


def apply_on_device(logits: torch.Tensor, words: torch.Tensor, shifts: torch.Tensor) -> None:
    """logits (R, V) at -inf where the bitmask `words` (R, W), on the logits' device, has a 0 bit."""
    R, V = logits.shape
    allowed = ((words[:, :, None] >> shifts) & 1).view(R, -1)[:, :V].bool()  # (R, V)
    logits.masked_fill_(~allowed, float("-inf"))


def _short(message) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."
