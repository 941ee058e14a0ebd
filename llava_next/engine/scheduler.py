"""The token-budget scheduler (vLLM v1's policy, simplified): who runs in the next step, with how many tokens.

There are no prefill and decode phases: each sequence has `num_computed_tokens` (positions whose KV is in the
pool) and `num_tokens` (prompt + generated); a step gives each scheduled sequence a number of new tokens so
it catches up. Per step, with `max_num_batched_tokens` as the budget:

1. RUNNING first, in arrival order: a decode takes 1 token, an unfinished prefill its next chunk (as much as
   the budget leaves). Blocks for the new tokens are allocated; when the pool is out of blocks the newest
   running sequence is preempted by recompute (blocks and encoder references dropped, computed = 0, back to
   the front of WAITING), until the current one fits or is itself the one preempted.
2. Then, if nothing was preempted, WAITING in arrival order while fewer than `max_num_seqs` run: a prefix
   cache lookup over its full blocks (at least one token is always left to compute), the chunk cut to the
   budget, blocks allocated (or it waits), moved to RUNNING.

A chunk may end anywhere, inside an image's placeholders too: the image's features stay in the encoder cache
(a reference per sequence) until the sequence has prefilled past the image. The step then runs all scheduled
tokens as one flattened batch (model_runner.py); a sequence whose last scheduled token is its last token
samples one new token.

Leaves out: priorities, a per-step encoder budget, the long-prefill threshold, swapping, async scheduling.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from llava_next.engine.block_pool import BlockPool, hash_block, salt_root
from llava_next.engine.encoder_cache import EncoderCache
from llava_next.engine.request import ImageItem, Sequence, Status


@dataclasses.dataclass
class SchedulerOutput:
    """One step: (sequence, its first new position, number of new tokens) in batch order, images to encode."""

    scheduled: list[tuple[Sequence, int, int]]
    images_to_encode: list[ImageItem]

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, pool: BlockPool, encoder_cache: EncoderCache, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, lookahead_tokens: int = 128):
        self.pool, self.encoder_cache = pool, encoder_cache
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len = max_model_len
        # While at least a quarter of the pool is free, a sequence that needs blocks takes enough for up to this
        # many tokens more (never past its max_tokens), so its pages stay adjacent (one slice to attend over).
        self.lookahead_tokens = lookahead_tokens
        self.block_size = pool.block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # arrival order
        self.num_preemptions = 0

    # -- queue ---------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    # -- blocks --------------------------------------------------------------------------------------------
    def block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Hashes of the first `num_blocks` full blocks of the sequence's tokens (memoised on the sequence)."""
        bs = self.block_size
        while len(seq.block_hashes) < num_blocks:
            i = len(seq.block_hashes)
            start, end = i * bs, (i + 1) * bs
            extra = tuple((im.mm_hash, max(0, start - im.offset)) for im in seq.images_in(start, end))
            parent = seq.block_hashes[-1] if seq.block_hashes else salt_root(seq.prepared.cache_salt)
            seq.block_hashes.append(hash_block(parent, seq.token_ids[start:end], extra))
        return seq.block_hashes[:num_blocks]

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _lookahead(self, seq: Sequence, num_tokens: int, need: int, free: int) -> int:
        """Extra blocks to take with `need` while the pool is roomy (0 when a quarter of it is no longer free)."""
        if need <= 0 or not self.lookahead_tokens:
            return 0
        final = seq.prompt_len + (seq.max_tokens or 0)
        target = self._blocks_for(min(final, num_tokens + self.lookahead_tokens))
        extra = max(0, target - self._blocks_for(num_tokens))
        return extra if free - need - extra >= self.pool.num_blocks // 4 else 0

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` blocks for `num_tokens` positions; False (nothing allocated) when the pool is short."""
        need = self._blocks_for(num_tokens) - len(seq.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        need += self._lookahead(seq, num_tokens, need, self.pool.num_free)
        seq.block_ids.extend(self.pool.allocate(need))
        return True

    def _drop_state(self, seq: Sequence) -> None:
        self.pool.release(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        self.encoder_cache.release_all(seq.key)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._drop_state(seq)
        seq.status = Status.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- the step ------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int, int]] = []
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            start = seq.num_computed_tokens
            num_new = min(seq.num_tokens - start, budget, self.max_model_len - start)
            if num_new <= 0:
                continue
            while not self._grow(seq, start + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            scheduled.append((seq, start, num_new))
            budget -= num_new
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                hits = self.pool.lookup(self.block_hashes(seq, (seq.num_tokens - 1) // self.block_size))
                computed = len(hits) * self.block_size
                num_new = min(seq.num_tokens - computed, budget)
                need = self._blocks_for(computed + num_new) - len(hits)
                reclaimed = sum(1 for b in hits if self.pool.ref_count[b] == 0)  # hits now in the free queue
                if need > self.pool.num_free - reclaimed:
                    break  # wait for blocks (running sequences free them as they finish)
                self.waiting.popleft()
                self.pool.touch(hits)
                seq.block_ids = list(hits)
                seq.num_hashed_blocks = len(hits)
                self._grow(seq, computed + num_new)  # the `need` new blocks (checked above) and the lookahead
                seq.num_computed_tokens = computed
                if seq.num_cached_tokens is None:  # reported once, at first scheduling (as vLLM)
                    seq.num_cached_tokens = computed
                    self.pool.hit_tokens += computed
                    self.pool.queried_tokens += seq.num_tokens
                seq.status = Status.RUNNING
                self.running.append(seq)
                scheduled.append((seq, computed, num_new))
                budget -= num_new
        images, seen = [], set()
        for seq, start, num_new in scheduled:
            for image in seq.images_in(start, start + num_new):
                self.encoder_cache.acquire(image.mm_hash, seq.key)
                if image.mm_hash not in self.encoder_cache and image.mm_hash not in seen:
                    seen.add(image.mm_hash)
                    images.append(image)
        return SchedulerOutput(scheduled, images)

    def update(self, seq: Sequence, num_new: int) -> None:
        """After the forward: `num_new` more positions of `seq` are in the pool; register its full blocks,
        release images it has prefilled past."""
        seq.num_computed_tokens += num_new
        full = seq.num_computed_tokens // self.block_size
        if self.pool.enable_prefix_caching and full > seq.num_hashed_blocks:
            hashes = self.block_hashes(seq, full)
            for i in range(seq.num_hashed_blocks, full):
                self.pool.register(seq.block_ids[i], hashes[i])
            seq.num_hashed_blocks = full
        for image in seq.images:
            if image.end <= seq.num_computed_tokens:
                self.encoder_cache.release(image.mm_hash, seq.key)

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        """End a sequence (stop, length, abort): its blocks and encoder references are freed now."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._drop_state(seq)
        seq.status = Status.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
