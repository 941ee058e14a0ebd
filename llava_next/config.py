"""Configuration: frozen dataclasses with Hugging Face field names, read from a (sparse) hub config.json.

The hub's config.json files leave out most fields (llava-v1.6-mistral-7b-hf has no hidden size or head
counts; CLIP's `quick_gelu` is implied), so a field that is absent takes the default of transformers' config
class for that `model_type`. `DEFAULTS` below holds those defaults; tests check them against transformers.
Both the legacy (`rope_theta`, `rope_scaling`, `torch_dtype`) and the newer (`rope_parameters`, `dtype`)
forms are read. Unknown fields are kept in `extra` and never used. `from_pretrained(..., **kwargs)` applies
kwargs naming config fields on top of the file, as transformers does (`CONFIG_OVERRIDES`).

Every value the model is built from is checked when the config is read (`check_text`, `check_vision`,
`check_llava`), before anything is allocated: unknown activations or dtypes, integer/bool dtypes, sizes that are
not positive integers, head counts that do not divide, layer counts and sizes beyond `LIMITS` (generous caps:
1024 layers, hidden 65536, vocabulary 2**20, ...), degenerate pinpoints. Each is a `CheckpointError` naming the
field and its value.

Leaves out: runtime knobs (dtype to load in, device, attention backend): those are arguments, not config.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from llava_next.errors import CheckpointError

# transformers' config-class defaults per model_type (LlamaConfig, MistralConfig, Qwen2Config, CLIPVisionConfig).
_DECODER_COMMON = dict(
    hidden_act="silu", initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_theta=10000.0, attention_dropout=0.0, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
)
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(_DECODER_COMMON, vocab_size=32000, intermediate_size=11008, num_key_value_heads=None,
                  max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                  attention_bias=False, mlp_bias=False, sliding_window=None),
    "mistral": dict(_DECODER_COMMON, vocab_size=32000, intermediate_size=14336, num_key_value_heads=8,
                    max_position_embeddings=131072, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                    attention_bias=False, mlp_bias=False, sliding_window=4096),
    "qwen2": dict(_DECODER_COMMON, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
                  max_position_embeddings=32768, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                  attention_bias=True, mlp_bias=False),
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12,
                              num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
                              initializer_range=0.02, initializer_factor=1.0),
}
# LlavaNextConfig builds this CLIP-L/14-336 tower when the config has no vision_config at all.
LLAVA_NEXT_VISION_DEFAULTS = dict(intermediate_size=4096, hidden_size=1024, patch_size=14, image_size=336,
                                  num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
# Fields transformers writes into every config that carry no model facts.
_TRANSFORMERS_ONLY_KEYS = {"architectures", "transformers_version", "_name_or_path", "output_hidden_states", "return_dict",
                "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
                "output_attentions", "use_cache", "torch_dtype", "dtype", "model_type", "vocab_size_text"}


# Activations each part accepts, all of them names of model/layers.py's ACTIVATIONS table (tests/test_config.py
# checks that).
TEXT_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")
PROJECTOR_ACTIVATIONS = TEXT_ACTIVATIONS
# Checkpoint dtypes a model can be loaded in (config "dtype"/"torch_dtype"; integer and bool types are refused).
CHECKPOINT_DTYPES = ("float16", "bfloat16", "float32", "float64")
# Generous caps on what a config may ask for, far above every released model (Qwen-110B: 80 layers, hidden 8192,
# vocab 152064), refused before any tensor is built. Tensor sizes follow from these.
LIMITS = dict(num_hidden_layers=1024, hidden_size=65536, intermediate_size=1 << 20, vocab_size=1 << 20,
              num_attention_heads=4096, num_key_value_heads=4096, head_dim=4096, max_position_embeddings=1 << 24,
              image_size=8192, patch_size=8192, num_channels=16, projection_dim=65536, pinpoints=1024,
              pinpoint_side=16384)


def _bad(where: str, name: str, value, what: str) -> CheckpointError:
    text = repr(value)
    return CheckpointError(f"config {where}{name} = {text[:60] + '...' if len(text) > 60 else text}: {what}")


def _check_int(where: str, raw: dict, name: str, minimum: int = 1, optional: bool = False) -> None:
    value = raw.get(name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(where, name, value, "must be an integer")
    if value < minimum:
        raise _bad(where, name, value, f"must be >= {minimum}")
    limit = LIMITS.get(name)
    if limit is not None and value > limit:
        raise _bad(where, name, value, f"is over the limit of {limit} (llava_next.config.LIMITS)")


def _check_float(where: str, raw: dict, name: str, positive: bool = True) -> None:
    value = raw.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            positive and value <= 0):
        raise _bad(where, name, value, "must be a finite positive number" if positive else "must be a number")


def _check_choice(where: str, raw: dict, name: str, choices) -> None:
    value = raw.get(name)
    if not isinstance(value, str) or value not in choices:
        raise _bad(where, name, value, f"must be one of {', '.join(choices)}")


def check_text(raw: dict) -> None:
    """The decoder fields of a merged text_config dict (defaults applied): a CheckpointError naming the first bad one."""
    w = "text_config."
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings"):
        _check_int(w, raw, name)
    _check_int(w, raw, "num_key_value_heads", optional=True)
    _check_int(w, raw, "head_dim", optional=True)
    _check_choice(w, raw, "hidden_act", TEXT_ACTIVATIONS)
    _check_float(w, raw, "rms_norm_eps")
    heads, kv = raw["num_attention_heads"], raw.get("num_key_value_heads") or raw["num_attention_heads"]
    if heads % kv:
        raise _bad(w, "num_key_value_heads", kv, f"must divide num_attention_heads ({heads})")
    if raw.get("head_dim") is None and raw["hidden_size"] % heads:
        raise _bad(w, "num_attention_heads", heads, f"must divide hidden_size ({raw['hidden_size']})")
    if (raw.get("head_dim") or raw["hidden_size"] // heads) % 2:
        raise _bad(w, "head_dim", raw.get("head_dim") or raw["hidden_size"] // heads, "must be even (rotary)")
    _check_int(w, raw, "sliding_window", optional=True)
    rope = raw.get("rope_parameters") or raw.get("rope_scaling")
    if rope is not None and not isinstance(rope, dict):
        raise _bad(w, "rope_parameters", rope, "must be an object")
    theta = (rope or {}).get("rope_theta", raw.get("rope_theta"))
    if theta is not None:
        _check_float(w, {"rope_theta": theta}, "rope_theta")
    types = raw.get("layer_types")
    if types is not None and (not isinstance(types, (list, tuple)) or len(types) != raw["num_hidden_layers"] or
                              any(t not in ("full_attention", "sliding_attention") for t in types)):
        raise _bad(w, "layer_types", types, "must list 'full_attention'/'sliding_attention' once per layer")


def check_vision(raw: dict) -> None:
    """The CLIP tower fields of a merged vision_config dict: a CheckpointError naming the first bad one."""
    w = "vision_config."
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "image_size", "patch_size"):
        _check_int(w, raw, name)
    _check_int(w, raw, "projection_dim", optional=True)
    _check_choice(w, raw, "hidden_act", VISION_ACTIVATIONS)
    _check_float(w, raw, "layer_norm_eps")
    if raw["hidden_size"] % raw["num_attention_heads"]:
        raise _bad(w, "num_attention_heads", raw["num_attention_heads"],
                   f"must divide hidden_size ({raw['hidden_size']})")
    if raw["patch_size"] > raw["image_size"]:
        raise _bad(w, "patch_size", raw["patch_size"], f"must not exceed image_size ({raw['image_size']})")


def check_pinpoints(pinpoints, where: str = "") -> None:
    """image_grid_pinpoints: a non-empty list of [height, width] pairs of positive integers (capped)."""
    if not isinstance(pinpoints, (list, tuple)) or not pinpoints:
        raise _bad(where, "image_grid_pinpoints", pinpoints, "must be a non-empty list of [height, width] pairs")
    if len(pinpoints) > LIMITS["pinpoints"]:
        raise _bad(where, "image_grid_pinpoints", f"<{len(pinpoints)} pairs>",
                   f"has more than {LIMITS['pinpoints']} pairs")
    for pair in pinpoints:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or any(
                isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= LIMITS["pinpoint_side"] for x in pair):
            raise _bad(where, "image_grid_pinpoints", pair,
                       f"each pinpoint must be [height, width], integers in 1..{LIMITS['pinpoint_side']}")


def check_dtype(value) -> str | None:
    """The checkpoint dtype as a name ("float16", ...), None when absent; a CheckpointError otherwise."""
    if value is None or value == "auto":
        return None
    name = str(value).removeprefix("torch.") if isinstance(value, str) or type(value).__name__ == "dtype" else None
    if name not in CHECKPOINT_DTYPES:
        raise _bad("", "dtype", value, f"must be one of {', '.join(CHECKPOINT_DTYPES)}")
    return name


def check_llava(raw: dict) -> None:
    """The LLaVA-NeXT glue fields of a config.json dict (sub-configs are checked by their own from_dict)."""
    if "projector_hidden_act" in raw:
        _check_choice("", raw, "projector_hidden_act", PROJECTOR_ACTIVATIONS)
    if raw.get("image_grid_pinpoints") is not None:
        check_pinpoints(raw["image_grid_pinpoints"])
    for name in ("image_token_index", "image_token_id"):
        if raw.get(name) is not None:
            _check_int("", raw, name, minimum=0)
    if "image_seq_length" in raw:
        _check_int("", raw, "image_seq_length", optional=True)


class ListTuple(list):
    """An immutable list: a real `list` (transformers' helpers check `isinstance(pinpoints, list)`) that refuses
    every change, hashes like a tuple (safe to share) and compares equal to the same values as a list or tuple."""

    def _frozen(self, *args, **kwargs):
        raise TypeError("config lists are immutable; build a new config with config.replace(...)")

    append = extend = insert = remove = pop = clear = sort = reverse = _frozen
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _frozen

    def __eq__(self, other):
        if isinstance(other, (list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __ne__(self, other):
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self):
        return hash(tuple(self))

    def __reduce__(self):  # pickle / deepcopy rebuild from the items, never through the refused append/extend
        return (ListTuple, (list(self),))

    def __repr__(self):
        return repr(list(self))


def as_list_tuple(value):
    """Lists and tuples (nested) as ListTuple; anything else unchanged."""
    if isinstance(value, (list, tuple)):
        return ListTuple(as_list_tuple(v) for v in value)
    return value


def _jsonable(value):
    """Tuples (ListTuple included) as lists, recursively: what transformers' to_dict gives."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _split(cls, raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Known dataclass fields of `cls` in `raw`, and everything else (kept as `extra`)."""
    names = {f.name for f in fields(cls)}
    known = {k: v for k, v in raw.items() if k in names and k != "extra"}
    extra = {k: v for k, v in raw.items() if k not in names and k not in _TRANSFORMERS_ONLY_KEYS}
    return known, extra


@dataclass(frozen=True)
class TextConfig:
    """Decoder (Llama, Mistral or Qwen2) hyper-parameters, HF names."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    attention_bias: bool = False  # llama: bias on q/k/v/o; qwen2: always bias on q/k/v only
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TextConfig":
        raw = dict(raw)
        model_type = raw.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"unsupported text model_type {model_type!r}: expected llama, mistral or qwen2")
        merged = {**DEFAULTS[model_type], **raw, "model_type": model_type}
        check_text(merged)  # before anything below (or the model) is built from these values
        # RoPE: the newer `rope_parameters`, else legacy `rope_scaling` + `rope_theta` (as transformers merges them).
        rope = dict(merged.pop("rope_parameters", None) or merged.pop("rope_scaling", None) or {})
        merged.pop("rope_scaling", None)
        rope.setdefault("rope_theta", merged.pop("rope_theta"))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        if rope["rope_type"] in ("llama3", "yarn", "longrope") and "original_max_position_embeddings" not in rope:
            rope["original_max_position_embeddings"] = merged.get("original_max_position_embeddings")
        merged["rope_parameters"] = rope
        if merged.get("num_key_value_heads") is None:
            merged["num_key_value_heads"] = merged["num_attention_heads"]
        if merged.get("head_dim") is None:
            merged["head_dim"] = merged["hidden_size"] // merged["num_attention_heads"]
        n_layers = merged["num_hidden_layers"]
        if model_type == "qwen2":
            if not merged.pop("use_sliding_window", False):
                merged["sliding_window"] = None
            window_from = merged.pop("max_window_layers", 28)
            if not merged.get("layer_types"):
                merged["layer_types"] = [
                    "sliding_attention" if merged["sliding_window"] is not None and i >= window_from
                    else "full_attention" for i in range(n_layers)
                ]
        if not merged.get("layer_types"):
            kind = "sliding_attention" if merged.get("sliding_window") is not None else "full_attention"
            merged["layer_types"] = [kind] * n_layers
        merged["layer_types"] = as_list_tuple(merged["layer_types"])
        known, extra = _split(cls, merged)
        return cls(**known, extra=extra)

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    def layer_window(self, layer: int) -> int | None:
        """Sliding-window size of one layer, None for full attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


@dataclass(frozen=True)
class VisionConfig:
    """CLIP vision tower hyper-parameters, HF names (`clip_vision_model`)."""

    model_type: str = "clip_vision_model"
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "VisionConfig":
        if raw is None:
            raw = dict(LLAVA_NEXT_VISION_DEFAULTS)
        model_type = raw.get("model_type", "clip_vision_model")
        if model_type != "clip_vision_model":
            raise ValueError(f"unsupported vision model_type {model_type!r}: expected clip_vision_model")
        merged = {**DEFAULTS["clip_vision_model"], **raw, "model_type": model_type}
        check_vision(merged)
        known, extra = _split(cls, merged)
        return cls(**known, extra=extra)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        """Patches per tile plus the CLS token."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class LlavaNextConfig:
    """The whole model: text and vision configs plus the LLaVA-NeXT glue (projector, anyres, image token)."""

    text_config: TextConfig = field(default_factory=TextConfig)
    vision_config: VisionConfig = field(default_factory=lambda: VisionConfig.from_dict(None))
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int | tuple[int, ...] = -2
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None  # None: model.anyres.DEFAULT_PINPOINTS
    image_seq_length: int = 576
    pad_token_id: int | None = None
    dtype: str | None = None  # the checkpoint's dtype ("float16", ...), used by dtype="auto"
    model_type: str = "llava_next"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        # transformers accepts sub-configs as dicts, and list-valued fields as lists
        if isinstance(self.text_config, dict):
            object.__setattr__(self, "text_config", TextConfig.from_dict(self.text_config))
        if isinstance(self.vision_config, dict):
            object.__setattr__(self, "vision_config", VisionConfig.from_dict(self.vision_config))
        if self.image_grid_pinpoints is None:
            from llava_next.model.anyres import DEFAULT_PINPOINTS  # pure arithmetic; never at import time

            object.__setattr__(self, "image_grid_pinpoints", DEFAULT_PINPOINTS)
        check_pinpoints(self.image_grid_pinpoints)
        object.__setattr__(self, "image_grid_pinpoints", as_list_tuple(self.image_grid_pinpoints))
        if isinstance(self.vision_feature_layer, (list, tuple)):
            object.__setattr__(self, "vision_feature_layer", as_list_tuple(self.vision_feature_layer))
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' or 'full', got {self.vision_feature_select_strategy!r}"
            )
        layers = self.vision_feature_layers
        if not layers or not all(isinstance(layer, int) and not isinstance(layer, bool) for layer in layers):
            raise ValueError(f"vision_feature_layer must be an int or a list of ints, got {self.vision_feature_layer!r}")
        n = self.vision_config.num_hidden_layers
        for layer in layers:
            if not -(n + 1) <= layer <= n:
                raise ValueError(f"vision_feature_layer {layer} is outside the tower's {n} layers (hidden states 0..{n})")

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], **overrides) -> "LlavaNextConfig":
        """From a config.json dict; `overrides` (config fields, as `from_pretrained` kwargs) replace its values."""
        raw = _with_overrides(dict(raw), overrides)
        instances = {k: raw.pop(k) for k in ("text_config", "vision_config")
                     if isinstance(raw.get(k), (TextConfig, VisionConfig))}
        if instances:
            return replace(cls.from_dict(raw), **instances)
        if raw.get("model_type", "llava_next") != "llava_next":
            raise ValueError(f"not a LLaVA-NeXT config: model_type is {raw.get('model_type')!r}")
        for sub in ("text_config", "vision_config"):
            if raw.get(sub) is not None and not isinstance(raw[sub], dict):
                raise _bad("", sub, raw[sub], "must be an object")
        check_llava(raw)
        text = TextConfig.from_dict(raw.pop("text_config", None) or {})
        vision = VisionConfig.from_dict(raw.pop("vision_config", None))
        dtype = raw.pop("dtype", None) or raw.pop("torch_dtype", None)
        raw.pop("torch_dtype", None)
        dtype = check_dtype(dtype)
        if "image_token_id" in raw and "image_token_index" not in raw:
            raw["image_token_index"] = raw.pop("image_token_id")
        if raw.get("image_grid_pinpoints") is None:
            raw.pop("image_grid_pinpoints", None)
        known, extra = _split(cls, raw)  # text_config, vision_config and dtype were popped from raw above
        return cls(text_config=text, vision_config=vision, dtype=dtype, **known, extra=extra)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, return_unused_kwargs: bool = False,
                        **kwargs) -> "LlavaNextConfig":
        """Read config.json from a local folder or a hub id; kwargs naming config fields override it.

        As transformers: `vision_feature_layer=-3`, `text_config={"rope_theta": ...}` (a dict updates the
        sub-config, a TextConfig/VisionConfig replaces it), `dtype=`. Other names are a TypeError, or with
        `return_unused_kwargs=True` come back as `(config, unused)`.
        """
        from llava_next.loading.hub import read_config  # the files are loading/'s: never at import time

        overrides = pop_config_overrides(kwargs)
        raw, unused = read_config(name_or_path, kwargs, return_unused_kwargs, f"{cls.__name__}.from_pretrained")
        config = cls.from_dict(raw, **overrides)
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        """Every field, sub-configs as dicts, list-valued fields as lists (as transformers' to_dict)."""
        out = asdict(self)
        for sub in ("text_config", "vision_config"):
            out[sub].update(out[sub].pop("extra"))
        out.update(out.pop("extra"))
        return _jsonable(out)

    def to_json_string(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes) -> "LlavaNextConfig":
        return replace(self, **changes)

    # -- derived facts ------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.image_token_index

    @property
    def vision_feature_layers(self) -> tuple[int, ...]:
        layer = self.vision_feature_layer
        return tuple(layer) if isinstance(layer, (list, tuple)) else (layer,)

    @property
    def geometry(self):
        """The model.anyres.AnyresGeometry of this config (imported when asked: config imports nothing above it)."""
        from llava_next.model.anyres import AnyresGeometry

        return AnyresGeometry(self.image_grid_pinpoints, self.vision_config.image_size, self.vision_config.patch_size)

    def get_text_config(self) -> TextConfig:
        return self.text_config


_dataclass_init = LlavaNextConfig.__init__


def _init_with_aliases(self, *args, image_token_id=None, **kwargs):
    """transformers' attribute_map: `image_token_id` is another name of `image_token_index`."""
    if image_token_id is not None:
        if kwargs.get("image_token_index", image_token_id) != image_token_id:
            raise ValueError("image_token_id and image_token_index (the same field) differ; give one")
        kwargs["image_token_index"] = image_token_id
    _dataclass_init(self, *args, **kwargs)


_init_with_aliases.__doc__ = _dataclass_init.__doc__
LlavaNextConfig.__init__ = _init_with_aliases
ATTRIBUTE_MAP = {"image_token_id": "image_token_index"}
LlavaNextConfig.attribute_map = ATTRIBUTE_MAP  # transformers' class attribute of the same name
# Run-time switches training libraries set on `model.config` (Trainer: `config.use_cache = args.use_cache`);
# they change no math, so they may be set on the otherwise frozen config. Not serialised.
RUNTIME_SWITCHES = {"use_cache": True}
for _name, _default in RUNTIME_SWITCHES.items():
    setattr(LlavaNextConfig, _name, _default)
_frozen_setattr = LlavaNextConfig.__setattr__


def _setattr(self, name, value):
    """Fields stay frozen (use `config.replace(...)`); only RUNTIME_SWITCHES may be set."""
    if name in RUNTIME_SWITCHES:
        object.__setattr__(self, name, value)
    else:
        _frozen_setattr(self, name, value)


LlavaNextConfig.__setattr__ = _setattr

# Names `from_pretrained` may override (transformers: any attribute of the config), and the dtype spellings.
CONFIG_OVERRIDES = frozenset({f.name for f in fields(LlavaNextConfig)} - {"extra", "model_type", "dtype"}
                             | {"image_token_id", "dtype", "torch_dtype"})


def pop_config_overrides(kwargs: dict) -> dict:
    """Take the config-field kwargs (`CONFIG_OVERRIDES`) out of a `from_pretrained` call's kwargs."""
    return {k: kwargs.pop(k) for k in list(kwargs) if k in CONFIG_OVERRIDES}


def _with_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A config.json dict with `from_pretrained` overrides applied (a sub-config dict updates the file's one)."""
    unknown = sorted(set(overrides) - CONFIG_OVERRIDES)
    if unknown:
        raise TypeError(f"unknown LlavaNextConfig field(s) {', '.join(map(repr, unknown))}; "
                        f"known: {', '.join(sorted(CONFIG_OVERRIDES))}")
    for key, value in overrides.items():
        if key in ("dtype", "torch_dtype"):
            if value is not None and value != "auto":
                raw.pop("torch_dtype", None)
                raw["dtype"] = str(value).removeprefix("torch.")
        elif key == "image_token_id":
            raw.pop("image_token_id", None)
            raw["image_token_index"] = value
        elif key in ("text_config", "vision_config") and isinstance(value, dict):
            base = dict(raw.get(key) or ({} if key == "text_config" else LLAVA_NEXT_VISION_DEFAULTS))
            if "num_hidden_layers" in value and "layer_types" not in value:
                base.pop("layer_types", None)  # derived from the layer count; rebuilt for the new one
            if "rope_theta" in value and isinstance(base.get("rope_parameters"), dict):
                base["rope_parameters"] = {**base["rope_parameters"], "rope_theta": value["rope_theta"]}
            raw[key] = {**base, **value}
        elif key in ("text_config", "vision_config"):
            expected = TextConfig if key == "text_config" else VisionConfig
            if not isinstance(value, expected):
                raise TypeError(f"{key} must be a dict or a {expected.__name__}, got {type(value).__name__}")
            raw[key] = value
        else:
            if key == "image_token_index":
                raw.pop("image_token_id", None)
            raw[key] = value
    return raw
