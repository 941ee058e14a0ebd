"""An offline demo checkpoint: the llava-v1.6-mistral-7b-hf layout at a tiny shape, with RANDOM weights.

`build_demo_checkpoint(folder)` writes, with this package's own code (no transformers, no network):
- config.json: the hub's LLaVA-NeXT/Mistral/CLIP config at a tiny width and depth, real image geometry (CLIP
  336/14, the default pinpoints, so images become the real ~2,000 tokens), plus a `llava_next_demo` entry saying
  the weights are random;
- model.safetensors: seeded random tensors under the hub's names (`language_model.model.*`,
  `language_model.lm_head.weight`, `vision_tower.vision_model.*`, `multi_modal_projector.*`, `image_newline`),
  every CLIP layer and `post_layernorm` included as on the hub;
- the real Mistral tokenizer: mistral-common's `tokenizer.model.v1` (the sentencepiece model of Mistral-7B v0.1/v0.2)
  converted to tokenizer.json as transformers' LlamaConverter does (same vocabulary and merges, legacy normalizer,
  byte fallback, BOS post-processor), with `<image>` = 32000 and `<pad>` = 32001 added as on the hub; the
  sentencepiece file itself as tokenizer.model;
- tokenizer_config.json, special_tokens_map.json, added_tokens.json, preprocessor_config.json,
  processor_config.json, chat_template.json (the hub's mistral template, `<\\s>` typo included) and
  generation_config.json.

The result is deterministic for a seed (same bytes every time) and loads with llava_next and with transformers.
Its answers are meaningless: it exists to try the CLI, the pipeline and the examples without downloading 15 GB.

Needs `mistral-common` (the tokenizer file) and `sentencepiece` (to read it): both in the `dev` extra.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch

from llava_next.model.anyres import DEFAULT_PINPOINTS
from llava_next.preprocess.image_processor import CLIP_MEAN as IMAGE_MEAN
from llava_next.preprocess.image_processor import CLIP_STD as IMAGE_STD

IMAGE_TOKEN_ID, PAD_TOKEN_ID = 32000, 32001
VOCAB_SIZE = 32064  # as the hub checkpoint: 32000 sentencepiece pieces + added tokens + padding to a multiple of 64
PINPOINTS = [list(p) for p in DEFAULT_PINPOINTS]  # JSON lists, as the hub files write them
CLIP_MEAN, CLIP_STD = list(IMAGE_MEAN), list(IMAGE_STD)
DEMO_KEY = "llava_next_demo"
WARNING = ("RANDOM WEIGHTS: this is the llava_next offline demo checkpoint (tiny shape, seeded random weights). "
           "Its answers are meaningless; use llava-hf/llava-v1.6-mistral-7b-hf for real output.")

# llava-hf/llava-v1.6-mistral-7b-hf chat_template.json, verbatim (the `<\s>` typo is the hub's).
MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text']"
    " + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + "
    "message['content'][0]['text'] + '<\\s> '}}{% else %}{{ raise_exception('Only user and assistant roles are "
    "supported!') }}{% endif %}{% endfor %}"
)

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, projection_dim=32)


# ---------------------------------------------------------------------- tokenizer


def mistral_sentencepiece_file() -> Path:
    """mistral-common's copy of the Mistral-7B v1 sentencepiece model (32,000 pieces), found from the installed
    distribution's files without importing mistral_common (a data file is all that is needed)."""
    import importlib.metadata
    import importlib.util

    hint = "pip install mistral-common (or the llava_next[dev] extra)"
    candidates = []
    try:
        candidates.append(Path(importlib.metadata.distribution("mistral-common").locate_file(
            "mistral_common/data/tokenizer.model.v1")))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("mistral_common") if "mistral_common" not in sys.modules else None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidates.append(Path(location) / "data" / "tokenizer.model.v1")
    for path in candidates:
        if path.is_file():
            return path
    if not candidates:
        raise ImportError(f"the demo checkpoint needs mistral-common for the real Mistral tokenizer file: {hint}")
    raise FileNotFoundError(f"mistral_common/data/tokenizer.model.v1 is missing from the installed mistral-common "
                            f"(looked at {', '.join(map(str, candidates))}); reinstall it: {hint}")


