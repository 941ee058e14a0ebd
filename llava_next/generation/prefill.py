"""The prefill of generate(): images and prompt into a KV cache, and the one-token decode step after it.

A left-padded batch takes positions from its attention mask (padding at 0, as transformers), so each row
decodes exactly as it would alone. Padded batches at least RAGGED_MIN_TOKENS wide are prefilled run by run
(consecutive rows of one length together, real tokens only, each straight into its slots of the batch
cache) instead of one masked pass. With `reuse_prefix`, the model's runner hands back the cache of the
previous call cut to the common prefix, and only the new tokens are prefilled.

Leaves out: chunked prefill (the engine's scheduler does that).
"""

from __future__ import annotations

import torch

from llava_next.generation.kv_cache import CacheAttention, StaticKVCache


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, T) positions counting only real tokens, padding at 0 (transformers' generate)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def prompt_ids(input_ids, inputs_embeds) -> torch.Tensor:
    """The id prompt; without input_ids transformers returns only the new tokens: an empty (B, 0) prompt."""
    if input_ids is not None:
        return input_ids
    return torch.empty(inputs_embeds.shape[0], 0, dtype=torch.long, device=inputs_embeds.device)


RAGGED_MIN_TOKENS = 128  # padded batches at least this wide are prefilled run by run (shorter: launches dominate)


def ragged_prefill_runs(attention_mask: torch.Tensor) -> list[tuple[slice, int]] | None:
    """(rows, pad) runs of consecutive equally padded rows, to prefill one by one; None: one batched pass.

    A padded batch needs a masked attention, which takes a slow kernel (SDPA's math path on a CPU, no flash
    kernel on a GPU) and computes the pad positions too; runs of equally long rows take the plain causal
    kernel over real tokens only. Only left-padded masks (0...0 1...1 per row) with no empty row qualify.
    """
    B, T = attention_mask.shape
    if B == 1 or T < RAGGED_MIN_TOKENS:
        return None
    lengths = attention_mask.long().sum(1)  # (B,)
    pads = T - lengths
    left_padded = torch.arange(T, device=attention_mask.device)[None] >= pads[:, None]  # (B, T)
    if not bool((attention_mask.bool() == left_padded).all()) or int(lengths.min()) == 0 or int(pads.max()) == 0:
        return None
    runs, first = [], 0
    pads = pads.tolist()
    for row in range(1, B + 1):
        if row == B or pads[row] != pads[first]:
            runs.append((slice(first, row), pads[first]))
            first = row
    return runs


class Prefill:
    """Images + prompt -> a filled KV cache, the last position's hidden state (B, D) and logits (B, V, unless
    head=False); also the per-row next position."""

    def __init__(self, model, input_ids, attention_mask, pixel_values, image_sizes, inputs_embeds, extra_slots: int,
                 batch_repeat: int = 1, reuse_prefix: bool = False, head: bool = True):
        core = model.model
        embeds = core.embed(input_ids, pixel_values, image_sizes, inputs_embeds)  # (B, T, D)
        B, T, _ = embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=embeds.device)
        attention_mask = attention_mask.to(embeds.device)
        if batch_repeat > 1:  # beam search: every beam starts from its row's prompt
            embeds = embeds.repeat_interleave(batch_repeat, 0)
            attention_mask = attention_mask.repeat_interleave(batch_repeat, 0)
        positions = positions_from_mask(attention_mask)
        runner = model.decode_runner()
        decoder = core.language_model
        reused = runner.take_prefix(embeds, T + extra_slots) if reuse_prefix and bool(attention_mask.all()) else None
        if reused is not None:  # the conversation so far is already in the cache: run only the new tokens
            self.cache, start = reused
            meta = CacheAttention.append(self.cache, decoder.windows, T - start)
            last = decoder(embeds[:, start:], positions[:, start:], meta)[:, -1]  # (1, D)
        else:
            self.cache = runner.cache_for(embeds.shape[0], T + extra_slots, embeds.dtype)
            runs = ragged_prefill_runs(attention_mask) if batch_repeat == 1 else None
            if runs is None:  # one pass over the padded batch
                meta = CacheAttention.append(self.cache, decoder.windows, T, attention_mask.bool())
                last = decoder(embeds, positions, meta)[:, -1]
            else:  # run by run, real tokens only, each into its own slots of the batch cache
                last = torch.cat([decoder(embeds[rows, p:], positions[rows, p:],
                                          CacheAttention.append(self.cache.row_view(rows, p), decoder.windows,
                                                                T - p))[:, -1]
                                  for rows, p in runs])
                self.cache.filled(T)
        self.embeds = embeds if reuse_prefix else None
        self.hidden = last  # (B, D)
        self.logits = model.lm_head(self.hidden) if head else None  # (B, V): lm_head only where we sample
        self.next_position = positions[:, -1] + 1  # (B,) matches HF: the last position + 1, padding or not


def decode_step(model, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
                head: bool = True) -> torch.Tensor:
    """tokens (B,), positions (B,) -> logits (B, V) for the next token (or, head=False, the last hidden state
    (B, D)); writes one cache slot."""
    return model.decode_runner().step(tokens, positions, cache, head=head)
