"""A streamer's consumer always ends (any error before or during generate() ends the stream and re-raises in the
caller); `.to("cuda")` without CUDA is one clear error; num_beams is capped. Each would hang or crash on the
commit before the layout issue."""

from __future__ import annotations

import threading

import pytest
import torch

from llava_next.compat.paged_rows import Rows
from llava_next import DeviceUnavailableError, GenerationArgumentError, ModelInputError, TextIteratorStreamer


class _Digits:
    """The least a streamer needs from a tokenizer."""

    def decode(self, ids, **_):
        return " ".join(str(int(i)) for i in ids)


def _consume(streamer) -> threading.Thread:
    pieces = []
    thread = threading.Thread(target=lambda: pieces.extend(streamer), daemon=True)
    thread.start()
    thread.pieces = pieces
    return thread


def _boom(*args, **kwargs):
    raise RuntimeError("decode step failed")


@pytest.mark.parametrize("case", ["bad_argument", "bad_input", "beams_with_streamer", "error_in_decode_loop"])
def test_a_streamer_consumer_ends_on_every_error(tiny_pair, monkeypatch, case):
    ours, _ = tiny_pair("mistral")
    streamer = TextIteratorStreamer(_Digits())  # timeout=None: a missing end() would block forever
    consumer = _consume(streamer)
    ids = torch.tensor([[1, 5, 6, 7]])
    kwargs = dict(input_ids=ids, max_new_tokens=6, streamer=streamer)
    expected = {"bad_argument": GenerationArgumentError, "bad_input": ModelInputError,
                "beams_with_streamer": GenerationArgumentError, "error_in_decode_loop": RuntimeError}[case]
    if case == "bad_argument":
        kwargs["max_new_tokens"] = -1
    elif case == "bad_input":
        kwargs["input_ids"] = torch.tensor([[1, 10**6]])
    elif case == "beams_with_streamer":
        kwargs["num_beams"] = 2
    else:
        monkeypatch.setattr("llava_next.compat.generate.decode_step", _boom)
    with pytest.raises(expected):
        ours.generate(**kwargs)
    consumer.join(timeout=10)
    assert not consumer.is_alive(), "the streamer's consumer is still waiting"
    if case == "error_in_decode_loop":
        assert consumer.pieces  # the prompt and the first token were streamed before the failure
    monkeypatch.undo()
    assert torch.equal(ours.generate(input_ids=ids, max_new_tokens=3), ours.generate(input_ids=ids, max_new_tokens=3))


def test_a_finished_stream_is_ended_exactly_once(tiny_pair):
    ours, _ = tiny_pair("mistral")
    streamer = TextIteratorStreamer(_Digits())
    consumer = _consume(streamer)
    ours.generate(input_ids=torch.tensor([[1, 5, 6, 7]]), max_new_tokens=4, min_new_tokens=4, streamer=streamer)
    consumer.join(timeout=10)
    assert not consumer.is_alive() and streamer.text_queue.empty()  # no second stop signal left behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("move", [lambda m: m.to("cuda"), lambda m: m.cuda(), lambda m: m.to("cuda:0", torch.float16),
                                  lambda m: m.model.to(device="cuda")])
def test_moving_to_a_missing_gpu_is_one_clear_error(tiny_pair, move):
    ours, _ = tiny_pair("mistral")
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
        move(ours)
    assert ours.device.type == "cpu" and ours.dtype == torch.float32  # nothing moved


def test_num_beams_is_capped_before_any_work(tiny_pair, monkeypatch):
    ours, _ = tiny_pair("mistral")
    monkeypatch.setattr(Rows, "prefill", _boom)  # a prefill would mean work was done
    with pytest.raises(GenerationArgumentError, match="num_beams"):
        ours.generate(input_ids=torch.tensor([[1, 5, 6]]), max_new_tokens=2, num_beams=10_000)
