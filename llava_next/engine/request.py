"""A request inside the engine: the prepared prompt (ids + image spans) and one running sequence per completion.

`PreparedRequest` is what `LLMEngine.prepare` returns: prompt token ids with every image already expanded to
its placeholders, and per image an `ImageItem` (its tiles, its size, its span in the prompt and a content hash
of its pixels). `Sequence` is one completion being generated: the engine's scheduler moves it between
WAITING and RUNNING (preemption puts it back in front of WAITING, to be recomputed) until it finishes.
A request with n > 1 becomes n sequences sharing the prompt (and, through the prefix cache, its KV blocks).

Leaves out: priorities, LoRA, speculative tokens.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch

from llava_next.sampling.params import SamplingParams


@dataclasses.dataclass
class ImageItem:
    """One image of a prompt: tiles (n_tiles, 3, S, S) on the CPU, size (H, W), its placeholders
    prompt[offset: offset + length], and `mm_hash` (hex digest of the tiles' bytes and the size)."""

    tiles: torch.Tensor
    size: tuple[int, int]
    offset: int
    length: int
    mm_hash: str

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclasses.dataclass
class PreparedRequest:
    """A validated prompt, ready for `add_request` (built by `LLMEngine.prepare`, thread-safe, CPU only)."""

    prompt: str | None
    prompt_token_ids: list[int]
    images: list[ImageItem]
    params: SamplingParams
    grammar: Any = None  # sampling/structured.Grammar when params.structured_outputs is set
    cache_salt: str | None = None  # mixed into the first block's prefix-cache hash (block_pool.salt_root)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One completion: prompt + generated ids, KV progress (`num_computed_tokens`), its block table."""

    def __init__(self, request_id: str, index: int, prepared: PreparedRequest, params: SamplingParams,
                 eos_token_ids: tuple[int, ...]):
        self.request_id, self.index = request_id, index
        self.prepared = prepared
        self.params = params
        self.prompt_len = prepared.num_prompt_tokens
        self.token_ids: list[int] = list(prepared.prompt_token_ids)  # prompt + output
        self.images = prepared.images
        self.eos_token_ids = () if params.ignore_eos else eos_token_ids
        self.stop_token_ids = frozenset(params.stop_token_ids or ())
        self.max_tokens = params.max_tokens
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.num_hashed_blocks = 0  # full blocks already registered in the prefix cache
        self.block_hashes: list[bytes] = []  # hash of each full block of token_ids, computed lazily
        self.num_cached_tokens: int | None = None  # prefix-cache hit at first scheduling
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        self.matcher = None if prepared.grammar is None else prepared.grammar.matcher()  # its grammar's state
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.text = ""  # detokenized output (stop strings cut)
        self.detokenizer = None  # engine/detokenizer.IncrementalDetokenizer, made by the engine at the first token
        self.sent_tokens = 0  # output tokens already reported
        self.sent_text = 0  # characters of text already reported

    @property
    def key(self) -> tuple[str, int]:
        """(request id, completion index): the name other maps hold this sequence by (never its id())."""
        return self.request_id, self.index

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def images_in(self, start: int, end: int) -> list[ImageItem]:
        """Images whose placeholders overlap positions [start, end)."""
        return [im for im in self.images if im.offset < end and im.end > start]

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}#{self.index}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})")
