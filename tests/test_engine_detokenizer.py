"""Incremental detokenization (engine/detokenizer.py) with the real Mistral tokenizer (mistral-common's
tokenizer.model.v1, loaded through our Tokenizer): after every token the text equals decoding the whole output
(skip_special_tokens on and off), text before the reported `unchanged` index never changes, byte-fallback runs
(UTF-8 split across tokens, a valid "€" turned into U+FFFD by a later byte) are held back, each step decodes
only a few tokens; and in the engine a stop string split across tokens is still found."""

from __future__ import annotations

import random

import pytest
from processor_fixtures import shared_processor_folder

from llava_next.engine.detokenizer import (
    IncrementalDetokenizer,
    byte_token_ids,
    special_token_ids,
)
from llava_next.preprocess.tokenizer import Tokenizer

TEXTS = ["Hello wörld € 😀 日本語 naïve  spaces\n\nnew line", "🙂🙃 x", "  leading", "€€€ 12,345.6", "<s> not special"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(shared_processor_folder("mistral", "hub"))


def random_outputs(tok, count, seed=0):
    """Id sequences mixing random ids, byte tokens, special tokens, bare spaces and pieces of real text."""
    rng = random.Random(seed)
    byte_ids = sorted(byte_token_ids(tok))
    pieces = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    for _ in range(count):
        ids = []
        for _ in range(rng.randint(1, 30)):
            r = rng.random()
            if r < 0.3:
                ids.append(rng.randrange(len(tok)))
            elif r < 0.55:
                ids.append(rng.choice(byte_ids))
            elif r < 0.65:
                ids.append(rng.choice([0, 1, 2, 28705, 259, 32000]))  # unk, bos, eos, "▁", "▁▁", <image>
            else:
                ids.extend(rng.choice(pieces)[: rng.randint(1, 12)])
        yield ids


@pytest.mark.parametrize("skip", [True, False])
def test_equals_whole_decode_after_every_token(tok, skip):
    byte_ids = byte_token_ids(tok)
    assert len(byte_ids) == 256
    for ids in random_outputs(tok, 600, seed=int(skip)):
        detok = IncrementalDetokenizer(tok, skip, byte_ids, special_ids=special_token_ids(tok))
        prompt = [1, 733, 16289]
        history = list(prompt)
        shown = ""
        for token in ids:
            history.append(token)
            before = detok.text
            unchanged = detok.update(history, len(prompt))
            want = tok.decode(history[len(prompt):], skip_special_tokens=skip)
            assert detok.text == want, (history[len(prompt):], detok.text, want)
            assert detok.text[:unchanged] == before[:unchanged]
            assert detok.text[: len(shown)] == shown  # what a stream already showed never changes
            shown = detok.text[: detok.stable_chars]


def test_byte_runs_are_held_back(tok):
    byte = {b: tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in (0xE2, 0x82, 0xAC)}
    euro = [byte[0xE2], byte[0x82], byte[0xAC]]
    detok = IncrementalDetokenizer(tok, True, byte_token_ids(tok))
    history = []
    for token in euro:
        history.append(token)
        detok.update(history)
    assert detok.text == "€" and detok.stable_chars == 0  # the run may still grow: not shown yet
    history.append(byte[0xE2])  # the run grows into an invalid one: the whole run is four U+FFFD
    detok.update(history)
    assert detok.text == "\ufffd" * 4 == tok.decode(history) and detok.stable_chars == 0
    history.extend(tok.encode("ok", add_special_tokens=False))
    detok.update(history)
    assert detok.text == tok.decode(history) and detok.stable_chars == len(detok.text)
    # a skipped special token does not end a run: <0x45> </s> <0xE2> decodes as one run of two bytes
    detok = IncrementalDetokenizer(tok, True, byte_token_ids(tok), special_ids=special_token_ids(tok))
    history = [tok.convert_tokens_to_ids("<0x45>"), 2]
    detok.update(history)
    assert detok.text == "E" and detok.stable_chars == 0
    history.append(byte[0xE2])
    detok.update(history)
    assert detok.text == tok.decode(history, skip_special_tokens=True) == "\ufffd\ufffd"


def test_each_step_decodes_a_few_tokens(tok):
    ids = tok.encode(" ".join(TEXTS * 30), add_special_tokens=False)
    decoded = []
    real = tok.decode

    class Counting:
        def decode(self, token_ids, skip_special_tokens=False):
            decoded.append(len(token_ids))
            return real(token_ids, skip_special_tokens=skip_special_tokens)

    detok = IncrementalDetokenizer(Counting(), True, byte_token_ids(tok))
    for n in range(1, len(ids) + 1):
        detok.update(ids[:n])
    assert detok.text == tok.decode(ids, skip_special_tokens=True)
    assert len(ids) > 500 and sum(decoded) < 12 * len(ids)  # a whole-output decode per step would be ~n^2 / 2


def test_engine_finds_a_stop_string_split_across_tokens(tmp_path_factory):
    import llava_next
    from llava_next import SamplingParams
    from llava_next.entrypoints.demo import build_demo_checkpoint

    folder = build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt", quiet=True)
    llm = llava_next.LLM(str(folder), max_num_batched_tokens=512)
    base = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    full = llm.generate(["Once upon"], base, use_tqdm=False)[0].outputs[0]
    tok = llm.get_tokenizer()
    pieces = [tok.decode(full.token_ids[: i + 1]) for i in range(len(full.token_ids))]
    # a stop string that starts in one token's text and ends in the next one's
    i = next(i for i in range(2, len(pieces)) if len(pieces[i - 1]) - len(pieces[i - 2]) >= 2
             and len(pieces[i]) > len(pieces[i - 1]))
    stop = pieces[i][len(pieces[i - 1]) - 1: len(pieces[i - 1]) + 1]
    cut = llm.generate(["Once upon"], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.find(stop)]
