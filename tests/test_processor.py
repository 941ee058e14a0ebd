"""llava_next.processor against transformers 5.23: image-token expansion, batching, padding, errors, loading."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from processor_fixtures import (
    SYNTHETIC_SIZES,
    make_processor_folder,
    reference_processor,
    shared_processor_folder,
    sample_images,
)
from llava_next.errors import ContextLengthError, ImageTokenMismatchError
from llava_next.preprocess.processor import AutoProcessor, LlavaNextProcessor

PROMPT = "[INST] <image>\nWhat is shown in this image? [/INST]"


@pytest.fixture(scope="module")
def pair():
    folder = shared_processor_folder("mistral")
    return LlavaNextProcessor.from_pretrained(folder), reference_processor(folder)


@pytest.fixture(scope="module")
def images():
    return sample_images()


def assert_same(a, b, keys=("input_ids", "attention_mask", "image_sizes")):
    """Identical integer outputs; pixel values equal too (they come from the image processor)."""
    assert [k for k in a.keys()] == [k for k in b.keys()]
    for key in keys:
        if key in b:
            x, y = a[key], b[key]
            if isinstance(y, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x, y), key
            else:
                assert np.array_equal(np.asarray(x), np.asarray(y)), key
    if "pixel_values" in b and isinstance(b["pixel_values"], torch.Tensor):
        assert a["pixel_values"].shape == b["pixel_values"].shape
        assert torch.allclose(a["pixel_values"], b["pixel_values"], atol=1e-6)


def test_attributes(pair):
    ours, ref = pair
    for name in ("patch_size", "num_additional_image_tokens", "vision_feature_select_strategy", "image_token", "image_token_id"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert (ours.patch_size, ours.num_additional_image_tokens, ours.image_token_id) == (14, 1, 32000)
    assert ours.chat_template == ref.chat_template
    assert ours.image_processor.image_grid_pinpoints == ref.image_processor.image_grid_pinpoints
    assert isinstance(AutoProcessor.from_pretrained(shared_processor_folder("mistral")), LlavaNextProcessor)


def test_token_count_sweep_matches_transformers(pair):
    """The count function equals transformers' `_get_number_of_features` over thousands of sizes."""
    ours, ref = pair
    rng = random.Random(0)
    sizes = list(SYNTHETIC_SIZES) + [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(3000)]
    sizes += [(h, w) for h in (1, 2, 13, 335, 336, 337, 671, 672, 673, 1007, 1008, 1009) for w in range(1, 1400, 37)]
    for h, w in sizes:
        expected = ref._get_number_of_features(h, w, 336, 336) - 1  # strategy "default" drops the CLS
        assert ours.num_image_tokens(h, w) == expected, (h, w)
    # FACTS.md test vectors: 500x316 (HxW) -> 1526, 750x1000 (HxW) -> 2340, squares over 336 px -> 2928, 200x300
    # -> 1464; squares up to 336 px tie on every pinpoint and take the first, 336x672 (1176 tokens at 336x336)
    assert [ours.num_image_tokens(*s) for s in [(500, 316), (750, 1000), (337, 337), (977, 977), (200, 300), (336, 336)]] == \
        [1526, 2340, 2928, 2928, 1464, 1176]


