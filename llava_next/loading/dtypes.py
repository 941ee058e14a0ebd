"""The one table of dtype names: `--dtype` of the CLI and the server, `LLM(dtype=)`, `from_pretrained(dtype=)`.

Torch-free at import (the CLI's argument parser lists the names without loading torch). `torch_dtype` turns a
name of the table, another torch dtype name ("float64", "torch.int8") or a torch.dtype into a torch.dtype.
Leaves out: the checkpoint's own dtype names (config.CHECKPOINT_DTYPES: config imports nothing above it).
"""

from __future__ import annotations

DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16",
          "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def torch_dtype(dtype):
    """None for None / "auto"; else the torch.dtype (ValueError for an unknown name, TypeError for a non-dtype)."""
    import torch

    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        name = DTYPES.get(dtype, dtype.removeprefix("torch."))
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}: 'auto', a torch dtype or one of {sorted(DTYPES)}")
        dtype = getattr(torch, name)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, a dtype name or 'auto', got {type(dtype).__name__}")
    return dtype
