"""What the engine returns: vLLM's `RequestOutput` and `CompletionOutput`, and `Logprob`.

Every output carries the cumulative state of a request (all token ids and the whole text so far). For
streaming, each CompletionOutput also carries the piece added since the previous output of that request:
`new_token_ids` and `new_text` (text held back while it could still become a stop string is released later,
so the concatenation of `new_text` pieces is always `text`).

`coalesce(older, newer)` merges two outputs of one request that a slow reader has not taken yet: the newer
cumulative state with the pieces of both (vLLM's delta merging), so a stream holds at most one output.

Leaves out: prompt logprobs, metrics objects (timestamps live on the engine's requests).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Logprob:
    """One candidate token's log-probability under the model's raw distribution, its rank (1 = most likely)."""

    logprob: float
    rank: int | None = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None = None  # per generated token: sampled token + top-`logprobs`
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (None for EOS)
    new_token_ids: list[int] = dataclasses.field(default_factory=list)  # added since the previous output
    new_text: str = ""  # text added since the previous output

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (the first completion's)


def coalesce(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """One output standing for `older` then `newer` (same request): newer's state, both steps' new pieces."""
    previous = {c.index: c for c in older.outputs}
    merged = []
    for c in newer.outputs:
        p = previous.get(c.index)
        if p is not None and (p.new_token_ids or p.new_text):
            c = dataclasses.replace(c, new_token_ids=p.new_token_ids + c.new_token_ids, new_text=p.new_text + c.new_text)
        merged.append(c)
    return dataclasses.replace(newer, outputs=merged)
