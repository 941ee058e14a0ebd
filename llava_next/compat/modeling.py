"""The transformers-shaped model classes over model/llava_next.py: input checks, caches, outputs, loss, generate.

`LlavaNextModel` (-> last_hidden_state) and `LlavaNextForConditionalGeneration` (-> logits, loss; `generate`)
mirror transformers. `embed()` is where images stop: it turns input_ids + pixel_values into inputs_embeds
(through the image-feature cache), so the decoder and the decode loop only see embeddings. Parameter names
follow the newer transformers layout (`model.language_model.*`, `model.vision_tower.*`, `lm_head.*`);
loading/weights.py maps the hub layouts onto it.

Each model object owns its generation state, created in __init__: the image-feature cache, the runner generate()
decodes on (compat/paged_rows.py: the engine's ModelRunner over a paged pool, built on first use for the device) and `generation_lock`, a per-model lock that
serialises generate() calls on this model (two models generate concurrently; one model, one call at a time).

Leaves out: a KV cache through forward() (generate() keeps its own), returning attention weights.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from llava_next.compat.generation_config import GenerationConfig
from llava_next.config import LlavaNextConfig
from llava_next.errors import ImageTokenMismatchError, ModelInputError
from llava_next.compat.input_checks import check_inputs
from llava_next.compat.training import TrainingHooks
from llava_next.engine.encoder_cache import EncoderCache
from llava_next.engine.prepare import mm_hash
from llava_next.compat.generate import generate
from llava_next.compat.paged_rows import GenerateRunner
from llava_next.compat.outputs import ModelOutput
from llava_next.loading.placement import check_available
from llava_next.loading.pretrained import load_pretrained
from llava_next.model.attention import DenseAttention
from llava_next.model.llava_next import LlavaNextCore, WithLMHead
from llava_next.model.stamp import weights_stamp
from llava_next.preprocess.prompt import check_pixel_values, image_sizes_as_ints


# forward() keyword arguments beyond its named parameters (transformers' TransformersKwargs we understand).
FORWARD_OPTIONS = ("num_items_in_batch", "output_attentions")
FEATURE_CACHE_TOKENS = 16384  # image feature rows the model keeps (about 6 large anyres images)


class _CheckedMoves:
    """`.to(device)` / `.cuda()` refuse a device this machine lacks with one clear DeviceUnavailableError
    (torch would raise an AssertionError from deep inside) before anything moves."""

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            check_available(device, f".to({str(device)!r}) asks for {device}")
        return super().to(*args, **kwargs)

    def cuda(self, device=None):
        check_available(torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda"),
                        ".cuda() asks for a CUDA device")
        return super().cuda(device)


def _load(cls, name_or_path, kwargs):
    """load_pretrained, with transformers' tensor-parallel options (`tp_plan="auto"`, `tp_size=N`): under
    torch.distributed.run each rank builds its shard of the decoder and reads only its slices (parallel/)."""
    tp_plan, tp_size = kwargs.pop("tp_plan", None), kwargs.pop("tp_size", None)
    if tp_plan is None and tp_size is None:
        return load_pretrained(cls, name_or_path, **kwargs)
    from llava_next.parallel.loading import ShardedLoad
    from llava_next.parallel.tensor_parallel import from_env

    tp = from_env(tp_plan or "auto", tp_size)
    model, generation = load_pretrained(cls, name_or_path, tensor_parallel=ShardedLoad(tp), **kwargs)
    if hasattr(model, "tensor_parallel"):
        model.tensor_parallel = tp
    return model, generation


def _trainable(model):
    """As transformers: every floating-point parameter loads trainable (quantized weights stay frozen). The
    inference paths (generate, the engine) run under torch.inference_mode, so this costs them nothing."""
    for p in model.parameters():
        if p.is_floating_point() and type(p) is torch.nn.Parameter:
            p.requires_grad_(True)
    return model


class LlavaNextModel(_CheckedMoves, LlavaNextCore):
    """Vision tower + projector + image_newline + decoder; forward returns `last_hidden_state`."""

    def __init__(self, config: LlavaNextConfig):
        super().__init__(config)
        # Packed features of recently seen images, by content hash (the engine's cache). Never a parameter.
        self.feature_cache = EncoderCache(FEATURE_CACHE_TOKENS)

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs) -> "LlavaNextModel":
        """transformers' from_pretrained (loading/pretrained.py); the base model keeps no generation config."""
        return _trainable(_load(cls, name_or_path, kwargs)[0])

    # -- input checks -------------------------------------------------------------------------------------
    def check_inputs(self, input_ids=None, attention_mask=None, pixel_values=None, image_sizes=None,
                     inputs_embeds=None, position_ids=None) -> None:
        """Refuse malformed model inputs before any work (compat/input_checks.py)."""
        check_inputs(self, input_ids, attention_mask, pixel_values, image_sizes, inputs_embeds, position_ids)

    def _check_overrides(self, vision_feature_layer, vision_feature_select_strategy):
        requested = (vision_feature_layer,) if isinstance(vision_feature_layer, int) else vision_feature_layer
        if requested is not None and tuple(requested) != self.config.vision_feature_layers:
            raise ValueError("vision_feature_layer differs from the config the tower was built for; set it in the config")
        if vision_feature_select_strategy not in (None, self.config.vision_feature_select_strategy):
            raise ValueError("vision_feature_select_strategy differs from the config; set it in the config")

    def get_image_features(self, pixel_values: torch.Tensor, image_sizes, vision_feature_layer=None,
                           vision_feature_select_strategy=None, **_) -> list[torch.Tensor]:
        """Packed features per image: a list of (tokens_i, D) tensors, tokens_i from anyres.num_image_tokens."""
        self._check_overrides(vision_feature_layer, vision_feature_select_strategy)
        sizes = image_sizes_as_ints(image_sizes)
        tiles = check_pixel_values(self.geometry, self.config.vision_config, pixel_values, sizes)
        if pixel_values.dim() == 5:  # drop the zero tiles that pad each image to max_tiles
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, tiles)], dim=0)
        per_image = pixel_values.split(tiles, dim=0)
        # The cache serves inference only: under autograd, features must stay connected to the tower.
        cache = None if torch.is_grad_enabled() else self.feature_cache
        keys: list[str | None] = [None] * len(sizes)
        if cache is not None:
            cache.check_weights(weights_stamp(self.vision_tower, self.multi_modal_projector, self.image_newline))
            keys = [mm_hash(t, size) for t, size in zip(per_image, sizes)]
        packed: list[torch.Tensor | None] = [None if k is None else cache.get(k) for k in keys]
        missing = [i for i, p in enumerate(packed) if p is None]
        if missing:  # one tower pass over every tile of every image not seen before
            todo = torch.cat([per_image[i] for i in missing]) if len(missing) < len(sizes) else pixel_values
            for i, features in zip(missing, self.encode_images(todo, [sizes[i] for i in missing])):
                packed[i] = features
                if cache is not None:
                    cache.put(keys[i], features.detach())
        return packed

    def embed(self, input_ids=None, pixel_values=None, image_sizes=None, inputs_embeds=None,
              image_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings with every image placeholder replaced by its image feature: (B, T, D)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        embeds = self.language_model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        has_pixels = pixel_values is not None and pixel_values.shape[0] > 0
        if image_features is None and has_pixels:
            if image_sizes is None:
                raise ValueError("pixel_values were given without image_sizes")
            image_features = self.get_image_features(pixel_values, image_sizes)
        if input_ids is not None:
            placeholders = input_ids == self.config.image_token_index  # (B, T)
        else:
            token = self.language_model.embed_tokens.weight[self.config.image_token_index]
            placeholders = (embeds == token).all(-1)
        n_placeholders = int(placeholders.sum())
        n_features = sum(f.shape[0] for f in image_features) if image_features else 0
        if n_placeholders != n_features:
            raise ImageTokenMismatchError(
                f"Image features and image tokens do not match: {n_placeholders} image tokens in the prompt, "
                f"{n_features} image features from {len(image_features or [])} image(s)"
            )
        return self.merge(embeds, placeholders, image_features) if n_features else embeds

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, vision_feature_layer=None,
                vision_feature_select_strategy=None, use_cache=None, output_hidden_states=None, return_dict=None,
                **kwargs) -> ModelOutput | tuple:
        """last_hidden_state (B, T, D); with output_hidden_states, transformers' `hidden_states`: the embeddings,
        then every layer's output, the last one after the final norm. A tuple with return_dict=False.

        No KV cache is kept or taken (`past_key_values` is refused, `use_cache` changes nothing): generate()
        holds its own."""
        _check_forward_options(past_key_values, kwargs)
        self._check_overrides(vision_feature_layer, vision_feature_select_strategy)
        self.check_inputs(input_ids, attention_mask, pixel_values, image_sizes, inputs_embeds, position_ids)
        embeds = self.embed(input_ids, pixel_values, image_sizes, inputs_embeds)
        B, T, _ = embeds.shape
        if attention_mask is not None:
            attention_mask = attention_mask.to(embeds.device)
        if position_ids is None:
            # matches HF: forward() numbers every position 0..T-1, padding included (only generate() derives
            # positions from the mask); RoPE is relative, so real tokens differ from the row alone by rounding.
            position_ids = torch.arange(T, device=embeds.device).expand(B, T)
        # An all-ones mask is no mask: the kernel then runs plain causal attention, as transformers' SDPA path does.
        key_valid = attention_mask.bool() if attention_mask is not None and not bool(attention_mask.all()) else None
        hidden_states = [] if output_hidden_states else None
        meta = DenseAttention(self.language_model.windows, T, key_valid, embeds.device)
        hidden = self.language_model(embeds, position_ids, meta, hidden_states=hidden_states)
        out = ModelOutput(last_hidden_state=hidden, hidden_states=tuple(hidden_states) if hidden_states else None)
        return out.to_tuple() if return_dict is False else out

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens


