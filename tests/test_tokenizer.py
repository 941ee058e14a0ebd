"""llava_next.tokenizer against transformers 5.23 on the real Mistral vocabulary (hub-style checkpoints)."""

import json
import shutil

import numpy as np
import pytest
import torch

from chat_templates import FAMILIES
from processor_fixtures import reference_processor, shared_processor_folder
from llava_next.errors import ContextLengthError
from llava_next.preprocess.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "",
    " leading space",
    "trailing space ",
    "  two  spaces\n\nand newlines\t tab",
    "[INST] <image>\nWhat is shown in this image? [/INST]",
    "<image><image><image>\nthree images",
    "USER: <image>\nDescribe it. ASSISTANT:",
    "<s> a typed BOS and </s> a typed EOS <unk>",
    "<|im_start|>user\n<image>\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|start_header_id|>user<|end_header_id|>\n\n<image>\nhi<|eot_id|>",
    "Unicode: é, ü, 中文, 日本語, emoji 🙂🚀, math ∑∫",
    "Numbers 1234567890 and punctuation !?.,;:'\"()[]{} don't won't",
    "<pad> padding token typed in text",
    "a" * 300,
]


@pytest.fixture(scope="module", params=["mistral", "34b", "llama3"])
def pair(request):
    """(ours, transformers') tokenizer for a family; both from the same folder."""
    folder = shared_processor_folder(request.param)
    return Tokenizer.from_pretrained(folder), reference_processor(folder).tokenizer


def test_encode_matches_transformers(pair):
    ours, ref = pair
    for text in TEXTS:
        for specials in (True, False):
            assert ours(text, add_special_tokens=specials)["input_ids"] == ref(text, add_special_tokens=specials).input_ids, text
            assert ours.encode(text, add_special_tokens=specials) == ref.encode(text, add_special_tokens=specials)
        assert ours.tokenize(text) == ref.tokenize(text)


def test_attributes_match_transformers(pair):
    ours, ref = pair
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == (ref.bos_token, ref.eos_token, ref.unk_token, ref.pad_token)
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.pad_token_id) == (1, 2, 0, 32001)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.vocab_size == ref.vocab_size and len(ours) == len(ref)
    assert ours.padding_side == ref.padding_side
    assert ours.special_tokens_map == ref.special_tokens_map
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids)
    tokens = ["<s>", "<image>", "<pad>", "▁Hello", "not-a-token-xyz", "<|im_start|>"]
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("<image>") == 32000
    ids = [1, 22557, 32000, 2, 32001, 13, 0]
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == ref.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert ours.convert_ids_to_tokens(22557) == ref.convert_ids_to_tokens(22557)
    assert ours.get_vocab() == ref.get_vocab()


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding_matches_transformers(pair, side):
    ours, ref = pair
    batch = TEXTS[:8]
    for kwargs in ({"padding": True}, {"padding": "longest", "pad_to_multiple_of": 8},
                   {"padding": "max_length", "max_length": 64}):
        a = ours(batch, padding_side=side, **kwargs)
        b = ref(batch, padding_side=side, **kwargs)
        assert a["input_ids"] == b.input_ids and a["attention_mask"] == b.attention_mask, kwargs
    old = ours.padding_side, ref.padding_side
    ours.padding_side = ref.padding_side = side
    try:
        a, b = ours(batch, padding=True, return_tensors="pt"), ref(batch, padding=True, return_tensors="pt")
    finally:
        ours.padding_side, ref.padding_side = old
    assert a["input_ids"].dtype == torch.int64 and torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["attention_mask"], b["attention_mask"])
    a, b = ours(batch, padding=True, padding_side=side, return_tensors="np"), ref(batch, padding=True, padding_side=side, return_tensors="np")
    assert isinstance(a["input_ids"], np.ndarray) and np.array_equal(a["input_ids"], b["input_ids"])


def test_truncation_matches_transformers(pair):
    ours, ref = pair
    text = "The quick brown fox jumps over the lazy dog. " * 5
    for kwargs in ({"truncation": True, "max_length": 10}, {"max_length": 7}, {"truncation": True, "max_length": 1},
                   {"truncation": "longest_first", "max_length": 500}):
        assert ours(text, **kwargs)["input_ids"] == ref(text, **kwargs).input_ids, kwargs
    ours.truncation_side = ref.truncation_side = "left"
    try:
        assert ours(text, truncation=True, max_length=9)["input_ids"] == ref(text, truncation=True, max_length=9).input_ids
    finally:
        ours.truncation_side = ref.truncation_side = "right"
    # truncation=True without max_length and an unbounded model_max_length: no truncation, as transformers
    assert ours(text, truncation=True)["input_ids"] == ref(text, truncation=True).input_ids


