"""One decoder for Llama, Mistral and Qwen2: flags, not copies.

Differences are config flags: GQA (`num_key_value_heads`), q/k/v bias (Qwen2) or all-projection bias
(Llama `attention_bias`), sliding-window layers (Mistral, Qwen2 when enabled), RoPE with llama3-style
frequency scaling (layers.py). Parameter names are HF's so checkpoint keys map 1:1
(`layers.N.self_attn.q_proj.weight`, ...).

`Decoder.forward(embeds, positions, meta)`: where keys and values are kept, and what each query sees, is the
attention metadata's business (model/attention.py), so the static cache, the engine's paged cache and
tensor-parallel shards share this one decoder.

Training: `gradient_checkpointing` (set by compat/training.py) recomputes every `checkpoint_every`-th layer in
the backward pass instead of keeping its activations (torch.utils.checkpoint, `checkpoint_kwargs`), only in
train mode under autograd. Leaves out: dropout (every supported checkpoint has attention_dropout 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llava_next.config import TextConfig
from llava_next.model.attention import AttentionMeta
from llava_next.model.layers import (ACTIVATIONS, KERNELS, Checkpointed, RMSNorm, compiled_kernels, fused_linear,
                                     rope_inverse_frequencies, rope_tables)


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
        fused = fused_linear([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self.qkv_proj = fused
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, meta: AttentionMeta, kernels=KERNELS):
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
        out = meta.attend(self.layer, q, k, v, self.window, self.scale, self.backend)  # (B, H, T, Hd)
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
        fused = fused_linear([self.gate_proj, self.up_proj])
        if fused is not None and self.act is F.silu:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj

    def forward(self, x, kernels=KERNELS):
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

    def forward(self, x, cos, sin, meta: AttentionMeta, kernels=KERNELS):
        x = x + self.self_attn(self.input_layernorm(x, kernels), cos, sin, meta, kernels)
        return x + self.mlp(self.post_attention_layernorm(x, kernels), kernels)


class Decoder(Checkpointed, nn.Module):
    """Embeddings, layers and final norm (HF's `LlamaModel` / `MistralModel` / `Qwen2Model`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.init_checkpointing()
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

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, meta: AttentionMeta,
                kernels=KERNELS, hidden_states: list | None = None) -> torch.Tensor:
        """inputs_embeds (B, T, D), positions (B, T) -> hidden states (B, T, D) after the final norm.

        meta: the attention metadata (where keys/values go, what each query sees); kernels: the elementwise
        table (layers.KERNELS or a runner's compiled copy). hidden_states: a list that receives transformers'
        `hidden_states` (the embeddings, each layer's output, the last one after the final norm).
        """
        cos, sin = rope_tables(self.inv_freq, positions, inputs_embeds.dtype)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            x = self.run_layer(i, layer, x, cos, sin, meta, kernels)
        x = self.norm(x, kernels)
        if hidden_states is not None:
            hidden_states.append(x)
        return x

    def fuse_projections(self):
        """Fuse q/k/v and gate/up of every layer (after loading; quantized layers are left alone)."""
        for layer in self.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()


def fast_decoder(decoder: Decoder, compiled: bool):
    """Make a built decoder fast for inference, for every runner that decodes (generate()'s runner and the
    engine's ModelRunner): fuse q/k/v and gate/up of every layer in place (idempotent; same math, fewer GEMMs)
    and return the elementwise kernel table to pass to `forward`: compiled versions when `compiled` (for
    static-shape steps such as captured CUDA graphs), else layers.KERNELS."""
    decoder.fuse_projections()
    return compiled_kernels() if compiled else KERNELS