def generate_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges of a sentencepiece BPE vocabulary: every split (left, right) of a piece into two pieces, ranked
    by the merged piece's id, then by the lengths of its parts (transformers' `generate_merges` without scores)."""
    merges = []
    for piece, rank in vocab.items():
        local = [(piece[:i], piece[i:], rank) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(left, right) for left, right, _ in merges]


def sentencepiece_bpe_tokenizer(model_file: str | Path):
    """A sentencepiece BPE model -> `tokenizers.Tokenizer`, as transformers' LlamaConverter (legacy) builds it."""
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=sp.id_to_piece(sp.unk_id()),
                              fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    # unknown and control pieces are special added tokens (user-defined pieces are not carried over: the
    # sentencepiece API does not expose them, and the Mistral v1 model has none)
    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                  for i, p in enumerate(pieces) if sp.is_control(i) or sp.is_unknown(i)])
    bos = sp.id_to_piece(sp.bos_id())
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, sp.bos_id())])
    return tokenizer


def demo_tokenizer():
    """The Mistral tokenizer with `<image>` (32000) and `<pad>` (32001) added as special tokens, as on the hub."""
    from tokenizers import AddedToken

    tokenizer = sentencepiece_bpe_tokenizer(mistral_sentencepiece_file())
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<image>", "<pad>")])
    if tokenizer.token_to_id("<image>") != IMAGE_TOKEN_ID or tokenizer.token_to_id("<pad>") != PAD_TOKEN_ID:
        raise RuntimeError("unexpected tokenizer size: <image> must be 32000 and <pad> 32001")
    return tokenizer


# ---------------------------------------------------------------------- config and weights


def demo_config(seed: int = 0) -> dict:
    """config.json of the demo: the hub's llava-v1.6-mistral-7b-hf fields at the tiny shape (dense, not sparse)."""
    return {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "model_type": "llava_next",
        "ignore_index": -100,
        "image_grid_pinpoints": PINPOINTS,
        "image_token_index": IMAGE_TOKEN_ID,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_image_newline_parameter": True,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": VOCAB_SIZE,
        "text_config": {
            "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            **TEXT,
            "head_dim": TEXT["hidden_size"] // TEXT["num_attention_heads"],
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "vocab_size": VOCAB_SIZE,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            **VISION,
            "hidden_act": "quick_gelu",
            "image_size": 336,
            "patch_size": 14,
            "num_channels": 3,
            "layer_norm_eps": 1e-05,
            "vocab_size": 32000,
        },
        DEMO_KEY: {"random_weights": True, "seed": seed, "warning": WARNING},
    }


def demo_tensor_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the hub layout at the demo shape, in a fixed order."""
    d, di, v = TEXT["hidden_size"], TEXT["intermediate_size"], VOCAB_SIZE
    hd = d // TEXT["num_attention_heads"]
    kv = TEXT["num_key_value_heads"] * hd
    dv, dvi = VISION["hidden_size"], VISION["intermediate_size"]
    patches = (336 // 14) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {}
    vm = "vision_tower.vision_model."
    shapes[vm + "embeddings.class_embedding"] = (dv,)
    shapes[vm + "embeddings.patch_embedding.weight"] = (dv, 3, 14, 14)
    shapes[vm + "embeddings.position_embedding.weight"] = (patches, dv)
    shapes[vm + "pre_layrnorm.weight"] = shapes[vm + "pre_layrnorm.bias"] = (dv,)
    for i in range(VISION["num_hidden_layers"]):
        p = f"{vm}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"], shapes[f"{p}self_attn.{proj}.bias"] = (dv, dv), (dv,)
        shapes[p + "layer_norm1.weight"] = shapes[p + "layer_norm1.bias"] = (dv,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (dvi, dv), (dvi,)
        shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (dv, dvi), (dv,)
        shapes[p + "layer_norm2.weight"] = shapes[p + "layer_norm2.bias"] = (dv,)
    shapes[vm + "post_layernorm.weight"] = shapes[vm + "post_layernorm.bias"] = (dv,)
    shapes["multi_modal_projector.linear_1.weight"], shapes["multi_modal_projector.linear_1.bias"] = (d, dv), (d,)
    shapes["multi_modal_projector.linear_2.weight"], shapes["multi_modal_projector.linear_2.bias"] = (d, d), (d,)
    shapes["image_newline"] = (d,)
    lm = "language_model.model."
    shapes[lm + "embed_tokens.weight"] = (v, d)
    for i in range(TEXT["num_hidden_layers"]):
        p = f"{lm}layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (d, d)
        shapes[p + "self_attn.k_proj.weight"] = (kv, d)
        shapes[p + "self_attn.v_proj.weight"] = (kv, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, d)
        shapes[p + "mlp.gate_proj.weight"] = (di, d)
        shapes[p + "mlp.up_proj.weight"] = (di, d)
        shapes[p + "mlp.down_proj.weight"] = (d, di)
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (d,)
    shapes[lm + "norm.weight"] = (d,)
    shapes["language_model.lm_head.weight"] = (v, d)
    return shapes


def demo_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random float32 tensors: matrices N(0, 0.1) (vision 0.15, large enough that greedy choices are not
    near-ties), norm weights 1, biases 0, `class_embedding`/`image_newline` N(0, 1/sqrt(dim))."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in demo_tensor_shapes().items():
        if name.endswith(".weight") and len(shape) == 1:  # every 1-D weight of this layout is a norm's
            t = torch.ones(shape)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        elif len(shape) == 1:  # class_embedding, image_newline
            t = torch.randn(shape, generator=generator) / math.sqrt(shape[0])
        else:
            t = torch.randn(shape, generator=generator) * (0.15 if name.startswith("vision_tower") else 0.1)
        tensors[name] = t.contiguous()
    return tensors


# ---------------------------------------------------------------------- files


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hub_processor_files(folder: Path, tokenizer, chat_template: str, additional_special_tokens=(),
                              padding_side: str = "right") -> None:
    """tokenizer.json (from a `tokenizers.Tokenizer`), tokenizer_config.json, special_tokens_map.json,
    preprocessor_config.json, processor_config.json and chat_template.json as the llava-hf hub repos write them
    (anyres 336 px CLIP settings, patch 14, strategy "default"). The tests write every family's with this."""
    tokenizer.save(str(folder / "tokenizer.json"))
    added = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    _write_json(folder / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(additional_special_tokens),
        **specials,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "padding_side": padding_side,
        "processor_class": "LlavaNextProcessor",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "use_default_system_prompt": False,
    })
    _write_json(folder / "special_tokens_map.json",
                {**specials, "additional_special_tokens": list(additional_special_tokens)})
    _write_json(folder / "preprocessor_config.json", {
        "aspect_ratio_setting": "anyres",
        "crop_size": {"height": 336, "width": 336},
        "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_pad": True,
        "do_rescale": True, "do_resize": True,
        "image_grid_pinpoints": PINPOINTS,
        "image_mean": CLIP_MEAN, "image_processor_type": "LlavaNextImageProcessor", "image_std": CLIP_STD,
        "processor_class": "LlavaNextProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 336},
    })
    _write_json(folder / "processor_config.json", {
        "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14,
        "processor_class": "LlavaNextProcessor", "vision_feature_select_strategy": "default",
    })
    _write_json(folder / "chat_template.json", {"chat_template": chat_template})


