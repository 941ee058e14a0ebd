"""One decoder for Llama, Mistral and Qwen2: flags, not copies.

Differences are config flags: GQA (`num_key_value_heads`), q/k/v bias (Qwen2) or all-projection bias
(Llama `attention_bias`), sliding-window layers (Mistral, Qwen2 when enabled), RoPE with llama3-style
frequency scaling. Numerics follow transformers: rotate-half RoPE with cos/sin computed in fp32 and cast to
the activation dtype, RMSNorm in fp32 then `weight * x` in the activation dtype. Parameter names are HF's
so checkpoint keys map 1:1 (`layers.N.self_attn.q_proj.weight`, ...).

Leaves out: rope types other than default/linear/llama3 (no published LLaVA-NeXT checkpoint uses them),
dropout, training-only paths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llava_next.model.attention import attend
from llava_next.config import TextConfig
from llava_next.generation.kv_cache import StaticKVCache

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "relu": F.relu}


def rope_inverse_frequencies(cfg: TextConfig) -> torch.Tensor:
    """(Hd/2,) fp32 inverse frequencies, with the rope type's scaling."""
    rope = cfg.rope_parameters
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / rope["factor"]
    if kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_type {kind!r} is not supported (default, linear, llama3 are)")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()  # matches HF: normalise in fp32
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)  # matches HF: cast back, then scale in the activation dtype


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# The elementwise pieces of the one-token decode step. On a GPU the engine replaces them with
# torch.compile'd versions (each a single fused kernel) for the static step only; prefill and the CPU use these.
STATIC_KERNELS = {"rms_norm": rms_norm, "rope": apply_rope, "silu_mul": silu_mul}
EAGER_KERNELS = dict(STATIC_KERNELS)


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear | None:
    """One Linear whose output is the parts' outputs side by side, or None if they are not plain Linears."""
    if not all(type(p) is nn.Linear for p in parts):
        return None  # e.g. quantized layers: keep them as they are
    weight = torch.cat([p.weight for p in parts], dim=0)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if parts[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, kernels: dict = EAGER_KERNELS) -> torch.Tensor:
        return kernels["rms_norm"](x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.layer_window(layer)
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=cfg.o_bias)
        self.qkv_proj: nn.Linear | None = None  # set by fuse_projections()
        self.scale = self.head_dim ** -0.5
        self.backend = "sdpa"

    def fuse_projections(self):
        """Replace q/k/v by one GEMM (fewer, larger kernels); the checkpoint's names stay loadable before this.
        Idempotent: a model may get a new engine (another device, another mode) after the first fused it."""
        if self.qkv_proj is not None:
            return
        fused = _fused_linear([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self.qkv_proj = fused
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, mask, cache: StaticKVCache | None, slots, kernels: dict = EAGER_KERNELS):
        B, T, _ = x.shape
        H, Hkv, Hd = self.heads, self.kv_heads, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, Hd).transpose(1, 2)  # (B, H + 2Hkv, T, Hd)
            q, k = kernels["rope"](qkv[:, : H + Hkv], cos, sin).split([H, Hkv], dim=1)  # one RoPE for q and k
            v = qkv[:, H + Hkv:]
        else:
            q = self.q_proj(x).view(B, T, H, Hd).transpose(1, 2)  # (B, H, T, Hd)
            k = self.k_proj(x).view(B, T, Hkv, Hd).transpose(1, 2)  # (B, Hkv, T, Hd)
            v = self.v_proj(x).view(B, T, Hkv, Hd).transpose(1, 2)  # (B, Hkv, T, Hd)
            q, k = kernels["rope"](q, cos, sin), kernels["rope"](k, cos, sin)
        if cache is not None:
            k, v = cache.write(self.layer, slots, k, v)  # (B, Hkv, S, Hd)
        out = attend(q, k, v, mask, self.scale, self.backend)  # (B, H, T, Hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * Hd))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, m, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, m, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(m, d, bias=cfg.mlp_bias)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse_projections()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.intermediate = m

    def fuse_projections(self):
        if self.gate_up_proj is not None:  # already fused (idempotent, as Attention's)
            return
        fused = _fused_linear([self.gate_proj, self.up_proj])
        if fused is not None and self.act is F.silu:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj

    def forward(self, x, kernels: dict = EAGER_KERNELS):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
            return self.down_proj(kernels["silu_mul"](gate, up))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, masks, cache, slots, kernels: dict = EAGER_KERNELS):
        mask = masks[self.self_attn.window]
        x = x + self.self_attn(self.input_layernorm(x, kernels), cos, sin, mask, cache, slots, kernels)
        return x + self.mlp(self.post_attention_layernorm(x, kernels), kernels)