def test_many_image_sizes_match_transformers(pair, images):
    """42 images (photos and synthetic 1x1 ... 4000x40), one per prompt, left-padded batch (right: below)."""
    ours, ref = pair
    pil = [im for _, im in images]
    assert len(pil) >= 40
    prompts = [PROMPT if i % 3 else f"USER: <image>\nPrompt number {i}, a bit longer. ASSISTANT:" for i in range(len(pil))]
    a = ours(pil, prompts, padding=True, padding_side="left", return_tensors="pt")
    b = ref(images=pil, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    assert_same(a, b)
    counts = (a["input_ids"] == 32000).sum(-1).tolist()
    assert counts == [ours.num_image_tokens(h, w) for h, w in a["image_sizes"].tolist()]


def test_several_images_per_prompt_and_across_a_batch(pair, images):
    ours, ref = pair
    pick = [images[i][1] for i in (0, 7, 12, 20, 25, 30)]
    prompts = [
        "USER: <image>\n<image>\nCompare these two. ASSISTANT:",
        "No image in this one, just text.",
        "<image><image><image> three in a row",
        "<image>\nlast",
    ]
    for side in ("left", "right"):
        a = ours(images=pick, text=prompts + ["tail text"], padding=True, padding_side=side, return_tensors="pt")
        b = ref(images=pick, text=prompts + ["tail text"], padding=True, padding_side=side, return_tensors="pt")
        assert_same(a, b)
    nested = [[pick[0], pick[1]], [], [pick[2], pick[3], pick[4]], [pick[5]]]
    assert_same(ours(nested, prompts, padding=True, return_tensors="pt"),
                ref(images=nested, text=prompts, padding=True, return_tensors="pt"))


def test_text_only_prompts(pair):
    ours, ref = pair
    texts = ["Just text.", "A longer text-only prompt, with no image at all."]
    for tensors in (None, "pt", "np"):
        a = ours(text=texts, padding=True, return_tensors=tensors)
        b = ref(text=texts, padding=True, return_tensors=tensors)
        assert list(a.keys()) == list(b.keys()) == ["input_ids", "attention_mask"]
        assert_same(a, b)
    assert ours(text="single")["input_ids"] == ref(text="single")["input_ids"]


def test_return_types_and_single_prompt(pair, images):
    ours, ref = pair
    image = images[1][1]
    a, b = ours(image, PROMPT, return_tensors="pt"), ref(images=image, text=PROMPT, return_tensors="pt")
    assert_same(a, b)
    assert a["input_ids"].shape[0] == 1 and a["image_sizes"].dtype == torch.int64
    assert_same(ours(PROMPT, image, return_tensors="pt"), b)  # the older (text, images) order also works
    a, b = ours(image, PROMPT), ref(images=image, text=PROMPT)
    assert a["input_ids"] == b["input_ids"] and a["attention_mask"] == b["attention_mask"]
    assert [list(x) for x in a["image_sizes"]] == [list(x) for x in b["image_sizes"]]
    a = ours(image, PROMPT, return_tensors="np")
    assert isinstance(a["input_ids"], np.ndarray) and a["pixel_values"].dtype == np.float32
    # images only
    only = ours(images=image, return_tensors="pt")
    assert list(only.keys()) == ["pixel_values", "image_sizes"]


def test_padding_side_attribute_and_left_padding_for_generation(pair, images):
    ours, ref = pair
    pil = [images[0][1], images[3][1]]
    prompts = [PROMPT, "[INST] <image>\nA much longer question about the second picture, please. [/INST]"]
    old = ours.tokenizer.padding_side, ref.tokenizer.padding_side
    ours.tokenizer.padding_side = ref.tokenizer.padding_side = "left"
    try:
        a, b = ours(pil, prompts, padding=True, return_tensors="pt"), ref(images=pil, text=prompts, padding=True, return_tensors="pt")
    finally:
        ours.tokenizer.padding_side, ref.tokenizer.padding_side = old
    assert_same(a, b)
    assert a["attention_mask"][:, -1].all()  # left padded: every row ends with a real token


def test_placeholder_image_mismatch(pair, images):
    ours, _ = pair
    image = images[0][1]
    with pytest.raises(ImageTokenMismatchError, match=r"2 <image>.*1 image"):
        ours(images=[image], text="<image><image> two placeholders")
    with pytest.raises(ImageTokenMismatchError, match=r"0 <image>.*1 image"):
        ours(images=[image], text="no placeholder")
    with pytest.raises(ImageTokenMismatchError, match=r"1 <image>.*0 image"):
        ours(text="<image> but no image")
    with pytest.raises(ImageTokenMismatchError, match=r"1 <image>.*2 image"):
        ours(images=[image, image], text=["<image> one", "none"])


def test_truncation_inside_an_image_run_is_refused(pair, images):
    ours, ref = pair
    image = images[0][1]
    with pytest.raises(ContextLengthError):
        ours(image, PROMPT, truncation=True, max_length=100)
    with pytest.raises(ValueError):  # transformers refuses too, after the fact
        ref(images=image, text=PROMPT, truncation=True, max_length=100)
    ok = ours(image, PROMPT + " tail words", truncation=True, max_length=2940, return_tensors="pt")
    assert_same(ok, ref(images=image, text=PROMPT + " tail words", truncation=True, max_length=2940, return_tensors="pt"))


def test_bad_arguments(pair, tmp_path):
    ours, _ = pair
    with pytest.raises(ValueError):
        ours()
    with pytest.raises(ValueError):
        ours(text=123)
    with pytest.raises(TypeError, match="nonsense"):
        ours(text="hi", nonsense=1)
    with pytest.raises(OSError, match="no-such-folder"):
        LlavaNextProcessor.from_pretrained(tmp_path / "no-such-folder")
    with pytest.raises(OSError, match="no-such-org/no-such-model"):
        AutoProcessor.from_pretrained("no-such-org/no-such-model")  # offline in tests: fails, naming the id


def test_both_layouts_and_families_match_transformers(tmp_path, images):
    pil = [images[2][1], images[9][1]]
    for family, layout in (("vicuna", "hub"), ("34b", "transformers"), ("llama3", "hub"), ("72b", "transformers"),
                           ("110b", "hub")):
        folder = shared_processor_folder(family, layout)
        ours, ref = LlavaNextProcessor.from_pretrained(folder), reference_processor(folder)
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
        prompt = ref.apply_chat_template(conversation, add_generation_prompt=True)
        assert ours.apply_chat_template(conversation, add_generation_prompt=True) == prompt
        a = ours(pil, [prompt, prompt], padding=True, return_tensors="pt")
        b = ref(images=pil, text=[prompt, prompt], padding=True, return_tensors="pt")
        assert_same(a, b)
        assert ours.decode(b["input_ids"][0], skip_special_tokens=True) == ref.decode(b["input_ids"][0], skip_special_tokens=True)


@pytest.mark.parametrize("skip", [False, True])
def test_decode_and_batch_decode(pair, images, skip):
    ours, ref = pair
    ids = ref(images=[images[0][1], images[5][1]], text=[PROMPT, "<image> other"], padding=True, return_tensors="pt")["input_ids"]
    ids = torch.cat([ids, torch.tensor([[22557, 1526, 2], [28705, 13, 32001]])], dim=1)  # "generated" tokens
    assert ours.batch_decode(ids, skip_special_tokens=skip) == ref.batch_decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids[0], skip_special_tokens=skip) == ref.decode(ids[0], skip_special_tokens=skip)
    assert ours.decode(ids[1, -3:], skip_special_tokens=skip) == ref.decode(ids[1, -3:], skip_special_tokens=skip)


