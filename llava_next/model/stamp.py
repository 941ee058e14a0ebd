"""A fingerprint of which weights a module holds, so caches of derived tensors know when they went stale.

Leaves out: hashing values (identity plus the in-place version counter is exact and free).
"""

from __future__ import annotations

import torch
from torch import nn


def weights_stamp(*parts: nn.Module | torch.Tensor) -> tuple:
    """Which tensors the parameters (of modules, or given directly) are and how often each was edited in
    place: equal stamps mean the same weights. A reload, `.to(...)` or `p.data = ...` makes new tensors (new
    storage); `copy_`, `load_state_dict` and other in-place edits bump the version counter. Inference tensors
    have no counter (-1): only their identity counts."""
    stamp = []
    for part in parts:
        for p in [part] if isinstance(part, torch.Tensor) else part.parameters():
            try:
                version = p._version
            except RuntimeError:  # an inference tensor (created under torch.inference_mode)
                version = -1
            stamp.append((p.data_ptr(), p.dtype, p.device, version))
    return tuple(stamp)
