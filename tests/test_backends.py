"""Attention backends, device maps and dtype="auto", against transformers on tiny checkpoints (CPU, fp32).

- eager and sdpa agree with each other within 1e-5 and each matches transformers loaded with the same
  attn_implementation within 1e-4 (decoder and CLIP tower both switch; observed: eager vs sdpa 2.6e-6,
  the same for transformers' own pair, and ours vs transformers 0.0 for each backend);
- flash_attention_2 without flash-attn is an ImportError, an unknown backend a ValueError;
- device_map "cpu", "auto" (-> cpu here), torch.device, {"": "cpu"} and per-module dicts (new and old key
  layouts) load the same tensors; a dict that splits the model, leaves a module unplaced, or names an
  absent CUDA device fails clearly before any tensor is read;
- dtype/torch_dtype "auto" (and the default) pick the checkpoint's dtype, as transformers 5 does.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import tiny
from llava_next.model.anyres import AnyresGeometry
from llava_next.compat.modeling import LlavaNextForConditionalGeneration

transformers = pytest.importorskip("transformers")

IMAGE_SIZE = (336, 100)  # (H, W): 3 tiles, 792 image tokens


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("mistral")[0]


@pytest.fixture(scope="module")
def batch():
    """One image prompt, left-padded next to a text-only row; HF-style positions passed explicitly."""
    geo = AnyresGeometry()
    g = torch.Generator().manual_seed(3)
    n, tiles = geo.num_image_tokens(*IMAGE_SIZE), geo.num_tiles(*IMAGE_SIZE)
    first = torch.randint(1, 1000, (4,), generator=g).tolist() + [tiny.IMAGE_TOKEN] * n + [11, 12, 13]
    second = torch.randint(1, 1000, (9,), generator=g).tolist()
    T = len(first)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    ids[0], mask[0] = torch.tensor(first), 1
    ids[1, T - len(second):], mask[1, T - len(second):] = torch.tensor(second), 1
    pv = torch.zeros(1, 5, 3, 336, 336)
    pv[0, :tiles] = torch.randn(tiles, 3, 336, 336, generator=g)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # transformers generate()'s positions
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=torch.tensor([IMAGE_SIZE]),
                position_ids=positions)


def run(model, batch):
    with torch.no_grad():
        logits = model(**batch, logits_to_keep=16).logits
    return logits[batch["attention_mask"][:, -16:].bool()]


def backends_of(model) -> set[str]:
    return {m.backend for m in model.modules() if hasattr(m, "backend")}


@pytest.fixture(scope="module")
def logits_by_backend(checkpoint, batch):
    from transformers import LlavaNextForConditionalGeneration as HFModel

    out = {}
    for backend in ("sdpa", "eager"):
        ours = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, attn_implementation=backend)
        assert backends_of(ours) == {backend}
        towers = [m for n, m in ours.named_modules() if hasattr(m, "backend") and n.startswith("model.vision_tower")]
        assert towers, "the CLIP tower's attention must follow attn_implementation too"
        theirs = HFModel.from_pretrained(checkpoint, attn_implementation=backend).eval()
        assert theirs.config.vision_config._attn_implementation == backend
        assert theirs.config.text_config._attn_implementation == backend
        out[backend] = run(ours, batch), run(theirs, batch)
    return out


def test_eager_matches_sdpa(logits_by_backend):
    (sdpa, _), (eager, _) = logits_by_backend["sdpa"], logits_by_backend["eager"]
    assert (sdpa - eager).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_backend_matches_transformers(logits_by_backend, backend):
    ours, theirs = logits_by_backend[backend]
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_default_backend_is_sdpa(checkpoint):
    assert backends_of(LlavaNextForConditionalGeneration.from_pretrained(checkpoint)) == {"sdpa"}


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_2_without_flash_attn(checkpoint):
    with pytest.raises(ImportError, match="flash-attn"):
        LlavaNextForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="flash_attention_2")


def test_unknown_backend(checkpoint):
    with pytest.raises(ValueError, match="attn_implementation"):
        LlavaNextForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="flex_attention")


# -- device_map ---------------------------------------------------------------------------------------------
PER_MODULE = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.image_newline": "cpu",
              "model.language_model.embed_tokens": "cpu", "model.language_model.layers.0": "cpu",
              "model.language_model.layers.1": "cpu", "model.language_model.norm": "cpu", "lm_head": "cpu"}
OLD_LAYOUT = {"vision_tower.vision_model": "cpu", "multi_modal_projector": "cpu", "image_newline": "cpu",
              "language_model.model": "cpu", "language_model.lm_head": "cpu"}


@pytest.mark.parametrize("device_map", ["cpu", "auto", torch.device("cpu"), {"": "cpu"}, PER_MODULE, OLD_LAYOUT],
                         ids=["cpu", "auto", "torch.device", "dict-all", "dict-per-module", "dict-old-layout"])
def test_device_maps(checkpoint, device_map, batch):
    if device_map == "auto" and torch.cuda.is_available():
        pytest.skip("auto picks CUDA here")
    reference = LlavaNextForConditionalGeneration.from_pretrained(checkpoint)
    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, device_map=device_map)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.device == torch.device("cpu")
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    small = dict(input_ids=batch["input_ids"][1:, -9:])
    with torch.no_grad():
        assert torch.equal(model(**small).logits, reference(**small).logits)


@pytest.mark.parametrize("device_map, match", [
    ({"": "cpu", "lm_head": "meta"}, "splits the model"),
    ({"lm_head": "cpu"}, "does not place"),
    ({"": "disk"}, "disk"),
    ("balanced_low_0", "not a device"),
    ({}, "empty"),
])
def test_bad_device_maps(checkpoint, device_map, match):
    with pytest.raises(ValueError, match=match):
        LlavaNextForConditionalGeneration.from_pretrained(checkpoint, device_map=device_map)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device_map", ["cuda", "cuda:0", {"": 0}])
def test_cuda_map_without_cuda(checkpoint, device_map):
    with pytest.raises(ValueError, match="CUDA is not available"):
        LlavaNextForConditionalGeneration.from_pretrained(checkpoint, device_map=device_map)


# -- dtype="auto" -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def half_checkpoint(request, tmp_path_factory):
    from transformers import LlavaNextForConditionalGeneration as HFModel

    folder = tmp_path_factory.mktemp(f"tiny_{str(request.param).split('.')[1]}")
    model = tiny.hf_model(tiny.hf_config("mistral"), seed=2).to(request.param)
    model.save_pretrained(folder)
    theirs = HFModel.from_pretrained(folder).eval()  # transformers 5: dtype defaults to "auto"
    assert theirs.dtype == request.param
    return folder, request.param, theirs


@pytest.mark.parametrize("how", ["torch_dtype", "dtype", "default"])
def test_dtype_auto(half_checkpoint, how):
    folder, dtype, theirs = half_checkpoint
    kwargs = {} if how == "default" else {how: "auto"}
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder, **kwargs)
    assert ours.dtype == dtype
    assert {p.dtype for p in ours.parameters()} == {dtype}
    assert {p.dtype for p in theirs.parameters()} == {dtype}
    ids = torch.randint(1, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits.float(), theirs(input_ids=ids).logits.float()
    # observed 0.0 (same ops in the same dtype); bounded here by a couple of 16-bit rounding steps of the scale
    assert (a - b).abs().max().item() <= 2e-2 * b.abs().max().item()
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    if how == "torch_dtype":
        explicit = LlavaNextForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.float32)
        assert explicit.dtype == torch.float32