def write_processor_files(folder: Path) -> None:
    """Tokenizer, image processor, processor and chat template files of the hub's llava-v1.6-mistral-7b-hf."""
    write_hub_processor_files(folder, demo_tokenizer(), MISTRAL_CHAT_TEMPLATE)
    shutil.copyfile(mistral_sentencepiece_file(), folder / "tokenizer.model")
    _write_json(folder / "added_tokens.json", {"<image>": IMAGE_TOKEN_ID, "<pad>": PAD_TOKEN_ID})


def build_demo_checkpoint(folder: str | Path, seed: int = 0, overwrite: bool = False, quiet: bool = False) -> Path:
    """Write the demo checkpoint into `folder` (created; must be empty or absent unless overwrite=True)."""
    from safetensors.torch import save_file

    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{str(folder)!r} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{str(folder)!r} is not empty; choose another folder or pass overwrite=True")
    folder.mkdir(parents=True, exist_ok=True)
    write_processor_files(folder)
    _write_json(folder / "config.json", demo_config(seed))
    _write_json(folder / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": PAD_TOKEN_ID})
    # NOTE: one metadata entry only: safetensors writes its metadata map in a per-process random order
    save_file(demo_weights(seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(folder / "model.safetensors", 0o644)  # safetensors writes it owner-only, unlike the other files
    (folder / "README.md").write_text(
        f"# llava_next demo checkpoint (RANDOM WEIGHTS)\n\n{WARNING}\n\n"
        f"Built by `llava_next.demo.build_demo_checkpoint` with seed {seed}: the llava-hf/llava-v1.6-mistral-7b-hf "
        "file layout, the real Mistral tokenizer and chat template, a tiny random model.\n", encoding="utf-8")
    if not quiet:
        print(f"WARNING: {WARNING}", file=sys.stderr)
    return folder


def is_demo_checkpoint(folder: str | Path) -> bool:
    """True for a local folder whose config.json carries the demo's random-weights label."""
    path = Path(folder).expanduser() / "config.json"
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get(DEMO_KEY, {}).get("random_weights"))
    except (ValueError, AttributeError):
        return False


__all__ = ["build_demo_checkpoint", "is_demo_checkpoint", "demo_config", "demo_weights", "demo_tokenizer",
           "sentencepiece_bpe_tokenizer", "generate_merges", "WARNING"]