def test_save_pretrained_round_trip(pair, images, tmp_path):
    ours, _ = pair
    ours.save_pretrained(tmp_path / "saved")
    shutil.copy(shared_processor_folder("mistral") / "config.json", tmp_path / "saved" / "config.json")
    again, ref = LlavaNextProcessor.from_pretrained(tmp_path / "saved"), reference_processor(tmp_path / "saved")
    pil = [images[4][1]]
    assert_same(again(pil, PROMPT, return_tensors="pt"), ref(images=pil, text=PROMPT, return_tensors="pt"))
    assert again.chat_template == ours.chat_template == ref.chat_template
    assert json.loads((tmp_path / "saved" / "processor_config.json").read_text())["patch_size"] == 14


def test_image_token_must_be_in_vocabulary(tmp_path):
    folder = make_processor_folder(tmp_path, "vicuna", layout="hub")
    config = json.loads((folder / "processor_config.json").read_text())
    config["image_token"] = "<not-a-token>"
    (folder / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not-a-token"):
        LlavaNextProcessor.from_pretrained(folder)


def test_a_folder_without_image_processor_settings_is_refused(tmp_path):
    folder = make_processor_folder(tmp_path, "vicuna", layout="hub")
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json.*'image_processor' entry"):
        LlavaNextProcessor.from_pretrained(folder)


def test_images_from_files_and_arrays(pair, tmp_path):
    ours, ref = pair
    rng = np.random.default_rng(3)
    array = rng.integers(0, 256, (250, 410, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    a = ours(images=[str(path), array], text=["<image> file", "<image> array"], padding=True, return_tensors="pt")
    b = ref(images=[Image.open(path), array], text=["<image> file", "<image> array"], padding=True, return_tensors="pt")
    assert_same(a, b)


def test_seed_document_flow(pair, images):
    """The seed's code with only the import changed: chat template, processor(image(s), prompt), decode."""
    ours, ref = pair
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": "Compare these two images."}]}]
    prompt = ours.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == ref.apply_chat_template(conversation, add_generation_prompt=True)
    pair_of_images = [images[0][1], images[2][1]]
    a = ours(pair_of_images, prompt, return_tensors="pt").to("cpu")
    assert_same(a, ref(images=pair_of_images, text=prompt, return_tensors="pt"))
    assert ours.decode(a["input_ids"][0], skip_special_tokens=True) == ref.decode(a["input_ids"][0], skip_special_tokens=True)


# -- from_pretrained keyword arguments ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"padding_side": "left"},
    {"padding_side": "left", "truncation_side": "left", "model_max_length": 64, "use_fast": True,
     "trust_remote_code": False},
    {"num_additional_image_tokens": 0, "vision_feature_select_strategy": "full", "do_pad": False},
    {"image_grid_pinpoints": [[336, 672], [672, 336]], "pad_token": "<unk>"},
])
def test_from_pretrained_kwargs_configure_the_parts_like_transformers(kwargs):
    folder = shared_processor_folder("mistral")
    ours = AutoProcessor.from_pretrained(folder, **kwargs)
    ref = type(reference_processor(folder)).from_pretrained(str(folder), **kwargs)
    for name in ("padding_side", "truncation_side", "model_max_length", "pad_token", "pad_token_id"):
        assert getattr(ours.tokenizer, name) == getattr(ref.tokenizer, name), name
    for name in ("num_additional_image_tokens", "vision_feature_select_strategy", "patch_size"):
        assert getattr(ours, name) == getattr(ref, name), name
    for name in ("do_pad", "image_grid_pinpoints"):
        assert getattr(ours.image_processor, name) == getattr(ref.image_processor, name), name
    texts = ["<image> a short one", "and a much longer second prompt <image> with more words in it"]
    images = [Image.new("RGB", (500, 300), "red"), Image.new("RGB", (500, 300), "blue")]  # same tiles: do_pad=False
    got = ours(images=images, text=texts, padding=True, return_tensors="pt")
    want = ref(images=images, text=texts, padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert got["pixel_values"].shape == want["pixel_values"].shape


def test_from_pretrained_bad_kwargs_are_typed_errors_before_any_download(monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(k) or "/nonexistent")
    folder = shared_processor_folder("mistral")
    for name in (folder, "llava-hf/llava-v1.6-mistral-7b-hf"):
        with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\) 'padding_sides'"):
            AutoProcessor.from_pretrained(name, padding_sides="left")
        with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
            LlavaNextProcessor.from_pretrained(name, padding_side="center")
        with pytest.raises(TypeError, match="'image_processor_type'"):  # not a setting to override
            LlavaNextProcessor.from_pretrained(name, image_processor_type="x")
    assert calls == []


def test_from_pretrained_hub_kwargs_reach_the_hub_only(monkeypatch):
    import huggingface_hub

    folder = shared_processor_folder("mistral")
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **k: calls.append(k) or str(folder))
    processor = AutoProcessor.from_pretrained("llava-hf/llava-v1.6-mistral-7b-hf", padding_side="left", use_fast=True,
                                              trust_remote_code=True, revision="r", cache_dir="/tmp/c", token=None)
    assert processor.tokenizer.padding_side == "left"
    assert calls == [{"allow_patterns": ["*.json", "*.jinja", "chat_templates/*.jinja", "additional_chat_templates/*.jinja"], "revision": "r",
                      "cache_dir": "/tmp/c"}]
