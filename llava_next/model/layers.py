"""The decoder's building blocks: RMSNorm, rotary embeddings, the activation table and fused projections.

Numerics follow transformers: RMSNorm normalises in fp32, casts back, then scales by the weight in the
activation dtype; RoPE is rotate-half with cos/sin computed in fp32 and cast to the activation dtype.
`KERNELS` is the read-only table of the elementwise pieces; a decode runner may pass its own table of compiled
versions (`compiled_kernels()`) to `Decoder.forward` (nothing here changes at run time).

Leaves out: rope types other than default/linear/llama3 (no published LLaVA-NeXT checkpoint uses them).
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from llava_next.config import TextConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# The one activation table of the decoder, the CLIP tower and the projector; which names each part accepts is
# config.py's (TEXT_ACTIVATIONS, VISION_ACTIVATIONS, PROJECTOR_ACTIVATIONS), checked when the config is read.
ACTIVATIONS = MappingProxyType({"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "quick_gelu": quick_gelu,
                                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")})


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


# The elementwise pieces of a decoder step, by name. Read-only: a runner that wants compiled versions builds
# its own dict with the same keys and passes it to Decoder.forward.
KERNELS = MappingProxyType({"rms_norm": rms_norm, "rope": apply_rope, "silu_mul": silu_mul})


def compiled_kernels() -> dict:
    """A kernel table (KERNELS' names) of torch.compile'd versions: static shapes, compiled on first use. For
    static-shape steps (captured decode steps); a step whose shapes change every call would recompile."""
    return {name: torch.compile(fn, dynamic=False, fullgraph=True) for name, fn in KERNELS.items()}


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin (B, 1, T, Hd) for positions (B, T), computed in fp32 then cast (matches HF)."""
    freqs = positions[..., None].float() * inv_freq.float()  # (B, T, Hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


class Checkpointed:
    """A stack of layers that can recompute activations in the backward pass (activation checkpointing):
    `gradient_checkpointing` on (transformers' attribute name, which PEFT and Trainer read), every
    `checkpoint_every`-th layer goes through torch.utils.checkpoint with `checkpoint_kwargs`, in train mode
    under autograd only, so inference never pays for it."""

    def init_checkpointing(self):
        self.gradient_checkpointing = False
        self.checkpoint_every = 1
        self.checkpoint_kwargs: dict = {}

    def run_layer(self, index: int, layer: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() \
                and index % self.checkpoint_every == 0:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(layer, *args, **self.checkpoint_kwargs)
        return layer(*args)


def linear_of(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain nn.Linear holding `weight` (out, in) and `bias` as frozen parameters (nothing else allocated)."""
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=False)
    return new


def fused_linear(parts: list[nn.Linear]) -> nn.Linear | None:
    """One Linear whose output is the parts' outputs side by side, or None if they are not plain Linears."""
    if not all(type(p) is nn.Linear for p in parts):
        return None  # e.g. quantized layers: keep them as they are
    bias = torch.cat([p.bias for p in parts]) if parts[0].bias is not None else None
    return linear_of(torch.cat([p.weight for p in parts], dim=0), bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, kernels=KERNELS) -> torch.Tensor:
        return kernels["rms_norm"](x, self.weight, self.eps)