def test_truncation_never_cuts_an_image_run(pair):
    ours, _ = pair
    text = "Look: " + "<image>" * 20 + " and tell me."
    with pytest.raises(ContextLengthError, match="image tokens"):
        ours(text, truncation=True, max_length=10)
    with pytest.raises(ContextLengthError):
        ours([text, "short"], padding=True, truncation=True, max_length=12)
    ours.truncation_side = "left"
    try:
        with pytest.raises(ContextLengthError):
            ours(text, truncation=True, max_length=15)
    finally:
        ours.truncation_side = "right"


def test_truncation_keeping_the_image_run_is_allowed(pair):
    ours, ref = pair
    text = "<image>" * 5 + " then a long tail of words that can be cut away safely"
    kept = ours(text, truncation=True, max_length=8)["input_ids"]
    assert kept == ref(text, truncation=True, max_length=8).input_ids and kept.count(32000) == 5


@pytest.mark.parametrize("skip", [False, True])
def test_decode_matches_transformers(pair, skip):
    ours, ref = pair
    batch = ref(TEXTS, padding=True, padding_side="left").input_ids
    for ids in batch:
        for clean in (None, True, False):
            assert ours.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean) == \
                ref.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean)
    assert ours.batch_decode(batch, skip_special_tokens=skip) == ref.batch_decode(batch, skip_special_tokens=skip)
    tensor = torch.tensor(batch)
    assert ours.batch_decode(tensor, skip_special_tokens=skip) == ref.batch_decode(tensor, skip_special_tokens=skip)
    assert ours.decode(tensor[0], skip_special_tokens=skip) == ref.decode(tensor[0], skip_special_tokens=skip)
    assert ours.decode(tensor, skip_special_tokens=skip) == ref.decode(tensor, skip_special_tokens=skip)
    assert ours.decode(22557) == ref.decode(22557)
    assert ours.batch_decode([[1, 22557]]) == ref.batch_decode([[1, 22557]])


def test_cleanup_rules_match_transformers(pair):
    ours, ref = pair
    ids = ref("Hello , world . It 's fine , is n't it ?", add_special_tokens=False).input_ids
    # BPE models: transformers 5.x ignores clean-up unless forced
    assert ours.decode(ids, clean_up_tokenization_spaces=True) == ref.decode(ids, clean_up_tokenization_spaces=True)
    ours._force_cleanup = True
    ref.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    try:
        assert ours.decode(ids, clean_up_tokenization_spaces=True) == ref.decode(ids, clean_up_tokenization_spaces=True)
        assert "," in ours.decode(ids, clean_up_tokenization_spaces=True) and " ," not in ours.decode(ids, clean_up_tokenization_spaces=True)
    finally:
        ours._force_cleanup = False
        ref.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = False


