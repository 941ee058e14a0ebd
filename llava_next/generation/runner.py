"""Decode runner: pooled KV caches and a one-token step captured as a CUDA graph (generate()'s hot loop).

On a GPU the decode step is ~500 small kernels for a 7B model; launching them from Python costs more
than running them. The engine captures the step once per (batch size, cache length bucket) into a CUDA
graph over a pooled static cache, then each token is: copy token/position/slot into static buffers, replay.
The pooled cache outlives one generate() call, so the graph is captured once and replayed across calls.
A runner belongs to one model object (`model.decode_runner()` builds it); its compiled kernel table is its own.

On a CPU there is no graph: the step runs eagerly over the filled part of the cache (fastest there), and can
stop at the last hidden state so that screened_head.py picks the token from an int8 copy of the lm_head.

Leaves out: torch.compile (compile times of tens of seconds for a few percent more), speculative decoding.
"""

from __future__ import annotations

import warnings

import torch

from llava_next.generation.kv_cache import CacheAttention, StaticKVCache
from llava_next.model.decoder import fast_decoder
from llava_next.model.layers import KERNELS
from llava_next.model.stamp import weights_stamp
from llava_next.sampling.screened_head import ScreenedHead, screen_applies

BUCKET = 512  # cache lengths are rounded up to a multiple of this, so graphs are reused across prompts


