"""save_pretrained round trips: ours -> transformers, ours -> ours, sharded and not, tied and untied embeddings,
resized embeddings; the key layout and files transformers writes; push_to_hub against a stubbed HfApi;
a quantized model and pickle refused with SaveError."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from safetensors import safe_open

from llava_next.compat.modeling import LlavaNextForConditionalGeneration
from llava_next.errors import SaveError

IDS = torch.tensor([[1, 17, 4000, 9, 31999, 5]])


def keys_of(folder) -> set[str]:
    keys = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys |= set(h.keys())
    return keys


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("tied", [False, True])
def test_ours_to_transformers_and_back(tiny_checkpoint, tmp_path, tied):
    from transformers import LlavaNextForConditionalGeneration as HF

    src, hf_src = tiny_checkpoint("mistral", tie_word_embeddings=tied)
    ours = LlavaNextForConditionalGeneration.from_pretrained(src)
    ours.save_pretrained(tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    # the key layout transformers 5 writes, less what we never build (the CLIP layer above -2, post_layernorm)
    hf_keys = keys_of(src)
    unused = {k for k in hf_keys if k.startswith(("vision_tower.encoder.layers.2.", "vision_tower.post_layernorm."))}
    assert keys_of(out) == hf_keys - unused
    assert ("language_model.lm_head.weight" in keys_of(out)) == (not tied)
    hf = HF.from_pretrained(out).eval()
    ref = logits(hf_src)
    torch.testing.assert_close(logits(hf), ref, rtol=0, atol=1e-4)
    again = LlavaNextForConditionalGeneration.from_pretrained(out)
    torch.testing.assert_close(logits(again), ref, rtol=0, atol=1e-4)
    assert (again.lm_head.weight is again.get_input_embeddings().weight) == tied
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_sharded_save_and_overwrite(tiny_checkpoint, tmp_path):
    from transformers import LlavaNextForConditionalGeneration as HF

    src, hf_src = tiny_checkpoint("qwen2")
    ours = LlavaNextForConditionalGeneration.from_pretrained(src)
    out = tmp_path / "sharded"
    ours.save_pretrained(out, max_shard_size="2MB", safe_serialization=True)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == keys_of(out) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in ours.state_dict().values()
                                                  if t.is_floating_point())
    assert index["metadata"]["total_parameters"] == ours.num_parameters()
    ref = logits(hf_src)
    torch.testing.assert_close(logits(HF.from_pretrained(out)), ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(logits(LlavaNextForConditionalGeneration.from_pretrained(out)), ref, rtol=0, atol=1e-4)
    ours.save_pretrained(out)  # one file now: the old shards and index go, or loaders would read both
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_resized_and_trained_weights_survive(tiny_checkpoint, tmp_path):
    from transformers import LlavaNextForConditionalGeneration as HF

    src, _ = tiny_checkpoint("llama")
    ours = LlavaNextForConditionalGeneration.from_pretrained(src)
    torch.manual_seed(0)
    ours.resize_token_embeddings(tiny.VOCAB + 3)
    with torch.no_grad():
        ours.model.language_model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    ours.save_pretrained(tmp_path / "r")
    ids = torch.tensor([[1, tiny.VOCAB + 2, 7, tiny.VOCAB]])
    ref = logits(ours, ids)
    hf = HF.from_pretrained(tmp_path / "r")
    assert hf.config.text_config.vocab_size == tiny.VOCAB + 3
    torch.testing.assert_close(logits(hf, ids), ref, rtol=0, atol=1e-4)
    again = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "r")
    assert again.config.text_config.vocab_size == tiny.VOCAB + 3
    torch.testing.assert_close(logits(again, ids), ref, rtol=0, atol=1e-4)


def test_fused_projections_are_written_as_their_parts(tiny_checkpoint, tmp_path):
    src, hf_src = tiny_checkpoint("mistral")
    ours = LlavaNextForConditionalGeneration.from_pretrained(src)
    ours.model.language_model.fuse_projections()  # what the static/graph decode runner does on a GPU
    ours.save_pretrained(tmp_path / "f")
    assert "language_model.model.layers.0.self_attn.k_proj.weight" in keys_of(tmp_path / "f")
    again = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "f")
    torch.testing.assert_close(logits(again), logits(hf_src), rtol=0, atol=1e-4)


def test_push_to_hub_uploads_the_saved_folder(tiny_checkpoint, monkeypatch):
    """huggingface_hub's HfApi is stubbed (never the network): one create_repo, one upload of the full folder."""
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path

        files = sorted(p.name for p in Path(folder_path).iterdir())
        calls.append(("upload_folder", repo_id, files, kwargs["commit_message"], self.token))
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    src, _ = tiny_checkpoint("mistral")
    ours = LlavaNextForConditionalGeneration.from_pretrained(src)
    assert ours.push_to_hub("me/tiny-llava", token="hf_x", commit_message="fine-tuned", private=True) == "commit-info"
    assert calls[0] == ("create_repo", "me/tiny-llava", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[1] == ("upload_folder", "me/tiny-llava",
                        ["config.json", "generation_config.json", "model.safetensors"], "fine-tuned", "hf_x")


def test_quantized_and_pickle_saves_are_refused(tiny_checkpoint, tmp_path, monkeypatch):
    src, _ = tiny_checkpoint("mistral")
    ours = LlavaNextForConditionalGeneration.from_pretrained(src)
    with pytest.raises(SaveError, match="safetensors only"):
        ours.save_pretrained(tmp_path / "p", safe_serialization=False)
    Linear4bit = type("Linear4bit", (torch.nn.Linear,), {})  # the bitsandbytes class name, without a GPU
    layer = ours.model.language_model.layers[0].self_attn
    monkeypatch.setattr(layer, "q_proj", Linear4bit(64, 64, bias=False))
    with pytest.raises(SaveError, match="quantized"):
        ours.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()
