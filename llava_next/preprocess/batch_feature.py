"""BatchFeature: the dict of model inputs that processors return, with `.to(device / dtype)` like transformers'.

`.to(dtype)` casts only floating tensors (pixel_values), never integer ones (input_ids, image_sizes), so
image sizes above 2048 are not rounded by a cast to float16 (FACTS.md, failure mode 4).
"""

from __future__ import annotations

from collections import UserDict

import numpy as np
import torch


class BatchFeature(UserDict):
    """A dict whose values are tensors; attribute access (`inputs.input_ids`) and `.to()` as in transformers."""

    def __init__(self, data=None, tensor_type: str | None = None):
        super().__init__(data or {})
        if tensor_type is not None:
            self.convert_to_tensors(tensor_type)

    def __getattr__(self, name):
        if name == "data":
            raise AttributeError(name)
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None

    def convert_to_tensors(self, tensor_type: str | None) -> "BatchFeature":
        """Turn lists/arrays into torch tensors ("pt") or numpy arrays ("np")."""
        if tensor_type is None:
            return self
        if tensor_type not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {tensor_type!r}")
        for key, value in self.data.items():
            if tensor_type == "pt" and not isinstance(value, torch.Tensor):
                self.data[key] = torch.as_tensor(np.asarray(value))
            elif tensor_type == "np" and not isinstance(value, np.ndarray):
                self.data[key] = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        return self

    def to(self, *args, **kwargs) -> "BatchFeature":
        """Move every tensor to a device; a dtype applies to floating tensors only."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        for key, value in self.data.items():
            if not isinstance(value, torch.Tensor):
                continue
            if dtype is not None and torch.is_floating_point(value):
                value = value.to(device=device, dtype=dtype)
            elif device is not None:
                value = value.to(device=device)
            self.data[key] = value
        return self
