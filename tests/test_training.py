"""Training parity with transformers: the same tiny checkpoint, the same batch, train mode.

Loss within 1e-5 and every parameter's gradient within 1e-4 (relative to the tensor's largest entry) for a
text-only batch, one image, two images of different sizes in one row, and a right-padded batch of three rows
(labels -100 on padding and image placeholders), also left-padded (transformers 5.23 changes nothing in the
merge between train and eval); again with activation checkpointing on. Plus the hooks
training libraries call: trainable parameters after loading, input-grad hooks, embeddings get/set/tie,
resize_token_embeddings (the same new rows as transformers for the same seed), num_parameters,
prepare_inputs_for_generation, config.use_cache, and generate() still running without autograd.
"""

from __future__ import annotations

import dataclasses

import pytest
import tiny
import torch

from llava_next.compat.modeling import LlavaNextForConditionalGeneration
from llava_next.loading.weights import canonical_name

LOSS_ATOL = 1e-5
GRAD_RTOL = 1e-4
SIZES = ((336, 336), (300, 200), (50, 1000))


def make_batch(model, kind: str, seed: int = 0) -> dict:
    """input_ids / attention_mask / pixel_values / image_sizes / labels for `kind` (right padding, as training)."""
    g = torch.Generator().manual_seed(seed)
    geo = model.model.geometry

    def text(n):
        return torch.randint(1, tiny.IMAGE_TOKEN, (n,), generator=g).tolist()

    def image(size):
        return [tiny.IMAGE_TOKEN] * geo.num_image_tokens(*size)

    images = {"text": [[]], "one": [[SIZES[0]]], "two": [[SIZES[1], SIZES[2]]],
              "padded": [[SIZES[1]], [], [SIZES[2]]], "padded-left": [[SIZES[1]], [], [SIZES[2]]]}[kind]
    rows, flat = [], []
    for r, sizes in enumerate(images):
        ids = text(5 + 3 * r)
        for size in sizes:
            ids += image(size) + text(4)
            flat.append(size)
        rows.append(ids + text(6 - 2 * r))
    T = max(map(len, rows))
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, ids in enumerate(rows):
        span = slice(T - len(ids), T) if kind == "padded-left" else slice(0, len(ids))
        input_ids[i, span], mask[i, span] = torch.tensor(ids), 1
    labels = input_ids.masked_fill((mask == 0) | (input_ids == tiny.IMAGE_TOKEN), -100)
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if flat:
        tiles = [geo.num_tiles(*s) for s in flat]
        pv = torch.zeros(len(flat), max(tiles), 3, 336, 336)
        for i, n in enumerate(tiles):
            pv[i, :n] = torch.randn(n, 3, 336, 336, generator=g)
        batch.update(pixel_values=pv, image_sizes=torch.tensor(flat))
    return batch


def grads(model) -> dict[str, torch.Tensor]:
    """Gradients under our canonical names (transformers' vision_model level dropped)."""
    return {canonical_name(n): p.grad for n, p in model.named_parameters() if p.grad is not None}


def step(model, batch) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), grads(model)


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    def make(backbone="mistral", **kwargs):
        from transformers import LlavaNextForConditionalGeneration as HF

        folder, _ = tiny_checkpoint(backbone, **kwargs)
        return LlavaNextForConditionalGeneration.from_pretrained(folder), HF.from_pretrained(folder)
    return make


def assert_same_grads(ours: dict, theirs: dict):
    """Each gradient within GRAD_RTOL of its tensor's largest entry. Gradients that are zero in exact arithmetic
    (a key bias: softmax ignores a constant shift) are rounding noise in both libraries: an absolute floor of
    GRAD_RTOL x 1e-3 of the largest gradient anywhere covers them."""
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"parameters with a gradient in transformers only: {missing[:5]}"
    floor = GRAD_RTOL * 1e-3 * max(g.abs().max().item() for g in theirs.values())
    for name, g in ours.items():
        ref = theirs[name]
        scale = ref.abs().max().item()
        err = (g - ref).abs().max().item()
        assert err <= max(GRAD_RTOL * scale, floor), f"{name}: gradient differs by {err:.2e} (largest {scale:.2e})"


@pytest.mark.parametrize("backbone,kind", [("mistral", "text"), ("mistral", "one"), ("mistral", "two"),
                                           ("mistral", "padded"), ("qwen2", "padded"), ("llama", "two"),
                                           ("mistral", "padded-left")])
def test_train_step_matches_transformers(models, backbone, kind):
    ours, hf = models(backbone)
    batch = make_batch(ours, kind)
    loss, g = step(ours, batch)
    ref_loss, ref_g = step(hf, batch)
    assert abs(loss - ref_loss) <= LOSS_ATOL, (loss, ref_loss)
    # every trainable parameter that takes part gets a gradient (images: the tower and projector too)
    expected = {n for n, p in ours.named_parameters()
                if kind != "text" or n.startswith(("model.language_model.", "lm_head."))}
    assert set(g) == expected, f"no gradient for {sorted(expected - set(g))[:5]}"
    assert_same_grads(g, ref_g)


