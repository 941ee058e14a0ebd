"""Checkpoint loading: safetensors shards -> a model built on the meta device, strictly, cast once.

Keys keep transformers' leaf names; only top-level prefixes are renamed (`RENAMES`) so the hub layout
(`language_model.model.*`, `vision_tower.vision_model.*`), what transformers 5 writes
(`language_model.model.*`, `vision_tower.*`) and the newer layout (`model.language_model.*`) all land on
one set of names. Every missing, unexpected or misshaped tensor is reported in one CheckpointError;
tensors the truncated vision tower never uses are skipped by an explicit rule with a reason.

The model is built on the meta device and each tensor is streamed from disk, cast to the target dtype and
moved to its device as it is assigned, so a 7B model never exists in fp32 and loads at disk speed.
Pickle checkpoints (*.bin, *.pt) are refused unless the caller passes allow_pickle=True.

Leaves out: writing checkpoints (tests write them with transformers itself).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from llava_next.config import LlavaNextConfig
from llava_next.errors import CheckpointError, UnsafeCheckpointError
from llava_next.loading.hub import MODEL_PATTERNS, resolve_folder

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


def resolve_dtype(dtype, config: LlavaNextConfig) -> torch.dtype:
    if dtype is None or dtype == "auto":
        name = config.dtype or "float32"
        return getattr(torch, name) if isinstance(name, str) else name
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return getattr(torch, dtype)
    return dtype


def device_for(name: str, device_map) -> torch.device:
    """Device of one parameter under a device_map: a single device, or a dict of module prefix -> device."""
    if not isinstance(device_map, dict):
        return torch.device(device_map)
    best = None
    for prefix, dev in device_map.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, dev)
    if best is None:
        raise ValueError(f"device_map does not place {name!r}; add its module (or '') to the map")
    return _as_device(best[1])


def _as_device(dev) -> torch.device:
    if isinstance(dev, int) and not isinstance(dev, bool):
        dev = f"cuda:{dev}"
    if dev == "disk":
        raise ValueError("device_map: 'disk' offload is not supported; every module must sit on one device")
    try:
        device = torch.device(dev)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device_map: {dev!r} is not a device (use 'auto', 'cpu', 'cuda', 'cuda:N', an int, "
                         "or a dict of module name -> device)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device_map asks for {dev!r} but CUDA is not available on this machine")
    return device


def map_devices(device_map: dict) -> set[torch.device]:
    """The distinct devices a dict device_map uses ("cuda" and "cuda:<current>" count as one)."""
    devices = {_as_device(d) for d in device_map.values()}
    if any(d.type == "cuda" for d in devices):
        current = torch.cuda.current_device()
        devices = {torch.device("cuda", current) if d.type == "cuda" and d.index is None else d for d in devices}
    return devices


def normalise_device_map(device_map, device=None):
    """None -> `device` or cpu; "auto" -> cuda if available else cpu; a dict keeps its (canonical) module keys.

    A dict must put every module on one device: the KV cache and activations live on one device, so split
    (pipeline) placement is refused here with a clear error rather than failing mid-forward.
    """
    if device_map is None:
        return device or "cpu"
    if device_map == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, dict):
        if not device_map:
            raise ValueError("device_map is an empty dict; use {'': device} to place the whole model")
        devices = map_devices(device_map)
        if len(devices) > 1:
            raise ValueError(
                f"device_map splits the model over {sorted(map(str, devices))}; llava_next runs a model on one device "
                "(split/offloaded placement is not supported). Map every module to the same device, e.g. "
                "device_map='cuda:0' or {'': 'cuda:0'}."
            )
        # NOTE: keys may use any checkpoint layout (language_model.model.layers.0, vision_tower.vision_model, ...)
        return {canonical_name(k + ".")[:-1] if k else "": v for k, v in device_map.items()}
    return str(_as_device(device_map))


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor):
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def load_state(model: nn.Module, tensors, dtype: torch.dtype, device_map, source: str = "checkpoint", assign=None):
    """Assign tensors by name to a meta-built model; raise one CheckpointError listing every problem.

    `assign(model, name, tensor)` stores one cast, placed tensor (default: as a frozen Parameter/buffer);
    quantization.py passes one that quantizes Linear weights as they stream in.
    """
    assign = assign or _set_tensor
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
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
        if misshaped:
            parts.append(f"misshaped tensors ({len(misshaped)}): {'; '.join(misshaped)}")
        raise CheckpointError(f"{source} does not fit the model: " + " | ".join(parts))


def _tie_if_allowed(model: nn.Module, missing: list[str]) -> set[str]:
    """Share embed_tokens with lm_head when the config ties them and the checkpoint has no lm_head."""
    cfg = getattr(model, "config", None)
    if "lm_head.weight" in missing and cfg is not None and (cfg.tie_word_embeddings or cfg.text_config.tie_word_embeddings):
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
        return {"lm_head.weight"}
    return set()


def load_pretrained(cls, name_or_path, *, dtype=None, torch_dtype=None, device_map=None, device=None,
                    quantization_config=None, attn_implementation=None, allow_pickle: bool = False,
                    config: LlavaNextConfig | str | None = None, generation_config=None,
                    use_safetensors: bool | None = None, **kwargs):
    """Build `cls` from a folder or hub id: config, meta-device build, streamed strict load, one cast.

    kwargs as transformers' `from_pretrained`: config fields (`vision_feature_layer=-3`, ...) override
    config.json (not allowed with `config=`, as in transformers), hub options go to the hub, transformers'
    no-op loading options (`low_cpu_mem_usage`, `trust_remote_code`, ...) are ignored, anything else is a
    TypeError before any download. `use_safetensors=False` asks for pickle weights: it needs allow_pickle=True.
    """
    from llava_next.model.attention import check_backend
    from llava_next.config import pop_config_overrides
    from llava_next.compat.generation_config import GenerationConfig
    from llava_next.loading.hub import hub_options, read_json

    where = f"{cls.__name__}.from_pretrained"
    overrides = pop_config_overrides(kwargs)
    hub = hub_options(kwargs, where)
    if overrides and isinstance(config, LlavaNextConfig):
        raise TypeError(f"{where} got config= and config field(s) {', '.join(map(repr, sorted(overrides)))}; "
                        "set them on the config instead (config.replace(...) or LlavaNextConfig.from_pretrained(..., "
                        "field=value))")
    if use_safetensors is False and not allow_pickle:
        raise ValueError(f"{where}: use_safetensors=False asks for pickle weights (*.bin), which can run arbitrary "
                         "code; pass allow_pickle=True as well if you trust the checkpoint")
    if use_safetensors:
        allow_pickle = False  # as transformers: safetensors or nothing
    if hasattr(generation_config, "to_diff_dict"):  # transformers' GenerationConfig
        generation_config = generation_config.to_diff_dict()
    if generation_config is not None and not isinstance(generation_config, Mapping):
        raise TypeError(f"generation_config must be a GenerationConfig or a dict, got {type(generation_config).__name__}")
    if config is not None and not isinstance(config, (LlavaNextConfig, str, os.PathLike)):
        raise TypeError(f"config must be a LlavaNextConfig or a folder/hub id, got {type(config).__name__}")

    patterns = MODEL_PATTERNS + (["*.bin", "*.pt"] if allow_pickle else [])
    folder = resolve_folder(name_or_path, allow_patterns=patterns, **hub)
    if isinstance(config, (str, os.PathLike)):
        config = LlavaNextConfig.from_pretrained(config, **hub, **overrides)
    elif config is None:
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"config.json not found in {str(name_or_path)!r}")
        raw = read_json(config_path)
        if "auto_map" in raw:
            raw.pop("auto_map")  # NOTE: remote code is never imported
        config = LlavaNextConfig.from_dict(raw, **overrides)
    target_dtype = resolve_dtype(torch_dtype if dtype is None else dtype, config)
    backend = check_backend(attn_implementation)
    device_map = normalise_device_map(device_map, device)
    with torch.device("meta"):
        model = cls(config)
    files = _tensor_files(folder, allow_pickle)
    if quantization_config is not None:
        from llava_next.loading.quantization import load_quantized

        load_quantized(model, iter_checkpoint(files), target_dtype, device_map, quantization_config,
                       source=str(name_or_path))
    else:
        load_state(model, iter_checkpoint(files), target_dtype, device_map, source=str(name_or_path))
    finish_build(model, backend)
    gen_path = folder / "generation_config.json"
    if generation_config is not None:
        model.generation_config = GenerationConfig(**dict(generation_config))
    elif gen_path.is_file():
        model.generation_config = GenerationConfig(**read_json(gen_path))
    elif hasattr(model, "generation_config"):
        model.generation_config = GenerationConfig()
    model.name_or_path = str(name_or_path)
    return model.eval()


def weights_stamp(*parts: nn.Module | torch.Tensor) -> tuple:
    """Which tensors the parameters (of modules, or given directly) are and how often each was edited in
    place: equal stamps mean the same weights. A reload, `.to(...)` or `p.data = ...` makes new tensors (new storage); `copy_`,
    `load_state_dict` and other in-place edits bump the version counter. Inference tensors have no counter
    (-1): only their identity counts."""
    stamp = []
    for part in parts:
        for p in [part] if isinstance(part, torch.Tensor) else part.parameters():
            try:
                version = p._version
            except RuntimeError:  # an inference tensor (created under torch.inference_mode)
                version = -1
            stamp.append((p.data_ptr(), p.dtype, p.device, version))
    return tuple(stamp)


def finish_build(model: nn.Module, backend: str = "sdpa"):
    """Recompute non-persistent buffers (RoPE frequencies) on the weights' device; set the attention backend."""
    for module in model.modules():
        if hasattr(module, "feature_cache"):
            module.feature_cache.clear()
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
        if hasattr(module, "backend"):
            module.backend = backend