class Decoder(nn.Module):
    """Embeddings, layers and final norm (HF's `LlamaModel` / `MistralModel` / `Qwen2Model`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)
        self.windows = sorted({layer.self_attn.window for layer in self.layers}, key=lambda w: w or 0)

    def reset_buffers(self):
        self.inv_freq = rope_inverse_frequencies(self.config).to(self.embed_tokens.weight.device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if not self.embed_tokens.weight.is_meta:
            self.reset_buffers()  # NOTE: RoPE frequencies stay fp32 whatever .to(dtype) asks (as HF loads them)
        return self

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin (B, 1, T, Hd) for positions (B, T), computed in fp32 then cast (matches HF)."""
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, T, Hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def build_masks(self, query_slots: torch.Tensor, key_valid: torch.Tensor | None, num_keys: int) -> dict:
        """Per distinct sliding window: None (attend to all keys), "causal" (T == S, no padding) or a
        boolean mask (B, 1, T, S), True = attend.

        query_slots (T,) are the sequence indices of the queries; key_valid (B, S) marks real keys, None when
        every key is real. As transformers' masks: a padding query sees the real keys before it, and a left-pad
        query none (SDPA then gives it a zero output, eager attention a uniform one, as for transformers).
        """
        T, S = query_slots.shape[0], num_keys
        masks = {}
        for window in self.windows:
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

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor | None = None,
                cache: StaticKVCache | None = None, hidden_states: list | None = None) -> torch.Tensor:
        """inputs_embeds (B, T, D), positions (B, T) -> hidden states (B, T, D) after the final norm.

        Without a cache, key_valid (B, T) is the attention mask. With one, the T tokens are written at the
        cache's next slots and key_valid (B, T) marks which of them are real. key_valid=None: all real.
        hidden_states: a list that receives transformers' `hidden_states` (the embeddings, each layer's
        output, the last one after the final norm: num_layers + 1 tensors).
        """
        B, T, _ = inputs_embeds.shape
        if cache is not None:
            slots = cache.reserve(T, key_valid)
            all_valid = cache.key_valid[:, : cache.length] if cache.has_padding else None
            num_keys = cache.length
        else:
            slots = torch.arange(T, device=inputs_embeds.device)
            all_valid, num_keys = key_valid, T
        masks = self.build_masks(slots, all_valid, num_keys)
        cos, sin = self.rope(positions, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            x = layer(x, cos, sin, masks, cache, slots)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x

    def decode_static(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                      cache: StaticKVCache) -> torch.Tensor:
        """One token per row with static shapes and no host syncs (CUDA-graph capturable).

        inputs_embeds (B, 1, D), positions (B, 1), slot (1,) the cache slot to write; the cache must be
        `static`. Attention reads all max_len slots; key_valid masks the unwritten and padding ones.
        """
        cache.key_valid.index_fill_(1, slot, True)
        key_idx = torch.arange(cache.max_len, device=slot.device)
        masks = {}
        for window in self.windows:
            mask = cache.key_valid  # (B, S)
            if window is not None:
                mask = mask & (slot - key_idx < window)
            masks[window] = mask[:, None, None, :]  # (B, 1, 1, S)
        cos, sin = self.rope(positions, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, masks, cache, slot, STATIC_KERNELS)
        return self.norm(x, STATIC_KERNELS)

    def fuse_projections(self):
        """Fuse q/k/v and gate/up of every layer (after loading; quantized layers are left alone)."""
        for layer in self.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
