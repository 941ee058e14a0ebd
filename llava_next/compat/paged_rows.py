"""generate()'s sequences on the engine's ModelRunner: block tables in a paged pool, prefill, decode, beam forks.

`GenerateRunner` (one per model object, `model.decode_runner()`) owns a PagedKVCache, its BlockPool and an
engine ModelRunner over them (engine/model_runner.py: the flattened step, fused projections and CUDA-graph
decode buckets in "static"/"graph" mode, eager elsewhere), so generate() runs the decoder through the same
runner as the engine. A call's batch is a `Rows`: each row's block table and length. A left-padded batch is
stripped of its padding: every row's real tokens are one prefill chunk from position 0 (as the row alone);
decode steps are one token per row. Blocks are allocated as rows grow; `fork` (beam search) gives each beam its
parent's full blocks (shared, reference-counted in the BlockPool) and a copy of the parent's partial last block
(copy-on-write: the first beam to take a parent keeps its block, the others copy it).

Prefix reuse (`reuse_prefix=True`, batch 1): the last call's row keeps its blocks, with the embeddings they were
computed from and the decoder's weights stamp (model/stamp.py); the next call keeps the longest prefix whose
embeddings are equal (images included) and prefills only the rest. A weight change invalidates it.
The screened head (sampling/screened_head.py) is an option here: on a float32 CPU head in eager mode, steps
stop at the hidden state (ModelRunner.forward(head=False)) and the screen picks the token.

A row whose last token is padding (right padding) takes its first new token from transformers' pad-position
query (one masked dense pass over those rows: the engine's attention has no key mask) and then continues at
transformers' mask-derived RoPE positions through a per-row position offset of the runner.

Leaves out: the engine's scheduler (a generate() call runs its whole batch each step), hashing prompts into the
engine's prefix cache (inputs_embeds prompts have no ids: prefixes are matched by embeddings).
"""

from __future__ import annotations

import numpy as np
import torch

from llava_next.engine.attention_metadata import PagedKVCache
from llava_next.engine.block_pool import BlockPool
from llava_next.engine.encoder_cache import EncoderCache
from llava_next.engine.model_runner import ModelRunner
from llava_next.errors import GenerationArgumentError
from llava_next.model.attention import DenseAttention
from llava_next.model.stamp import weights_stamp
from llava_next.sampling.screened_head import ScreenedHead, screen_applies

BLOCK_SIZE = 16


