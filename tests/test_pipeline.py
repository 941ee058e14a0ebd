"""pipeline("image-text-to-text"): our records equal transformers' ImageTextToTextPipeline records.

Both pipelines load the same local checkpoint: a tiny random Mistral LLaVA-NeXT written by transformers
(tests/tiny.py) plus the hub-layout processor files of llava-v1.6-mistral-7b-hf (tests/processor_fixtures.py: the
real Mistral tokenizer and chat template). Images are real photographs (scikit-image) saved as PNG files.
CPU, float32 (exact) and bfloat16 (the seed's dtype) where noted.
"""

from __future__ import annotations

import base64
import shutil
from functools import lru_cache
from pathlib import Path

import pytest
import torch

import processor_fixtures


def full_checkpoint(tiny_checkpoint, root: Path) -> Path:
    """The tiny transformers-written mistral weights + the hub-layout processor files, in one folder (once)."""
    folder = Path(root) / "tiny-mistral-full"
    if not (folder / "model.safetensors").is_file():
        weights, _ = tiny_checkpoint("mistral")
        shutil.copytree(weights, folder, dirs_exist_ok=True)
        for path in processor_fixtures.shared_processor_folder("mistral", "hub").iterdir():
            if path.name != "config.json":  # keep the model's config
                shutil.copy(path, folder / path.name)
    return folder


@lru_cache(maxsize=None)
def photo(root: str, name: str) -> str:
    """A scikit-image photograph saved as PNG under `root`; returns its path."""
    from PIL import Image
    from skimage import data

    path = Path(root) / f"{name}.png"
    if not path.is_file():
        Image.fromarray(getattr(data, name)()).save(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tiny_root):
    return full_checkpoint(tiny_checkpoint, tiny_root)


@pytest.fixture(scope="module")
def photos(tiny_root):
    return {name: photo(str(tiny_root), name) for name in ("chelsea", "astronaut", "coffee")}


@pytest.fixture(scope="module")
def pipes(checkpoint):
    """(ours, transformers') float32 pipelines on the CPU."""
    import transformers
    from transformers.utils import logging

    from llava_next import pipeline

    logging.set_verbosity_error()
    ours = pipeline("image-text-to-text", model=str(checkpoint), device="cpu", dtype=torch.float32)
    ref = transformers.pipeline("image-text-to-text", model=str(checkpoint), device="cpu", dtype=torch.float32)
    return ours, ref


def chat(image_part: dict, text: str = "Describe this image.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", **image_part}, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("return_full_text", [True, False])
def test_chat_return_full_text(pipes, photos, return_full_text):
    ours, ref = pipes
    messages = chat({"path": photos["astronaut"]}, "What is in the picture?")
    got = ours(text=messages, max_new_tokens=6, return_full_text=return_full_text)
    assert got == ref(text=messages, max_new_tokens=6, return_full_text=return_full_text)
    if not return_full_text:
        assert isinstance(got[0]["generated_text"], str)
    else:  # the chat plus a new assistant message
        assert got[0]["generated_text"][:-1] == messages
        assert got[0]["generated_text"][-1]["role"] == "assistant"


def test_assistant_prefill_continues_final_message(pipes, photos):
    ours, ref = pipes
    prefill = {"role": "assistant", "content": [{"type": "text", "text": "It is"}]}
    messages = chat({"url": photos["chelsea"]}) + [prefill]
    got = ours(text=messages, max_new_tokens=5)
    assert got == ref(text=messages, max_new_tokens=5)
    assert got[0]["generated_text"][-1]["content"][-1]["text"].startswith("It is")


def test_batch_of_conversations_left_padded(pipes, photos):
    """A list of chats of different lengths and image sizes: one left-padded batch for us, one by one for
    transformers; the records must be the same, in order."""
    ours, ref = pipes
    from PIL import Image

    chats = [
        chat({"url": photos["chelsea"]}),
        chat({"image": Image.open(photos["astronaut"])}, "Tell me, in a few words, what this photograph shows?"),
        chat({"base64": base64.b64encode(Path(photos["coffee"]).read_bytes()).decode()}, "Hi"),
    ]
    want = ref(text=chats, max_new_tokens=5)
    got = ours(text=chats, max_new_tokens=5)
    assert len(got) == 3 and all(len(r) == 1 for r in got)
    # transformers reports the PIL image object it was given; compare everything else exactly
    assert got == want


@pytest.mark.parametrize("return_full_text", [True, False])
def test_plain_prompt_with_image(pipes, photos, return_full_text):
    ours, ref = pipes
    kwargs = dict(images=photos["chelsea"], text="<image> A photo of", max_new_tokens=5,
                  return_full_text=return_full_text)
    got = ours(**kwargs)
    assert got == ref(**kwargs)
    assert got[0]["input_text"] == "<image> A photo of"


