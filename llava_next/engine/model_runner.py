"""One engine step on the model: vision tower for new images, embeddings, one flattened decoder forward,
lm_head at the sampling positions, sampling.

Input of a step (scheduler.SchedulerOutput): per sequence its first new position and its number of new
tokens. The runner orders the rows (one-token rows, continuing chunks, chunks from position 0), builds the
step's host plan once with numpy (attention_metadata.plan_step: positions, slots, block tables, sampling rows)
and moves it to the device in one transfer; a lone sequence's one-token step or prompt from position 0
(generate() at batch 1, a one-request engine; eager mode) needs no plan (attention_metadata.LoneSequence:
constant host work, one index tensor). It runs the CLIP tower once over the tiles of every image the step
needs that the encoder cache lacks, writes image features over placeholders only for the chunks that hold some
(a pure decode step has none), runs `Decoder.forward(embeds (1, T, D), positions (1, T), meta)` and applies the
lm_head only to the rows that sample. Grammar masks of constrained rows (sampling/structured.py) are computed
on a worker thread during the forward where a core is free (a GPU engine; a CPU engine whose torch threads leave
one), else right after it, and applied with the rows' logit_bias right before the sampler.

generate() runs on this runner too (compat/paged_rows.py: `forward` with its rows' block tables; head=False
stops at the hidden state for its screened lm_head). Modes: "eager" (default off CUDA) runs every step at its
own shapes; "static" pads each pure-decode step to a batch bucket (1, 2, 4, ..., powers of two) and a key-length
bucket (multiples of KEY_BUCKET) and runs it over static buffers; "graph" (default on CUDA) does the same and
captures each bucket's step as a CUDA graph with compiled elementwise kernels, replayed every step. Projections
are fused in every mode (model/decoder.fast_decoder), except for generate() in eager mode (`fuse=False`: the
model keeps its checkpoint's modules).

`EngineModel` is the small module a checkpoint loads into (parameter names `model.*` and `lm_head.weight`)
when the engine is built from a path. Under tensor parallelism (tp_workers.py) rank 0's runner hands each
step's plan and embeddings to the `tp_leader` before the decoder forward, so the followers run the same
forward on their shards; decode steps then run eagerly (no collective inside a captured graph).

Leaves out: graphs for mixed steps, a persistent device copy of block tables (the plan is sent each step).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from llava_next.engine.attention_metadata import (
    LoneSequence,
    PagedKVCache,
    StepAttention,
    plan_step,
)
from llava_next.engine.encoder_cache import EncoderCache
from llava_next.engine.request import Sequence
from llava_next.engine.sampler import Sampler
from llava_next.engine.scheduler import SchedulerOutput
from llava_next.model.decoder import fast_decoder
from llava_next.model.layers import KERNELS
from llava_next.model.llava_next import WithLMHead
from llava_next.model.stamp import weights_stamp

KEY_BUCKET = 512  # key lengths of a bucketed decode step are rounded up to a multiple of this


class EngineModel(WithLMHead):
    """LlavaNextCore + lm_head under transformers' names, for loading.pretrained.load_pretrained."""


