"""bitsandbytes quantization against transformers' own (`quantization_config=`), on CPU.

bitsandbytes 0.50 runs 4-bit (NF4/FP4, double quant) and 8-bit (LLM.int8) on CPU, so parity is checked here:
the same modules are swapped, the quantized bytes and quantization statistics are identical, logits on an
image + text prompt agree, and 16 greedy tokens (our generate vs transformers' generate) are identical.
Observed: identical quantized bytes and absmax, logits max |diff| = 0.0 for every config below (same
kernels on the same bytes), so the tolerance is kept tight (1e-5 fp32, 1e-3 for 16-bit loads).

The tiny checkpoint uses a CLIP width of 64: bitsandbytes' CPU 4-bit path repacks weights in 64-wide blocks
and fails on narrower layers (transformers fails the same way on the default tiny width of 32).
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")

import tiny  # noqa: E402
from llava_next import BitsAndBytesConfig  # noqa: E402
from llava_next.compat.modeling import LlavaNextForConditionalGeneration  # noqa: E402
from llava_next.loading.quantization import quantized_module_names, should_convert  # noqa: E402

transformers = pytest.importorskip("transformers")

VISION = {"vision_overrides": {"hidden_size": 64, "intermediate_size": 128}}
IMAGE_SIZE = (336, 100)  # (H, W): 3 tiles, 792 image tokens with the default pinpoints


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    folder, _ = tiny_checkpoint("mistral", seed=1, **VISION)
    return folder


@pytest.fixture(scope="module")
def inputs(checkpoint):
    from llava_next.model.anyres import AnyresGeometry

    geo = AnyresGeometry()
    n, tiles = geo.num_image_tokens(*IMAGE_SIZE), geo.num_tiles(*IMAGE_SIZE)
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1, 733, 16289, 28793] + [tiny.IMAGE_TOKEN] * n + [1824, 349, 4894, 28804, 733, 28748]])
    pv = torch.zeros(1, 5, 3, 336, 336)
    pv[0, :tiles] = torch.randn(tiles, 3, 336, 336, generator=g)
    return dict(input_ids=ids, pixel_values=pv, image_sizes=torch.tensor([IMAGE_SIZE]))


def load_pair(folder, dtype=None, **quant):
    from transformers import BitsAndBytesConfig as HFConfig
    from transformers import LlavaNextForConditionalGeneration as HFModel

    extra = {} if dtype is None else {"dtype": dtype}
    transformers.logging.set_verbosity_error()
    theirs = HFModel.from_pretrained(folder, quantization_config=HFConfig(**quant), device_map="cpu", **extra).eval()
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**quant),
                                                             device_map="cpu", **extra)
    return ours, theirs


def unused_clip_layers(name: str, model) -> bool:
    """transformers builds (and quantizes) CLIP layers above vision_feature_layer; we never build them."""
    built = len(model.model.vision_tower.encoder.layers)
    parts = name.split(".")
    return name.startswith("model.vision_tower.encoder.layers.") and int(parts[4]) >= built


def check_same_modules(ours, theirs):
    mine, ref = quantized_module_names(ours), quantized_module_names(theirs)
    assert mine, "nothing was quantized"
    assert set(mine) <= set(ref), f"quantized by us only: {sorted(set(mine) - set(ref))}"
    extra = [n for n in ref if n not in mine]
    assert all(unused_clip_layers(n, ours) for n in extra), f"transformers quantizes more: {extra}"
    for name in mine:
        assert type(ours.get_submodule(name)) is type(theirs.get_submodule(name)), name
    return mine


def check_same_bytes(ours, theirs, names):
    """Quantized weights and statistics are identical (checked before any forward: on CPU, bitsandbytes
    repacks 4-bit weights in place on the first call)."""
    for name in names:
        a, b = ours.get_submodule(name).weight, theirs.get_submodule(name).weight
        assert a.dtype == b.dtype and torch.equal(a.data, b.data), name
        if hasattr(b, "quant_state") and b.quant_state is not None:
            sa, sb = a.quant_state.as_dict(packed=False), b.quant_state.as_dict(packed=False)
            assert sa.keys() == sb.keys(), name
            for key, value in sb.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(sa[key], value), f"{name}.{key}"
                else:
                    assert sa[key] == value, f"{name}.{key}"
        else:
            assert torch.equal(a.SCB, b.SCB), name
    for name, p in theirs.named_parameters():  # everything else: same tensors in the same dtype
        if name in dict(ours.named_parameters()) and not any(name.startswith(n + ".") for n in names):
            mine = ours.get_parameter(name)
            assert mine.dtype == p.dtype and torch.equal(mine, p), name


def logits_and_tokens(ours, theirs, inputs, dtype, steps=16):
    """Without steps: max |diff| of the full (T, V) logits. With steps: 16 greedy tokens from each library's
    generate, and max |diff| of the logits of every step (the prefill's last position included)."""
    batch = dict(inputs, pixel_values=inputs["pixel_values"].to(dtype or torch.float32))
    if not steps:
        with torch.no_grad():
            a, b = ours(**batch).logits.float(), theirs(**batch).logits.float()
        return (a - b).abs().max().item(), None, None
    kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    mine, ref = ours.generate(**batch, **kwargs), theirs.generate(**batch, **kwargs)
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(mine.logits, ref.logits))
    return diff, mine.sequences, ref.sequences


