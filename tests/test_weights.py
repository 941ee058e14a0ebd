"""Checkpoint loading: layouts, shards, strict errors, pickle refusal, dtypes, skipped tensors, tied embeddings.

Every checkpoint here is written by transformers (`save_pretrained`) or rewritten from one, and every
successful load is checked by comparing logits with the transformers model it came from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tiny
from llava_next.model.anyres import AnyresGeometry
from llava_next.errors import CheckpointError, UnsafeCheckpointError
from llava_next.compat.modeling import LlavaNextForConditionalGeneration as Ours

SIZE = (1, 4000)  # 576 image tokens, 3 tiles: the cheapest image


def inputs(seed=0):
    """The same prompt for every model here (all use the default pinpoints)."""
    g = torch.Generator().manual_seed(seed)
    geo = AnyresGeometry()
    n_tiles = geo.num_tiles(*SIZE)
    ids = torch.cat([torch.randint(1, tiny.IMAGE_TOKEN, (5,), generator=g),
                     torch.full((geo.num_image_tokens(*SIZE),), tiny.IMAGE_TOKEN),
                     torch.randint(1, tiny.IMAGE_TOKEN, (7,), generator=g)])[None]
    return dict(input_ids=ids, pixel_values=torch.randn(1, n_tiles, 3, 336, 336, generator=g),
                image_sizes=torch.tensor([SIZE]))


def logits(model, dtype=torch.float32):
    x = inputs()
    x["pixel_values"] = x["pixel_values"].to(dtype)
    with torch.no_grad():
        return model(**x).logits.float()


def assert_same_logits(ours, hf, atol=1e-5):
    diff = (logits(ours) - logits(hf)).abs().max().item()
    assert diff <= atol, f"max |logits - transformers| = {diff:.3g}"


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# What transformers 5 writes, parsed independently of llava_next.weights.RENAMES.
_PARTS = [(re.compile(r"^language_model\.model\.(.+)$"), "text"), (re.compile(r"^language_model\.lm_head\.(.+)$"), "head"),
          (re.compile(r"^vision_tower\.(.+)$"), "vision"), (re.compile(r"^multi_modal_projector\.(.+)$"), "projector"),
          (re.compile(r"^image_newline()$"), "newline")]
LAYOUTS = {
    # llava-hf hub files (transformers 4.39-4.51)
    "hub": {"text": "language_model.model.{}", "head": "language_model.lm_head.{}",
            "vision": "vision_tower.vision_model.{}", "projector": "multi_modal_projector.{}", "newline": "image_newline"},
    # newer layout (transformers >= 4.52 in-memory names)
    "newer": {"text": "model.language_model.{}", "head": "lm_head.{}", "vision": "model.vision_tower.{}",
              "projector": "model.multi_modal_projector.{}", "newline": "model.image_newline"},
    "newer-vision-model": {"text": "model.language_model.{}", "head": "lm_head.{}",
                           "vision": "model.vision_tower.vision_model.{}", "projector": "model.multi_modal_projector.{}",
                           "newline": "model.image_newline"},
}


def relayout(tensors: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in tensors.items():
        for pattern, part in _PARTS:
            m = pattern.match(key)
            if m:
                out[LAYOUTS[layout][part].format(m.group(1))] = tensor
                break
        else:
            raise AssertionError(f"unexpected key written by transformers: {key}")
    return out


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    folder, hf = tiny_checkpoint("mistral")
    return folder, hf, read_tensors(folder), tiny.read_config(folder)


def test_transformers_save_loads(base):
    folder, hf, tensors, _ = base
    assert "language_model.model.embed_tokens.weight" in tensors  # the layout transformers 5 writes
    assert_same_logits(Ours.from_pretrained(folder), hf)


def test_sharded_checkpoint_loads(base, tmp_path):
    _, hf, _, _ = base
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert_same_logits(Ours.from_pretrained(tmp_path), hf)


def test_sharded_checkpoint_with_missing_shard_raises(base, tmp_path):
    _, hf, _, _ = base
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        Ours.from_pretrained(tmp_path)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_load_to_the_same_logits(base, tmp_path, layout):
    _, hf, tensors, config = base
    folder = write_checkpoint(tmp_path / layout, relayout(tensors, layout), config)
    assert_same_logits(Ours.from_pretrained(folder), hf)


def test_hub_layout_is_what_transformers_reads(base, tmp_path):
    """Sanity check of the rewritten hub layout: transformers itself loads it to the same logits."""
    import transformers

    _, hf, tensors, config = base
    folder = write_checkpoint(tmp_path / "hub", relayout(tensors, "hub"), config)
    reloaded = transformers.LlavaNextForConditionalGeneration.from_pretrained(folder).eval()
    assert_same_logits(reloaded, hf, atol=0)


# -- strict accounting -------------------------------------------------------------------------------------

MISSING = "language_model.model.layers.1.mlp.up_proj.weight"
EXTRA = "language_model.model.layers.7.mlp.up_proj.weight"
MISSHAPED = "multi_modal_projector.linear_1.weight"


def edited(tensors, missing=False, extra=False, misshaped=False):
    out = dict(tensors)
    if missing:
        del out[MISSING]
    if extra:
        out[EXTRA] = torch.zeros(128, 64)
    if misshaped:
        out[MISSHAPED] = torch.zeros(64, 33)
    return out


@pytest.mark.parametrize("problem", ["missing", "extra", "misshaped"])
def test_one_problem_one_error_naming_it(base, tmp_path, problem):
    _, _, tensors, config = base
    folder = write_checkpoint(tmp_path, edited(tensors, **{problem: True}), config)
    with pytest.raises(CheckpointError) as err:
        Ours.from_pretrained(folder)
    message = str(err.value)
    name = {"missing": "layers.1.mlp.up_proj.weight", "extra": EXTRA, "misshaped": "linear_1.weight"}[problem]
    assert name in message, message
    assert {"missing": "missing", "extra": "unexpected", "misshaped": "misshaped"}[problem] in message, message
    if problem == "misshaped":
        assert "(64, 33)" in message, message  # the checkpoint's shape is reported


def test_all_problems_in_one_error(base, tmp_path):
    _, _, tensors, config = base
    folder = write_checkpoint(tmp_path, edited(tensors, missing=True, extra=True, misshaped=True), config)
    with pytest.raises(CheckpointError) as err:
        Ours.from_pretrained(folder)
    message = str(err.value)
    assert "layers.1.mlp.up_proj.weight" in message and EXTRA in message and "linear_1.weight" in message, message


def test_untied_checkpoint_without_lm_head_raises(base, tmp_path):
    _, _, tensors, config = base
    tensors = {k: v for k, v in tensors.items() if "lm_head" not in k}
    folder = write_checkpoint(tmp_path, tensors, config)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        Ours.from_pretrained(folder)


@pytest.mark.parametrize("damage", ["truncated", "header-only", "garbage", "empty"])
def test_damaged_safetensors_raise_checkpoint_error(base, copy_checkpoint, damage):
    folder = copy_checkpoint(base[0])
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "header-only": data[:200],
                      "garbage": b"\x13\x37" * 5000, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Ours.from_pretrained(folder)


# -- pickle, missing files ---------------------------------------------------------------------------------

def test_pickle_only_checkpoint_refused_then_allowed(base, tmp_path):
    _, hf, _, config = base
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
        Ours.from_pretrained(tmp_path)
    assert_same_logits(Ours.from_pretrained(tmp_path, allow_pickle=True), hf)


def test_safetensors_preferred_over_pickle(base, copy_checkpoint):
    folder = copy_checkpoint(base[0])
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle")  # must never be opened
    assert_same_logits(Ours.from_pretrained(folder), base[1])


def test_missing_folder_names_it(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        Ours.from_pretrained(missing)


def test_folder_without_config_raises(base, copy_checkpoint):
    folder = copy_checkpoint(base[0])
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Ours.from_pretrained(folder)


def test_folder_without_weights_raises(base, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(base[3]))
    with pytest.raises(CheckpointError, match="safetensors"):
        Ours.from_pretrained(tmp_path)


# -- dtypes ------------------------------------------------------------------------------------------------

def float_params(model):
    return {n: p for n, p in model.named_parameters() if p.is_floating_point()}


@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def half_checkpoint(request, tmp_path_factory):
    dtype = request.param
    hf = tiny.hf_model(tiny.hf_config("mistral"), seed=1).to(dtype)
    folder = tmp_path_factory.mktemp(f"tiny_{dtype}".replace("torch.", ""))
    hf.save_pretrained(folder)
    assert tiny.read_config(folder)["dtype"] == str(dtype).removeprefix("torch.")
    return folder, hf, dtype


@pytest.mark.parametrize("how", ["auto", "default"])
def test_auto_dtype_is_the_checkpoints(half_checkpoint, how):
    import transformers

    folder, hf, dtype = half_checkpoint
    ours = Ours.from_pretrained(folder, dtype="auto") if how == "auto" else Ours.from_pretrained(folder)
    theirs = transformers.LlavaNextForConditionalGeneration.from_pretrained(folder, **({"dtype": "auto"} if how == "auto" else {}))
    assert ours.dtype == theirs.dtype == dtype  # transformers 5 also defaults to the checkpoint's dtype
    hf_params = dict(hf.named_parameters())
    for name, p in float_params(ours).items():
        assert p.dtype == dtype, name
    assert torch.equal(ours.lm_head.weight, hf_params["lm_head.weight"])
    assert torch.equal(ours.model.image_newline, hf_params["model.image_newline"])


def test_half_checkpoint_logits_close_to_transformers(half_checkpoint):
    """Same dtype, same cast order: half-precision logits agree with transformers' to a half-precision tolerance."""
    import transformers

    folder, _, dtype = half_checkpoint
    ours = Ours.from_pretrained(folder)
    theirs = transformers.LlavaNextForConditionalGeneration.from_pretrained(folder).eval()
    a, b = logits(ours, dtype), logits(theirs, dtype)
    tolerance = 2 * torch.finfo(dtype).eps * max(b.abs().max().item(), 1.0)  # two ulps at the largest logit
    assert (a - b).abs().max().item() <= tolerance


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", torch.float16])
def test_explicit_dtype_casts(base, dtype):
    folder, hf, _, _ = base
    ours = Ours.from_pretrained(folder, dtype=dtype)
    target = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    assert {p.dtype for p in float_params(ours).values()} == {target}
    assert torch.equal(ours.lm_head.weight, hf.lm_head.weight.to(target))
    assert ours.model.language_model.inv_freq.dtype == torch.float32  # RoPE frequencies stay fp32, as in transformers