def test_padding_without_pad_token(tmp_path):
    folder = tmp_path / "nopad"
    shutil.copytree(shared_processor_folder("vicuna", "hub"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special = json.loads((folder / "special_tokens_map.json").read_text())
    special.pop("pad_token")
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    ours, ref = Tokenizer.from_pretrained(folder), reference_processor(folder).tokenizer
    assert ours.pad_token is None and ours.pad_token_id is None and ref.pad_token_id is None
    with pytest.raises(ValueError, match="pad"):
        ours(["a", "b c"], padding=True)
    with pytest.raises(ValueError):
        ref(["a", "b c"], padding=True)
    ours.pad_token = ours.eos_token
    ref.pad_token = ref.eos_token
    assert ours(["a", "b c"], padding=True)["input_ids"] == ref(["a", "b c"], padding=True).input_ids


def test_legacy_files_without_added_tokens_decoder(tmp_path):
    """Old checkpoints: special_tokens_map.json + added_tokens.json, no added_tokens_decoder in the config."""
    folder = tmp_path / "legacy"
    shutil.copytree(shared_processor_folder("34b", "hub"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"], config["pad_token"], config["additional_special_tokens"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "added_tokens.json").write_text(json.dumps({"<image>": 32000, "<pad>": 32001}))
    ours, ref = Tokenizer.from_pretrained(folder), reference_processor(folder).tokenizer
    assert ours.special_tokens_map == ref.special_tokens_map and ours.pad_token_id == ref.pad_token_id == 32001
    for text in TEXTS:
        assert ours(text)["input_ids"] == ref(text).input_ids
        ids = ref(text).input_ids
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_save_pretrained_round_trip(pair, tmp_path):
    ours, ref = pair
    ours.save_pretrained(tmp_path)
    shutil.copy(shared_processor_folder("mistral") / "config.json", tmp_path / "config.json")
    again = Tokenizer.from_pretrained(tmp_path)
    from transformers import AutoTokenizer

    ref_again = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert again(text)["input_ids"] == ours(text)["input_ids"] == ref_again(text).input_ids
    assert again.special_tokens_map == ours.special_tokens_map and again.padding_side == ours.padding_side
    # added_tokens_decoder: every added token with all its flags, as the backend's tokenizer.json lists them
    backend = json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"]
    expected = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in backend}
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["added_tokens_decoder"] == expected


def test_bad_inputs(pair, tmp_path):
    ours, _ = pair
    with pytest.raises(ValueError):
        ours(123)
    with pytest.raises(ValueError):
        ours(["a", 2])
    with pytest.raises(ValueError, match="different lengths"):
        ours(["a", "b c d"], return_tensors="pt")
    with pytest.raises(ValueError):
        ours(["a"], padding=True, padding_side="middle")
    with pytest.raises(OSError, match="does-not-exist"):
        Tokenizer.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_all_families_load():
    for family in FAMILIES:
        folder = shared_processor_folder(family)
        ours, ref = Tokenizer.from_pretrained(folder), reference_processor(folder).tokenizer
        text = TEXTS[9] + TEXTS[10]
        assert ours(text)["input_ids"] == ref(text).input_ids
        assert ours.decode(ref(text).input_ids, skip_special_tokens=True) == ref.decode(ref(text).input_ids, skip_special_tokens=True)


def test_add_bos_eos_flags_follow_transformers(tmp_path):
    """With a tokenizer.json, transformers 5.x ignores add_bos_token/add_eos_token: the post-processor decides."""
    folder = tmp_path / "flags"
    shutil.copytree(shared_processor_folder("vicuna", "hub"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, add_eos_token=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = Tokenizer.from_pretrained(folder), reference_processor(folder).tokenizer
    assert ours("hi")["input_ids"] == ref("hi").input_ids == [1, 12014]
    # no post-processor in tokenizer.json: no special tokens at all (transformers' default add_bos_token=False)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    ours, ref = Tokenizer.from_pretrained(folder), reference_processor(folder).tokenizer
    assert ours("hi")["input_ids"] == ref("hi").input_ids == [12014]


# -- from_pretrained keyword arguments ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"padding_side": "left", "truncation_side": "left", "model_max_length": 12},
    {"pad_token": "<new_pad>", "use_fast": True, "trust_remote_code": True},
    {"pad_token": None, "unk_token": "<s>"},
])
def test_from_pretrained_kwargs_override_tokenizer_config_like_transformers(kwargs):
    from transformers import AutoTokenizer

    folder = shared_processor_folder("mistral")
    ours, ref = Tokenizer.from_pretrained(folder, **kwargs), AutoTokenizer.from_pretrained(str(folder), **kwargs)
    for name in ("padding_side", "truncation_side", "model_max_length", "pad_token", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert len(ours) == len(ref)
    texts = ["Hello world <new_pad>", "a much longer text that will be truncated on one side or the other"]
    padding = ours.pad_token is not None
    got = ours(texts, padding=padding, truncation=True)
    want = ref(texts, padding=padding, truncation=True)
    assert got["input_ids"] == want["input_ids"] and got["attention_mask"] == want["attention_mask"]


def test_from_pretrained_bad_kwargs_are_typed_errors():
    folder = shared_processor_folder("mistral")
    with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\) 'add_prefix_space'"):
        Tokenizer.from_pretrained(folder, add_prefix_space=True)
    with pytest.raises(ValueError, match="model_max_length must be a positive int"):
        Tokenizer.from_pretrained(folder, model_max_length="long")
    with pytest.raises(ValueError, match="truncation_side must be 'left' or 'right'"):
        Tokenizer.from_pretrained(folder, truncation_side="middle")
