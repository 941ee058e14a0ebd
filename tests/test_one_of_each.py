"""The single copies issue 19 merged: the chat splitter, the prompt builder's checks, the dtype table.

Each front door (LLM.chat, the server, the processor, the engine, generate()) is covered end to end by its own
tests; these pin the shared functions' contracts directly.
"""

from __future__ import annotations

import pytest
import torch

from llava_next.config import LlavaNextConfig
from llava_next.errors import ContextLengthError, ImageTokenMismatchError, InvalidImageError, ModelInputError
from llava_next.loading.dtypes import DTYPES, torch_dtype
from llava_next.preprocess.chat_messages import image_sources, split_messages
from llava_next.preprocess.prompt import check_pixel_values, check_room, encode_prompt, expand_image_tokens, image_spans


def test_split_messages_dicts_and_server_models_alike():
    from llava_next.entrypoints.openai import protocol as P

    raw = [{"role": "developer", "content": "be brief"},
           {"role": "user", "content": [{"type": "text", "text": "what is"},
                                        {"type": "image_url", "image_url": {"url": "data:a", "detail": "low"}},
                                        {"type": "image", "url": "b.png"}]},
           {"role": "assistant", "content": None}]
    expected = ([{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                 {"role": "user", "content": [{"type": "text", "text": "what is"}, {"type": "image"}, {"type": "image"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": ""}]}], ["data:a", "b.png"])
    assert split_messages(raw) == expected
    loaded = split_messages(raw, load=lambda key, source: (key, source))[1]
    assert loaded == [("url", "data:a"), ("url", "b.png")]  # the injected loader sees each image in order
    server_raw = [raw[0], {"role": "user", "content": raw[1]["content"][:2]}]  # the server's parts: no "image"
    server = P.ChatCompletionRequest.model_validate({"model": "m", "messages": server_raw}, strict=False).messages
    assert split_messages(server) == ([expected[0][0], {"role": "user", "content": expected[0][1]["content"][:2]}],
                                      ["data:a"])


@pytest.mark.parametrize("messages, fragment", [
    ([{"role": "user", "content": [{"type": "video", "url": "v.mp4"}]}], "video"),
    ([{"role": "user", "content": [{"type": "image"}]}], "with its"),
    ([{"content": "no role"}], "role"),
    ([{"role": "user", "content": "look: <image>"}], "placeholder"),
])
def test_split_messages_refuses(messages, fragment):
    with pytest.raises(ModelInputError, match=fragment):
        split_messages(messages, image_token="<image>")


def test_image_sources_follow_transformers_key_order():
    assert image_sources({"type": "image", "path": "p", "image": "i"}) == [("image", "i"), ("path", "p")]
    assert image_sources({"type": "image_url", "image_url": "u"}) == [("url", "u")]
    assert image_sources({"type": "text", "text": "x"}) == [] and image_sources("x") == []


def test_expand_spans_and_room():
    assert expand_image_tokens("a<i>b<i>", "<i>", iter([2, 1])) == "a<i><i>b<i>"
    assert image_spans([1, 9, 9, 2, 9], 9, [2, 1]) == [1, 4]
    with pytest.raises(ImageTokenMismatchError, match="not contiguous"):
        image_spans([9, 1, 9, 9], 9, [2, 1])
    with pytest.raises(ImageTokenMismatchError, match="3 image tokens"):
        image_spans([9, 9, 9], 9, [2])
    check_room(10, 5, 15)
    with pytest.raises(ContextLengthError, match="max_tokens is 6: 16 > max_model_len 15"):
        check_room(10, 6, 15, "max_tokens", "max_model_len")
    with pytest.raises(ContextLengthError, match=r"\(image tokens included\): 16 > the model's context of 15") as err:
        check_room(16, 0, 15, None)  # a forward pass: no tokens to generate
    assert "lower" not in str(err.value)


def test_check_pixel_values_counts_tiles_per_image():
    config = LlavaNextConfig()
    geometry, vision = config.geometry, config.vision_config
    side = vision.image_size
    n = geometry.num_tiles(500, 300)
    assert check_pixel_values(geometry, vision, torch.zeros(n, 3, side, side), [(500, 300)]) == [n]
    assert check_pixel_values(geometry, vision, torch.zeros(2, n + 1, 3, side, side), [(500, 300)] * 2) == [n, n]
    for bad, fragment in [(torch.zeros(n - 1, 3, side, side), "tiles"), (torch.zeros(n, 3, side, 7), "got"),
                          (torch.zeros(n, 3, side, side, dtype=torch.uint8), "floating")]:
        with pytest.raises(InvalidImageError, match=fragment):
            check_pixel_values(geometry, vision, bad, [(500, 300)])


def test_encode_prompt_needs_a_processor_and_one_kind_of_image():
    with pytest.raises(ModelInputError, match="processor"):
        encode_prompt(None, None, "hi", [])


def test_one_dtype_table():
    assert torch_dtype("auto") is None and torch_dtype(None) is None
    assert {torch_dtype(name) for name in DTYPES if name != "auto"} == {torch.float32, torch.float16, torch.bfloat16}
    assert torch_dtype("torch.float64") is torch.float64 and torch_dtype(torch.int8) is torch.int8
    with pytest.raises(ValueError, match="unknown dtype"):
        torch_dtype("float17")
    with pytest.raises(TypeError):
        torch_dtype(3)
