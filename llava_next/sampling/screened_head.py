"""Exact next tokens from a float32 lm_head that is mostly read as int8 (the CPU decode path).

A CPU decode step is bound by memory traffic, and with a small decoder and a large vocabulary the float32
lm_head is most of it (the `tiny` benchmark shape: 33 of 40 MB read per token). Greedy decoding needs only
the arg max, and top-k sampling only the k best scores, so per step:

1. approximate logits  a = s_x s_W (q_x . q_W)            int8 copies of x and W (a quarter of W's bytes;
                                                          the integer products are exact, `torch._int_mm`)
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

The bound. x = s_x q_x + dx and W_v = s_v q_v + dw_v (round to nearest, one scale per row of x and of W;
the norms of dx and dw_v are measured in float64 when quantizing). By Cauchy-Schwarz,
    |x.W_v - s_x s_v q_x.q_v|  = |x.dw_v + dx.W_v - dx.dw_v| <= |dw_v| (|x| + |dx|) + |dx| |W_v|
    |l_v - x.W_v|              <= g |x| |W_v|              float32 GEMM, g = D 2^-24 / (1 - D 2^-24)
    |a_v - s_x s_v q_x.q_v|    <= 2^-21 |a_v|              three float32 roundings of the int32 result
(|.| the 2-norm; plus slack for the float32 evaluation of e and of a +- e). The int8 copy of the head stays in
the last-level cache on this machine (8 MB for the tiny shape), which is where most of the gain comes from.

Leaves out: sampling without top_k (every probability counts), beam search, output_scores/output_logits
(they need every logit), non-float32 or quantized heads, heads with a bias. Those take the full lm_head.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

_ROWS = 4096  # rows of W quantized at a time (float64 work space)
_UP = 1 + 2.0**-20  # float64 -> float32 casts round down by at most 2^-24: multiply first, so bounds stay bounds
_TINY = 2.0**-126  # smallest normal float32


def _quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t (N, D) float64 -> (q (N, D) int8, scale (N, 1), |t - scale q| per row (N, 1)), scale and norm float64."""
    amax = t.abs().amax(-1, keepdim=True)  # (N, 1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(t / scale).clamp_(-127, 127)
    residual = (t - q * scale).norm(dim=-1, keepdim=True)  # float64 on float32 inputs: rounding negligible
    return q.to(torch.int8), scale, residual


class ScreenedHead:
    """Next tokens for hidden states (B, D) through a float32, bias-free lm_head weight (V, D).

    Keeps an int8 copy of the weight (V x D bytes) and per-row scale, residual and norms; rebuilds them if
    the weight is replaced or changed in place. `max_candidates` (default V / 8): above it a step takes the
    full lm_head.
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
        V, D = self.weight.shape
        q = torch.empty(V, D, dtype=torch.int8)
        stats = torch.empty(V, 3, dtype=torch.float64)  # scale, |dw_v|, |W_v|
        with torch.no_grad():
            for start in range(0, V, _ROWS):
                rows = self.weight[start:start + _ROWS].double()  # (n, D)
                q[start:start + _ROWS], scale, residual = _quantize_rows(rows)
                stats[start:start + _ROWS] = torch.cat([scale, residual, rows.norm(dim=-1, keepdim=True)], dim=1)
        self.q_t = q.t()  # (D, V) view: the layout the int8 GEMM reads fastest
        self.scale = stats[:, 0].float()  # (V,) the a_v rounding term covers its cast
        self.residual = (stats[:, 1] * _UP).float()  # (V,)
        self.norm = (stats[:, 2] * _UP).float()  # (V,)
        self.gamma = D * 2.0**-24 / (1 - D * 2.0**-24)
        self._stamp = stamp

    def bounds(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, D) float32 -> (a, e), both (B, V) float32, with |a - float32 logits| <= e everywhere."""
        self._refresh()
        x = hidden.double()  # (B, D)
        qx, sx, dx = _quantize_rows(x)  # (B, D) int8, (B, 1), (B, 1)
        exact = torch._int_mm(qx, self.q_t)  # (B, V) int32, no rounding
        a = exact.float() * (sx.float() * self.scale)  # (B, V)
        xn = x.norm(dim=-1, keepdim=True)  # (B, 1)
        e = self.residual * ((xn + dx) * _UP).float()  # (B, V): |dw_v| (|x| + |dx|)
        e.addcmul_(self.norm, ((dx + self.gamma * xn) * _UP).float())  # + (|dx| + g |x|) |W_v|
        e.add_(a.abs(), alpha=2.0**-21 + 2.0**-20)  # + a's roundings, and those of a +- e
        e.mul_(1 + 2.0**-12).add_(_TINY)  # the float32 evaluation of e itself; underflow
        return a, e

    def __call__(self, hidden: torch.Tensor, k: int, monotone: Callable[[torch.Tensor], torch.Tensor],
                 choose: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """hidden (B, D) -> next tokens (B,) = choose(hidden @ W.T), reading W mostly as int8.

        `choose` maps (B, V) float32 logits to tokens and may only depend on the k best entries of
        `monotone(logits)`, a per-entry, order-keeping map (for greedy: the processors and argmax, k = 1).
        """
        if k > self.max_candidates or not bool(torch.isfinite(hidden).all()):  # a huge k; NaN/inf: torch's own
            self.full_steps += 1
            return choose(F.linear(hidden, self.weight))
        a, e = self.bounds(hidden)
        low = monotone(a - e)  # (B, V): every score is at least this
        kth_low = low.amax(-1, keepdim=True) if k == 1 else low.topk(k, dim=-1).values[:, -1:]  # (B, 1)
        candidates = monotone(a + e) >= kth_low  # (B, V)
        columns = candidates.any(0).nonzero().squeeze(1)  # (N,) ascending token ids
        usable = bool(candidates.any(-1).all()) and bool(torch.isfinite(kth_low).all())
        if not usable or columns.numel() > self.max_candidates:  # overflow, or a flat distribution
            self.full_steps += 1
            return choose(F.linear(hidden, self.weight))
        self.screened_steps += 1
        exact = F.linear(hidden, self.weight[columns])  # (B, N) float32 logits of the candidates
        logits = torch.full_like(a, -math.inf)  # (B, V): everything else is out of the top k
        logits[:, columns] = exact.masked_fill(~candidates[:, columns], -math.inf)
        return choose(logits)


@functools.lru_cache(maxsize=None)
def int8_gemm_available() -> bool:
    """Whether this torch build runs the exact int8 GEMM (`torch._int_mm`) on the CPU."""
    try:
        a = torch.ones(1, 16, dtype=torch.int8)
        return int(torch._int_mm(a, torch.ones(16, 8, dtype=torch.int8))[0, 0]) == 16
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def screen_applies(lm_head: torch.nn.Module) -> bool:
    """Whether `lm_head` is a plain float32 CPU Linear without a bias (what ScreenedHead handles) and the int8
    GEMM is there."""
    weight = getattr(lm_head, "weight", None)
    return (type(lm_head) is torch.nn.Linear and lm_head.bias is None and isinstance(weight, torch.Tensor)
            and weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 2
            and int8_gemm_available())