def test_torch_dtype_alias(base):
    ours = Ours.from_pretrained(base[0], torch_dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16


# -- skipped tensors, tied embeddings ----------------------------------------------------------------------

@pytest.mark.parametrize("layer,built", [(-2, 2), ([0, -2], 2), ([-1, 1], 3), ([0], 0)])
def test_unused_clip_layers_and_post_layernorm_skipped(tiny_checkpoint, layer, built):
    folder, hf = tiny_checkpoint("mistral", vision_feature_layer=layer)
    tensors = read_tensors(folder)
    assert "vision_tower.post_layernorm.weight" in tensors and "vision_tower.encoder.layers.2.fc1.weight" not in tensors
    assert any(k.startswith("vision_tower.encoder.layers.2.") for k in tensors)
    ours = Ours.from_pretrained(folder)
    assert len(ours.model.vision_tower.encoder.layers) == built
    names = [n for n, _ in ours.named_parameters()]
    assert not any("post_layernorm" in n for n in names)
    assert_same_logits(ours, hf)


def test_tied_embeddings_without_lm_head(tiny_checkpoint):
    folder, hf = tiny_checkpoint("mistral", tie_word_embeddings=True)
    assert not any("lm_head" in k for k in read_tensors(folder))
    ours = Ours.from_pretrained(folder)
    assert ours.lm_head.weight is ours.model.language_model.embed_tokens.weight
    assert_same_logits(ours, hf)


# -- from_pretrained keyword arguments (transformers' rules) -------------------------------------------------

def _hf_from(folder, **kwargs):
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


@pytest.fixture
def fake_hub(monkeypatch, tiny_checkpoint):
    """huggingface_hub.snapshot_download replaced: records its kwargs, returns the tiny checkpoint folder."""
    import huggingface_hub

    folder, hf = tiny_checkpoint("mistral")
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls, hf


def test_hub_kwargs_go_to_the_hub_and_loading_no_ops_are_accepted(fake_hub, tmp_path):
    calls, hf = fake_hub
    ours = Ours.from_pretrained("llava-hf/llava-v1.6-mistral-7b-hf", low_cpu_mem_usage=True, use_safetensors=True,
                                trust_remote_code=True, _fast_init=False, offload_state_dict=True,
                                revision="v1", cache_dir=str(tmp_path), use_auth_token="hf_x", force_download=False,
                                local_files_only=True, proxies=None)
    assert calls == [("llava-hf/llava-v1.6-mistral-7b-hf",
                      {"allow_patterns": ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"], "revision": "v1",
                       "cache_dir": str(tmp_path), "token": "hf_x", "force_download": False,
                       "local_files_only": True})]
    assert_same_logits(ours, hf)


@pytest.mark.parametrize("kwargs,named", [({"output_loading_info": True}, "'output_loading_info'"),
                                          ({"variant": "fp16", "colour": 1}, "'colour', 'variant'"),
                                          ({"revison": "main"}, "'revison'")])
def test_unknown_kwargs_are_a_type_error_before_any_download(fake_hub, base, kwargs, named):
    calls, _ = fake_hub
    for name in ("llava-hf/llava-v1.6-mistral-7b-hf", base[0]):  # hub id, and a local folder (was silently ignored)
        with pytest.raises(TypeError, match=f"unexpected keyword argument\\(s\\) {named}"):
            Ours.from_pretrained(name, **kwargs)
    assert calls == []


@pytest.mark.parametrize("overrides", [{"vision_feature_layer": -3}, {"vision_feature_layer": -1},
                                       {"image_grid_pinpoints": [[336, 672], [672, 336]]},
                                       {"text_config": {"rms_norm_eps": 0.1}, "projector_hidden_act": "silu"}])
def test_config_field_kwargs_override_config_json_like_transformers(tiny_checkpoint, overrides):
    folder, _ = tiny_checkpoint("mistral")
    ours, hf = Ours.from_pretrained(folder, **overrides), _hf_from(folder, **overrides)
    for key in ("vision_feature_layer", "projector_hidden_act"):
        want = getattr(hf.config, key)
        assert getattr(ours.config, key) == (tuple(want) if isinstance(want, list) else want)
    assert ours.config.text_config.rms_norm_eps == hf.config.text_config.rms_norm_eps
    x = inputs()
    if "image_grid_pinpoints" in overrides:  # (1, 4000) picks another grid: fewer image tokens
        tokens = AnyresGeometry(tuple(map(tuple, overrides["image_grid_pinpoints"]))).num_image_tokens(*SIZE)
        ids = x["input_ids"][0]
        keep = torch.cat([ids[:5], ids[5:-7][:tokens], ids[-7:]])
        x["input_ids"], x["pixel_values"] = keep[None], x["pixel_values"][:, :3]
    with torch.no_grad():
        diff = (ours(**x).logits - hf(**x).logits).abs().max().item()
    assert diff <= 1e-5


def test_config_fields_with_config_argument_are_refused_like_transformers(base):
    config = Ours.from_pretrained(base[0]).config
    with pytest.raises(TypeError, match="vision_feature_layer"):
        Ours.from_pretrained(base[0], config=config, vision_feature_layer=-3)
    with pytest.raises(TypeError):
        _hf_from(base[0], config=base[1].config, vision_feature_layer=-3)
    with pytest.raises(ValueError, match="vision_feature_layer 7 is outside"):
        Ours.from_pretrained(base[0], vision_feature_layer=7)


def test_use_safetensors_false_needs_allow_pickle(base):
    with pytest.raises(ValueError, match="use_safetensors=False.*allow_pickle=True"):
        Ours.from_pretrained(base[0], use_safetensors=False)


def test_subfolder(base, tmp_path):
    import shutil

    shutil.copytree(base[0], tmp_path / "repo" / "llava")
    assert_same_logits(Ours.from_pretrained(tmp_path / "repo", subfolder="llava"), base[1])
    with pytest.raises(FileNotFoundError, match="subfolder 'nope'"):
        Ours.from_pretrained(tmp_path / "repo", subfolder="nope")