def batch_bucket(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


class DecodeStep:
    """A pure-decode step at static shapes (B rows, S key positions): static buffers, run eagerly or replayed
    from a CUDA graph captured on first use (a failed capture falls back to eager, with a warning)."""

    def __init__(self, runner: ModelRunner, plan, graphs: bool):
        self.runner, self.group, self.graph = runner, plan.groups[0], None if graphs else False
        B, device = self.group.B, runner.device
        self.ids = torch.zeros(B, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(B, dtype=torch.long, device=device)
        self.query_pos = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.kv_blocks = torch.zeros(self.group.kv_blocks.size, dtype=torch.long, device=device)
        self.logits = None

    def _run(self) -> torch.Tensor:
        r = self.runner
        meta = StepAttention.from_tensors(r.cache, r.decoder.windows, self.slot_mapping,
                                          [(self.group, self.query_pos, self.kv_blocks, None)])
        hidden = r.decoder(r.decoder.embed_tokens(self.ids)[None], self.positions[None], meta, r.kernels)
        return r.model.lm_head(hidden[0])  # (B, V)

    def __call__(self, ids, positions, slot_mapping, query_pos, kv_blocks) -> torch.Tensor:
        for buffer, value in ((self.ids, ids), (self.positions, positions), (self.slot_mapping, slot_mapping),
                              (self.query_pos, query_pos), (self.kv_blocks, kv_blocks)):
            buffer.copy_(value)
        if self.graph is False:
            return self._run()
        if self.graph is None:
            try:
                self._capture()
            except Exception as exc:  # noqa: BLE001 (never fail a step over an optimisation)
                torch.cuda.synchronize()
                warnings.warn(f"engine CUDA graph capture failed ({type(exc).__name__}: {exc}); decoding eagerly")
                self.graph, self.runner.kernels = False, KERNELS
                return self._run()
        self.graph.replay()
        return self.logits

    def _capture(self):
        # Warm up on a side stream (CUDA graphs require it), then capture. Warm-up and replay write the same
        # slots with the same values, so the warm-up leaves no trace in the cache.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.runner.graph_pool is None:
            self.runner.graph_pool = torch.cuda.graph_pool_handle()
        # one memory pool for every bucket's graph: one replays at a time and its logits are read before the next
        with torch.cuda.graph(graph, pool=self.runner.graph_pool):
            self.logits = self._run()
        self.graph = graph


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, encoder_cache: EncoderCache, seed: int = 0, tp_leader=None,
                 mode: str | None = None, structured=None, fuse: bool = True, compiled: bool | None = None):
        self.structured = structured  # sampling/structured.StructuredDecoding: grammar masks and logit_bias
        self.model = model
        self.tp_leader = tp_leader  # tp_workers.TPLeader when the decoder is sharded over worker processes
        self.core = model.model
        self.decoder = self.core.language_model
        self.cache, self.encoder_cache = cache, encoder_cache
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.mode = mode or ("graph" if self.device.type == "cuda" and tp_leader is None else "eager")
        if self.mode not in ("eager", "static", "graph"):
            raise ValueError(f"unknown engine runner mode {self.mode!r} (eager, static, graph)")
        if self.mode != "eager" and tp_leader is not None:
            raise ValueError("a tensor-parallel engine decodes eagerly: runner mode must be 'eager'")
        # fuse=False (generate() on an eager runner): the model keeps its checkpoint's q/k/v and gate/up modules;
        # compiled: the bucketed decode step's elementwise kernels (default: in "graph" mode)
        compiled = self.mode == "graph" if compiled is None else compiled
        self.kernels = fast_decoder(self.decoder, compiled) if fuse or self.mode != "eager" else KERNELS
        self.sampler = Sampler(self.device, seed)
        self.steps: dict[tuple[int, int], DecodeStep] = {}  # (batch bucket, key bucket) -> its static step
        self.graph_pool = None  # the CUDA graphs' shared memory pool, made at the first capture
        # a lone decode's RoPE position (1, 1) and slot (1,), filled each step (attention_metadata.LoneSequence)
        self._lone_position = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self._lone_slot = torch.zeros(1, dtype=torch.long, device=self.device)

    def check_weights(self, pool) -> None:
        """Empty the encoder cache and the pool's prefix cache if the model's weights changed (model/stamp.py)
        since their entries were made (a reload, an in-place edit, a cast)."""
        if self.encoder_cache.check_weights(weights_stamp(self.model)):
            pool.reset_prefix_cache()

    @torch.inference_mode()
    def encode(self, images) -> None:
        """Run the tower over every tile of `images` (one pass) and keep each image's features in the cache."""
        if not images:
            return
        tiles = torch.cat([im.tiles for im in images]).to(self.device, self.dtype)  # (N, 3, S, S)
        for image, feats in zip(images, self.core.encode_images(tiles, [im.size for im in images])):
            self.encoder_cache.put(image.mm_hash, feats)  # (num_image_tokens, D)

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> tuple[list[Sequence], list[int], list]:
        """Run the step; returns the sequences that sampled, their tokens and logprobs (same order)."""
        self.encode(step.images_to_encode)
        # rows: one-token rows, continuing prefill chunks, chunks from position 0 (attention_metadata's groups)
        order = ([x for x in step.scheduled if x[2] == 1] + [x for x in step.scheduled if x[2] != 1 and x[1] > 0]
                 + [x for x in step.scheduled if x[2] != 1 and x[1] == 0])
        num_decodes = sum(1 for x in step.scheduled if x[2] == 1)
        B = len(order)
        starts = np.fromiter((s for _, s, _ in order), np.int64, B)  # (B,)
        num_new = np.fromiter((n for _, _, n in order), np.int64, B)  # (B,)
        samples = np.fromiter((s + n == seq.num_tokens for seq, s, n in order), bool, B)  # (B,)
        sample_rows = (np.cumsum(num_new) - 1)[samples]  # (n,) last row of each sequence that samples
        samplers = [seq for (seq, _, _), s in zip(order, samples) if s]
        masks = None if self.structured is None else self.structured.begin([s.matcher for s in samplers])
        ids = np.fromiter((t for seq, s, n in order for t in seq.token_ids[s:s + n]), np.int64)  # (T,)
        with_images = [i for i, (seq, s, _) in enumerate(order) if seq.images and s < seq.images[-1].end]
        write = None
        if with_images:
            def write(embeds):
                self._write_images(embeds, order, with_images, num_new)
        logits = self.forward(starts, num_new, [seq.block_ids for seq, _, _ in order], ids, num_decodes,
                              sample_rows, write)
        if not samplers:
            return [], [], []
        if self.structured is not None:  # logit_bias and grammar masks, in place (sampling/structured.py)
            self.structured.constrain(logits, masks, [s.params.logit_bias for s in samplers])
        tokens, logprobs = self.sampler(samplers, logits)
        return samplers, tokens, logprobs

    def forward(self, starts: np.ndarray, num_new: np.ndarray, tables: list[list[int]], ids, num_decodes: int,
                sample_rows: np.ndarray, write=None, head: bool = True,
                position_offset: np.ndarray | None = None) -> torch.Tensor | None:
        """The decoder over one flattened step -> logits (n, V) at `sample_rows` (hidden states (n, D) with
        head=False, eager steps only), or None when nothing samples. Callers run it under torch.inference_mode
        (execute, generate()): entering it once per step costs a decode step of a small model a few percent.

        starts/num_new (B,): each row's first new position and count, its first `num_decodes` rows one token
        each; tables: block ids per row; ids (T,) token ids (numpy, or a device tensor for a pure decode step);
        write(embeds (T, D)): writes over the embedded rows in place (image features, a prompt's inputs_embeds);
        position_offset (B,): added to each row's RoPE positions (generate()'s right-padded rows continue at
        transformers' mask-derived position, not at their length).
        """
        B = len(tables)
        on_device = isinstance(ids, torch.Tensor)
        bucket = None
        if self.mode != "eager" and num_decodes == B and write is None and head:
            bucket = (batch_bucket(B), -(-int((starts + 1).max()) // KEY_BUCKET) * KEY_BUCKET)
            pad = bucket[0] - B
            ids = (torch.cat([ids, ids.new_zeros(pad)]) if on_device
                   else np.concatenate([ids, np.zeros(pad, np.int64)]))
        if B == 1 and bucket is None and self.tp_leader is None:
            meta = LoneSequence.of(self.cache, self.decoder.windows, int(starts[0]), int(num_new[0]), tables[0],
                                   self._lone_slot)
            if meta is not None:  # no host plan, no index tensors: a cost that does not grow with the context
                ids = ids if on_device else torch.from_numpy(ids).to(self.device, non_blocking=True)
                # a lone sequence samples at its last token only
                return self._eager(meta, self._lone_positions(meta, position_offset), ids, write, None, sample_rows,
                                   slice(-1, None), head)
        plan = plan_step(starts, num_new, tables, self.cache.block_size, self.cache.scratch_block,
                         self.decoder.windows, num_decodes, sample_rows, bucket)
        if position_offset is not None:
            plan.positions[: int(num_new.sum())] += np.repeat(position_offset, num_new)
        extra = [] if on_device else [ids]
        if bucket is not None:
            positions, slot_mapping, rows, *rest = StepAttention.to_device(plan, self.device, extra)
            ids_t = ids if on_device else rest.pop(0)
            query_pos, kv_blocks = rest
            step = self.steps.get(bucket)
            if step is None:
                step = self.steps[bucket] = DecodeStep(self, plan, graphs=self.mode == "graph")
            return step(ids_t, positions, slot_mapping, query_pos.view(-1, 1), kv_blocks)[rows]
        meta, positions, rows, moved = StepAttention.build(self.cache, self.decoder.windows, plan, self.device, extra)
        return self._eager(meta, positions[None], ids if on_device else moved[0], write, plan, sample_rows, rows, head)

    def _eager(self, meta, positions: torch.Tensor, ids: torch.Tensor, write, plan, sample_rows: np.ndarray, rows,
               head: bool) -> torch.Tensor | None:
        """The eager decoder over a step's T rows: positions (1, T) and ids (T,) on the device, `rows` the sampling
        rows' index (a device tensor, or a slice) -> logits (n, V) there (hidden (n, D) with head=False), or None."""
        embeds = self.decoder.embed_tokens(ids)  # (T, D)
        if write is not None:
            write(embeds)
        if self.tp_leader is not None:
            self.tp_leader.step(plan, embeds[None])  # the followers run this forward on their shards
        hidden = self.decoder(embeds[None], positions, meta, KERNELS)  # (1, T, D)
        if not len(sample_rows):
            return None
        last = hidden[0] if len(sample_rows) == positions.shape[1] else hidden[0, rows]  # (n, D): every row, or some
        return self.model.lm_head(last) if head else last  # (n, V): lm_head only where we sample

    def _lone_positions(self, meta: LoneSequence, position_offset) -> torch.Tensor:
        """(1, n) RoPE positions of a lone sequence's new tokens: one token's is a fill of a runner buffer."""
        position = meta.slot - meta.first + (0 if position_offset is None else int(position_offset[0]))
        if meta.n == 1:
            return self._lone_position.fill_(position)  # (1, 1): a device fill, no transfer
        return torch.arange(position, position + meta.n, device=self.device)[None]  # (1, n)

    def _write_images(self, embeds, order, with_images, num_new) -> None:
        """Write image features over the placeholders of the chunks that hold some (embeds (T, D) in place)."""
        row_start = np.cumsum(num_new) - num_new
        for i in with_images:
            seq, start, n = order[i]
            row = int(row_start[i])
            for image in seq.images_in(start, start + n):
                feats = self.encoder_cache.get(image.mm_hash)
                lo, hi = max(start, image.offset), min(start + n, image.end)
                rows = slice(row + lo - start, row + hi - start)
                embeds[rows] = feats[lo - image.offset: hi - image.offset].to(embeds.dtype)
