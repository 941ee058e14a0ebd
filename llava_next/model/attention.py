"""Attention: the kernels behind one call, `attend(q, k, v, mask, scale, backend)`, and the attention metadata.

The decoder never decides where keys and values live. Each forward takes a metadata object (`AttentionMeta`)
whose `attend(layer, q, k, v, window, scale, backend)` stores the new keys/values where its cache keeps them
and attends over what the layer may see: `DenseAttention` here (no cache: the tokens attend among
themselves, causally, with an optional padding mask) and the paged cache of engine/ (which generate() runs
on too). Tensor parallelism changes only the head counts the layers hold, not this interface.

Backends: "sdpa" (PyTorch scaled_dot_product_attention, which runs FlashAttention-2 / memory-efficient
kernels on GPU), "eager" (matmul + fp32 softmax, as transformers' eager path), and "flash_attention_2"
(the flash-attn package, when installed). Grouped-query attention is handled here, so callers pass
k/v with Hkv heads.

Leaves out: attention dropout and returning attention weights.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "eager", "flash_attention_2")


def check_backend(name: str | None) -> str:
    """Validate an `attn_implementation` value; None means sdpa."""
    name = name or "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"attn_implementation must be one of {BACKENDS}, got {name!r}")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package (pip install flash-attn) "
            "and a CUDA GPU; 'sdpa' already uses FlashAttention kernels through PyTorch."
        )
    return name


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, S, Hd) -> (B, Hkv*groups, S, Hd)."""
    if groups == 1:
        return x
    B, H, S, D = x.shape
    return x[:, :, None].expand(B, H, groups, S, D).reshape(B, H * groups, S, D)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           backend: str = "sdpa") -> torch.Tensor:
    """q (B, H, T, Hd), k/v (B, Hkv, S, Hd) -> (B, H, T, Hd).

    mask: None (every query sees every key), "causal" (T == S, lower triangle) or a bool (B, 1, T, S)
    tensor, True = attend.
    """
    groups = q.shape[1] // k.shape[1]
    if backend == "sdpa" and q.shape[2] == 1 and groups > 1 and not isinstance(mask, str):
        # One decode token: fold each KV head's query heads into a length-`groups` query "sequence". The keys
        # and values are then read once per KV head with no GQA support needed from the kernel, so a padding
        # mask still gets a fused kernel instead of the math fallback (the same dot products and softmax).
        B, H, _, D = q.shape
        out = F.scaled_dot_product_attention(q.view(B, H // groups, groups, D), k, v, attn_mask=mask, scale=scale)
        return out.view(B, H, 1, D)  # (B, Hkv, groups, Hd) -> (B, H, 1, Hd)
    if backend == "sdpa":
        # enable_gqa reads the Hkv heads in place; repeating them would copy the whole cache every step.
        gqa = groups > 1
        if isinstance(mask, str):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if isinstance(mask, str):
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()[None, None]
    if backend == "eager":
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)
    if backend == "flash_attention_2":
        return _flash(q, k, v, mask, scale)
    raise ValueError(f"unknown attention backend {backend!r}")


def _flash(q, k, v, mask, scale):
    """flash-attn path: exact for unpadded causal or full attention; padded batches fall back to SDPA."""
    from flash_attn import flash_attn_func

    if mask is not None and not isinstance(mask, str):
        return attend(q, k, v, mask, scale, "sdpa")  # flash-attn takes no arbitrary (padding) mask
    causal = mask == "causal"
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal)
    return out.transpose(1, 2)


class AttentionMeta(Protocol):
    """Where a forward's keys and values go and what each query may see."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
               scale: float, backend: str) -> torch.Tensor:
        """q (B, H, T, Hd), the T new keys/values k, v (B, Hkv, T, Hd) -> (B, H, T, Hd)."""
        ...


def causal_masks(windows, query_slots: torch.Tensor, key_valid: torch.Tensor | None, num_keys: int) -> dict:
    """Per distinct sliding window (None = no window): None (attend to all keys), "causal" (T == S, no
    padding) or a boolean mask (B|1, 1, T, S), True = attend.

    query_slots (T,) are the sequence indices of the queries; key_valid (B, S) marks real keys, None when
    every key is real. As transformers' masks: a padding query sees the real keys before it, and a left-pad
    query none (SDPA then gives it a zero output, eager attention a uniform one, as for transformers).
    """
    T, S = query_slots.shape[0], num_keys
    masks = {}
    for window in windows:
        window_cuts = window is not None and S > window
        if key_valid is None and not window_cuts and (T == 1 or T == S):
            masks[window] = None if T == 1 else "causal"  # let the kernel skip the mask entirely
            continue
        key_idx = torch.arange(S, device=query_slots.device)
        diff = query_slots[:, None] - key_idx[None, :]  # (T, S)
        allowed = diff >= 0
        if window_cuts:
            allowed = allowed & (diff < window)
        mask = allowed[None] if key_valid is None else allowed[None] & key_valid[:, None, :]  # (B|1, T, S)
        masks[window] = mask[:, None]
    return masks


class DenseAttention:
    """No cache: the T tokens of a (B, T) batch attend among themselves, causally; key_valid (B, T) marks real
    tokens (None: all real)."""

    def __init__(self, windows, num_tokens: int, key_valid: torch.Tensor | None, device: torch.device):
        self.masks = causal_masks(windows, torch.arange(num_tokens, device=device), key_valid, num_tokens)

    def attend(self, layer, q, k, v, window, scale, backend):
        return attend(q, k, v, self.masks[window], scale, backend)