class _CapturedStep:
    """The static one-token decoder step + lm_head over one pooled cache, as a CUDA graph (or eagerly,
    graphs=False), with the runner's kernel table."""

    def __init__(self, runner: "DecodeRunner", cache: StaticKVCache, graphs: bool = True):
        self.runner, self.model, self.cache = runner, runner.model, cache
        B, device = cache.batch_size, cache.keys.device
        self.tokens = torch.zeros(B, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None if graphs else False  # False: run the same static step eagerly
        self.logits = None

    def _run(self):
        decoder = self.model.model.language_model
        embeds = decoder.embed_tokens(self.tokens[:, None])  # (B, 1, D)
        meta = CacheAttention.static_step(self.cache, decoder.windows, self.slot)
        hidden = decoder(embeds, self.positions[:, None], meta, self.runner.kernels)
        return self.model.lm_head(hidden[:, -1])  # (B, V)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.slot.fill_(slot)
        if self.graph is False:  # capture failed once: the same static step, run eagerly
            return self._run()
        if self.graph is None:
            try:
                self._capture()
            except Exception as exc:  # NOTE: never fail a generation over an optimisation
                torch.cuda.synchronize()
                if self.runner.kernels is not KERNELS:
                    warnings.warn(f"compiled decode kernels failed ({type(exc).__name__}: {exc}); using eager ones")
                    self.runner.kernels = KERNELS
                    return self(tokens, positions, slot)
                warnings.warn(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); decoding eagerly")
                self.graph = False
                return self._run()
        self.graph.replay()
        return self.logits

    def _capture(self):
        # Warm up on a side stream (as CUDA graphs require), then capture. The warm-up writes the same
        # slot with the same values the replay writes, so it leaves no trace in the cache.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._run()
        self.graph = graph


class DecodeRunner:
    """Per model: a pool of static caches and their captured steps, keyed by (batch, bucketed length).

    mode "graph" (default on CUDA): static step, fused projections, compiled kernels, CUDA graph.
    mode "static": the same step without the graph (runs anywhere; the CPU tests use it to check that path).
    mode "eager" (default elsewhere): dynamic step over the filled part of a fresh cache.
    screen_head (eager mode, float32 CPU lm_head): greedy and top-k sampling steps choose their token through
    ScreenedHead (same tokens, a quarter of the lm_head traffic); False always computes the full logits.
    """

    def __init__(self, model, mode: str | None = None, screen_head: bool = True):
        self.model = model
        self.screen_head = screen_head
        self._screen: ScreenedHead | None = None
        self.device_type = model.device.type
        self.mode = mode or ("graph" if self.device_type == "cuda" else "eager")
        if self.mode not in ("graph", "static", "eager"):
            raise ValueError(f"unknown engine mode {self.mode!r}")
        self.use_graphs = self.mode == "graph"
        self.static = self.mode != "eager"
        # static: fewer, larger GEMMs and one fused kernel per elementwise piece (model/decoder.fast_decoder,
        # shared with the engine): the decode step is ~1,300 kernels otherwise, each ~2 us even inside a graph.
        self.kernels = fast_decoder(model.model.language_model, compiled=True) if self.static else KERNELS
        self._pool: dict[tuple[int, int], tuple[StaticKVCache, _CapturedStep | None]] = {}
        # (embeddings in the cache, cache, the decoder weights' stamp when it was filled)
        self._last: tuple[torch.Tensor, StaticKVCache, tuple] | None = None

    def cache_for(self, batch: int, length: int, dtype: torch.dtype) -> StaticKVCache:
        """An empty cache with room for `length` tokens (pooled and graph-backed on GPU, fresh on CPU)."""
        text = self.model.config.text_config
        device = self.model.device
        # the layers' own KV head count: per rank when the decoder is tensor-parallel (parallel/)
        kv_heads = self.model.model.language_model.layers[0].self_attn.kv_heads
        size = -(-length // BUCKET) * BUCKET  # slack lets a conversation's next turn continue in place
        if not self.static:
            return StaticKVCache(text.num_hidden_layers, batch, kv_heads, size, text.head_dim, dtype, device)
        key = (batch, size, dtype)
        if key not in self._pool:
            cache = StaticKVCache(text.num_hidden_layers, batch, kv_heads, size, text.head_dim, dtype, device)
            self._pool[key] = (cache, _CapturedStep(self, cache, graphs=self.use_graphs))
        cache, _ = self._pool[key]
        if self._last is not None and self._last[1] is cache:
            self._last = None  # the remembered conversation is being overwritten
        cache.reset()
        cache.static = False  # prefill reads only the filled slots; decode switches to static
        return cache

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

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
             head: bool = True) -> torch.Tensor:
        """tokens (B,), positions (B,) -> logits (B, V), or with head=False (eager mode) the last hidden
        state (B, D); writes the next cache slot."""
        if not self.static:
            decoder = self.model.model.language_model
            meta = CacheAttention.append(cache, decoder.windows, 1)
            hidden = decoder(decoder.embed_tokens(tokens[:, None]), positions[:, None], meta)
            return self.model.lm_head(hidden[:, -1]) if head else hidden[:, -1]
        if not head:
            raise ValueError("the static decode step always ends in the lm_head")
        captured = self._pool[(cache.batch_size, cache.max_len, cache.keys.dtype)][1]
        cache.static = True
        slot = cache.length
        if slot >= cache.max_len:
            raise RuntimeError(f"KV cache full: {cache.max_len} slots")
        cache.length += 1
        return captured(tokens, positions, slot)

    def remember(self, embeds: torch.Tensor, cache: StaticKVCache):
        """Keep a batch-1 cache and the (1, cache.length, D) embeddings it was built from, for take_prefix."""
        if embeds.shape[0] != 1:
            self._last = None
            return
        self._last = (embeds[:, : cache.length], cache, weights_stamp(self.model.model.language_model))

    def take_prefix(self, embeds: torch.Tensor, needed: int) -> tuple[StaticKVCache, int] | None:
        """The remembered cache cut to the longest prefix whose embeddings equal `embeds` (1, T, D), or None.

        Comparing embeddings (not ids) covers the images too: an image placeholder only matches if its
        feature vector is identical. At least one token is left to prefill, so there are logits to sample.
        Nothing is reused if the decoder's weights changed since (weights.weights_stamp).
        """
        last, self._last = self._last, None
        if last is None or embeds.shape[0] != 1:
            return None
        previous, cache, stamp = last
        if cache.max_len < needed or previous.dtype != embeds.dtype or previous.device != embeds.device:
            return None
        if stamp != weights_stamp(self.model.model.language_model):
            return None
        n = min(previous.shape[1], embeds.shape[1] - 1)
        same = (previous[0, :n] == embeds[0, :n]).all(-1)  # (n,)
        keep = n if bool(same.all()) else int((~same).int().argmax())
        if keep == 0:
            return None
        cache.truncate(keep)
        cache.static = False
        return cache, keep

    def release(self):
        """Free pooled caches and graphs (e.g. before loading another model)."""
        self._pool.clear()
        self._last = None
        self._screen = None

