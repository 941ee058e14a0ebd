"""The text of each generated token in its context, so logprob `token`s, `bytes` and `text_offset` add up.

A token decoded alone loses what its neighbours give it: SentencePiece's "▁the" decodes to "the" at the start
of a decode but to " the" after another token, and a byte-fallback token (`<0xE2>`) is half a character. Each
token's piece is therefore the growth of the decoded text when the token is added after up to `WINDOW`
preceding tokens (all of them at the start of the output, where the decoder strips the first space, as the
output's own text does). Bytes of a character split over byte tokens are given to the token that completes it
(the earlier ones get ""), so the pieces concatenate exactly to the decoded output, their UTF-8 bytes to its
bytes, and `text_offset`s are the running sums. An alternative (top_logprobs) token is decoded in the same
context as the token it stands beside.

`chat_logprobs` and `completion_logprobs` render the engine's per-token Logprob maps with these pieces as
OpenAI's `choices[].logprobs` of `/v1/chat/completions` (`content`: token, logprob, bytes, top_logprobs) and of
`/v1/completions` (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`), for a whole output or, while
streaming, from the token `start` on; logprobs are floored at -9999.0 (JSON has no -inf).

Leaves out: per-byte tokens for split characters ("bytes:\\xe2" as OpenAI shows them).
"""

from __future__ import annotations

from llava_next.entrypoints.openai import protocol as P

WINDOW = 6  # preceding tokens decoded with each token: enough for a space, a word piece and a 4-byte character


class TokenTexts:
    """Pieces of the output token `ids` in context. `final`: the output is complete (a trailing unfinished
    character is then given to the last token; while streaming it waits for the next one)."""

    def __init__(self, tokenizer, ids: list[int], skip_special_tokens: bool = True, final: bool = True):
        self.tokenizer, self.ids, self.skip, self.final = tokenizer, list(ids), skip_special_tokens, final
        self._cache: dict[tuple[int, int], str] = {}

    def _decode(self, lo: int, hi: int, extra: int | None = None) -> str:
        key = (lo, hi) if extra is None else None
        if key is not None and key in self._cache:
            return self._cache[key]
        ids = self.ids[lo:hi] if extra is None else self.ids[lo:hi] + [extra]
        text = self.tokenizer.decode(ids, skip_special_tokens=self.skip) if ids else ""
        if key is not None:
            self._cache[key] = text
        return text

    def piece(self, i: int, token: int | None = None) -> str:
        """The text token i adds (or `token` put in its place), given the tokens before it."""
        lo = 0 if i < WINDOW else i - WINDOW
        before = self._decode(lo, i).rstrip("\ufffd")
        after = self._decode(lo, i + 1) if token is None else self._decode(lo, i, token)
        last = self.final and i == len(self.ids) - 1 and token is None
        grown = after if last else after.rstrip("\ufffd")  # an unfinished character waits for its last byte
        if not grown.startswith(before):  # a decoder that rewrites earlier text: fall back to the token alone
            return self.tokenizer.decode([self.ids[i] if token is None else token], skip_special_tokens=self.skip)
        return grown[len(before):]


def _entries(tokenizer, token_ids, logprobs, params, start: int, final: bool):
    """Per output token from `start`: (piece, chosen Logprob, [(piece, Logprob) of the top k]), each token
    and alternative decoded in its context (TokenTexts), so the pieces add up to the text."""
    k = params.logprobs
    texts = TokenTexts(tokenizer, token_ids, params.skip_special_tokens, final)
    for i in range(start, min(len(token_ids), len(logprobs))):
        token_id, entry = token_ids[i], logprobs[i] or {}
        ranked = sorted((lp.rank or 0, tid, lp) for tid, lp in entry.items() if lp.rank is not None
                        and lp.rank <= k)[:k] if k else []
        top = [(texts.piece(i) if tid == token_id else texts.piece(i, tid), lp) for _, tid, lp in ranked]
        yield texts.piece(i), entry.get(token_id), top


def chat_logprobs(tokenizer, token_ids, logprobs, params, start: int = 0, final: bool = True
                  ) -> P.ChoiceLogprobs | None:
    if params.logprobs is None or logprobs is None:
        return None
    content = []
    for text, chosen, tops in _entries(tokenizer, token_ids, logprobs, params, start, final):
        top = [P.TopLogprob(token=t, logprob=max(lp.logprob, -9999.0), bytes=list(t.encode("utf-8", "replace")))
               for t, lp in tops]
        content.append(P.TokenLogprob(token=text, logprob=max(chosen.logprob, -9999.0) if chosen else -9999.0,
                                      bytes=list(text.encode("utf-8", "replace")), top_logprobs=top))
    return P.ChoiceLogprobs(content=content)


def completion_logprobs(tokenizer, token_ids, logprobs, params, offset: int, start: int = 0, final: bool = True
                        ) -> P.CompletionLogprobs | None:
    if params.logprobs is None or logprobs is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    for text, chosen, top in _entries(tokenizer, token_ids, logprobs, params, start, final):
        tokens.append(text)
        values.append(max(chosen.logprob, -9999.0) if chosen else None)
        tops.append({t: max(lp.logprob, -9999.0) for t, lp in top} if params.logprobs else None)
        offsets.append(offset)
        offset += len(text)
    return P.CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)
