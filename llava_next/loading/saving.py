"""save_pretrained / push_to_hub: the folder transformers 5 writes for LlavaNextForConditionalGeneration.

Files: config.json (our config as a dict, plus `architectures` and the weights' `dtype`), generation_config.json,
and the weights as safetensors (`{"format": "pt"}` metadata): one `model.safetensors`, or shards
`model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` (`metadata.total_size`,
`metadata.total_parameters`, `weight_map`) when they exceed `max_shard_size` (split by huggingface_hub, as
transformers does). Keys are the original layout transformers writes (`language_model.model.*`,
`language_model.lm_head.*`, `vision_tower.*`, `multi_modal_projector.*`, `image_newline`); fused projections
(qkv_proj, gate_up_proj) are written back as their parts; a tied lm_head is left out, as transformers leaves it.

Leaves out: the CLIP layers above the deepest feature layer and the tower's post_layernorm, which the model
never builds (transformers loads such a folder with those reported missing and freshly initialised: they feed
nothing, so logits are unchanged); bitsandbytes-quantized weights (a SaveError: our loader refuses
pre-quantized checkpoints, so such a folder could not come back); a model with PEFT adapter layers still in
(a SaveError: save the adapter, or merge_and_unload first); pickle (`safe_serialization=False`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from llava_next.errors import SaveError

# canonical (in-memory) prefix -> the prefix transformers 5 writes; first match wins
SAVED_PREFIXES = [
    ("lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
]
_FUSED = re.compile(r"^(.*)\.(qkv_proj|gate_up_proj)\.(weight|bias)$")


def saved_name(name: str, base_model: bool = False) -> str:
    """Our parameter name -> the checkpoint key transformers writes for it."""
    if base_model:
        name = "model." + name
    for prefix, replacement in SAVED_PREFIXES:
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    raise SaveError(f"no checkpoint key for parameter {name!r}")


def _unfused(name: str, tensor: torch.Tensor, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A fused projection back to the parts the checkpoint names (q/k/v, gate/up); anything else as it is."""
    match = _FUSED.match(name)
    if match is None:
        return [(name, tensor)]
    owner, kind, leaf = match.groups()
    module = model.get_submodule(owner)
    if kind == "qkv_proj":
        sizes = [module.heads * module.head_dim] + [module.kv_heads * module.head_dim] * 2
        parts = ("q_proj", "k_proj", "v_proj")
    else:
        sizes, parts = [module.intermediate] * 2, ("gate_proj", "up_proj")
    return [(f"{owner}.{part}.{leaf}", piece) for part, piece in zip(parts, tensor.split(sizes, dim=0))]


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors transformers would write, under its keys, contiguous on the CPU (a tied lm_head left out)."""
    quantized = sorted(n for n, m in model.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
    if quantized:
        raise SaveError(
            f"cannot save a bitsandbytes-quantized model ({len(quantized)} quantized layers, e.g. {quantized[0]}): "
            "pre-quantized checkpoints cannot be loaded back by llava_next; save the unquantized model and "
            "quantize at load time with quantization_config=")
    adapted = [n for n, _ in model.named_parameters() if ".base_layer." in n or ".lora_" in n]
    if adapted:
        raise SaveError(f"the model holds adapter layers ({adapted[0]}, ...): save the adapter with the PEFT model's "
                        "save_pretrained, or merge it first (peft_model.merge_and_unload()) to save a full model")
    base_model = not hasattr(model, "lm_head")
    embed = (model.language_model if base_model else model.model.language_model).embed_tokens.weight
    state = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name == "lm_head.weight" and param is embed:
            continue  # tied: transformers writes the embedding only
        for part, tensor in _unfused(name, param, model):
            state[saved_name(part, base_model)] = tensor.detach().to("cpu").contiguous()
    return state


def _config_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict:
    config = model.config.to_dict()
    for sub in ("text_config", "vision_config"):
        if not config[sub].get("layer_types"):
            config[sub].pop("layer_types", None)  # derived from the layer count when absent
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    config["dtype"] = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else config.get("dtype")
    arch = "LlavaNextModel" if not hasattr(model, "lm_head") else "LlavaNextForConditionalGeneration"
    return {"architectures": [arch], **config}


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, max_shard_size: int | str = "50GB",
                    safe_serialization: bool = True, state_dict: dict | None = None, is_main_process: bool = True,
                    push_to_hub: bool = False, **hub_kwargs) -> None:
    """Write `model` as transformers' save_pretrained does (see the module docstring). `state_dict` replaces the
    model's tensors (keys in our or transformers' layout); `push_to_hub=True` then uploads the folder."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    if not safe_serialization:
        raise SaveError("safe_serialization=False (pickle .bin files) is not supported; safetensors only")
    folder = Path(save_directory)
    if folder.is_file():
        raise SaveError(f"save_directory {str(folder)!r} is a file, not a folder")
    if state_dict is not None:
        base_model = not hasattr(model, "lm_head")
        state = {(k if k.startswith(tuple(p for _, p in SAVED_PREFIXES)) else saved_name(k, base_model)):
                 v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    else:
        state = checkpoint_state(model)
    if not is_main_process:
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(_config_dict(model, state), indent=2, sort_keys=True) + "\n",
                                        encoding="utf-8")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    stale = re.compile(r"model-\d{5}-of-\d{5}\.safetensors|model\.safetensors(\.index\.json)?")
    for old in folder.iterdir():  # shards of an earlier save would be read as part of this one
        if stale.fullmatch(old.name) and old.name not in split.filename_to_tensors:
            old.unlink()
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        total_parameters = sum(t.numel() for t in state.values())
        index = {"metadata": {"total_parameters": total_parameters, **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                                              encoding="utf-8")
    if push_to_hub:
        repo_id = hub_kwargs.pop("repo_id", None) or folder.name
        upload_folder(folder, repo_id, **hub_kwargs)


def upload_folder(folder: Path, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                  token: str | bool | None = None, revision: str | None = None, create_pr: bool = False):
    """Create the model repo if needed, then upload `folder` in one commit (huggingface_hub.HfApi)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo, "repo_id", repo_id)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                             commit_message=commit_message or "Upload LlavaNextForConditionalGeneration",
                             create_pr=create_pr)


def push_to_hub(model: nn.Module, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                max_shard_size: int | str = "5GB", **kwargs):
    """save_pretrained into a temporary folder, then upload_folder; returns huggingface_hub's CommitInfo."""
    if kwargs:
        raise TypeError(f"push_to_hub got unknown arguments: {sorted(kwargs)}")
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, max_shard_size=max_shard_size)
        return upload_folder(Path(tmp), repo_id, commit_message=commit_message, private=private, token=token,
                             revision=revision, create_pr=create_pr)
