"""PEFT LoRA on our model: adapters move between our model and transformers' with equal logits (both ways, with
PEFT's key names for transformers' class), a 20-step LoRA run on 10 image-caption pairs lowers the loss, and
merge_and_unload -> save_pretrained -> the OpenAI server answers from the merged folder."""

from __future__ import annotations

import shutil

import caption_data
import pytest
import server_fixtures
import torch

from llava_next.compat.modeling import LlavaNextForConditionalGeneration
from llava_next.errors import SaveError

peft = pytest.importorskip("peft")

LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def folder(tiny_checkpoint, tmp_path_factory):
    return server_fixtures.full_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("peft"))


@pytest.fixture(scope="module")
def batch(folder):
    from llava_next import LlavaNextProcessor

    return caption_data.CaptionCollator(LlavaNextProcessor.from_pretrained(folder))(caption_data.pairs(2))


def lora(model, seed=0):
    torch.manual_seed(seed)  # init_lora_weights=False: random A and B, so the adapter changes the logits
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "linear_1"],
                             task_type="CAUSAL_LM", init_lora_weights=False)
    return peft.get_peft_model(model, config)


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def adapter_keys(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("direction", ["ours->transformers", "transformers->ours"])
def test_adapter_moves_between_libraries(folder, batch, tmp_path, direction):
    from transformers import LlavaNextForConditionalGeneration as HF

    ours, hf = LlavaNextForConditionalGeneration.from_pretrained(folder), HF.from_pretrained(folder)
    base_logits = logits(ours, batch)
    source, target = (ours, hf) if direction == "ours->transformers" else (hf, ours)
    trained = lora(source).eval()
    trained.save_pretrained(tmp_path / "adapter")
    reference = lora(HF.from_pretrained(folder) if source is ours else LlavaNextForConditionalGeneration.from_pretrained(folder))
    reference.save_pretrained(tmp_path / "reference")
    # PEFT's names, both classes; transformers' model also has the CLIP layer above the feature layer (layer 2)
    ours_keys, hf_keys = (adapter_keys(tmp_path / name) for name in
                          (("adapter", "reference") if source is ours else ("reference", "adapter")))
    assert ours_keys and ours_keys <= hf_keys
    assert all(".vision_tower.encoder.layers.2." in k for k in hf_keys - ours_keys), sorted(hf_keys - ours_keys)[:3]
    loaded = peft.PeftModel.from_pretrained(target, tmp_path / "adapter").eval()
    expected = logits(trained, batch)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=LOGITS_ATOL)


def test_lora_finetune_lowers_loss_then_merged_model_serves(folder, tmp_path):
    from transformers import LlavaNextForConditionalGeneration as HF

    from llava_next import LlavaNextProcessor

    processor = LlavaNextProcessor.from_pretrained(folder)
    collate = caption_data.CaptionCollator(processor)
    data = caption_data.pairs(10)
    batches = [collate([pair]) for pair in data]  # one pair a step: 20 steps are two passes
    model = LlavaNextForConditionalGeneration.from_pretrained(folder)
    # the decoder's attention only (a regex, as in the README): the frozen vision tower needs no backward pass
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    assert 0 < trainable < total // 100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for step in range(20):  # two passes over the 10 pairs
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    first, second = sum(losses[:10]) / 10, sum(losses[10:]) / 10
    assert second < first - 0.5, (first, second)  # the same pairs score better on the second visit
    assert all(b < a for a, b in zip(losses[:10], losses[10:]))
    model.eval()

    adapted = logits(model, batches[0])
    with pytest.raises(SaveError, match="merge_and_unload"):  # LoRA layers still in: a full save would not load
        model.get_base_model().save_pretrained(tmp_path / "unmerged")
    merged = model.merge_and_unload()
    assert type(merged) is LlavaNextForConditionalGeneration
    merged.gradient_checkpointing_disable()
    out = tmp_path / "merged"
    merged.save_pretrained(out)
    processor.save_pretrained(out)
    for name in ("tokenizer.model",):
        if (folder / name).exists():
            shutil.copy(folder / name, out / name)
    torch.testing.assert_close(logits(LlavaNextForConditionalGeneration.from_pretrained(out), batches[0]), adapted,
                               rtol=0, atol=LOGITS_ATOL)
    torch.testing.assert_close(logits(HF.from_pretrained(out), batches[0]), adapted, rtol=0, atol=LOGITS_ATOL)

    # the OpenAI server (what `llava-next serve` runs) answers from the merged folder, as our generate() does
    from PIL import Image

    image = Image.fromarray(caption_data.np.random.default_rng(1).integers(0, 256, (8, 600, 3), dtype="uint8"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    served = LlavaNextForConditionalGeneration.from_pretrained(out)
    ids = served.generate(**inputs, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    expected = processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    server = server_fixtures.ThreadServer(out)
    try:
        png = caption_data.png(image)
        reply = server.client().chat.completions.create(
            model=server_fixtures.MODEL, max_tokens=3, temperature=0, extra_body={"min_tokens": 3},
            messages=server_fixtures.image_message("Describe the image.", server_fixtures.data_url(png)))
        assert reply.usage.completion_tokens == 3
        assert reply.choices[0].message.content == expected
    finally:
        server.stop()
        server.llm.shutdown()
