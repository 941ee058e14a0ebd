"""One engine step on the model: vision tower for new images, embeddings, one flattened decoder forward,
lm_head at the sampling positions, sampling.

Input of a step (scheduler.SchedulerOutput): per sequence its first new position and its number of new
tokens. The runner builds the flattened batch (ids (T,), positions (T,), the paged attention metadata),
runs the CLIP tower once over the tiles of every image the step needs that the encoder cache lacks (images
of several requests batched), writes each image's feature rows over its placeholders inside the chunk
(a chunk may start or end inside an image), runs `Decoder.forward(embeds (1, T, D), positions (1, T), meta)`
and applies the lm_head only to the last position of sequences that reached their last token.

`EngineModel` is the small module a checkpoint loads into (parameter names `model.*` and `lm_head.weight`)
when the engine is built from a path.

Under tensor parallelism (tp_workers.py) rank 0's runner hands each step's pieces and embeddings to the
`tp_leader` right before the decoder forward, so the follower ranks run the same forward on their shards.

Leaves out: CUDA graphs for pure-decode steps and torch.compile (eager everywhere).
"""

from __future__ import annotations

import torch

from llava_next.engine.encoder_cache import EncoderCache
from llava_next.engine.paged_attention import PagedAttention, PagedKVCache
from llava_next.engine.request import Sequence
from llava_next.engine.sampler import Sampler
from llava_next.engine.scheduler import SchedulerOutput
from llava_next.model.llava_next import WithLMHead


class EngineModel(WithLMHead):
    """LlavaNextCore + lm_head under transformers' names, for loading.pretrained.load_pretrained."""


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, encoder_cache: EncoderCache, seed: int = 0, tp_leader=None,
                 structured=None):
        self.structured = structured  # sampling/structured.StructuredDecoding: grammar masks and logit_bias
        self.model = model
        self.tp_leader = tp_leader  # tp_workers.TPLeader when the decoder is sharded over worker processes
        self.core = model.model
        self.decoder = self.core.language_model
        self.cache, self.encoder_cache = cache, encoder_cache
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.sampler = Sampler(self.device, seed)
        self.timings = {"encoder_s": 0.0, "forward_s": 0.0}  # host-side wall time (bench)

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
        ids, positions, pieces, sample_rows, samplers = [], [], [], [], []
        row = 0
        for seq, start, num_new in step.scheduled:
            end = start + num_new
            ids.extend(seq.token_ids[start:end])
            positions.append(torch.arange(start, end))
            pieces.append((start, num_new, seq.block_ids))
            if end == seq.num_tokens:
                sample_rows.append(row + num_new - 1)
                samplers.append(seq)
            row += num_new
        ids_t = torch.tensor(ids, device=self.device)  # (T,)
        embeds = self.decoder.embed_tokens(ids_t)  # (T, D)
        row = 0
        for seq, start, num_new in step.scheduled:
            end = start + num_new
            for image in seq.images_in(start, end):
                feats = self.encoder_cache.get(image.mm_hash)
                lo, hi = max(start, image.offset), min(end, image.end)
                embeds[row + lo - start: row + hi - start] = feats[lo - image.offset: hi - image.offset].to(embeds.dtype)
            row += num_new
        meta = PagedAttention(self.cache, self.decoder.windows, pieces, self.device)
        pos = torch.cat(positions).to(self.device)[None]  # (1, T)
        if self.tp_leader is not None:
            self.tp_leader.step(pieces, embeds[None])  # the followers run this forward on their shards
        hidden = self.decoder(embeds[None], pos, meta)  # (1, T, D)
        if not samplers:
            return [], [], []
        logits = self.model.lm_head(hidden[0, sample_rows])  # (n, V): lm_head only where we sample
        if self.structured is not None:  # logit_bias and grammar masks, in place (sampling/structured.py)
            self.structured.constrain(logits, [s.matcher for s in samplers], [s.params.logit_bias for s in samplers])
        tokens, logprobs = self.sampler(samplers, logits)
        return samplers, tokens, logprobs
