"""Shared fixtures: tiny transformers-written checkpoints, made once per session and reused by every test file.

`tiny_checkpoint(backbone, seed=0, **save_tiny_kwargs)` -> (folder, transformers model in eval mode).
`tiny_pair(backbone, seed=0, **save_tiny_kwargs)` -> (our model loaded from that folder, the transformers model).
Both are cached per argument set; treat the returned models and folders as read-only (copy a folder before
editing its files, e.g. with `copy_checkpoint`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):  # `import llava_next` without installing; `import tiny` from any test file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import tiny  # noqa: E402


def _key(backbone, seed, kwargs) -> str:
    """Cache key; arguments equal to tiny.hf_config's defaults are dropped, so spelling them out shares the cache."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(tiny.hf_config).parameters.items()}
    kept = {k: v for k, v in kwargs.items() if k not in defaults or v != defaults[k]}
    return repr((backbone, seed, sorted((k, repr(v)) for k, v in kept.items())))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_checkpoints")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_root):
    """Factory: tiny_checkpoint("mistral", vision_feature_layer=[-2, -3], pinpoints=tiny.OTHER_PINPOINTS)."""
    cache: dict[str, tuple[Path, torch.nn.Module]] = {}

    def make(backbone: str = "mistral", seed: int = 0, **kwargs):
        key = _key(backbone, seed, kwargs)
        if key not in cache:
            folder = tiny_root / f"{backbone}-s{seed}-{len(cache)}"
            cache[key] = tiny.save_tiny(folder, backbone, seed, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_pair(tiny_checkpoint):
    """Factory: (ours, transformers) for the same tiny checkpoint, both fp32 eval."""
    from llava_next.compat.modeling import LlavaNextForConditionalGeneration

    cache: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}

    def make(backbone: str = "mistral", seed: int = 0, **kwargs):
        key = _key(backbone, seed, kwargs)
        if key not in cache:
            folder, hf = tiny_checkpoint(backbone, seed, **kwargs)
            cache[key] = (LlavaNextForConditionalGeneration.from_pretrained(folder), hf)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def hf_processor():
    """Factory: a real transformers LlavaNextProcessor for `pinpoints` (word-level stub tokenizer), configured as
    the llava-hf processors are (patch 14, +1 CLS, strategy "default", 336 tiles). Use it for token counts:
    `hf_processor(pins)._get_num_multimodal_tokens(image_sizes=[(h, w), ...]).num_image_tokens`."""
    import functools

    @functools.lru_cache(maxsize=None)
    def make(pinpoints=None):
        from tokenizers import Tokenizer, models
        from transformers import LlavaNextProcessor, PreTrainedTokenizerFast
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        pins = [list(p) for p in (pinpoints or tiny.hf_config().image_grid_pinpoints)]
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1}, unk_token="<unk>")),
            unk_token="<unk>")
        images = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                            image_grid_pinpoints=pins)
        return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)

    return lambda pinpoints=None: make(None if pinpoints is None else tuple(tuple(p) for p in pinpoints))


@pytest.fixture
def copy_checkpoint(tmp_path):
    """copy_checkpoint(folder) -> a private copy (in this test's tmp dir) safe to edit."""
    def copy(folder: Path, name: str = "ckpt") -> Path:
        target = tmp_path / name
        shutil.copytree(folder, target)
        return target

    return copy


@pytest.fixture(scope="module")
def folder(tiny_checkpoint, tiny_root):
    """The server tests' checkpoint: tiny weights + the real Mistral tokenizer and template (server_fixtures)."""
    from server_fixtures import full_checkpoint

    return full_checkpoint(tiny_checkpoint, tiny_root)


@pytest.fixture(scope="module")
def server(folder):
    """A default ThreadServer on `folder` (127.0.0.1, free port), stopped at the module's end; a module that needs
    other settings defines its own `server`."""
    from server_fixtures import ThreadServer

    s = ThreadServer(folder)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module (the chat page tests)."""
    import chat_page_fixtures as pf
    from playwright import sync_api

    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=pf.CHROMIUM, args=pf.ARGS, headless=True, timeout=60_000)
        try:
            yield b
        finally:
            b.close()
