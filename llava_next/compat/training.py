"""The hooks training libraries call on a transformers model, for LlavaNextForConditionalGeneration.

PEFT (`get_peft_model`, `prepare_model_for_kbit_training`, LoRA's tied-embedding checks) and transformers'
`Trainer` duck-type the model: they read `supports_gradient_checkpointing`, `main_input_name`,
`_no_split_modules`, `base_model_prefix`, `config.use_cache` (set), `name_or_path`, and call
`gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)` (transformers 5: `activation_checkpointing_*`,
`is_activation_checkpointing`), `enable_input_require_grads`, `get/set_input_embeddings`,
`get/set_output_embeddings`, `tie_weights`, `resize_token_embeddings`, `prepare_inputs_for_generation`,
`num_parameters`, `save_pretrained`, `push_to_hub`. `TrainingHooks` implements them over the model's own
modules; activation checkpointing itself lives in model/layers.Checkpointed (the decoder and vision stacks).

New embedding rows follow transformers' `_init_added_embeddings_weights_with_mean` (a multivariate normal with
the old rows' mean and 1e-9 x their covariance, or the mean when that is not positive definite), drawn in the
same order (embeddings, then lm_head), so the same seed gives the same rows.

`train()` / `eval()`: transformers 5.23's LlavaNextModel changes nothing in the image-feature merge between the
modes (features are scattered into the placeholder positions, whatever the padding side), and neither does ours;
the tests check train-mode parity on right-padded batches.

Leaves out: DeepSpeed ZeRO-3 gathering, resizing a quantized embedding (refused), every_n_layers offload.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from llava_next.errors import ModelInputError

# The image placeholder is an input id like any other: the keys a batch may carry into forward().
MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "pixel_values", "image_sizes")


def _stacks(model: nn.Module) -> list[nn.Module]:
    """The layer stacks that can checkpoint (model/layers.Checkpointed): the decoder and the vision encoder."""
    return [m for m in model.modules() if hasattr(m, "checkpoint_kwargs")]


def _mean_rows(old: torch.Tensor, added: int) -> torch.Tensor:
    """`added` rows drawn as transformers draws them: N(mean, 1e-9 * covariance) of the old rows (fp32)."""
    weight = old.detach().float()  # (V_old, D)
    mean = weight.mean(dim=0)
    centred = weight - mean
    covariance = centred.T @ centred / weight.shape[0]  # (D, D)
    scaled = 1e-9 * covariance
    if torch.distributions.constraints.positive_definite.check(scaled).all():
        rows = torch.distributions.MultivariateNormal(mean, covariance_matrix=scaled).sample((added,))
    else:
        rows = mean[None, :].repeat(added, 1)
    return rows.to(old.dtype)  # (added, D)


class TrainingHooks:
    """Mixed into compat/modeling.LlavaNextForConditionalGeneration (needs `.model`, `.lm_head`, `.config`)."""

    supports_gradient_checkpointing = True
    main_input_name = "input_ids"
    model_input_names: ClassVar[list[str]] = list(MODEL_INPUT_NAMES)
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "CLIPEncoderLayer"]
    _keys_to_ignore_on_save = None
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    # -- activation checkpointing --------------------------------------------------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False):
        """Recompute layer activations in the backward pass (train mode only); kwargs go to
        torch.utils.checkpoint.checkpoint (default `use_reentrant=False`, as transformers)."""
        if offload:
            raise ValueError("activation checkpointing with offload=True is not supported")
        if not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
        kwargs = {"use_reentrant": False} if activation_checkpointing_kwargs is None else dict(activation_checkpointing_kwargs)
        for stack in _stacks(self):
            stack.gradient_checkpointing, stack.checkpoint_every, stack.checkpoint_kwargs = True, every_n_layers, kwargs
        self.enable_input_require_grads()  # as transformers: main_input_name is input_ids

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self):
        for stack in _stacks(self):
            stack.gradient_checkpointing = False

    def gradient_checkpointing_disable(self):
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(stack.gradient_checkpointing for stack in _stacks(self))

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    # -- input gradients (adapters with frozen embeddings, reentrant checkpointing) ---------------------------
    def enable_input_require_grads(self):
        """Make the token embeddings' output require grad, so gradients reach adapters below checkpoints."""
        self.disable_input_require_grads()

        def require_grads(module, inputs, output):
            output.requires_grad_(True)

        self._require_grads_hooks = [self.get_input_embeddings().register_forward_hook(require_grads)]

    def disable_input_require_grads(self):
        for hook in getattr(self, "_require_grads_hooks", []):
            hook.remove()
        self._require_grads_hooks = []

    # -- embeddings -----------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.language_model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear):
        self.lm_head = value

    @property
    def ties_embeddings(self) -> bool:
        return bool(self.config.tie_word_embeddings or self.config.text_config.tie_word_embeddings)

    def tie_weights(self, missing_keys=None, recompute_mapping: bool = True):
        """lm_head shares the token embedding matrix when the config ties them (transformers' rule)."""
        if self.ties_embeddings:
            self.lm_head.weight = self.get_input_embeddings().weight

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """transformers' resize: rows kept, new rows mean-initialised (see the module docstring), lm_head
        resized the same way, ties restored, `config.text_config.vocab_size` updated."""
        old = self.get_input_embeddings()
        if pad_to_multiple_of is not None:
            if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
                raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
            base = old.weight.shape[0] if new_num_tokens is None else new_num_tokens
            new_num_tokens = -(-base // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens is None:
            return old
        if not isinstance(new_num_tokens, int) or new_num_tokens < 1:
            raise ValueError(f"new_num_tokens must be a positive integer, got {new_num_tokens!r}")
        if type(old) is not nn.Embedding or type(self.lm_head) is not nn.Linear or self.lm_head.bias is not None:
            raise ModelInputError("resize_token_embeddings needs a plain nn.Embedding and a bias-free nn.Linear "
                                  "lm_head (quantized or adapter-wrapped layers cannot be resized)")
        if new_num_tokens != old.weight.shape[0]:
            self.set_input_embeddings(self._resized(old, new_num_tokens, mean_resizing, nn.Embedding))
            self.set_output_embeddings(self._resized(self.lm_head, new_num_tokens, mean_resizing, nn.Linear))
            self._set_vocab_size(new_num_tokens)
            self.tie_weights()
        return self.get_input_embeddings()

    def _resized(self, old: nn.Module, rows: int, mean_resizing: bool, kind) -> nn.Module:
        """A new Embedding / Linear with `rows` rows: old rows copied, new ones initialised as transformers."""
        weight = old.weight  # (V_old, D)
        n_old, dim = weight.shape
        with torch.no_grad():
            if kind is nn.Embedding:
                new = nn.Embedding(rows, dim, device=weight.device, dtype=weight.dtype)
            else:
                new = nn.Linear(dim, rows, bias=False, device=weight.device, dtype=weight.dtype)
            if rows > n_old and mean_resizing:
                new.weight[n_old:] = _mean_rows(weight, rows - n_old)
            elif rows > n_old:
                new.weight[n_old:].normal_(0.0, self.config.text_config.initializer_range)
            keep = min(rows, n_old)
            new.weight[:keep] = weight[:keep]
        new.requires_grad_(weight.requires_grad)
        return new

    def _set_vocab_size(self, vocab_size: int):
        """The frozen configs are replaced (model, core and decoder share them), and generation state dropped."""
        text = dataclasses.replace(self.config.text_config, vocab_size=vocab_size)
        config = self.config.replace(text_config=text)
        self.config = self.model.config = config
        self.model.language_model.config = text
        if getattr(self, "_runner", None) is not None:
            self._runner.release()
            self._runner = None

    # -- what PEFT, Trainer and generation helpers read ------------------------------------------------------
    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (tied ones once); bitsandbytes 4-bit weights count two values per byte."""
        skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        total = 0
        for p in self.parameters():  # parameters() yields a shared tensor once
            if id(p) in skip or (only_trainable and not p.requires_grad):
                continue
            total += p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
        return total

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, pixel_values=None, image_sizes=None, **kwargs) -> dict:
        """The forward() inputs of one generation step: the whole prompt with its images on the first step;
        with a cache, only the last token and no images (the features are already in the cache)."""
        first = past_key_values is None
        inputs = {"attention_mask": attention_mask}
        if inputs_embeds is not None and first:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids if first else input_ids[:, -1:]
        if first:
            inputs.update(pixel_values=pixel_values, image_sizes=image_sizes)
        inputs.update({k: v for k, v in kwargs.items() if k in ("position_ids", "logits_to_keep")})
        return inputs

    def save_pretrained(self, save_directory, **kwargs):
        """transformers' layout: config.json, generation_config.json, safetensors shards (loading/saving.py)."""
        from llava_next.loading.saving import save_pretrained

        return save_pretrained(self, save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """save_pretrained into a temporary folder, then one commit to the hub (huggingface_hub)."""
        from llava_next.loading.saving import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)