def blocks_needed(batch: int, max_len: int) -> int:
    """Blocks a call may hold at once: each row's blocks, plus one per row for a beam fork's copy."""
    return batch * (-(-max_len // BLOCK_SIZE) + 1)


class GenerateRunner:
    """Per model: the paged pool and the engine ModelRunner that generate() runs on.

    mode: ModelRunner's ("graph" default on CUDA, "eager" elsewhere; "static" runs the bucketed decode step
    without a graph). screen_head (eager, float32 CPU lm_head): greedy and top-k sampling steps choose their
    token through ScreenedHead; False always computes the full logits.
    """

    def __init__(self, model, mode: str | None = None, screen_head: bool = True):
        self.model, self.screen_head = model, screen_head
        self.device_type = model.device.type
        self.mode = mode or ("graph" if self.device_type == "cuda" else "eager")
        if self.mode not in ("graph", "static", "eager"):
            raise ValueError(f"unknown engine mode {self.mode!r}")
        self.static = self.mode != "eager"
        self.cache: PagedKVCache | None = None
        self.pool: BlockPool | None = None
        self.runner: ModelRunner | None = None
        self._screen: ScreenedHead | None = None
        self._last = None  # (embeds (1, n, D), its Rows, the decoder's weights stamp) for reuse_prefix
        if self.static:  # build the runner now: fused projections and compiled kernels, as the engine's
            self._ensure(1, model.lm_head.weight.dtype)

    @property
    def kernels(self):
        return self.runner.kernels

    def _ensure(self, num_blocks: int, dtype: torch.dtype, headroom: int = 1):
        """A pool of at least `num_blocks` blocks (a new pool forgets the remembered row; it is made `headroom`
        times that size, at least twice the old one, so that growing is rare and a next turn fits)."""
        device = self.model.lm_head.weight.device
        cache = self.cache
        if cache is not None and cache.num_blocks >= num_blocks and cache.keys.dtype == dtype \
                and cache.keys.device == device:
            return
        self._last = None
        old = cache.num_blocks if cache is not None and cache.keys.dtype == dtype else 32
        size = max(headroom * num_blocks, 2 * old)
        text = self.model.config.text_config
        # the layers' own KV head count: per rank when the decoder is tensor-parallel (parallel/)
        kv_heads = self.model.model.language_model.layers[0].self_attn.kv_heads
        self.cache = PagedKVCache(text.num_hidden_layers, size, BLOCK_SIZE, kv_heads, text.head_dim, dtype, device)
        self.pool = BlockPool(size, BLOCK_SIZE, enable_prefix_caching=False)
        self.runner = ModelRunner(self.model, self.cache, EncoderCache(1), mode=self.mode, fuse=self.static,
                                  compiled=self.static)

    def head_screen(self, screen_k: int | None, full_logits_wanted: bool) -> ScreenedHead | None:
        """The screened lm_head for this generation; None when every logit is needed (no screen_k, scores
        wanted) or the head is not a plain float32 CPU Linear (then the full lm_head runs)."""
        head = self.model.lm_head
        if not (self.screen_head and screen_k and not full_logits_wanted and not self.static
                and screen_applies(head)):
            return None
        if self._screen is None or self._screen.weight is not head.weight:
            self._screen = ScreenedHead(head.weight)
        return self._screen

    def start(self, batch: int, max_len: int, dtype: torch.dtype, headroom: int = 1) -> Rows:
        """Rows for `batch` sequences of up to `max_len` tokens each; forgets the remembered row. One call runs
        at a time per model (its generation_lock), so the pool starts empty again (blocks still held here were
        lost by a failed call), handing out blocks in order: a lone row's blocks are consecutive and its
        attention reads them in place (attention_metadata.LoneSequence, Group.view_start)."""
        self.forget()
        self._ensure(blocks_needed(batch, max_len), dtype, headroom)
        self.pool = BlockPool(self.cache.num_blocks, BLOCK_SIZE, enable_prefix_caching=False)
        return Rows(self, batch)

    def take_prefix(self, embeds: torch.Tensor, max_len: int) -> tuple[Rows, int] | None:
        """The remembered row cut to the longest prefix whose embeddings equal `embeds` (1, T, D), and its
        length; None if nothing is kept. At least one token is left to prefill, so there are logits to sample.
        Nothing is reused if the decoder's weights changed since (model/stamp.py)."""
        last, self._last = self._last, None
        if last is None or embeds.shape[0] != 1:
            return self._drop(last)
        previous, rows, stamp = last
        if previous.dtype != embeds.dtype or previous.device != embeds.device \
                or stamp != weights_stamp(self.model.model.language_model) \
                or self.cache.num_blocks < blocks_needed(1, max_len):
            return self._drop(last)
        n = min(previous.shape[1], embeds.shape[1] - 1)
        same = (previous[0, :n] == embeds[0, :n]).all(-1)  # (n,)
        keep = n if bool(same.all()) else int((~same).int().argmax())
        if keep == 0:
            return self._drop(last)
        rows.truncate(keep)
        return rows, keep

    def _drop(self, last):
        if last is not None:
            last[1].release()

    def remember(self, embeds: torch.Tensor, rows: Rows) -> None:
        """Keep a batch-1 call's row and the (1, n, D) embeddings it was built from, for take_prefix."""
        if embeds.shape[0] != 1:
            rows.release()
            return
        self._last = (embeds[:, : int(rows.lengths[0])], rows, weights_stamp(self.model.model.language_model))

    def forget(self) -> None:
        self._drop(self._last)
        self._last = None

    def release(self):
        """Free the pool, the runner and its graphs (e.g. before loading another model)."""
        self._last = self.cache = self.pool = self.runner = self._screen = None


class Rows:
    """One call's sequences in the pool: a block table and a length (tokens in the cache) per row."""

    def __init__(self, owner: GenerateRunner, batch: int):
        self.owner = owner
        self.tables: list[list[int]] = [[] for _ in range(batch)]
        self.lengths = np.zeros(batch, np.int64)  # (B,)
        self.offsets: np.ndarray | None = None  # (B,) RoPE position minus slot of the next token, if not 0
        self._room = 0  # decode steps every row's blocks still hold (0: grow first, or unknown since a change)
        self._ones, self._rows = np.ones(batch, np.int64), np.arange(batch)

    def _grow(self, need: np.ndarray) -> None:
        """Blocks so that each row's table covers need[i] tokens."""
        pool = self.owner.pool
        for table, n in zip(self.tables, (-(-need // BLOCK_SIZE)).tolist()):
            if n > len(table):
                table += pool.allocate(n - len(table))

    def prefill(self, embeds: torch.Tensor, num_new: np.ndarray, head: bool) -> torch.Tensor:
        """embeds (sum(num_new), D): each row's next num_new[i] tokens, rows one after the other -> the last
        token's logits (B, V), or its hidden state (B, D) with head=False."""
        starts = self.lengths.copy()
        self._grow(starts + num_new)
        self.lengths, self._room = starts + num_new, 0
        sample_rows = np.cumsum(num_new) - 1  # (B,)
        ids = np.zeros(int(num_new.sum()), np.int64)  # every row is written over by `embeds`

        def write(rows: torch.Tensor):
            rows.copy_(embeds)

        return self.owner.runner.forward(starts, num_new, self.tables, ids, 0, sample_rows, write, head)

    def decode(self, tokens: torch.Tensor, head: bool = True) -> torch.Tensor:
        """tokens (B,) on the device -> logits (B, V) for the next token (hidden (B, D) with head=False)."""
        starts = self.lengths
        if not self._room:  # a row's next token needs a new block (or the tables changed): grow, count again
            self._grow(starts + 1)
            self._room = min(len(table) * BLOCK_SIZE - int(n) for table, n in zip(self.tables, starts))
        self._room -= 1
        self.lengths = starts + 1
        B = len(self.tables)
        if self._ones.shape[0] != B:
            self._ones, self._rows = np.ones(B, np.int64), np.arange(B)  # (B,) each: one new token, every row samples
        return self.owner.runner.forward(starts, self._ones, self.tables, tokens, B, self._rows, head=head,
                                         position_offset=self.offsets)

    def fork(self, parents: list[int]) -> None:
        """Row i continues from row parents[i] (beam search): full blocks shared, partial last blocks copied
        where a parent has more than one child."""
        pool, cache = self.owner.pool, self.owner.cache
        taken, src, dst, tables = set(), [], [], []
        for p in parents:
            n = int(self.lengths[p])
            full, table = n // BLOCK_SIZE, self.tables[p]
            if n % BLOCK_SIZE and p in taken:  # a second child: its own copy of the partial block
                own = table[:full] + pool.allocate(1)
                src.append(table[full])
                dst.append(own[-1])
                pool.touch(own[:-1])
            else:
                taken.add(p)
                own = table[: -(-n // BLOCK_SIZE)]
                pool.touch(own)
            tables.append(own)
        for table in self.tables:
            pool.release(table)
        if src:  # one gather + one scatter of whole blocks, every layer at once
            slots = torch.arange(BLOCK_SIZE)
            src_t = (torch.tensor(src)[:, None] * BLOCK_SIZE + slots).reshape(-1).to(cache.keys.device)
            dst_t = (torch.tensor(dst)[:, None] * BLOCK_SIZE + slots).reshape(-1).to(cache.keys.device)
            for kv in (cache.keys, cache.values):  # (L, Hkv, slots, Hd)
                kv.index_copy_(2, dst_t, kv.index_select(2, src_t))
        self.tables = tables
        self.lengths, self._room = self.lengths[parents], 0
        self.offsets = None if self.offsets is None else self.offsets[parents]

    def truncate(self, length: int) -> None:
        """Keep only the first `length` tokens of every row (its blocks past them go back to the pool)."""
        keep = -(-length // BLOCK_SIZE)
        for table in self.tables:
            self.owner.pool.release(table[keep:])
            del table[keep:]
        self.lengths, self._room = np.minimum(self.lengths, length), 0

    def release(self) -> None:
        for table in self.tables:
            self.owner.pool.release(table)
        self.tables, self._room = [[] for _ in self.tables], 0


def prompt_ids(input_ids, inputs_embeds) -> torch.Tensor:
    """The id prompt; without input_ids transformers returns only the new tokens: an empty (B, 0) prompt."""
    if input_ids is not None:
        return input_ids
    return torch.empty(inputs_embeds.shape[0], 0, dtype=torch.long, device=inputs_embeds.device)


def prefill(runner, embeds: torch.Tensor, attention_mask, max_new: int, reuse: bool, head: bool,
            repeat: int = 1) -> tuple[Rows, torch.Tensor]:
    """embeds (B, T, D) and the 0/1 mask -> (the rows in the runner's pool, the last token's logits (B * repeat,
    V), or its hidden state (B * repeat, D) with head=False). Each row's real tokens (mask 1) are one chunk from
    position 0; `repeat` rows per prompt row (beam search); `reuse` (batch 1): continue the remembered row."""
    B, T, _ = embeds.shape
    if attention_mask is None or bool(attention_mask.all()):
        flat, lengths = embeds.reshape(B * T, -1), np.full(B, T, np.int64)  # (B*T, D), (B,)
    else:
        real = attention_mask.to(embeds.device).bool()  # (B, T)
        lengths = real.sum(1).cpu().numpy().astype(np.int64)  # (B,)
        if not lengths.all():
            raise GenerationArgumentError(f"attention_mask row {int(np.argmin(lengths))} has no token to attend to")
        flat = embeds[real]  # (sum(lengths), D), row after row
    if repeat > 1:  # each prompt row's tokens `repeat` times
        flat = torch.cat([chunk for chunk in flat.split(lengths.tolist()) for _ in range(repeat)])
        lengths = lengths.repeat(repeat)
    reused = runner.take_prefix(embeds, T + max_new) if reuse and B == 1 and lengths[0] == T else None
    if reused is not None:  # the conversation so far is already in the pool: run only the new tokens
        rows, start = reused
        return rows, rows.prefill(flat[start:], lengths - start, head)
    rows = runner.start(len(lengths), int(lengths.max()) + max_new, embeds.dtype, headroom=2 if reuse else 1)
    try:
        out = rows.prefill(flat, lengths, head)
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            _trailing_padding(runner, rows, out, embeds, attention_mask.to(embeds.device), repeat, head)
        return rows, out
    except BaseException:
        rows.release()
        raise


def _trailing_padding(runner, rows: Rows, out: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, repeat: int,
                      head: bool) -> None:
    """Rows whose last token is padding, as transformers runs them: the first new token comes from that pad
    position's query (position 0, attending to the real tokens only), so its logits (or hidden state) are
    taken from one masked dense pass over those rows (model/attention.DenseAttention, forward()'s attention);
    the new tokens then continue at RoPE position 1, 2, ... (mask-derived: the last position + 1) after the
    real tokens' keys. out (B * repeat, V or D) is overwritten in place for those rows."""
    pads = (mask[:, -1] == 0).nonzero()[:, 0]  # (b,)
    decoder, T = runner.model.model.language_model, mask.shape[1]
    sub = mask[pads]  # (b, T)
    positions = (sub.long().cumsum(-1) - 1).masked_fill(sub == 0, 0)  # transformers' generate() positions
    hidden = decoder(embeds[pads], positions, DenseAttention(decoder.windows, T, sub.bool(), embeds.device))[:, -1]
    last = runner.model.lm_head(hidden) if head else hidden  # (b, V) or (b, D)
    at = (pads[:, None] * repeat + torch.arange(repeat, device=pads.device)).reshape(-1)  # (b * repeat,)
    out[at] = last.repeat_interleave(repeat, 0)
    offsets = np.zeros(len(rows.lengths), np.int64)
    at_host = at.tolist()
    offsets[at_host] = 1 - rows.lengths[at_host]  # next token: position 1 at slot length
    rows.offsets = offsets


def decode_step(rows: Rows, tokens: torch.Tensor, head: bool) -> torch.Tensor:
    """tokens (B,) -> the next logits (B, V) (hidden (B, D) with head=False); one engine step."""
    return rows.decode(tokens, head)
