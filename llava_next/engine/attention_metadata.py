"""The paged KV cache and one engine step's attention metadata: one attention call per layer per kind of row.

`PagedKVCache` holds, per layer, keys and values as (L, Hkv, (num_blocks + 1) * block_size, Hd): a block is a
contiguous range of slots, slot = block_id * block_size + offset, so one `index_copy_` writes a step's new
keys and values wherever their blocks lie. The extra last block is scratch: padded rows of a bucketed decode
step write there and read only it; the block pool never hands it out.

`StepPlan` (host, numpy; built once per step by `plan_step`) describes the flattened step: rows (B = 1,
T = every scheduled token, decode rows first, then prefill chunks), their positions and slots, and per group of
rows ("decode": one new token per sequence; "prefill": chunks, padded to the longest) the query rows and the
blocks holding every sequence's keys, read from its block table. It is small and picklable, so
tensor-parallel followers get the same plan (tp_workers.py). `StepAttention.build` moves it to the device in
one transfer and builds, once per step and per sliding window, each group's mask with device ops only (no
host syncs: a bucketed decode step is CUDA-graph capturable). Then every layer does one `index_copy_` of the
T new keys/values, and per group one gather (whole blocks) of its (B_g, Hkv, S_g, Hd) keys/values and one SDPA with a
padding + causal (+ window) mask: at most three attention calls per layer (decodes, continuing chunks, chunks
from position 0) whatever the batch.

`LoneSequence` is the metadata of the commonest steps of all, one sequence's one new token or its prompt
from position 0, its blocks consecutive (generate() at batch 1, a one-request engine): no host plan, one index
tensor (the new slots), the keys read in place as a slice of the pool, so its host cost does not grow with the
context (the general plan converts the whole block table every step).

Exactness: the same dot products and softmax as generate() over the same keys (fp32 CPU logits within 1e-4);
a lone decode runs the exact call generate() makes (no mask), and prefill chunks that all start at position 0
run as generate()'s prefill does (is_causal, no mask tensor; padded query rows are dropped).

Leaves out: a fused paged kernel reading the pool in place (FlexAttention / FlashAttention with block tables:
the gather moves each context once more per layer), KV quantization, freeing blocks behind the window.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from llava_next.model.attention import attend


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, num_kv_heads, (num_blocks + 1) * block_size, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (L, Hkv, slots, Hd)
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # (L, Hkv, slots, Hd)
        # per layer its (Hkv, slots, Hd) key and value views, made once (not one select per layer per step)
        self.layers = list(zip(self.keys.unbind(0), self.values.unbind(0)))
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block = num_blocks  # padding rows write and read here only

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclasses.dataclass
class Group:
    """Rows of one kind: B sequences, Q query rows each (padded), S key positions each (padded).

    first/last: the group's rows in the flat step; query_pos (B, Q) each query's position (padding: 0);
    kv_blocks (B, ceil(S / block_size)) the blocks holding each sequence's key positions 0..S-1 (beyond its
    end: any block, masked), gathered whole (block-sized copies) and cut to S;
    gather/scatter: (B*Q,) flat row of each padded query and (last-first,) padded index of each real row, or
    None when the group is one unpadded run (decode rows, or one chunk); mask_kind: "tensor", "none", "causal";
    view_start: for one sequence whose blocks are consecutive (generate() at batch 1, a lone request), the slot of
    its first key: its keys are read as a slice of the pool, with no gather.
    """
    first: int
    last: int
    B: int
    Q: int
    S: int
    query_pos: np.ndarray
    kv_blocks: np.ndarray
    gather: np.ndarray | None
    scatter: np.ndarray | None
    mask_kind: str
    view_start: int | None = None


@dataclasses.dataclass
class StepPlan:
    """Host arrays of one flattened step (int64 numpy). positions/slot_mapping (T,) cover the padding rows of
    a bucketed decode step too; sample_rows (n,) are the rows whose logits are sampled."""
    positions: np.ndarray
    slot_mapping: np.ndarray
    sample_rows: np.ndarray
    groups: list[Group]

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


def plan_step(starts: np.ndarray, num_new: np.ndarray, tables: list[list[int]], block_size: int, scratch: int,
              windows, num_decodes: int, sample_rows: np.ndarray, bucket: tuple[int, int] | None = None) -> StepPlan:
    """The plan of a step whose first `num_decodes` sequences have one new token each and the rest are prefill
    chunks. starts/num_new (B,): each sequence's first new position and count; tables: block ids per
    sequence. bucket (batch, keys): pad a pure-decode step to these static sizes (padding rows use `scratch`)."""
    B = len(tables)
    ends = starts + num_new
    width = max(-(-int(ends.max()) // block_size), 1) if B else 1
    if bucket is not None:
        width = max(width, -(-bucket[1] // block_size))
    table = np.full((B, width), scratch, dtype=np.int64)  # (B, blocks), scratch beyond each sequence's blocks
    for i, blocks in enumerate(tables):
        n = min(len(blocks), width)
        table[i, :n] = blocks[:n]
    if num_decodes == B:  # one row per sequence
        row_seq = row_start = np.arange(B)  # (B,)
        positions = starts + 0  # (B,) a copy: callers may shift it in place
    else:
        row_seq = np.repeat(np.arange(B), num_new)  # (T,) which sequence each row belongs to
        row_start = np.cumsum(num_new) - num_new  # (B,) first flat row of each sequence
        positions = np.arange(row_seq.shape[0]) - row_start[row_seq] + starts[row_seq]  # (T,)
    slot_mapping = table[row_seq, positions // block_size] * block_size + positions % block_size  # (T,)
    groups = []
    if num_decodes:
        pad = 0 if bucket is None else bucket[0] - num_decodes
        S = int(ends[:num_decodes].max()) if bucket is None else bucket[1]
        query_pos = (ends[:num_decodes] - 1)[:, None]  # (Bd, 1)
        kv_table = table[:num_decodes]
        if pad:
            query_pos = np.concatenate([query_pos, np.zeros((pad, 1), np.int64)])
            kv_table = np.concatenate([kv_table, np.full((pad, width), scratch, np.int64)])
            scratch_slots = np.full(pad, scratch * block_size, np.int64)
            positions = np.concatenate([positions, np.zeros(pad, np.int64)])
            slot_mapping = np.concatenate([slot_mapping, scratch_slots])
        one = num_decodes == 1 and bucket is None and not _window_cuts(windows, S)
        blocks = kv_table[:, :-(-S // block_size)]  # (Bd, ceil(S / block_size))
        groups.append(Group(0, num_decodes + pad, num_decodes + pad, 1, S, query_pos, blocks, None, None,
                            "none" if one else "tensor", None if bucket else _view_start(blocks, block_size)))
    if num_decodes == B:
        return StepPlan(positions, slot_mapping, sample_rows, groups)
    prefill = np.arange(num_decodes, B)
    fresh = starts[prefill] == 0
    # continuing chunks (a mask with each chunk's offset), then chunks from position 0 (is_causal): two calls,
    # so fresh prompts keep the kernel's causal block skipping and are not padded to a long continuing chunk
    split = fresh.any() and not fresh.all() and fresh[int(np.argmax(fresh)):].all()
    for seqs in ([prefill[~fresh], prefill[fresh]] if split else [prefill] if len(prefill) else []):
        Q, S = int(num_new[seqs].max()), int(ends[seqs].max())
        first, last = int(row_start[seqs[0]]), int(row_start[seqs[-1]] + num_new[seqs[-1]])
        j = np.arange(Q)
        real = j[None, :] < num_new[seqs, None]  # (Bp, Q)
        query_pos = np.where(real, starts[seqs, None] + j[None, :], 0)  # (Bp, Q)
        gather = scatter = None
        if len(seqs) > 1:
            gather = (row_start[seqs, None] + np.minimum(j[None, :], num_new[seqs, None] - 1)).reshape(-1)
            scatter = np.flatnonzero(real.reshape(-1))  # (Tp,) padded index of each real row, in row order
        # every chunk from position 0 (so S == Q): top-left causal is exact for every real row, padded rows are
        # dropped, and the kernel skips the upper triangle; otherwise a mask with each chunk's offset
        kind = "causal" if not starts[seqs].any() and not _window_cuts(windows, S) else "tensor"
        blocks = table[seqs, :-(-S // block_size)]  # (Bp, ceil(S / block_size))
        groups.append(Group(first, last, len(seqs), Q, S, query_pos, blocks, gather, scatter, kind,
                            _view_start(blocks, block_size)))
    return StepPlan(positions, slot_mapping, sample_rows, groups)


def _view_start(blocks: np.ndarray, block_size: int) -> int | None:
    """blocks (B, n): the first key's slot if B == 1 and the blocks are consecutive, else None."""
    return consecutive_start(blocks[0].tolist(), block_size) if blocks.shape[0] == 1 else None


