"""Where and in what dtype tensors go: `dtype=`/`torch_dtype=`, `device=` and transformers' `device_map`.

A model runs on one device: a device_map that splits it is refused with a clear error (the KV cache and the
activations live on one device). `set_tensor` stores one cast, placed tensor as a frozen Parameter or buffer.

Leaves out: disk and CPU offload, multi-device (pipeline) placement.
"""

from __future__ import annotations

import torch
from torch import nn

from llava_next.config import LlavaNextConfig
from llava_next.errors import DeviceUnavailableError
from llava_next.loading.dtypes import torch_dtype


def resolve_dtype(dtype, config: LlavaNextConfig) -> torch.dtype:
    """The load dtype: "auto"/None -> the checkpoint's; a name or torch.dtype, floating point only (as
    transformers: a model cannot be instantiated under torch.int8; quantize with quantization_config=)."""
    dtype = torch_dtype(dtype)
    if dtype is None:
        name = config.dtype or "float32"
        return getattr(torch, name) if isinstance(name, str) else name
    if not dtype.is_floating_point:
        raise ValueError(f"the model cannot be instantiated under dtype={dtype} as it is not a floating-point dtype; "
                         "for 8-bit or 4-bit weights pass quantization_config=BitsAndBytesConfig(...)")
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
    return as_device(best[1])


def as_device(dev) -> torch.device:
    if isinstance(dev, int) and not isinstance(dev, bool):
        dev = f"cuda:{dev}"
    if dev == "disk":
        raise ValueError("device_map: 'disk' offload is not supported; every module must sit on one device")
    try:
        device = torch.device(dev)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device_map: {dev!r} is not a device (use 'auto', 'cpu', 'cuda', 'cuda:N', an int, "
                         "or a dict of module name -> device)") from exc
    check_available(device, f"device_map asks for {dev!r}")
    return device


def check_available(device: torch.device, what: str) -> None:
    """DeviceUnavailableError when `device` is a CUDA device this machine (or this torch build) lacks."""
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(f"{what}, but CUDA is not available on this machine (torch "
                                     f"{torch.__version__}); use 'cpu'")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"{what}, but this machine has {torch.cuda.device_count()} CUDA device(s)")


def map_devices(device_map: dict) -> set[torch.device]:
    """The distinct devices a dict device_map uses ("cuda" and "cuda:<current>" count as one)."""
    devices = {as_device(d) for d in device_map.values()}
    if any(d.type == "cuda" for d in devices):
        current = torch.cuda.current_device()
        devices = {torch.device("cuda", current) if d.type == "cuda" and d.index is None else d for d in devices}
    return devices


def normalise_device_map(device_map, device=None, canonical=lambda name: name):
    """None -> `device` or cpu; "auto" -> cuda if available else cpu; a dict keeps its (canonical) module keys.

    `canonical` maps a module name of any checkpoint layout to the model's (weights.canonical_name).
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
        return {canonical(k + ".")[:-1] if k else "": v for k, v in device_map.items()}
    return str(as_device(device_map))


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor):
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor
