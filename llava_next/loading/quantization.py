"""bitsandbytes 4-bit (NF4/FP4) and 8-bit (LLM.int8) loading, matching transformers' `quantization_config=`.

Which modules are quantized is transformers' rule (5.23, `replace_with_bnb_linear`): every `nn.Linear`
except the skipped ones, so the CLIP tower's q/k/v/out_proj, fc1, fc2 and the projector's linear_1/linear_2
are quantized too. The skip list is:
- `llm_int8_skip_modules=None` (the default): `["lm_head"]` (transformers' "output embeddings / last module"
  rule; the tied lm_head of a checkpoint with tie_word_embeddings is never quantized either);
- an explicit list: exactly that list, and nothing else; as in transformers, `lm_head` is then quantized
  unless the list names it.
A pattern skips a module when it matches the module name from its start up to a module boundary, as a
regex with that boundary, or as a suffix (transformers' `should_convert_module`). So `"model.vision_tower"`
skips the whole CLIP tower but a bare `"vision_tower"` skips nothing under it (it matches only the container
module, whose children's names do not end with it): transformers behaves the same way; we warn.

Keeping the vision tower in 16 bits: `BitsAndBytesConfig(..., quantize_vision_tower=False)` (our
extension; it adds `"model.vision_tower"` to whatever skip list applies, lm_head default included), or
`llm_int8_skip_modules=["lm_head", "model.vision_tower"]`, which means the same thing in both libraries.

Numerics follow transformers: each weight is cast to the load dtype (`dtype=`/`torch_dtype=`, "auto" by
default) and moved to its device, then quantized there by bitsandbytes' own `Params4bit` / `Int8Params`,
one tensor at a time as the checkpoint streams in, so the 16-bit model never exists whole. Everything not
quantized (embeddings, norms, biases, lm_head, image_newline, the conv patch embedding) stays in the load
dtype; 4-bit layers compute in `bnb_4bit_compute_dtype` (float32 unless set, as in transformers).

Leaves out: loading pre-quantized (already-serialized bitsandbytes) checkpoints, CPU/disk offload
(`llm_int8_enable_fp32_cpu_offload`), and splitting a model across devices.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import re
import warnings

import torch
from torch import nn

from llava_next.loading.placement import map_devices, set_tensor

QUANT_STORAGE = ("float16", "float32", "int8", "uint8", "float64", "bfloat16")
QUANT_TYPES = ("nf4", "fp4")
VISION_TOWER = "model.vision_tower"
_INSTALL_HINT = "pip install llava_next[quant]  (or: pip install bitsandbytes)"


def _dtype(value, name: str, default: torch.dtype, allowed=None) -> torch.dtype:
    if value is None:
        return default
    if isinstance(value, str):
        key = value.removeprefix("torch.")
        if (allowed is not None and key not in allowed) or not isinstance(getattr(torch, key, None), torch.dtype):
            raise ValueError(f"{name} must be a torch.dtype or one of {allowed or 'the torch dtype names'}, got {value!r}")
        return getattr(torch, key)
    if isinstance(value, torch.dtype):
        if allowed is not None and str(value).split(".")[1] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value}")
        return value
    raise ValueError(f"{name} must be a string or a torch.dtype, got {type(value).__name__}")


def _bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


class BitsAndBytesConfig:
    """transformers' `BitsAndBytesConfig`, same arguments and defaults; validated when built.

    Extension: `quantize_vision_tower=False` keeps the CLIP tower in the load dtype (see the module doc).
    """

    quant_method = "bitsandbytes"

    def __init__(self, load_in_8bit: bool = False, load_in_4bit: bool = False, llm_int8_threshold: float = 6.0,
                 llm_int8_skip_modules: list[str] | None = None, llm_int8_enable_fp32_cpu_offload: bool = False,
                 llm_int8_has_fp16_weight: bool = False, bnb_4bit_compute_dtype=None, bnb_4bit_quant_type: str = "fp4",
                 bnb_4bit_use_double_quant: bool = False, bnb_4bit_quant_storage=None,
                 quantize_vision_tower: bool = True, **kwargs):
        self.load_in_8bit = _bool(load_in_8bit, "load_in_8bit")
        self.load_in_4bit = _bool(load_in_4bit, "load_in_4bit")
        if load_in_4bit and load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both True, but only one can be used at the same time")
        if isinstance(llm_int8_threshold, bool) or not isinstance(llm_int8_threshold, (int, float)):
            raise ValueError(f"llm_int8_threshold must be a number, got {llm_int8_threshold!r}")
        self.llm_int8_threshold = float(llm_int8_threshold)
        if llm_int8_skip_modules is not None:
            if isinstance(llm_int8_skip_modules, str) or not all(isinstance(m, str) for m in llm_int8_skip_modules):
                raise ValueError(f"llm_int8_skip_modules must be a list of module names, got {llm_int8_skip_modules!r}")
            llm_int8_skip_modules = list(llm_int8_skip_modules)
        self.llm_int8_skip_modules = llm_int8_skip_modules
        self.llm_int8_enable_fp32_cpu_offload = _bool(llm_int8_enable_fp32_cpu_offload,
                                                      "llm_int8_enable_fp32_cpu_offload")
        self.llm_int8_has_fp16_weight = _bool(llm_int8_has_fp16_weight, "llm_int8_has_fp16_weight")
        self.bnb_4bit_compute_dtype = _dtype(bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype", torch.float32)
        if bnb_4bit_quant_type not in QUANT_TYPES:
            raise ValueError(f"bnb_4bit_quant_type must be one of {QUANT_TYPES}, got {bnb_4bit_quant_type!r}")
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = _bool(bnb_4bit_use_double_quant, "bnb_4bit_use_double_quant")
        self.bnb_4bit_quant_storage = _dtype(bnb_4bit_quant_storage, "bnb_4bit_quant_storage", torch.uint8,
                                             QUANT_STORAGE)
        self.quantize_vision_tower = _bool(quantize_vision_tower, "quantize_vision_tower")
        unknown = set(kwargs) - {"quant_method", "_load_in_4bit", "_load_in_8bit"}
        if unknown:
            raise ValueError(f"unknown BitsAndBytesConfig arguments: {sorted(unknown)}")

    # -- transformers' helpers ------------------------------------------------------------------------------
    def is_quantizable(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit

    def quantization_method(self) -> str | None:
        if self.load_in_8bit:
            return "llm_int8"
        if self.load_in_4bit:
            return self.bnb_4bit_quant_type
        return None

    def to_dict(self) -> dict:
        """transformers' serialisation (dtype names as strings); `quantize_vision_tower` only when False."""
        out = {
            "quant_method": self.quant_method,
            "_load_in_8bit": self.load_in_8bit,
            "_load_in_4bit": self.load_in_4bit,
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_skip_modules": copy.copy(self.llm_int8_skip_modules),
            "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
            "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "bnb_4bit_compute_dtype": str(self.bnb_4bit_compute_dtype).split(".")[1],
            "bnb_4bit_quant_storage": str(self.bnb_4bit_quant_storage).split(".")[1],
            "load_in_4bit": self.load_in_4bit,
            "load_in_8bit": self.load_in_8bit,
        }
        if not self.quantize_vision_tower:
            out["quantize_vision_tower"] = False
        return out

    @classmethod
    def from_dict(cls, config: dict) -> "BitsAndBytesConfig":
        config = dict(config)
        if config.get("quant_method", "bitsandbytes") != "bitsandbytes":
            raise ValueError(f"not a bitsandbytes quantization config: quant_method={config.get('quant_method')!r}")
        for flag in ("load_in_4bit", "load_in_8bit"):
            private = config.pop("_" + flag, None)
            if flag not in config and private is not None:
                config[flag] = private
        config.pop("quant_method", None)
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(config) - known)
        if unknown:  # e.g. keys a newer transformers writes: ignored, as transformers ignores unused kwargs
            warnings.warn(f"BitsAndBytesConfig.from_dict ignores unknown keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in config.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self):
        return f"{type(self).__name__} {self.to_json_string()}"

    def __eq__(self, other):
        return isinstance(other, BitsAndBytesConfig) and self.to_dict() == other.to_dict()


def as_bnb_config(config) -> BitsAndBytesConfig:
    """Ours, transformers' BitsAndBytesConfig, or a dict (as in a config.json) -> ours."""
    if isinstance(config, BitsAndBytesConfig):
        return config
    if isinstance(config, dict):
        return BitsAndBytesConfig.from_dict(config)
    if hasattr(config, "to_dict") and hasattr(config, "load_in_4bit"):
        return BitsAndBytesConfig.from_dict(config.to_dict())  # e.g. transformers.BitsAndBytesConfig
    raise TypeError(f"quantization_config must be a BitsAndBytesConfig (or its dict), got {type(config).__name__}")


def import_bitsandbytes():
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as exc:
        raise ImportError(f"quantization_config needs the bitsandbytes package: {_INSTALL_HINT} ({exc})") from exc


# -- which modules ------------------------------------------------------------------------------------------
_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def should_convert(name: str, patterns: list[str] | None) -> bool:
    """transformers' `should_convert_module`: a pattern matches from the start up to a boundary, or as a suffix."""
    if patterns is None:
        return True
    return not any(re.match(rf"(?:{p}){_BOUNDARY}", name) or name.endswith(p) for p in patterns)


def skip_patterns(model: nn.Module, config: BitsAndBytesConfig) -> list[str]:
    if config.llm_int8_skip_modules is None:
        patterns = ["lm_head"]  # transformers' defaults: output embeddings, last module, tied weights
    else:
        patterns = list(config.llm_int8_skip_modules)
    cfg = getattr(model, "config", None)
    if hasattr(model, "lm_head") and cfg is not None and (cfg.tie_word_embeddings or cfg.text_config.tie_word_embeddings):
        patterns.append("lm_head")  # NOTE: a tied head shares embed_tokens' tensor; it is never quantized
    if not config.quantize_vision_tower:
        patterns.append(VISION_TOWER if hasattr(model, "lm_head") else "vision_tower")
    return sorted(set(patterns), key=patterns.index)


def modules_to_quantize(model: nn.Module, config: BitsAndBytesConfig) -> list[str]:
    """Names of the nn.Linear modules transformers would replace with bitsandbytes layers."""
    patterns = skip_patterns(model, config)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and should_convert(n, patterns)]
    linear = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    for p in config.llm_int8_skip_modules or []:
        hits = [n for n in linear if not should_convert(n, [p])]
        containers = [n for n, _ in model.named_modules() if n and not should_convert(n, [p])]
        if not hits and containers:
            warnings.warn(
                f"llm_int8_skip_modules entry {p!r} matches {containers[0]!r} but none of its Linear layers (patterns "
                f"match a name from its start, or as a suffix; transformers behaves the same), so nothing is skipped; "
                f"write the full name, e.g. {containers[0]!r}", stacklevel=3)
    return names


# -- loading -----------------------------------------------------------------------------------------------
def _single_device(device_map) -> torch.device:
    if isinstance(device_map, dict):
        devices = map_devices(device_map)
        if len(devices) != 1:
            raise ValueError(f"a quantized model must sit on one device; device_map places it on {sorted(map(str, devices))}")
        return devices.pop()
    return torch.device(device_map)


def check_backend_support(bnb, config: BitsAndBytesConfig, device: torch.device, dtype: torch.dtype):
    """Run one tiny quantized matmul on the target device, so an unsupported device fails now and clearly."""
    if device.type == "meta":
        return
    try:
        with torch.no_grad():
            x = torch.randn(2, 64, dtype=dtype, device=device)
            layer = _bnb_linear(bnb, config, 64, 64, bias=False)
            layer.weight = _quantized_weight(bnb, layer, torch.randn(64, 64, dtype=dtype, device=device))
            layer.eval()(x)
    except Exception as exc:  # noqa: BLE001 -- any failure here means "this device cannot run it"
        kind = "8-bit (LLM.int8)" if config.load_in_8bit else f"4-bit ({config.bnb_4bit_quant_type})"
        version = getattr(bnb, "__version__", "?")
        hint = " Use load_in_4bit=True, or a CUDA device." if config.load_in_8bit and device.type == "cpu" else ""
        raise RuntimeError(f"bitsandbytes {version} cannot run {kind} on {device}: {type(exc).__name__}: {exc}.{hint}") \
            from exc