CASES = {
    "nf4": (None, dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), 16),
    "fp4-default": (None, dict(load_in_4bit=True), 0),
    "nf4-double-bf16compute": (None, dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="bfloat16"), 0),
    # the seed's 4-bit example: NF4, fp16 compute; the published checkpoint is fp16 so "auto" is fp16
    "seed-nf4-fp16": (torch.float16, dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float16), 16),
    "int8": (None, dict(load_in_8bit=True), 16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(case, checkpoint, inputs):
    dtype, quant, steps = CASES[case]
    ours, theirs = load_pair(checkpoint, dtype, **quant)
    names = check_same_modules(ours, theirs)
    assert "lm_head" not in names and any(n.startswith("model.vision_tower.") for n in names) \
        and "model.multi_modal_projector.linear_1" in names  # tower and projector quantized, lm_head not
    check_same_bytes(ours, theirs, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' "inputs will be cast to float16" (int8)
        diff, mine, ref = logits_and_tokens(ours, theirs, inputs, dtype, steps)
    assert diff <= (1e-5 if dtype is None else 1e-3), f"{case}: logits differ by {diff}"
    if steps:
        assert torch.equal(mine, ref), f"{case}: greedy tokens differ\nours   {mine[0, -steps:]}\ntheirs {ref[0, -steps:]}"


def test_vision_tower_kept_in_16_bits(checkpoint, inputs):
    """quantize_vision_tower=False == transformers with llm_int8_skip_modules=["lm_head", "model.vision_tower"]."""
    from transformers import BitsAndBytesConfig as HFConfig
    from transformers import LlavaNextForConditionalGeneration as HFModel

    quant = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    ours = LlavaNextForConditionalGeneration.from_pretrained(
        checkpoint, quantization_config=BitsAndBytesConfig(**quant, quantize_vision_tower=False), device_map="cpu")
    theirs = HFModel.from_pretrained(checkpoint, device_map="cpu", quantization_config=HFConfig(
        **quant, llm_int8_skip_modules=["lm_head", "model.vision_tower"]))
    names = check_same_modules(ours, theirs)
    assert not any(n.startswith("model.vision_tower.") for n in names)
    assert "model.multi_modal_projector.linear_1" in names and "lm_head" not in names
    assert ours.model.vision_tower.encoder.layers[0].mlp.fc1.weight.dtype == torch.float32
    check_same_bytes(ours, theirs, names)
    diff, _, _ = logits_and_tokens(ours, theirs, inputs, None, 0)
    assert diff <= 1e-5


def test_explicit_skip_list_is_transformers_rule(checkpoint):
    """An explicit list replaces the lm_head default (transformers' rule), and a bare "vision_tower" matches no
    Linear layer (patterns match from the start of a name or as a suffix): same modules as transformers, plus
    our warning."""
    from transformers import BitsAndBytesConfig as HFConfig
    from transformers import LlavaNextForConditionalGeneration as HFModel

    quant = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["vision_tower"])
    with pytest.warns(UserWarning, match="model.vision_tower"):
        ours = LlavaNextForConditionalGeneration.from_pretrained(
            checkpoint, quantization_config=BitsAndBytesConfig(**quant), device_map="cpu")
    theirs = HFModel.from_pretrained(checkpoint, quantization_config=HFConfig(**quant), device_map="cpu")
    names = check_same_modules(ours, theirs)
    assert "lm_head" in names
    ids = torch.randint(1, 1000, (1, 9))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_should_convert_patterns():
    assert not should_convert("lm_head", ["lm_head"])
    assert not should_convert("model.vision_tower.encoder.layers.0.mlp.fc1", ["model.vision_tower"])
    assert should_convert("model.vision_tower.encoder.layers.0.mlp.fc1", ["vision_tower"])
    assert not should_convert("model.language_model.layers.11.mlp.up_proj", ["model.language_model.layers.1*"])
    assert should_convert("model.language_model.layers.11.mlp.up_proj", ["model.language_model.layers.1"])
    assert not should_convert("model.language_model.layers.11.mlp.up_proj", ["up_proj"])


def test_weights_quantized_as_they_stream(checkpoint):
    """No Linear weight waits in 16/32 bits for the rest of the checkpoint: each is quantized on arrival."""
    import bitsandbytes as bnb

    from llava_next.loading.pretrained import load_tensors
    from llava_next.loading.weights import _tensor_files, finish_build, iter_checkpoint

    from llava_next.config import LlavaNextConfig

    config = LlavaNextConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    seen = []

    def watched():
        for key, tensor in iter_checkpoint(_tensor_files(checkpoint, False)):
            for name, module in model.named_modules():
                if isinstance(module, bnb.nn.Linear4bit) and not module.weight.is_meta:
                    assert module.weight.dtype == torch.uint8 and module.weight.bnb_quantized, name
            seen.append(key)
            yield key, tensor

    names = load_tensors(model, watched(), torch.float32, "cpu", BitsAndBytesConfig(load_in_4bit=True))
    finish_build(model)
    assert len(seen) > len(names) > 0
    assert all(not p.is_meta for p in model.parameters())


def test_config_matches_transformers():
    from transformers import BitsAndBytesConfig as HFConfig

    for kwargs in [dict(load_in_4bit=True), dict(load_in_8bit=True, llm_int8_threshold=5.0),
                   dict(load_in_4bit=True, bnb_4bit_compute_dtype="bfloat16", bnb_4bit_quant_type="nf4",
                        bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage="bfloat16",
                        llm_int8_skip_modules=["lm_head", "model.vision_tower"]),
                   dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)]:
        ours, theirs = BitsAndBytesConfig(**kwargs), HFConfig(**kwargs)
        assert ours.to_dict() == theirs.to_dict(), kwargs
        assert ours.quantization_method() == theirs.quantization_method()
        assert BitsAndBytesConfig.from_dict(theirs.to_dict()) == ours
    from llava_next.loading.quantization import as_bnb_config

    assert as_bnb_config(HFConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")).bnb_4bit_quant_type == "nf4"
    assert BitsAndBytesConfig(load_in_4bit=True, quantize_vision_tower=False).to_dict()["quantize_vision_tower"] is False


@pytest.mark.parametrize("kwargs, match", [
    (dict(load_in_4bit=True, load_in_8bit=True), "only one"),
    (dict(load_in_4bit=True, bnb_4bit_quant_type="int4"), "bnb_4bit_quant_type"),
    (dict(load_in_4bit=True, bnb_4bit_compute_dtype="float17"), "bnb_4bit_compute_dtype"),
    (dict(load_in_4bit=True, bnb_4bit_compute_dtype=3), "bnb_4bit_compute_dtype"),
    (dict(load_in_4bit=True, bnb_4bit_quant_storage="int4"), "bnb_4bit_quant_storage"),
    (dict(load_in_4bit=True, llm_int8_skip_modules="lm_head"), "llm_int8_skip_modules"),
    (dict(load_in_4bit="yes"), "load_in_4bit"),
    (dict(load_in_8bit=True, llm_int8_threshold="6"), "llm_int8_threshold"),
    (dict(load_in_4bit=True, bnb_4bit_quant_tpye="nf4"), "unknown"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BitsAndBytesConfig(**kwargs)


def test_load_errors(checkpoint, monkeypatch):
    with pytest.raises(ValueError, match="neither"):
        LlavaNextForConditionalGeneration.from_pretrained(checkpoint, quantization_config=BitsAndBytesConfig())
    with pytest.raises(ValueError, match="one device"):
        LlavaNextForConditionalGeneration.from_pretrained(
            checkpoint, quantization_config=BitsAndBytesConfig(load_in_4bit=True),
            device_map={"": "cpu", "lm_head": "meta"})
    import bitsandbytes as bnb

    def broken(self, x):
        raise NotImplementedError("int8 matmul is not implemented for CPU")

    monkeypatch.setattr(bnb.nn.Linear8bitLt, "forward", broken)
    with pytest.raises(RuntimeError, match="cannot run 8-bit .* on cpu.*load_in_4bit"):
        LlavaNextForConditionalGeneration.from_pretrained(
            checkpoint, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ImportError, match=r"llava_next\[quant\]"):
        LlavaNextForConditionalGeneration.from_pretrained(
            checkpoint, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