def consecutive_start(blocks: list[int], block_size: int) -> int | None:
    """One sequence's block ids: the slot of its first key if the blocks are consecutive (its keys are then one
    slice of the pool), else None."""
    first = blocks[0]
    return first * block_size if blocks == list(range(first, first + len(blocks))) else None


def _window_cuts(windows, S: int) -> bool:
    return any(w is not None and S > w for w in windows)


class StepAttention:
    """The decoder's attention metadata (model/attention.py) for one step over a PagedKVCache."""

    def __init__(self, cache: PagedKVCache, slot_mapping: torch.Tensor, groups: list[tuple]):
        self.cache, self.slot_mapping, self.groups = cache, slot_mapping, groups

    @staticmethod
    def to_device(plan: StepPlan, device, extra: list[np.ndarray] = ()) -> list[torch.Tensor]:
        """Every host array of the plan (then `extra`) in one transfer, as device views in a fixed order."""
        parts = [plan.positions, plan.slot_mapping, plan.sample_rows, *extra]
        for g in plan.groups:
            parts += [g.query_pos.reshape(-1), g.kv_blocks.reshape(-1)]
            parts += [] if g.gather is None else [g.gather, g.scatter]
        flat = torch.from_numpy(np.concatenate(parts).astype(np.int64, copy=False))
        flat = flat.to(device, non_blocking=True) if torch.device(device).type != "cpu" else flat
        return list(flat.split([len(p) for p in parts]))

    @classmethod
    def build(cls, cache: PagedKVCache, windows, plan: StepPlan, device, extra: list[np.ndarray] = ()):
        """(metadata, positions (T,), sample_rows (n,), the extra arrays on the device)."""
        tensors = cls.to_device(plan, device, extra)
        positions, slot_mapping, sample_rows = tensors[:3]
        rest = iter(tensors[3 + len(extra):])
        shapes = []
        for g in plan.groups:
            query_pos, kv_blocks = next(rest).view(g.B, g.Q), next(rest)
            index = None if g.gather is None else (next(rest), next(rest))
            shapes.append((g, query_pos, kv_blocks, index))
        return cls.from_tensors(cache, windows, slot_mapping, shapes), positions, sample_rows, tensors[3:3 + len(extra)]

    @classmethod
    def from_tensors(cls, cache: PagedKVCache, windows, slot_mapping: torch.Tensor, shapes) -> StepAttention:
        """Device-side part (no host syncs): masks per group and window. shapes: (Group, query_pos (B, Q),
        kv_blocks (B * blocks,), (gather, scatter) or None) per group."""
        groups = []
        for g, query_pos, kv_blocks, index in shapes:
            masks = {}
            for window in windows:
                if g.mask_kind != "tensor":
                    masks[window] = None if g.mask_kind == "none" else "causal"
                    continue
                diff = query_pos[:, :, None] - torch.arange(g.S, device=query_pos.device)  # (B, Q, S)
                allowed = diff >= 0
                if window is not None:
                    allowed = allowed & (diff < window)
                masks[window] = allowed[:, None]  # (B, 1, Q, S), True = attend
            groups.append((g.first, g.last, g.B, g.Q, g.S, kv_blocks.reshape(-1), index, masks, g.view_start))
        return cls(cache, slot_mapping, groups)

    def attend(self, layer, q, k, v, window, scale, backend):
        """q (1, H, T, Hd), new k/v (1, Hkv, T, Hd) -> (1, H, T, Hd)."""
        keys, values = self.cache.layers[layer]  # (Hkv, slots, Hd) each
        keys.index_copy_(1, self.slot_mapping, k[0])
        values.index_copy_(1, self.slot_mapping, v[0])
        Hkv, H, Hd, bs = keys.shape[0], q.shape[1], q.shape[3], self.cache.block_size
        outs = []
        for first, last, B, Q, S, kv_blocks, index, masks, view_start in self.groups:
            if view_start is not None:  # one sequence in consecutive blocks: a slice (1, Hkv, S, Hd)
                kg, vg = keys[None, :, view_start:view_start + S], values[None, :, view_start:view_start + S]
            else:  # whole blocks (Hkv, B * blocks, bs, Hd), then each sequence's first S positions: (B, Hkv, S, Hd)
                kg = keys.view(Hkv, -1, bs, Hd).index_select(1, kv_blocks).view(Hkv, B, -1, Hd)[:, :, :S]
                vg = values.view(Hkv, -1, bs, Hd).index_select(1, kv_blocks).view(Hkv, B, -1, Hd)[:, :, :S]
                kg, vg = kg.transpose(0, 1), vg.transpose(0, 1)
            if index is None and B == 1:  # one sequence (one chunk, or one token)
                outs.append(attend(q[:, :, first:last], kg, vg, masks[window], scale, backend))  # (1, H, Q, Hd)
            elif Q == 1:  # one token per sequence: rows are sequences
                qg = q[0, :, first:last, None].transpose(0, 1)  # (B, H, 1, Hd)
                outs.append(attend(qg, kg, vg, masks[window], scale, backend).transpose(0, 2))  # (1, H, B, Hd)
            else:  # chunks padded to Q rows each
                gather, scatter = index
                qg = q[0].index_select(1, gather).view(H, B, Q, Hd).transpose(0, 1)  # (B, H, Q, Hd)
                out = attend(qg, kg, vg, masks[window], scale, backend)  # (B, H, Q, Hd)
                outs.append(out.transpose(0, 1).reshape(1, H, B * Q, Hd).index_select(2, scatter))  # (1, H, Tp, Hd)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class LoneSequence:
    """The attention metadata of a step that is one sequence's `n` new tokens at slot indices start..start+n-1,
    its keys 0..start+n-1 in consecutive blocks from `first_block`, when no mask tensor is needed: one new token
    (no mask: generate() at batch 1, a one-request engine) or a chunk from position 0 (causal: their prefill).
    It is what plan_step + StepAttention.build give for that step (the new keys/values written at their slots,
    every key read in place as a slice of the pool), built at a host cost that does not grow with the context
    and with one small index tensor (the new slots: a fill of the caller's (1,) `buffer` for one token, else an
    arange on the device). `LoneSequence.of` says when it applies."""

    def __init__(self, cache: PagedKVCache, first_block: int, start: int, n: int, buffer: torch.Tensor | None = None):
        self.cache, self.n = cache, n
        self.first = first_block * cache.block_size  # slot of key 0
        self.slot = self.first + start  # the first new token's slot
        self.end = self.slot + n
        self.mask = None if n == 1 else "causal"  # (start == 0 when n > 1)
        self.slots = buffer.fill_(self.slot) if n == 1 and buffer is not None \
            else torch.arange(self.slot, self.end, device=cache.keys.device)  # (n,)

    @classmethod
    def of(cls, cache: PagedKVCache, windows, start: int, n: int, blocks: list[int],
           buffer: torch.Tensor | None = None) -> LoneSequence | None:
        """None when it does not apply: a chunk that continues (a mask with its offset), blocks that are not
        consecutive, or a sliding window that cuts the keys."""
        S = start + n
        first_slot = consecutive_start(blocks[: -(-S // cache.block_size)], cache.block_size)
        if (n > 1 and start) or first_slot is None or _window_cuts(windows, S):
            return None
        return cls(cache, first_slot // cache.block_size, start, n, buffer)

    def attend(self, layer, q, k, v, window, scale, backend):
        """q (1, H, n, Hd), the new k/v (1, Hkv, n, Hd) -> (1, H, n, Hd)."""
        keys, values = self.cache.layers[layer]  # (Hkv, slots, Hd) each
        keys.index_copy_(1, self.slots, k[0])
        values.index_copy_(1, self.slots, v[0])
        return attend(q, keys[None, :, self.first:self.end], values[None, :, self.first:self.end], self.mask, scale,
                      backend)  # the keys (1, Hkv, S, Hd) in place


def prefill_plan(T: int, num_blocks: int, block_size: int, windows) -> StepPlan:
    """The plan of one T-token chunk from position 0 over blocks 0..num_blocks-1 (worst-case memory profiling)."""
    return plan_step(np.array([0]), np.array([T]), [list(range(num_blocks))], block_size, num_blocks, windows, 0,
                     np.array([T - 1]))