def test_checkpointing_gives_the_same_gradients(models, monkeypatch):
    ours, hf = models("mistral")
    batch = make_batch(ours, "one", seed=1)
    loss, plain = step(ours, batch)
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        assert ours.is_gradient_checkpointing and ours.is_activation_checkpointing
        assert ours.model.language_model.gradient_checkpointing and ours.model.vision_tower.encoder.gradient_checkpointing
        import torch.utils.checkpoint as tuc

        counted, real = [], tuc.checkpoint
        monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: counted.append(k) or real(*a, **k))
        ckpt_loss, ckpt = step(ours, batch)
        monkeypatch.undo()
        assert counted == [{"use_reentrant": False}] * 4, "2 decoder + 2 vision layers go through checkpoint()"
    finally:
        ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_loss, ref = step(hf, batch)
    hf.gradient_checkpointing_disable()
    assert abs(ckpt_loss - loss) <= LOSS_ATOL and abs(ckpt_loss - ref_loss) <= LOSS_ATOL
    assert_same_grads(ckpt, plain)
    assert_same_grads(ckpt, ref)


def test_reentrant_checkpointing_reaches_frozen_embedding_adapters(models):
    """use_reentrant=True with frozen embeddings needs enable_input_require_grads (gradient_checkpointing_enable
    turns it on): the layers' weights still get gradients."""
    ours, _ = models("mistral")
    ours.get_input_embeddings().weight.requires_grad_(False)
    try:
        ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        _, g = step(ours, make_batch(ours, "text"))
        assert "model.language_model.layers.0.self_attn.q_proj.weight" in g
        ours.disable_input_require_grads()
        _, g = step(ours, make_batch(ours, "text"))
        assert "model.language_model.layers.0.self_attn.q_proj.weight" not in g  # the hook was what carried it
    finally:
        ours.gradient_checkpointing_disable()
        ours.get_input_embeddings().weight.requires_grad_(True)


def test_loaded_parameters_are_trainable_and_inference_stays_gradient_free(models):
    ours, hf = models("mistral")
    assert all(p.requires_grad for p in ours.parameters())
    assert ours.num_parameters(only_trainable=True) == ours.num_parameters()
    ours_names = dict(ours.named_parameters())
    unused = sum(p.numel() for n, p in hf.named_parameters() if canonical_name(n) not in ours_names)
    assert unused > 0  # the CLIP layer above the feature layer and post_layernorm, which we never build
    for exclude in (False, True):
        assert ours.num_parameters(exclude_embeddings=exclude) == hf.num_parameters(exclude_embeddings=exclude) - unused
    ours.eval()
    out = ours.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=3, do_sample=False)
    assert not out.requires_grad
    ours.config.use_cache = False  # what Trainer does; the frozen config accepts run-time switches only
    assert ours.config.use_cache is False
    ours.config.use_cache = True
    with pytest.raises(dataclasses.FrozenInstanceError):
        ours.config.vocab_size = 5


def test_embedding_hooks_and_tying(tiny_checkpoint):
    folder, _ = tiny_checkpoint("mistral", tie_word_embeddings=True)
    model = LlavaNextForConditionalGeneration.from_pretrained(folder)
    assert model.get_output_embeddings() is model.lm_head
    assert model.lm_head.weight is model.get_input_embeddings().weight
    new = torch.nn.Embedding(*model.get_input_embeddings().weight.shape)
    model.set_input_embeddings(new)
    assert model.model.language_model.embed_tokens is new and model.lm_head.weight is not new.weight
    model.tie_weights()
    assert model.lm_head.weight is new.weight


@pytest.mark.parametrize("tied", [False, True])
def test_resize_token_embeddings_matches_transformers(tiny_checkpoint, tied):
    from transformers import LlavaNextForConditionalGeneration as HF

    folder, _ = tiny_checkpoint("mistral", tie_word_embeddings=tied)
    ours, hf = LlavaNextForConditionalGeneration.from_pretrained(folder), HF.from_pretrained(folder)
    torch.manual_seed(7)
    emb = ours.resize_token_embeddings(tiny.VOCAB + 5, pad_to_multiple_of=8)
    torch.manual_seed(7)
    ref = hf.resize_token_embeddings(tiny.VOCAB + 5, pad_to_multiple_of=8)
    assert emb.weight.shape == ref.weight.shape == (tiny.VOCAB + 8, 64)
    assert ours.config.text_config.vocab_size == tiny.VOCAB + 8 == hf.config.text_config.vocab_size
    torch.testing.assert_close(emb.weight, ref.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.lm_head.weight, hf.lm_head.weight, rtol=0, atol=1e-6)
    assert (ours.lm_head.weight is emb.weight) == tied
    ids = torch.tensor([[1, tiny.VOCAB + 3, 9, tiny.VOCAB + 7]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, rtol=0, atol=1e-4)
    assert ours.resize_token_embeddings() is emb  # no size: the same module


def test_prepare_inputs_for_generation():
    cfg = tiny.hf_config()
    del cfg
    from llava_next.config import LlavaNextConfig

    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(text_config={"num_hidden_layers": 1,
                                                                               "hidden_size": 8, "vocab_size": 10,
                                                                               "num_attention_heads": 2,
                                                                               "num_key_value_heads": 2,
                                                                               "head_dim": 4,
                                                                               "intermediate_size": 8}))
    ids, mask, pv = torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4), torch.zeros(1, 1, 3, 2, 2)
    first = model.prepare_inputs_for_generation(ids, attention_mask=mask, pixel_values=pv, image_sizes=[[2, 2]])
    assert first["input_ids"] is ids and first["pixel_values"] is pv and first["attention_mask"] is mask
    later = model.prepare_inputs_for_generation(ids, past_key_values=object(), attention_mask=mask, pixel_values=pv)
    assert later["input_ids"].shape == (1, 1) and "pixel_values" not in later
