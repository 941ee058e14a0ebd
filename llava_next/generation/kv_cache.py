"""Preallocated static KV cache: one (B, Hkv, S_max, Hd) key and value tensor per decoder layer.

Rows of a batch share slot indices (a left-padded batch is aligned on its last token), so writing T new
tokens is one `index_copy_` per layer and the decode step never allocates. `key_valid` marks which slots
hold real tokens (padding slots stay False), which is all the attention mask needs.

`CacheAttention` is the attention metadata (model/attention.py) over this cache: the decoder's new keys and
values go to its slots, and queries see the filled (or, for the CUDA-graph step, all masked) slots.

A left-padded batch can also be prefilled row by row (`row_view`: row i's real tokens go straight into its
slots, no padding computed), then decodes together.

Leaves out: paged/block caches and per-row offsets (a padded batch decodes together instead).
"""

from __future__ import annotations

import torch

from llava_next.model.attention import attend, causal_masks


class StaticKVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, S, Hd)
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, S, Hd)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # (B, S)
        self.has_padding = False  # any invalid slot so far (host-side, set once at prefill: one sync)
        self.length = 0  # slots filled so far (host-side int: shapes depend on it, values never do)
        self.max_len = max_len
        # static=True: attention reads all max_len slots (masked by key_valid), so shapes never change and a
        # captured CUDA graph can replay every step; False: it reads only the filled slots (faster eagerly).
        self.static = False

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def reserve(self, num_new: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Claim the next `num_new` slots; `valid` (B, num_new) marks real tokens. Returns the slots (T,)."""
        if self.length + num_new > self.max_len:
            raise RuntimeError(f"KV cache full: {self.length} + {num_new} > {self.max_len} slots")
        slots = torch.arange(self.length, self.length + num_new, device=self.keys.device)
        if valid is None:
            self.key_valid[:, self.length:self.length + num_new] = True
        else:
            self.key_valid[:, self.length:self.length + num_new] = valid
            self.has_padding = self.has_padding or not bool(valid.all())
        self.length += num_new
        return slots

    def row_view(self, rows: slice, start: int) -> StaticKVCache:
        """An empty cache over this cache's `rows`, slots `start` on, sharing its storage.

        Prefilling rows whose L real tokens sit behind T - L pads into `row_view(rows, T - L)` fills the
        same slots a left-padded batch prefill of width T would; afterwards call `filled(T)` on this cache.
        """
        view = object.__new__(StaticKVCache)
        view.keys = self.keys[:, rows, :, start:]  # (L, b, Hkv, S - start, Hd) view
        view.values = self.values[:, rows, :, start:]
        view.key_valid = self.key_valid[rows, start:]  # (b, S - start) view
        view.has_padding, view.length, view.max_len, view.static = False, 0, self.max_len - start, False
        return view

    def filled(self, length: int):
        """Mark `length` slots as written through row views (their key_valid is already set)."""
        self.length = length
        self.has_padding = not bool(self.key_valid[:, :length].all())

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, Hkv, T, Hd) at `slots` (T,); return this layer's (B, Hkv, length, Hd) views."""
        self.keys[layer].index_copy_(2, slots, k)
        self.values[layer].index_copy_(2, slots, v)
        if self.static:
            return self.keys[layer], self.values[layer]
        return self.keys[layer, :, :, : self.length], self.values[layer, :, :, : self.length]

    def reset(self):
        """Empty the cache for reuse (a pooled cache keeps its tensors, so captured graphs stay valid)."""
        self.key_valid.zero_()
        self.length = 0
        self.has_padding = False

    def reorder(self, rows: torch.Tensor):
        """Keep rows (B,) in this order (beam search: each beam continues from its parent's cache)."""
        n = self.length  # only the filled slots: the rest of the buffer holds nothing yet
        self.keys[:, :, :, :n] = self.keys[:, rows, :, :n]
        self.values[:, :, :, :n] = self.values[:, rows, :, :n]
        self.key_valid[:, :n] = self.key_valid[rows, :n]

    def truncate(self, length: int):
        """Forget every slot from `length` on (prefix reuse keeps the shared part)."""
        self.key_valid[:, length:] = False
        self.length = length


class CacheAttention:
    """Attention metadata over a StaticKVCache: each layer writes its new keys/values at `slots` (T,) and its
    queries attend over the cache with `masks` (one per sliding window)."""

    def __init__(self, cache: StaticKVCache, slots: torch.Tensor, masks: dict):
        self.cache, self.slots, self.masks = cache, slots, masks

    @classmethod
    def append(cls, cache: StaticKVCache, windows, num_new: int, valid: torch.Tensor | None = None):
        """The next `num_new` slots, `valid` (B, num_new) marking real tokens; queries see the filled slots."""
        slots = cache.reserve(num_new, valid)
        key_valid = cache.key_valid[:, : cache.length] if cache.has_padding else None
        return cls(cache, slots, causal_masks(windows, slots, key_valid, cache.length))

    @classmethod
    def static_step(cls, cache: StaticKVCache, windows, slot: torch.Tensor):
        """One token per row at `slot` (1,) with static shapes and no host syncs (CUDA-graph capturable): the
        cache must be `static`; attention reads all max_len slots, key_valid masks the unwritten ones."""
        cache.key_valid.index_fill_(1, slot, True)
        key_idx = torch.arange(cache.max_len, device=slot.device)
        masks = {}
        for window in windows:
            mask = cache.key_valid  # (B, S)
            if window is not None:
                mask = mask & (slot - key_idx < window)
            masks[window] = mask[:, None, None, :]  # (B, 1, 1, S)
        return cls(cache, slot, masks)

    def attend(self, layer, q, k, v, window, scale, backend):
        k, v = self.cache.write(layer, self.slots, k, v)  # (B, Hkv, S, Hd)
        return attend(q, k, v, self.masks[window], scale, backend)
