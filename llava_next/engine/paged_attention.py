"""The paged KV cache and the attention metadata that reads and writes it (the reference kernel).

`PagedKVCache` holds, per layer, keys and values as (L, Hkv, num_blocks * block_size, Hd): a block is a
contiguous range of slots, slot = block_id * block_size + offset, so one `index_copy_` writes a step's new
keys and values wherever their blocks lie.

`PagedAttention` is the decoder's attention metadata (model/attention.py) for one engine step: the batch is
flattened (B = 1, T = every scheduled token of every sequence, no padding). Each layer writes its T new
keys/values at `slot_mapping` (T,), then every sequence attends over its own pages: the decodes of the step
together (their pages gathered into one (n, Hkv, S_max, Hd) batch, padding masked), each prefill chunk alone
(its pages gathered, SDPA with the causal offset: query at position p sees keys 0..p). A sliding window
(Mistral) masks keys more than `window` positions back. Exact on the CPU in fp32: the same SDPA calls
generate() makes, over the same keys.

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


class PagedAttention:
    """Attention metadata of one flattened step.

    pieces: per scheduled sequence (first new position, number of new tokens, its block ids), in batch order.
    """

    def __init__(self, cache: PagedKVCache, windows, pieces: list[tuple[int, int, list[int]]],
                 device: torch.device):
        self.cache = cache
        slot_mapping, decode_rows, decode_slots, decode_len, self.chunks = [], [], [], [], []
        row = 0
        for start, num_new, blocks in pieces:
            end = start + num_new
            slots = cache.slots(blocks, 0, end)  # (end,) every position the sequence can see
            slot_mapping.append(slots[start:])
            if num_new == 1:
                decode_rows.append(row)
                decode_slots.append(slots)
                decode_len.append(end)
            else:
                positions = torch.arange(start, end, device=device)
                self.chunks.append((row, row + num_new, slots.to(device),
                                    causal_masks(windows, positions, None, end)))
            row += num_new
        self.num_tokens = row
        self.slot_mapping = torch.cat(slot_mapping).to(device)  # (T,)
        self.decode = None
        if decode_rows:
            S = max(decode_len)
            n = len(decode_rows)
            padded = torch.zeros(n, S, dtype=torch.long)
            for i, s in enumerate(decode_slots):
                padded[i, : s.shape[0]] = s
            lengths = torch.tensor(decode_len)
            key_idx = torch.arange(S)
            masks = {}
            for window in windows:
                valid = key_idx[None] < lengths[:, None]  # (n, S)
                if window is not None:
                    valid = valid & (lengths[:, None] - 1 - key_idx[None] < window)
                masks[window] = None if bool(valid.all()) else valid[:, None, None, :].to(device)  # (n, 1, 1, S)
            self.decode = (torch.tensor(decode_rows, device=device), padded.to(device), masks)

    def attend(self, layer, q, k, v, window, scale, backend):
        """q (1, H, T, Hd), new k/v (1, Hkv, T, Hd) -> (1, H, T, Hd)."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]  # (Hkv, slots, Hd)
        keys.index_copy_(1, self.slot_mapping, k[0])
        values.index_copy_(1, self.slot_mapping, v[0])
        if self.decode is not None and not self.chunks and self.decode[0].shape[0] == self.num_tokens:
            return self._decodes(q, keys, values, window, scale, backend).transpose(0, 2)  # pure decode step
        out = torch.empty_like(q)
        if self.decode is not None:
            rows = self.decode[0]
            out[:, :, rows] = self._decodes(q, keys, values, window, scale, backend).transpose(0, 2)
        for first, last, slots, masks in self.chunks:
            kr, vr = keys[:, slots][None], values[:, slots][None]  # (1, Hkv, S, Hd)
            out[:, :, first:last] = attend(q[:, :, first:last], kr, vr, masks[window], scale, backend)
        return out

    def _decodes(self, q, keys, values, window, scale, backend):
        """The step's one-token queries together: (n, H, 1, Hd) over their padded pages."""
        rows, padded, masks = self.decode
        qd = q[0, :, rows][:, :, None].transpose(0, 1)  # (n, H, 1, Hd)
        n, S = padded.shape
        flat = padded.reshape(-1)
        kd = keys[:, flat].view(keys.shape[0], n, S, -1).transpose(0, 1)  # (n, Hkv, S, Hd)
        vd = values[:, flat].view(values.shape[0], n, S, -1).transpose(0, 1)
        return attend(qd, kd, vd, masks[window], scale, backend)  # (n, H, 1, Hd)
