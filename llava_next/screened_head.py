"""Exact next tokens from a float32 lm_head that is mostly read in bfloat16 (the CPU decode path).

A CPU decode step is bound by memory traffic, and with a small decoder and a large vocabulary the float32
lm_head is most of it (the `tiny` benchmark shape: 33 of 40 MB read per token). Greedy decoding needs only
the arg max, and top-k sampling only the k best scores, so per step:

1. approximate logits  a = bf16(x) @ bf16(W).T          (half the bytes of W)
2. a rigorous bound    |a_v - l_v| <= e_v                 (l: the float32 logits transformers computes)
3. candidates          {v : M(a + e)_v >= k-th largest of M(a - e)}
                       (M: the processors that act per entry and keep order: repetition penalty, EOS
                       suppression, temperature; k = 1 for greedy, top_k for sampling)
4. exact float32 logits for the candidates, -inf everywhere else, then every processor and the choice
   (argmax, or softmax + multinomial over the whole vocabulary) exactly as on the full logits.

Since M(a - e) <= M(l) <= M(a + e) per entry, every token of the true top k (and anything tied with its k-th)
is a candidate; the rest would be set to -inf by top-k anyway. So the processed scores equal those of the
full logits, position for position, and greedy and sampling (same RNG draws) give the same tokens. Candidate
logits come from a GEMM over the gathered rows, whose rounding may differ from the full GEMM's by ~1e-7 (as
any other kernel difference).

The bound (u = 2^-8, bf16's unit roundoff; g = gamma_D = D 2^-24 / (1 - D 2^-24); S_v = sum_i |x_i W_vi|):
    |l_v - x.W_v|            <= g S_v                      float32 GEMM, any summation order
    |x^.W^_v - x.W_v|         <= (2u + u^2) S_v            both operands rounded to bf16
    |s_v - x^.W^_v|           <= g (1 + u)^2 S_v           products of bf16 are exact in float32; float32 sum
    |a_v - s_v|               <= u / (1 - u) |a_v|         the bf16 output
with S_v <= ||x|| ||W_v|| (Cauchy-Schwarz) and a small absolute term for flushed subnormals. This assumes
torch's CPU bf16 matmul accumulates in float32 (oneDNN and the fallback kernel both do);
tests/test_screened_head.py checks the bound on adversarial inputs.

Leaves out: sampling without top_k (every probability counts), beam search, output_scores/output_logits
(they need every logit), non-float32 or quantized heads, heads with a bias. Those take the full lm_head.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

_U = 2.0**-8  # bfloat16 unit roundoff (8 significand bits, round to nearest)
_TINY = 2.0**-126  # smallest normal float32: bound for a flushed subnormal


def error_coefficients(hidden_size: int) -> tuple[float, float]:
    """(c_norm, c_abs): e_v = c_norm ||x|| ||W_v|| + c_abs |a_v| (+ the subnormal term), with safety slack.

    The slack (2^-12 on the norms, 2^-16 overall, 2^-20 on |a|) covers the float32 rounding of the norms,
    of e itself, and of a +- e.
    """
    gamma = hidden_size * 2.0**-24 / (1 - hidden_size * 2.0**-24)
    c_norm = (2 * _U + _U**2 + gamma * (1 + _U) ** 2 + gamma) * (1 + 2.0**-12) ** 2 * (1 + 2.0**-16)
    c_abs = (_U / (1 - _U) + 2.0**-20) * (1 + 2.0**-16)
    return c_norm, c_abs


class ScreenedHead:
    """Next tokens for hidden states (B, D) through a float32, bias-free lm_head weight (V, D).

    Keeps a bf16 copy of the weight (V x D x 2 bytes) and its row norms; rebuilds them if the weight is
    replaced or changed in place. `max_candidates` (default V / 8): above it a step takes the full lm_head.
    """

    def __init__(self, weight: torch.Tensor, max_candidates: int | None = None):
        self.weight = weight  # (V, D) float32, the model's own tensor
        self.max_candidates = max_candidates or max(1, weight.shape[0] // 8)
        self.screened_steps = 0  # counters, for tests and profiling
        self.full_steps = 0
        self._stamp = None
        self._refresh()

    def _refresh(self):
        stamp = (self.weight.data_ptr(), self.weight._version)
        if stamp == self._stamp:
            return
        with torch.no_grad():
            self.weight_bf16 = self.weight.to(torch.bfloat16)  # (V, D)
            self.row_norms = self.weight.norm(dim=1)  # (V,)
        self.c_norm, self.c_abs = error_coefficients(self.weight.shape[1])
        self.subnormal = (self.weight.shape[1] + 1) * _TINY * (1 + self.row_norms)  # (V,)
        self._stamp = stamp

    def bounds(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, D) float32 -> (a, e), both (B, V) float32, with |a - float32 logits| <= e everywhere."""
        self._refresh()
        a = F.linear(hidden.to(torch.bfloat16), self.weight_bf16).float()  # (B, V)
        scale = hidden.norm(dim=-1, keepdim=True) * self.c_norm  # (B, 1)
        e = a.abs().mul_(self.c_abs).addcmul_(scale, self.row_norms).add_(self.subnormal)  # (B, V)
        return a, e

    def __call__(self, hidden: torch.Tensor, k: int, monotone: Callable[[torch.Tensor], torch.Tensor],
                 choose: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """hidden (B, D) -> next tokens (B,) = choose(hidden @ W.T), reading W mostly in bf16.

        `choose` maps (B, V) float32 logits to tokens and may only depend on the k best entries of
        `monotone(logits)`, a per-entry, order-keeping map (for greedy: the processors and argmax, k = 1).
        """
        a, e = self.bounds(hidden)
        low = monotone(a - e)  # (B, V): every score is at least this
        kth_low = low.amax(-1, keepdim=True) if k == 1 else low.topk(k, dim=-1).values[:, -1:]  # (B, 1)
        candidates = monotone(a + e) >= kth_low  # (B, V); a NaN logit leaves its row without candidates
        columns = candidates.any(0).nonzero().squeeze(1)  # (N,) ascending token ids
        usable = bool(candidates.any(-1).all()) and bool(torch.isfinite(kth_low).all())
        if not usable or columns.numel() > self.max_candidates:  # NaN/inf or a flat distribution
            self.full_steps += 1
            return choose(F.linear(hidden, self.weight))
        self.screened_steps += 1
        exact = F.linear(hidden, self.weight[columns])  # (B, N) float32 logits of the candidates
        logits = torch.full_like(a, -math.inf)  # (B, V): everything else is out of the top k
        logits[:, columns] = exact.masked_fill(~candidates[:, columns], -math.inf)
        return choose(logits)


def screen_applies(lm_head: torch.nn.Module) -> bool:
    """Whether `lm_head` is a plain float32 CPU Linear without a bias (what ScreenedHead handles)."""
    weight = getattr(lm_head, "weight", None)
    return (type(lm_head) is torch.nn.Linear and lm_head.bias is None and isinstance(weight, torch.Tensor)
            and weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 2)