def _bnb_linear(bnb, config: BitsAndBytesConfig, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """The bitsandbytes layer transformers puts in place of an nn.Linear for this config."""
    if config.load_in_8bit:
        return bnb.nn.Linear8bitLt(in_features, out_features, bias, has_fp16_weights=config.llm_int8_has_fp16_weight,
                                   threshold=config.llm_int8_threshold)
    return bnb.nn.Linear4bit(in_features, out_features, bias, config.bnb_4bit_compute_dtype,
                             compress_statistics=config.bnb_4bit_use_double_quant,
                             quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage)


def _quantized_weight(bnb, module: nn.Module, tensor: torch.Tensor):
    """`module`'s weight from a cast, placed tensor, quantized on the tensor's device as transformers does."""
    if isinstance(module, bnb.nn.Linear4bit):
        # as transformers' Bnb4bitQuantize: a Params4bit of the cast tensor, quantized by .to(device)
        return bnb.nn.Params4bit(tensor, requires_grad=False, module=module,
                                 **_param_kwargs(module.weight)).to(tensor.device)
    # as transformers' Bnb8bitQuantize: Int8Params quantizes when it leaves the CPU for a device
    return bnb.nn.Int8Params(tensor.to("cpu"), requires_grad=False, **_param_kwargs(module.weight)).to(tensor.device)


def _param_kwargs(param) -> dict:
    return {k: v for k, v in param.__dict__.items() if k not in ("SCB", "module")}


def refuse_prequantized(tensors):
    """Pass (name, tensor) pairs through, refusing a checkpoint that is already bitsandbytes-quantized."""
    for key, tensor in tensors:
        if key.endswith((".absmax", ".quant_map", ".SCB", ".weight_format")) or ".quant_state." in key:
            raise ValueError(f"{key!r}: this checkpoint is already bitsandbytes-quantized; loading pre-quantized "
                             "checkpoints is not supported, load the 16-bit checkpoint with quantization_config")
        yield key, tensor


def prepare_quantized(model: nn.Module, dtype: torch.dtype, device_map, config):
    """Swap the Linear layers transformers quantizes for bitsandbytes ones (on the meta device) and return
    (assign, config, names): `assign(model, name, tensor)` for weights.load_state, which quantizes each weight
    as it arrives (cast to `dtype` and placed already), the BitsAndBytesConfig, the quantized module names."""
    config = as_bnb_config(config)
    if not config.is_quantizable():
        raise ValueError("quantization_config asks for neither load_in_4bit nor load_in_8bit")
    if config.llm_int8_enable_fp32_cpu_offload:
        raise ValueError("llm_int8_enable_fp32_cpu_offload is not supported: a quantized model sits on one device")
    bnb = import_bitsandbytes()
    device = _single_device(device_map)
    check_backend_support(bnb, config, device, dtype)
    names = modules_to_quantize(model, config)
    for name in names:
        old = model.get_submodule(name)
        with torch.device("meta"):
            new = _bnb_linear(bnb, config, old.in_features, old.out_features, old.bias is not None)
        new.requires_grad_(False)
        model.set_submodule(name, new)
    quantized = set(names)

    def assign(model: nn.Module, name: str, tensor: torch.Tensor):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if leaf != "weight" or module_name not in quantized:
            set_tensor(model, name, tensor)
            return
        module._parameters["weight"] = _quantized_weight(bnb, module, tensor)

    return assign, config, sorted(quantized)


def mark_quantized(model: nn.Module, config: BitsAndBytesConfig, names: list[str]) -> None:
    """transformers' attributes of a quantized model."""
    model.quantization_config = config
    model.is_quantized = True
    model.is_loaded_in_4bit, model.is_loaded_in_8bit = config.load_in_4bit, config.load_in_8bit
    model.quantized_modules = list(names)


def quantized_module_names(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes layers in a loaded model (ours or transformers')."""
    return sorted(n for n, m in model.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
