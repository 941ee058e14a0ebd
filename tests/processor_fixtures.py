"""Processor checkpoints for tests, written like the llava-hf hub repos and loadable by both libraries.

`make_processor_folder(tmp_path, family)` writes a folder with the real Mistral sentencepiece vocabulary (from
mistral-common, converted by transformers) plus `<image>` = 32000 and `<pad>` = 32001 as the hub adds them, the
family's control tokens, CLIP-style anyres image settings (336 px, default pinpoints), patch_size 14,
num_additional_image_tokens 1, strategy "default", and the family's chat template (tests/chat_templates.py).

layout="hub": the files as the hub has them (tokenizer.json with a BOS post-processor, tokenizer_config.json,
special_tokens_map.json, preprocessor_config.json, processor_config.json, chat_template.json, config.json).
layout="transformers": that folder loaded by transformers' AutoProcessor and written back with its
`save_pretrained` (processor_config.json with a nested image processor, chat_template.jinja).
`reference_processor(folder)` loads a folder with transformers; `shared_processor_folder(family, layout)` builds
a folder once per test process.

Other test files (generation, pipeline) can reuse these folders; add model weights next to them as needed.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from chat_templates import CHAT_TEMPLATES, CONTROL_TOKENS
from hub_files import write_hub_preprocessor_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fixtures are local folders; never reach for the network

# The demo checkpoint writes the same hub files.
from llava_next.entrypoints.demo import (  # noqa: E402
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    PINPOINTS,
    _write_json,
    write_hub_processor_files,
)

# Families whose hub tokenizer.json is the legacy Llama kind (normalizer prepends "▁"); the others use the
# Metaspace pre-tokenizer that transformers 5.x writes. Both kinds are exercised.
LEGACY_NORMALIZER = {"mistral", "mistral-fixed", "vicuna", "34b"}
PADDING_SIDE = {"llama3": "left", "72b": "left"}


@lru_cache(maxsize=1)
def mistral_tokenizer_json() -> str:
    """tokenizer.json of the real Mistral v1 sentencepiece model, converted once by transformers (about 3 s)."""
    import mistral_common
    from transformers import LlamaTokenizer

    spm = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(spm, Path(tmp) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(tmp)
        return tokenizer.backend_tokenizer.to_str()


def _hub_tokenizer(family: str):
    """The family's tokenizer.json as a `tokenizers.Tokenizer`, with the added tokens the hub has."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors

    backend = Tokenizer.from_str(mistral_tokenizer_json())
    extra = ["<image>", "<pad>", *CONTROL_TOKENS[family]]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    assert backend.token_to_id("<image>") == IMAGE_TOKEN_ID and backend.token_to_id("<pad>") == PAD_TOKEN_ID
    backend.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    if family in LEGACY_NORMALIZER:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
        backend.decoder = decoders.Sequence([
            decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
        ])
    return backend


def write_hub_folder(folder: Path, family: str, chat_template: str | None = None) -> Path:
    """The hub layout of a llava-hf processor for `family` (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_hub_processor_files(folder, _hub_tokenizer(family), chat_template or CHAT_TEMPLATES[family],
                              CONTROL_TOKENS[family], PADDING_SIDE.get(family, "right"))
    # The image settings from the literal hub file, not from the library's constants (the demo writer is checked
    # against the same literal in test_image_processor.py).
    write_hub_preprocessor_config(folder)
    # With model_type llava_next, transformers loads tokenizer.json as is (its TokenizersBackend), as on the hub.
    _write_json(folder / "config.json", {
        "architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
        "image_token_index": IMAGE_TOKEN_ID, "image_grid_pinpoints": PINPOINTS,
        "vision_feature_select_strategy": "default", "vision_feature_layer": -2,
    })
    return folder


def make_processor_folder(tmp_path: Path, family: str, layout: str = "transformers",
                          chat_template: str | None = None) -> Path:
    """A processor folder for `family`, in the hub layout or as transformers' save_pretrained writes it."""
    if layout not in ("hub", "transformers"):
        raise ValueError(f"layout must be 'hub' or 'transformers', got {layout!r}")
    hub = write_hub_folder(Path(tmp_path) / f"{family}-hub", family, chat_template)
    if layout == "hub":
        return hub
    out = Path(tmp_path) / f"{family}-transformers"
    reference_processor(hub).save_pretrained(str(out))
    shutil.copy(hub / "config.json", out / "config.json")
    return out


@lru_cache(maxsize=None)
def shared_processor_folder(family: str, layout: str = "transformers") -> Path:
    """`make_processor_folder` once per process (read-only by convention), removed at exit."""
    root = Path(tempfile.mkdtemp(prefix=f"llava_next_{family}_{layout}_"))
    atexit.register(shutil.rmtree, root, True)
    return make_processor_folder(root, family, layout)


def reference_processor(folder: Path):
    """transformers' AutoProcessor for a fixture folder (a LlavaNextProcessor with a TokenizersBackend)."""
    from transformers import AutoProcessor
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoProcessor.from_pretrained(str(folder))


def sample_images():
    """Real photographs from scikit-image plus synthetic sizes: a list of (name, PIL image)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = {name: getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "camera", "rocket", "hubble_deep_field")}
    images = [(name, Image.fromarray(array)) for name, array in photos.items()]
    rng = np.random.default_rng(0)
    for h, w in SYNTHETIC_SIZES:
        images.append((f"{h}x{w}", Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))))
    return images


# (height, width): tiny, extreme aspect ratios, the FACTS.md test vectors, and odd sizes near pinpoint edges.
SYNTHETIC_SIZES = [
    (1, 1), (1, 2), (2, 1), (3, 7), (14, 14), (40, 4000), (4000, 40), (1, 3000), (3000, 1), (500, 316),
    (750, 1000), (200, 300), (336, 336), (336, 672), (672, 336), (337, 673), (671, 335), (1008, 336), (336, 1008),
    (899, 1024), (1024, 899), (100, 1000), (1000, 100), (123, 457), (457, 123), (640, 480), (480, 640), (720, 1280),
    (1280, 720), (999, 333), (333, 999), (224, 224), (17, 900), (900, 17), (2048, 2049), (1500, 511),
]
