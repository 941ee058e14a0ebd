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
- `begin(matchers)` (before the step's forward) -> a pending mask, or None when no row is constrained:
  `matchers[i]` is sampling row i's matcher or None. Where a core is free for it (`overlaps`: a GPU engine,
  or a CPU engine whose torch threads leave one, with enough rows) the mask work runs on one worker thread
  while the model runs (as vLLM overlaps its bitmask with the forward); otherwise `begin` hands the matchers
  on and `constrain` computes the masks after the forward (with torch's threads on every core the overlap
  measured slower: the worker competes with the forward, and the handoff costs ~0.1 ms). The token bitmask of
  every constrained row is filled in one llguidance call (parallel, GIL released) into a preallocated host
  buffer; on a CPU the bits of the constrained rows (only those: a row without a grammar costs nothing) then
  become their (C, V) 0 / -inf addend by integer ops on the unpacked bits (`cpu_addend`, branch-free: torch's
  CPU masked_fill and where on such masks were ~4-8x slower); on a GPU rows without a grammar are all ones in the
  (R, W) bitmask. A matcher in an error state allows nothing: the sampler finds the row all -inf, fails it,
  and the engine ends that request only (finish_reason "error"). llguidance's tokenizer gets extra "slices"
  for short strings (`_slices`): the masks are the same, the fill of the bench's rows ~10% cheaper.
- `constrain(logits, pending, biases)`: in place on the logits of the sampling rows (R, V), before the sampler
  (as vLLM applies its bitmask: logprobs see the mask): every row's logit_bias {id: bias} (one scatter), then
  the pending mask in one op (CPU: one add, or one index_add over the constrained rows; GPU: the packed int32
  words copied over, unpacked there, one masked_fill). `pending` may also be the matcher list itself
  (computed then, without overlap).
- `advance(matcher, token)`: after sampling; None (go on), "end" (the grammar is complete: finish with
  "stop") or "error" (the token was rejected: that request ends with "error").

Leaves out: fast-forward (forced) tokens, speculative draft masks, jump-ahead decoding, other backends.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import os
import threading
from collections.abc import Callable

import numpy as np
import torch

from llava_next.errors import StructuredOutputError
from llava_next.sampling.structured_params import ANY_OBJECT, StructuredOutputsParams

logger = logging.getLogger("llava_next.structured")