def _check_forward_options(past_key_values, kwargs: dict) -> None:
    """Refuse what forward() cannot honour instead of ignoring it: a KV cache, attention weights, unknown names."""
    if past_key_values is not None:
        raise ModelInputError("past_key_values is not supported: forward() keeps no KV cache, so manual decode "
                              "loops cannot continue from one; use model.generate(), which manages its own cache")
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in FORWARD_OPTIONS)
    if unknown:
        raise ModelInputError(f"forward() got arguments it does not use: {unknown} (check for typos)")
    if kwargs.get("output_attentions"):
        raise ModelInputError("output_attentions=True is not supported: attention runs in fused kernels that never "
                              "form the attention weights")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross-entropy in fp32, -100 ignored (transformers' ForCausalLMLoss): the mean over counted
    tokens, or with num_items_in_batch (gradient accumulation) their sum divided by it."""
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100,
                           reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


class LlavaNextForConditionalGeneration(_CheckedMoves, TrainingHooks, WithLMHead):
    """LlavaNextModel + lm_head; forward returns logits (and loss with labels); `generate` decodes."""

    core = LlavaNextModel

    def __init__(self, config: LlavaNextConfig):
        super().__init__(config)
        self.generation_config = GenerationConfig()
        self.generation_lock = threading.Lock()  # serialises generate() on this model (see the module docstring)
        self._runner: GenerateRunner | None = None
        self.tensor_parallel = None  # parallel.tensor_parallel.TensorParallel when loaded with tp_plan / tp_size
        self._require_grads_hooks: list = []  # enable_input_require_grads (compat/training.py)

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs) -> "LlavaNextForConditionalGeneration":
        """transformers' from_pretrained (loading/pretrained.py), with the checkpoint's generation_config.json."""
        model, generation = _load(cls, name_or_path, kwargs)
        model.generation_config = GenerationConfig(**(generation or {}))
        return _trainable(model)

    def get_image_features(self, pixel_values, image_sizes, **kwargs) -> list[torch.Tensor]:
        return self.model.get_image_features(pixel_values, image_sizes, **kwargs)

    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, vision_feature_layer=None,
                vision_feature_select_strategy=None, labels=None, use_cache=None, logits_to_keep=0,
                output_hidden_states=None, return_dict=None, num_items_in_batch=None, **kwargs) -> ModelOutput | tuple:
        """logits (B, T_kept, V), loss with labels, hidden_states with output_hidden_states (as LlavaNextModel).

        return_dict=False: the same fields as a tuple (loss first when labels are given, then logits); unlike
        transformers there is no past_key_values entry, so hidden_states comes right after the logits."""
        out = self.model(input_ids, pixel_values, image_sizes, attention_mask, position_ids, past_key_values,
                         inputs_embeds, vision_feature_layer, vision_feature_select_strategy,
                         output_hidden_states=output_hidden_states, **kwargs)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            kept = hidden[:, logits_to_keep]
        logits = self.lm_head(kept)  # (B, T_kept, V)
        loss = causal_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        out = ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return out.to_tuple() if return_dict is False else out

    def decode_runner(self, **settings) -> GenerateRunner:
        """This model's generate() runner (the engine's ModelRunner over a paged KV pool, CUDA-graph decode
        buckets), built on first use and again after a move to another device type. With settings (`mode=`,
        `screen_head=`: GenerateRunner's), a new runner with them replaces the current one."""
        if settings or self._runner is None or self._runner.device_type != self.device.type:
            if self._runner is not None:
                self._runner.release()
            self._runner = GenerateRunner(self, **settings)
        return self._runner

    def generate(self, input_ids=None, **kwargs):
        """transformers' generate (compat/generate.py; beam search with num_beams > 1)."""
        if self.tensor_parallel is not None:
            self.tensor_parallel.sync_rng(kwargs.get("generator"))  # every rank samples rank 0's draws
        return generate(self, input_ids=input_ids, **kwargs)
