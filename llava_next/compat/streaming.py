"""Text streamers for `generate(streamer=...)`, with transformers' put/end protocol and output.

`TextStreamer` prints text as words complete; `TextIteratorStreamer` hands the same pieces to another
thread through a queue. Like transformers, the token cache is re-decoded on every `put` and text is
released only up to the last space, whole at a newline, and at once when it ends in a CJK ideograph;
`end()` flushes the rest. The pieces are transformers' pieces, with one deliberate difference: after a
newline transformers restarts its cache, and a SentencePiece decoder then strips the next line's leading
space; we keep the newline's token as context, so the joined pieces always equal the non-streamed decode.

The tokenizer is duck-typed: `decode(ids: list[int], **decode_kwargs) -> str`.
Leaves out: transformers' AsyncTextIteratorStreamer and TextDiffusionStreamer; batch size > 1.
`put` calls `.tolist()`, a host sync: streaming needs the text, so it costs one per step by nature.
"""

from __future__ import annotations

from queue import Queue
from typing import Any

import torch

# CJK Unified Ideographs and their extensions/compatibility blocks (not kana or hangul, which use spaces).
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def is_cjk(char: str) -> bool:
    cp = ord(char)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


class TextStreamer:
    """Prints generated text to stdout as soon as whole words are formed; a newline at the end."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.token_cache: list[int] = []
        self.print_len = 0  # characters of decode(token_cache) already released
        self.next_tokens_are_prompt = True

    def put(self, value: torch.Tensor) -> None:
        """Receive token ids, (1, T) or (T,); the first call after construction or `end()` is the prompt."""
        value = torch.as_tensor(value)
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("TextStreamer only supports batch size 1")
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return

        self.token_cache.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):  # a finished line: release it; keep its last token as context
            printable = text[self.print_len :]
            # NOTE: transformers empties the cache here, so SentencePiece drops the leading space of the next
            # line's first token ("x\n  y" streams as "x\n y"). Keeping one token of context keeps the text exact.
            self.token_cache = self.token_cache[-1:]
            self.print_len = len(self.tokenizer.decode(self.token_cache, **self.decode_kwargs))
        elif text and is_cjk(text[-1]):  # ideographs are words of their own
            printable = text[self.print_len :]
            self.print_len += len(printable)
        else:  # hold back the last, maybe unfinished, word
            printable = text[self.print_len : text.rfind(" ") + 1]
            self.print_len += len(printable)
        self.on_finalized_text(printable)

    def end(self) -> None:
        """Release whatever is held back and signal the end of the stream."""
        printable = ""
        if self.token_cache:
            printable = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)[self.print_len :]
        self.token_cache = []
        self.print_len = 0
        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end=None if stream_end else "")


class TextIteratorStreamer(TextStreamer):
    """Queues the same pieces for a consumer thread: `for piece in streamer: ...`.

    `timeout` (seconds) bounds each queue put/get; a consumer waiting longer gets `queue.Empty`, so a
    generation that died does not hang it.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self) -> TextIteratorStreamer:
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration
        return value
