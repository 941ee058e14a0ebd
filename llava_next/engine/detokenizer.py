"""Incremental detokenization: each step decodes only the newest tokens, and the text always equals decoding
the whole output (vLLM's prefix/read-offset scheme, made exact).

The output is split at a `stable` boundary: the text of the tokens before it can never change, whatever comes
next. Each step decodes the tokens after the boundary together with a few context tokens before it (the
"prefix" window), and keeps what follows the context's own text: the context absorbs what a decoder does at
the start of a string (SentencePiece's leading-space strip, Metaspace's first-token rule). The boundary then
moves to the end when nothing at the end can still change:
- the last token the decoder sees (skipped special tokens are invisible to it, so a run continues across them)
  is not a byte-fallback token (`<0xE2>`): tokenizers decodes a run of byte tokens as a whole (a valid "€"
  followed by an incomplete <0xE2> becomes four U+FFFD), so a run is held until it ends;
- the text does not end with U+FFFD (an incomplete UTF-8 sequence of a byte-level BPE).
When the context decodes to nothing (only skipped special tokens or a lone space) or its text is not a prefix
of the window's, that step decodes the whole output instead: always exact, rarely slower.

`stable_chars` is the length of the text no later token can change: a streaming caller shows only that much
(UTF-8 pieces held back), and a stop-string search only needs to look from there.

Leaves out: `clean_up_tokenization_spaces` (it rewrites across token boundaries; tokenizers that apply it,
none of the llava-hf BPE ones, decode the whole output every step).
"""

from __future__ import annotations

import re

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def byte_token_ids(tokenizer) -> frozenset[int]:
    """The ids of a tokenizer's byte-fallback tokens (<0x00> .. <0xFF>), found once per tokenizer."""
    return frozenset(i for t, i in tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(t))


def special_token_ids(tokenizer) -> frozenset[int]:
    """The ids decode(skip_special_tokens=True) drops (the backend's special added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
    return frozenset(getattr(tokenizer, "all_special_ids", ()))


def cleans_up(tokenizer) -> bool:
    """Whether decode() rewrites spaces across tokens (clean_up_tokenization_spaces; ignored for BPE models)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    is_bpe = backend is not None and type(backend.model).__name__ == "BPE"
    return not is_bpe or bool(getattr(tokenizer, "_force_cleanup", False))


class IncrementalDetokenizer:
    """The text of one completion, updated as tokens are appended."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, byte_ids: frozenset[int] = frozenset(),
                 incremental: bool = True, special_ids: frozenset[int] = frozenset()):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.byte_ids = byte_ids
        self.hidden = special_ids if skip_special_tokens else frozenset()  # ids the decoder never sees
        self.incremental = incremental
        self.text = ""
        self.stable = 0  # output tokens before the boundary
        self.stable_chars = 0  # len of their text, a prefix of self.text forever
        self.context = 0  # the window's context starts here (context = tokens [context, stable))
        self.context_text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def update(self, token_ids: list[int], start: int = 0) -> int:
        """token_ids[start:] is the whole output so far (append-only between calls). Updates `text`; returns the
        index before which the text did not change in this call (a stop-string search starts there)."""
        unchanged = self.stable_chars
        end = len(token_ids) - start
        if self.stable == 0 or not self.context_text or not self.incremental:
            self.text = self._decode(token_ids[start:])
        else:
            window = self._decode(token_ids[start + self.context:])
            if window.startswith(self.context_text):
                self.text = self.text[: self.stable_chars] + window[len(self.context_text):]
            else:  # the context's text is not a prefix of the window's: decode everything
                self.text = self._decode(token_ids[start:])
        if end and not self._open_byte_run(token_ids, start, end) and not self.text.endswith("\ufffd"):
            new_context = self._decode(token_ids[start + self.stable: start + end])
            if new_context:  # else keep the older context (it still has text)
                self.context, self.context_text = self.stable, new_context
            else:
                self.context_text = self._decode(token_ids[start + self.context: start + end])
            self.stable, self.stable_chars = end, len(self.text)
        return unchanged

    def _open_byte_run(self, token_ids: list[int], start: int, end: int) -> bool:
        """Whether the last token the decoder sees (skipped special tokens are invisible to it) is a byte token;
        looks back to the boundary only (the token before it was checked when the boundary moved)."""
        for i in range(start + end - 1, start + self.stable - 1, -1):
            if token_ids[i] not in self.hidden:
                return token_ids[i] in self.byte_ids
        return False
