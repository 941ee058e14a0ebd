"""from_pretrained: config + files + (quantization) + strict streamed load + one cast, as transformers' loader.

kwargs as transformers' `from_pretrained`: config fields override config.json, hub options go to the hub,
transformers' no-op loading options are ignored, anything else is a TypeError before any download. Returns
the model and the generation settings (the `generation_config=` argument or generation_config.json), which
the caller (compat/modeling.py) turns into its GenerationConfig.

`tensor_parallel=` is a hook from parallel/loading.py (`device`, `prepare(model)` after the meta build,
`tensors(files)` streaming only the rank's slices); this file never imports parallel/.

Leaves out: the tensor-parallel rewrite itself (parallel/), pre-quantized checkpoints.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import torch

from llava_next.config import LlavaNextConfig, pop_config_overrides
from llava_next.loading.hub import MODEL_PATTERNS, hub_options, read_json, resolve_folder
from llava_next.loading.placement import normalise_device_map, resolve_dtype
from llava_next.loading.quantization import mark_quantized, prepare_quantized, refuse_prequantized
from llava_next.loading.weights import _tensor_files, canonical_name, finish_build, iter_checkpoint, load_state
from llava_next.model.attention import check_backend


def progress_wanted() -> bool:
    """A loading bar on a terminal, as transformers shows; off when stderr is not a terminal or when
    HF_HUB_DISABLE_PROGRESS_BARS is set (the hub's switch); LLAVA_NEXT_PROGRESS=1 forces it on (logs, tests)."""
    if os.environ.get("LLAVA_NEXT_PROGRESS") == "1":
        return True
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes", "on"):
        return False
    return sys.stderr.isatty()


def with_progress(tensors, files, source: str):
    """(name, tensor) pairs as they stream, with a tqdm bar over the checkpoint's bytes when progress_wanted()."""
    if not progress_wanted():
        yield from tensors
        return
    from tqdm.auto import tqdm

    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"Loading weights ({len(files)} file(s))",
              file=sys.stderr) as bar:
        for name, tensor in tensors:
            bar.update(tensor.numel() * tensor.element_size())
            yield name, tensor
        bar.update(total - bar.n)  # the files' headers: the bar ends at 100%


def load_tensors(model, tensors, dtype: torch.dtype, device_map, quantization_config=None,
                 source: str = "checkpoint") -> list[str]:
    """Stream (name, tensor) pairs into a meta-built model; with a quantization config, the Linear layers
    transformers quantizes are swapped for bitsandbytes ones first and quantized as their weights arrive.
    Returns the quantized module names."""
    if quantization_config is None:
        load_state(model, tensors, dtype, device_map, source=source)
        return []
    assign, config, names = prepare_quantized(model, dtype, device_map, quantization_config)
    load_state(model, refuse_prequantized(tensors), dtype, device_map, source=source, assign=assign)
    mark_quantized(model, config, names)
    return names


def load_pretrained(cls, name_or_path, *, dtype=None, torch_dtype=None, device_map=None, device=None,
                    quantization_config=None, attn_implementation=None, allow_pickle: bool = False,
                    config: LlavaNextConfig | str | None = None, generation_config=None,
                    use_safetensors: bool | None = None, tensor_parallel=None, **kwargs):
    """Build `cls` from a folder or hub id: config, meta-device build, streamed strict load, one cast.

    kwargs as transformers' `from_pretrained`: config fields (`vision_feature_layer=-3`, ...) override
    config.json (not allowed with `config=`, as in transformers), hub options go to the hub, transformers'
    no-op loading options (`low_cpu_mem_usage`, `trust_remote_code`, ...) are ignored, anything else is a
    TypeError before any download. `use_safetensors=False` asks for pickle weights: it needs allow_pickle=True.
    """
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
    if tensor_parallel is not None:
        if quantization_config is not None or device_map not in (None, "auto") or device is not None:
            raise ValueError(f"{where}: tp_plan/tp_size place each rank on its own device (cuda:LOCAL_RANK or cpu); "
                             "device_map=, device= and quantization_config= cannot be combined with it")
        device_map = str(tensor_parallel.device)
    device_map = normalise_device_map(device_map, device, canonical_name)
    with torch.device("meta"):
        model = cls(config)
    files = _tensor_files(folder, allow_pickle)
    if tensor_parallel is not None:
        tensor_parallel.prepare(model)
        tensors = with_progress(tensor_parallel.tensors(files), files, str(name_or_path))
        load_state(model, tensors, target_dtype, device_map, source=str(name_or_path))
    else:
        tensors = with_progress(iter_checkpoint(files), files, str(name_or_path))
        load_tensors(model, tensors, target_dtype, device_map, quantization_config, str(name_or_path))
    finish_build(model, backend)
    gen_path = folder / "generation_config.json"
    if generation_config is not None:
        generation = dict(generation_config)
    else:
        generation = read_json(gen_path) if gen_path.is_file() else None
    model.name_or_path = str(name_or_path)
    return model.eval(), generation