def test_plain_prompts_batch_and_text_only(pipes, photos):
    ours, ref = pipes
    # several prompts in one call; transformers pads with the tokenizer's side, so make it left for the reference
    ref.processor.tokenizer.padding_side = "left"
    try:
        kwargs = dict(images=[photos["chelsea"], photos["coffee"]], text=["<image> A", "<image> What is it, really?"],
                      max_new_tokens=4)
        assert ours(**kwargs) == ref(**kwargs)
    finally:
        ref.processor.tokenizer.padding_side = "right"
    assert ours(text="Just text, no image.", max_new_tokens=4) == ref(text="Just text, no image.", max_new_tokens=4)
    assert ours(text=["one", "two words"], max_new_tokens=3) == ref(text=["one", "two words"], max_new_tokens=3)


def test_return_tensors_and_generate_kwargs(pipes, photos):
    ours, ref = pipes
    messages = chat({"url": photos["chelsea"]})
    got = ours(text=messages, max_new_tokens=4, return_tensors=True)
    want = ref(text=messages, max_new_tokens=4, return_tensors=True)
    assert torch.equal(got[0]["generated_token_ids"], want[0]["generated_token_ids"])
    assert got[0]["input_text"] == messages
    # generate_kwargs as transformers takes them: the same tokens as max_new_tokens=
    as_kwargs = ours(text=messages, generate_kwargs={"max_new_tokens": 4}, return_tensors=True)
    assert torch.equal(as_kwargs[0]["generated_token_ids"], got[0]["generated_token_ids"])
    with pytest.raises(ValueError, match="defined twice"):
        ours(text=messages, max_new_tokens=3, generate_kwargs={"max_new_tokens": 3})


def test_sampling_kwargs_are_used(pipes):
    """Unlike transformers 5.x (which hands them to the processor and drops them), call-time generation
    arguments reach generate(): with a fixed seed sampling is reproducible and differs from greedy."""
    ours, _ = pipes
    messages = [{"role": "user", "content": [{"type": "text", "text": "Write a word."}]}]
    torch.manual_seed(0)
    a = ours(text=messages, max_new_tokens=8, do_sample=True, temperature=5.0, return_full_text=False)
    torch.manual_seed(0)
    b = ours(text=messages, max_new_tokens=8, do_sample=True, temperature=5.0, return_full_text=False)
    greedy = ours(text=messages, max_new_tokens=8, return_full_text=False)
    assert a == b and a != greedy


def test_model_object_and_errors(pipes, photos):
    from llava_next import pipeline

    ours, _ = pipes
    pipe = pipeline("image-text-to-text", model=ours.model, device=-1)  # the processor from the model's folder
    assert pipe.model is ours.model and pipe.processor is not ours.processor
    assert pipe(text="Only text", max_new_tokens=3) == ours(text="Only text", max_new_tokens=3)
    with pytest.raises(ValueError, match="Unknown task"):
        pipeline("text-generation", model=ours.model)
    import llava_next.compat.pipeline  # noqa: F401  importing the module must not shadow the function

    from llava_next import pipeline as again

    assert again is pipeline
    assert pipe(text=(t for t in ["Only text"]), max_new_tokens=3) == [ours(text="Only text", max_new_tokens=3)]
    with pytest.raises(ValueError, match="separate input"):
        pipe(images=photos["chelsea"], text=chat({"url": photos["chelsea"]}))
    with pytest.raises(ValueError, match="role"):
        pipe(text=[{"content": "no role"}])
    with pytest.raises(ValueError, match="provide text"):
        pipe(images=photos["chelsea"])
    with pytest.raises(FileNotFoundError):
        pipe(text=chat({"path": str(Path(photos["chelsea"]).with_name("missing.png"))}), max_new_tokens=2)


def test_bad_generation_arguments_fail_before_preprocessing(pipes, photos, monkeypatch):
    """Typos in generate_kwargs and arguments of the wrong kind: GenerationArgumentError before any image is read
    (value ranges such as num_beams=1.5 are checked by generate(), after preprocessing, before any forward pass)."""
    from llava_next.errors import GenerationArgumentError

    ours, _ = pipes
    loaded = []
    monkeypatch.setattr(ours, "preprocess", lambda *a, **k: loaded.append(1))
    messages = chat({"url": photos["chelsea"]})
    for kwargs, name in ((dict(generate_kwargs={"max_new_token": 2, "temprature": 3}), "max_new_token"),
                         (dict(max_new_tokens=2, stop_sequence=5), "stop_strings"),
                         (dict(max_new_tokens=2, output_hidden_states=True), "output_hidden_states"),
                         (dict(max_new_tokens=2, streamer=5), "streamer")):
        with pytest.raises(GenerationArgumentError, match=name):
            ours(text=messages, **kwargs)
    assert loaded == []
