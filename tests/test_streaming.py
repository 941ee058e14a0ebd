"""Streamers against transformers' own, on a real SentencePiece tokenizer (Mistral's, shipped in mistral_common):
the same pieces, the same stdout, and the joined text equal to the plain decode."""

import os
import queue
import shutil
import threading
import time

import pytest
import torch
from transformers import LlamaTokenizer
from transformers import TextIteratorStreamer as HFTextIteratorStreamer
from transformers import TextStreamer as HFTextStreamer

from llava_next.compat.streaming import TextIteratorStreamer, TextStreamer

TEXTS = [
    "An increasing sequence: one, two, three, four, five, six, seven, eight, nine, ten, eleven,",
    "first line\n\nThe next line\nand   several    spaces  ",
    "你好，世界！这是一个测试。中文没有空格",
    "日本語のテキスト、カタカナ　ひらがな and 한국어 문장",
    "rare: 龘 𝔘 🦙 emoji 😀 end",  # byte-fallback tokens: partial UTF-8 mid-stream
    "naïve café — Ünïcödé ßtraße\tTab",
    "trailing newline\n",
    "",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    import mistral_common

    folder = tmp_path_factory.mktemp("mistral_tokenizer")
    src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    shutil.copy(src, folder / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(str(folder))


def collecting(cls):
    """A subclass that records each finalized piece instead of printing it."""

    class Collect(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.pieces = []

        def on_finalized_text(self, text, stream_end=False):
            self.pieces.append((text, stream_end))

    return Collect


def stream(streamer, prompt, new_ids, chunk=1):
    streamer.put(torch.tensor([prompt]))  # the prompt arrives as (1, T), later tokens as (chunk,)
    for i in range(0, len(new_ids), chunk):
        streamer.put(torch.tensor(new_ids[i : i + chunk]))
    streamer.end()


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_prompt", [True, False])
@pytest.mark.parametrize("chunk", [1, 3])
def test_pieces_match_transformers(tok, text, skip_prompt, chunk):
    prompt = tok.encode("USER: say it\nASSISTANT:")  # starts with BOS
    new_ids = tok.encode(text, add_special_tokens=False)
    ours = collecting(TextStreamer)(tok, skip_prompt=skip_prompt, skip_special_tokens=True)
    ref = collecting(HFTextStreamer)(tok, skip_prompt=skip_prompt, skip_special_tokens=True)
    stream(ours, prompt, new_ids, chunk)
    stream(ref, prompt, new_ids, chunk)
    assert ours.pieces == ref.pieces
    if skip_prompt:
        assert "".join(p for p, _ in ours.pieces) == tok.decode(new_ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_joined_equals_decode(tok, text):
    new_ids = tok.encode(text, add_special_tokens=False)
    ours = collecting(TextStreamer)(tok, skip_prompt=True)
    stream(ours, [1], new_ids)
    assert "".join(p for p, _ in ours.pieces) == tok.decode(new_ids) == text
    assert all(p != "\ufffd" and not p.endswith("\ufffd") for p, _ in ours.pieces)  # no half characters
    assert [end for _, end in ours.pieces] == [False] * len(new_ids) + [True]


def test_releases_whole_words(tok):
    ids = tok.encode("Hello wonderful world", add_special_tokens=False)
    ours = collecting(TextStreamer)(tok, skip_prompt=True)
    ours.put(torch.tensor([[1]]))
    released = []
    for i in ids:
        ours.put(torch.tensor([i]))
        released.append("".join(p for p, _ in ours.pieces))
    assert "wonderful " in released[-1] and "world" not in released[-1]
    ours.end()
    assert "".join(p for p, _ in ours.pieces) == "Hello wonderful world"


def test_stdout_matches_transformers(tok, capsys):
    prompt = tok.encode("USER: go\nASSISTANT:")
    printed = []
    for cls in (TextStreamer, HFTextStreamer):
        for text in TEXTS[:5]:
            stream(cls(tok, skip_prompt=True), prompt, tok.encode(text, add_special_tokens=False))
            stream(cls(tok), prompt, tok.encode(text, add_special_tokens=False), chunk=2)
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and "你好" in printed[0]


def test_reuse_after_end(tok):
    ours = collecting(TextStreamer)(tok, skip_prompt=True)
    for text in ("one two", "three four"):
        stream(ours, tok.encode("prompt"), tok.encode(text, add_special_tokens=False))
    assert "".join(p for p, _ in ours.pieces) == "one twothree four"  # each prompt skipped again


def test_batch_of_two_refused(tok):
    with pytest.raises(ValueError, match="batch size 1"):
        TextStreamer(tok).put(torch.tensor([[1, 2], [3, 4]]))


def test_iterator_across_threads(tok):
    text = TEXTS[1] + " " + TEXTS[2] + " " + TEXTS[4]
    prompt, new_ids = tok.encode("USER: go\nASSISTANT:"), tok.encode(text, add_special_tokens=False)

    def produce(streamer):
        streamer.put(torch.tensor([prompt]))
        for i in new_ids:
            streamer.put(torch.tensor([i]))
            time.sleep(0.001)
        streamer.end()

    results = []
    for cls in (TextIteratorStreamer, HFTextIteratorStreamer):
        streamer = cls(tok, skip_prompt=True, timeout=10.0)
        worker = threading.Thread(target=produce, args=(streamer,))
        worker.start()
        results.append(list(streamer))  # blocks on the queue until the producer ends the stream
        worker.join()
    assert results[0] == results[1]
    assert "".join(results[0]) == tok.decode(new_ids) == text


def test_iterator_timeout(tok):
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=0.05)
    start = time.monotonic()
    with pytest.raises(queue.Empty):
        next(streamer)  # nothing was generated: the consumer is not left hanging
    assert time.monotonic() - start < 2
    streamer.put(torch.tensor([1]))  # prompt
    streamer.put(torch.tensor(tok.encode("hi there", add_special_tokens=False)))
    streamer.end()
    assert "".join(streamer) == "hi there"


def test_space_after_newline_is_kept_unlike_transformers(tok):
    # transformers empties its cache at a newline, and SentencePiece strips the leading space of the first token
    # of a decode, so it loses one space after each newline. We keep a token of context: the text stays exact.
    text = "x\n  indented code\n    more"
    new_ids = tok.encode(text, add_special_tokens=False)
    ours = collecting(TextStreamer)(tok, skip_prompt=True)
    ref = collecting(HFTextStreamer)(tok, skip_prompt=True)
    stream(ours, [1], new_ids)
    stream(ref, [1], new_ids)
    assert "".join(p for p, _ in ours.pieces) == tok.decode(new_ids)
    assert "".join(p for p, _ in ref.pieces) == "x\n indented code\n   more"
    assert [p for p, _ in ours.pieces][0] == [p for p, _ in ref.pieces][0]  # same pieces up to the first newline
