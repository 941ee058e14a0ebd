"""The pool of KV blocks: free list, reference counts, and the prefix cache over full blocks.

A block holds `block_size` consecutive token positions of one sequence (its slots are
block_id * block_size + i in every layer's KV tensor, see attention_metadata.py). Blocks are reference-counted:
a prefix-cache hit shares a block between sequences. A block whose count falls to 0 goes to the tail of the
free queue but keeps its hash, so it can still be hit until it is reused; allocation takes from the head,
which makes eviction least-recently-freed first (LRU), as vLLM and nano-vllm do.

Block hashes (`hash_block`) chain the parent block's hash, the block's token ids and, for blocks that hold
image placeholders, (image content hash, offset inside the image) of each image overlapping the block: the
same image after the same prefix hits, another image of the same size does not. blake2b from hashlib.
A request's `cache_salt` (vLLM's) becomes the first block's parent (`salt_root`), so it changes every hash of
the chain: requests with different salts never share a block, nor learn through `cached_tokens` what another
salt's requests sent.

Leaves out: swapping to host memory, hybrid (per-layer-group) pools, sliding-window block freeing (all blocks
of a sequence are kept; the attention mask applies the window).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict


def salt_root(salt: str | None) -> bytes | None:
    """The parent hash of a sequence's first block: None (the shared root) without a salt."""
    if salt is None:
        return None
    return hashlib.blake2b(b"salt|" + salt.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def hash_block(parent: bytes | None, token_ids, extra: tuple = ()) -> bytes:
    """Content hash of one full block: parent hash, token ids, image keys ((mm_hash, offset), ...)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(b",".join(str(t).encode() for t in token_ids))
    for mm_hash, offset in extra:
        h.update(f"|{mm_hash}@{offset}".encode())
    return h.digest()


class BlockPool:
    """`num_blocks` blocks of `block_size` slots; `enable_prefix_caching` keeps full blocks findable by hash."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one slot, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # head = evict first
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.num_allocated = 0  # counters for tests: every allocation and every release
        self.num_released = 0
        self.hit_tokens = 0  # prefix-cache statistics (tokens)
        self.queried_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (ref 1), evicting the least recently freed cached blocks; the caller checks num_free."""
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self.free)} free")
        out = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            old = self.block_hash[block]
            if old is not None:  # evicted from the prefix cache
                if self.cached.get(old) == block:
                    del self.cached[old]
                self.block_hash[block] = None
            self.ref_count[block] = 1
            out.append(block)
        self.num_allocated += n
        return sorted(out)  # blocks freed together come back adjacent: adjacent reads of the pool (attention_metadata)

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (not yet referenced: call `touch`)."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def touch(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks (a prefix hit); blocks at ref 0 leave the free queue."""
        for block in blocks:
            if self.ref_count[block] == 0:
                del self.free[block]
                self.num_allocated += 1
            self.ref_count[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference per block; freed blocks go to the free queue's tail, the last block first
        freed last (so a sequence's tail blocks are evicted before its shared prefix)."""
        for block in reversed(blocks):
            self.ref_count[block] -= 1
            assert self.ref_count[block] >= 0, f"block {block} released twice"
            if self.ref_count[block] == 0:
                self.free[block] = None
                self.num_released += 1

    def register(self, block: int, block_hash: bytes) -> None:
        """A block became full: make it findable (first writer wins; a duplicate stays private)."""
        if not self.enable_prefix_caching or self.block_hash[block] is not None:
            return
        if block_hash in self.cached:
            return
        self.block_hash[block] = block_hash
        self.cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        """Forget every hash (blocks in use stay allocated): the weights changed (model_runner.check_weights)."""
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks
