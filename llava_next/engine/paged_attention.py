"""The paged KV cache and the attention metadata that reads and writes it (the reference kernel).

`PagedKVCache` holds, per layer, keys and values as (L, Hkv, num_blocks * block_size, Hd): a block is a
contiguous range of slots, slot = block_id * block_size + offset, so one `index_copy_` writes a step's new
keys and values wherever their blocks lie.

`PagedAttention` is the decoder's attention metadata (model/attention.py) for one engine step: the batch is
flattened (B = 1, T = every scheduled token of every sequence, no padding). Each layer writes its T new
keys/values at `slot_mapping` (T,), then every sequence attends over its own pages: its context [0, end) is
read as runs of adjacent blocks (one slice, a view, when its blocks are adjacent, as blocks allocated together
are; otherwise the runs are concatenated), and SDPA runs with the causal offset (a query at position p sees
keys 0..p; a decode query sees every key, unmasked). A sliding window (Mistral) masks keys more than
`window` positions back. Exact on the CPU in fp32: the same SDPA calls generate() makes, over the same keys.

Leaves out: a fused paged kernel (FlexAttention/Triton; gather + SDPA moves each context once more per step),
KV quantization, freeing blocks that slid out of the window.
"""

from __future__ import annotations

import torch

from llava_next.model.attention import attend, causal_masks


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, num_kv_heads, num_blocks * block_size, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (L, Hkv, slots, Hd)
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # (L, Hkv, slots, Hd)
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """Slots (end - start,) of positions [start, end) of a sequence with this block table."""
        bs = self.block_size
        first, last = start // bs, -(-end // bs)
        table = torch.tensor(block_ids[first:last], dtype=torch.long)
        slots = (table[:, None] * bs + torch.arange(bs)).reshape(-1)  # (blocks * bs,)
        return slots[start - first * bs: end - first * bs]


def slot_runs(block_ids: list[int], block_size: int, end: int) -> list[tuple[int, int]]:
    """Positions [0, end) of a sequence as runs of consecutive slots [(first, last + 1), ...]: blocks allocated
    together are usually adjacent, so a context is one or a few slices (views, no gather)."""
    runs: list[list[int]] = []
    for i, block in enumerate(block_ids[: -(-end // block_size)]):
        a = block * block_size
        b = a + min(block_size, end - i * block_size)
        if runs and runs[-1][1] == a:
            runs[-1][1] = b
        else:
            runs.append([a, b])
    return [(a, b) for a, b in runs]


class PagedAttention:
    """Attention metadata of one flattened step.

    pieces: per scheduled sequence (first new position, number of new tokens, its block ids), in batch order.
    """

    def __init__(self, cache: PagedKVCache, windows, pieces: list[tuple[int, int, list[int]]],
                 device: torch.device):
        self.cache = cache
        bs = cache.block_size
        slot_mapping, self.pieces = [], []
        row = 0
        for start, num_new, blocks in pieces:
            end = start + num_new
            slot_mapping.append(cache.slots(blocks, start, end))
            positions = torch.arange(start, end, device=device)
            self.pieces.append((row, row + num_new, slot_runs(blocks, bs, end),
                                causal_masks(windows, positions, None, end)))
            row += num_new
        self.num_tokens = row
        self.slot_mapping = torch.cat(slot_mapping).to(device)  # (T,)

    def attend(self, layer, q, k, v, window, scale, backend):
        """q (1, H, T, Hd), new k/v (1, Hkv, T, Hd) -> (1, H, T, Hd): each sequence over its own pages."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]  # (Hkv, slots, Hd)
        keys.index_copy_(1, self.slot_mapping, k[0])
        values.index_copy_(1, self.slot_mapping, v[0])
        outs = []
        for first, last, runs, masks in self.pieces:
            if len(runs) == 1:  # one slice of the pool: a view
                (a, b), = runs
                kr, vr = keys[:, a:b], values[:, a:b]  # (Hkv, S, Hd)
            else:
                kr = torch.cat([keys[:, a:b] for a, b in runs], dim=1)
                vr = torch.cat([values[:, a:b] for a, b in runs], dim=1)
            outs.append(attend(q[:, :, first:last], kr[None], vr[None], masks[window], scale, backend))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
