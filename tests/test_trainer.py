"""transformers' Trainer (a test-only dependency) drives our model on the CPU: a few steps on a tiny
image-caption set, with the same first-step loss as transformers' own model from the same checkpoint and
seed, and (the optimizer having used our gradients) the same second-step loss; then the trained model's
save_pretrained writes a folder both libraries load with the same logits."""

from __future__ import annotations

import caption_data
import pytest
import server_fixtures
import torch

from llava_next.compat.modeling import LlavaNextForConditionalGeneration

LOSS_ATOL = 1e-5


def run_trainer(model, processor, data, out, steps=2):
    from transformers import Trainer, TrainingArguments

    losses = []
    hook = model.register_forward_hook(lambda module, args, output: losses.append(output.loss.item()))
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3,
                             use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=0,
                             remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=caption_data.CaptionCollator(processor))
    result = trainer.train()
    hook.remove()
    return trainer, losses, result


@pytest.fixture(scope="module")
def folder(tiny_checkpoint, tmp_path_factory):
    return server_fixtures.full_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("trainer"))


def test_trainer_matches_transformers(folder, tmp_path):
    from transformers import LlavaNextForConditionalGeneration as HF

    from llava_next import LlavaNextProcessor

    processor = LlavaNextProcessor.from_pretrained(folder)
    data = caption_data.pairs(4)
    ours = LlavaNextForConditionalGeneration.from_pretrained(folder)
    _, losses, result = run_trainer(ours, processor, data, tmp_path / "ours")
    _, ref_losses, _ = run_trainer(HF.from_pretrained(folder), processor, data, tmp_path / "hf")
    assert len(losses) == len(ref_losses) == 2 and result.global_step == 2
    assert abs(losses[0] - ref_losses[0]) <= LOSS_ATOL, (losses, ref_losses)
    assert abs(losses[1] - ref_losses[1]) <= 1e-4, (losses, ref_losses)
    assert ours.config.use_cache is False  # Trainer's setting (args.use_cache defaults to False)

    # Trainer.save_model writes only a state dict for a class that is not transformers' PreTrainedModel;
    # the model's own save_pretrained writes the full folder
    ours.save_pretrained(tmp_path / "saved")
    batch = caption_data.CaptionCollator(processor)(data[:1])
    batch.pop("labels")
    ours.eval()
    with torch.no_grad():
        expected = ours(**batch).logits
        for cls in (LlavaNextForConditionalGeneration, HF):
            torch.testing.assert_close(cls.from_pretrained(tmp_path / "saved")(**batch).logits, expected,
                                       rtol=0, atol=1e-4)
