"""Checkpoint loading: safetensors shards -> a model built on the meta device, strictly, cast once.

Keys keep transformers' leaf names; only top-level prefixes are renamed (`RENAMES`) so the hub layout
(`language_model.model.*`, `vision_tower.vision_model.*`), what transformers 5 writes
(`language_model.model.*`, `vision_tower.*`) and the newer layout (`model.language_model.*`) all land on
one set of names. Every missing, unexpected or misshaped tensor is reported in one CheckpointError;
tensors the truncated vision tower never uses are skipped by an explicit rule with a reason.

The model is built on the meta device and each tensor is streamed from disk, cast to the target dtype and
moved to its device as it is assigned, so a 7B model never exists in fp32 and loads at disk speed.
Pickle checkpoints (*.bin, *.pt) are refused unless the caller passes allow_pickle=True.

Leaves out: writing checkpoints (tests write them with transformers itself), placement (placement.py),
quantization (quantization.py's assign hook, handed in by pretrained.py: this file never imports it).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from llava_next.errors import CheckpointError, UnsafeCheckpointError
from llava_next.loading.placement import device_for, set_tensor

# (pattern, replacement) applied in order, first match wins; result is the newer transformers layout.
RENAMES = [
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^vision_tower\.vision_model\."), "model.vision_tower."),
    (re.compile(r"^model\.vision_tower\.vision_model\."), "model.vision_tower."),
    (re.compile(r"^(vision_tower|multi_modal_projector|image_newline|language_model)\b"), r"model.\1"),
]
_VISION_LAYER = re.compile(r"^model\.vision_tower\.encoder\.layers\.(\d+)\.")


def canonical_name(key: str) -> str:
    for pattern, replacement in RENAMES:
        new, n = pattern.subn(replacement, key, count=1)
        if n:
            return new
    return key


def skip_reason(name: str, model: nn.Module) -> str | None:
    """Why a checkpoint tensor is not loaded, or None if it must be."""
    if name.startswith("model.vision_tower.post_layernorm."):
        return "post_layernorm: LLaVA-NeXT reads hidden states before it"
    match = _VISION_LAYER.match(name)
    tower = model.vision_tower if hasattr(model, "vision_tower") else model.model.vision_tower
    if match and int(match.group(1)) >= len(tower.encoder.layers):
        return "CLIP layer above the deepest vision_feature_layer: never computed"
    if name.endswith("rotary_emb.inv_freq") or name.endswith("position_ids"):
        return "buffer recomputed at build time"
    if name.startswith("lm_head.") and not hasattr(model, "lm_head"):
        return "the base LlavaNextModel has no lm_head"
    return None


def _tensor_files(folder: Path, allow_pickle: bool) -> list[Path]:
    from llava_next.loading.hub import read_shard_index

    if (shards := read_shard_index(folder)) is not None:  # checked: a weight_map of files inside the folder
        return shards
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth"))
    if pickles and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{folder} holds only pickle checkpoints ({', '.join(p.name for p in pickles)}); loading pickle can run "
            "arbitrary code. Convert it to safetensors, or pass allow_pickle=True if you trust it."
        )
    if pickles:
        return pickles
    raise CheckpointError(f"no weights found in {folder} (expected *.safetensors)")


def iter_checkpoint(files: list[Path]):
    """Yield (name, tensor) from safetensors (memory-mapped) or, when allowed, pickle files (weights_only)."""
    from safetensors import safe_open

    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        yield key, f.get_tensor(key)
            except Exception as exc:
                if isinstance(exc, CheckpointError):
                    raise
                raise CheckpointError(f"cannot read {path.name}: it is truncated or not a safetensors file ({exc})") from exc
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise CheckpointError(f"cannot read {path.name} ({exc})") from exc
            yield from state.items()


def load_state(model: nn.Module, tensors, dtype: torch.dtype, device_map, source: str = "checkpoint", assign=None):
    """Assign tensors by name to a meta-built model; raise one CheckpointError listing every problem.

    `assign(model, name, tensor)` stores one cast, placed tensor (default: as a frozen Parameter/buffer);
    pretrained.py passes quantization.py's, which quantizes Linear weights as they stream in.
    """
    assign = assign or set_tensor
    expected = dict(model.named_parameters())
    expected.update({k: v for k, v in model.named_buffers() if k in model.state_dict()})
    loaded, unexpected, misshaped = set(), [], []
    base_model = not hasattr(model, "lm_head")  # LlavaNextModel: names without the leading "model."
    for key, tensor in tensors:
        canonical = name = canonical_name(key)
        if base_model and name.startswith("model."):
            name = name[len("model."):]
        if name not in expected:
            if skip_reason(canonical, model) is None:
                unexpected.append(key)
            continue
        target = expected[name]
        if tuple(tensor.shape) != tuple(target.shape):
            misshaped.append(f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(target.shape)}")
            continue
        cast = dtype if tensor.is_floating_point() else tensor.dtype
        assign(model, name, tensor.to(device=device_for(canonical, device_map), dtype=cast))
        loaded.add(name)
    missing = [n for n in expected if n not in loaded]
    tied = _tie_if_allowed(model, missing)
    missing = [n for n in missing if n not in tied]
    if missing or unexpected or misshaped:
        parts = [_listed(what, names, sep) for what, names, sep in
                 (("missing", missing, ", "), ("unexpected", unexpected, ", "), ("misshaped", misshaped, "; ")) if names]
        raise CheckpointError(f"{source} does not fit the model: " + " | ".join(parts))


LISTED = 5  # names shown per kind of problem in a CheckpointError; the rest are counted


def _listed(what: str, names: list[str], sep: str) -> str:
    """'missing tensors (669): a, b, c, d, e and 664 more': bounded whatever the checkpoint."""
    shown = sep.join(names[:LISTED]) + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")
    return f"{what} tensors ({len(names)}): {shown}"


def _tie_if_allowed(model: nn.Module, missing: list[str]) -> set[str]:
    """Share embed_tokens with lm_head when the config ties them and the checkpoint has no lm_head."""
    cfg = getattr(model, "config", None)
    if "lm_head.weight" in missing and cfg is not None and (cfg.tie_word_embeddings or cfg.text_config.tie_word_embeddings):
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
        return {"lm_head.weight"}
    return set()


def finish_build(model: nn.Module, backend: str = "sdpa"):
    """Recompute non-persistent buffers (RoPE frequencies) on the weights' device; set the attention backend."""
    for module in model.modules():
        if hasattr(module, "feature_cache"):
            module.feature_cache.clear()
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
        if hasattr(module, "backend"):
            module.backend = backend