CACHE_SIZE = 256
OVERLAP_MIN_ROWS = 16  # on a CPU with a free core: fewer rows fill in less time than the worker's handoff
_STRING_CHAR = r'[^"\\\x00-\x1F\x7F]'  # a JSON string character that needs no escape
SHORT_STRING_SLICES = [_STRING_CHAR + f"{{1,{n}}}" for n in range(1, 10)]  # see _slices()
NEG_INF_BITS = -8388608  # 0xFF800000 as int32: the bits of float32 -inf
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

    def __init__(self, pristine):
        self._pristine = pristine

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
        self._addend = torch.empty(0, 32 * self.words, dtype=torch.int32)  # (rows, 32W) CPU addend, grown on demand
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llava-next-grammar-mask")
        self._last: concurrent.futures.Future | None = None  # the worker's latest job

    # -- compiling (any thread) ------------------------------------------------------------------------------
    def _ll_tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                text = self._tokenizer_json()
                if text is None:
                    raise StructuredOutputError("structured outputs need the model's tokenizer (a processor)")
                ll = _llguidance()
                self._tokenizer = ll.LLTokenizer(text, n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None,
                                                 slices=_slices(ll))
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
            hit = self._compile(params)
            with self._lock:
                self._cache[key] = hit
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        if isinstance(hit, str):
            raise StructuredOutputError(hit)
        return hit

    def _compile(self, params: StructuredOutputsParams) -> Grammar | str:
        ll = _llguidance()
        tokenizer = self._ll_tokenizer()
        kind = params.kind()
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
        return Grammar(matcher)

    # -- one step (engine thread) ----------------------------------------------------------------------------
    def _grown(self, buffer: torch.Tensor, rows: int, pin: bool = False) -> torch.Tensor:
        """`buffer` (n, C), or a larger one when n < rows; a normal tensor even when made inside the engine's
        inference mode, so it can be written in place outside it too."""
        if buffer.shape[0] >= rows:
            return buffer
        with torch.inference_mode(False):
            return torch.empty(max(rows, self._max_rows), buffer.shape[1], dtype=buffer.dtype, pin_memory=pin)

    def _buffer(self, rows: int) -> torch.Tensor:
        self._host = self._grown(self._host, rows, pin=self.device.type == "cuda")
        return self._host[:rows]  # (rows, W), contiguous

    def begin(self, matchers: list) -> concurrent.futures.Future | list | None:
        """Start this step's masks for the sampling rows (row i: `matchers[i]` or None) on the worker thread
        where `overlaps` says so; otherwise the matchers themselves, for `constrain` to compute the masks."""
        if all(m is None for m in matchers):
            return None
        if not self.overlaps(sum(m is not None for m in matchers)):
            return list(matchers)  # computed in constrain
        self._last = self._worker.submit(self._masks, list(matchers))
        return self._last

    def overlaps(self, rows: int) -> bool:
        """Whether `begin` puts the masks of `rows` constrained rows on the worker thread, to overlap the
        forward: on a GPU (its forward leaves the CPU idle) always; on a CPU only when torch's intra-op threads
        leave a core free and there are OVERLAP_MIN_ROWS rows or more. With torch on every core the worker only
        competes with the forward and the handoff adds ~0.1 ms (bench/RESULTS.md)."""
        if self.device.type != "cpu":
            return True
        return rows >= OVERLAP_MIN_ROWS and torch.get_num_threads() < (os.cpu_count() or 1)

    def _masks(self, matchers: list):
        """On the worker thread or in `constrain`. A CPU engine: (rows, addend), the constrained rows' indices ((C,) int64, or None when
        every row is constrained) and their (C, 32W) float32 0 / -inf addend; rows without a grammar get no
        mask work at all. Other devices: the (R, W) int32 bitmask, rows without a grammar all ones."""
        R = len(matchers)
        rows = [i for i, m in enumerate(matchers) if m is not None]
        on_cpu = self.device.type == "cpu"
        n = len(rows) if on_cpu else R
        bitmask = self._buffer(n)  # (n, W) int32
        if not on_cpu and len(rows) < R:
            bitmask.fill_(-1)
        pairs = [(matchers[i], k if on_cpu else i) for k, i in enumerate(rows)]  # (matcher, its bitmask row)
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), self.words * 4, n)
        for m, k in pairs:
            if m.is_error():  # its mask would allow only EOS and hide the failure: allow nothing, the row fails
                bitmask[k] = 0
        if not on_cpu:
            return bitmask
        self._addend = self._grown(self._addend, n)
        return (None if n == R else torch.tensor(rows)), cpu_addend(bitmask, self._addend[:n])

    def constrain(self, logits: torch.Tensor, pending, biases: list) -> None:
        """One step, in place on logits (R, V): every row's logit_bias (one scatter), then the grammar masks
        that `begin` started (or, given the matchers themselves, computed now)."""
        if any(b for b in biases):
            rows, cols, vals = [], [], []
            for i, bias in enumerate(biases):
                if bias:
                    rows.extend([i] * len(bias))
                    cols.extend(bias.keys())
                    vals.extend(bias.values())
            index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
            logits.index_put_(index, torch.tensor(vals, device=logits.device, dtype=logits.dtype), accumulate=True)
        if isinstance(pending, list) and all(m is None for m in pending):
            pending = None
        if pending is None:
            return
        V = logits.shape[1]
        if V > 32 * self.words:
            raise ValueError(f"logits have {V} columns; the grammar masks cover {32 * self.words}")
        if isinstance(pending, list):
            if self._last is not None:  # a step that failed after begin may have left one running: same buffers
                concurrent.futures.wait([self._last])
            masks = self._masks(pending)
        else:
            masks = pending.result()
        if logits.device.type == "cpu":
            rows, addend = masks  # -inf where not allowed
            if rows is None:
                logits.add_(addend[:, :V])
            else:
                logits.index_add_(0, rows, addend[:, :V])
        else:
            if self._shifts is None or self._shifts.device != logits.device:
                self._shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
            apply_on_device(logits, masks.to(logits.device, non_blocking=True), self._shifts)

    @staticmethod
    def advance(matcher, token: int) -> str | None:
        if not matcher.consume_token(token):
            return "error"
        return "end" if matcher.is_stopped() else None


def cpu_addend(bitmask: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The host bitmask (R, W) int32 -> (R, 32W) float32, 0 where allowed and -inf elsewhere (in `out`, an
    (R, 32W) int32 buffer, when given). Branch-free: the bits unpacked to bytes (numpy, bit j of a word is
    token 32w + j), widened to int32, minus 1 (0 or all ones), and with -inf's bits (a table lookup per byte was
    ~1.6x slower: it writes the 8 MB addend from a gather)."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")  # (R, 32W) uint8: 1 allowed
    out = torch.empty(bits.shape, dtype=torch.int32) if out is None else out
    out.copy_(torch.from_numpy(bits))
    return out.sub_(1).bitwise_and_(NEG_INF_BITS).view(torch.float32)


def apply_on_device(logits: torch.Tensor, words: torch.Tensor, shifts: torch.Tensor) -> None:
    """logits (R, V) at -inf where the bitmask `words` (R, W), on the logits' device, has a 0 bit."""
    R, V = logits.shape
    allowed = ((words[:, :, None] >> shifts) & 1).view(R, -1)[:, :V].bool()  # (R, V)
    logits.masked_fill_(~allowed, float("-inf"))


def _slices(ll) -> list[str]:
    """llguidance's default slices with the string lengths 1..9 in front. A slice is a set of tokens whose
    mask bits are set at once, without walking its part of the token trie, when every token of it is allowed
    (an under-approximation: the masks are the same with or without). The defaults cover string contents of
    up to 10, 30 or any characters, so inside a string with `maxLength` below 10 (or fewer than 10 characters
    left) every token was walked. Measured on the bench's engine states (tiny model, 32k vocabulary, one
    thread): a row with most of the vocabulary allowed ~120 instead of ~190 us, a row near the end of its
    string ~105 instead of ~65 us (more slices to walk), ~10% off the fill in all (bench/RESULTS.md)."""
    defaults = ll.LLTokenizer.general_slices()
    first_string = next((i for i, s in enumerate(defaults) if s.startswith(_STRING_CHAR)), len(defaults))
    return defaults[:first_string] + SHORT_STRING_SLICES + defaults[first_string:]


def _short(message) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."
