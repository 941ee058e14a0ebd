"""The grammar mask paths of sampling/structured.py, row by row against llguidance's own masks.

- `constrain` on a CPU engine, with the masks computed after the forward or on the worker thread, adds the
  0 / -inf addend of the constrained rows only: rows without a grammar come out bit-for-bit unchanged, a
  constrained row is -inf exactly where its matcher's mask (computed alone, on a copy) has a 0 bit, a matcher in
  an error state leaves its row all -inf; the device path (the (R, W) bitmask unpacked by shifts) gives the
  same logits from the same matchers.
- `overlaps`: the worker thread on a GPU always, on a CPU only with a core torch leaves free and 16+ rows.
- The tokenizer's extra slices (string lengths 1..9) change no mask: along random token paths of schemas with
  short and long strings, every mask equals the one of a tokenizer without slices.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import structured_cases as cases
import torch
from server_fixtures import full_checkpoint

from llava_next import LLM, StructuredOutputsParams

SHORT = {"type": "array", "minItems": 2, "maxItems": 4, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                     "code": {"type": "string", "minLength": 1, "maxLength": 3},
                                     "note": {"type": "string", "maxLength": 40},
                                     "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "code", "note", "n"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def llm(tiny_checkpoint, tiny_root):
    return LLM(str(full_checkpoint(tiny_checkpoint, tiny_root)), dtype="float32", device="cpu", max_num_seqs=8)


def _allowed(matcher, vocab: int) -> np.ndarray:
    """(V,) bool: the tokens `matcher` allows now (on a copy: the matcher itself is left as it was)."""
    bits = np.frombuffer(matcher.deep_copy().compute_bitmask(), np.uint8)
    return np.unpackbits(bits, bitorder="little")[:vocab].astype(bool)


def _walk(matcher, rng: np.random.Generator, steps: int, vocab: int):
    """Advance `matcher` by up to `steps` random allowed tokens, yielding it before each step."""
    for _ in range(steps):
        if matcher.is_stopped():
            return
        yield matcher
        allowed = np.flatnonzero(_allowed(matcher, vocab))
        assert matcher.consume_token(int(rng.choice(allowed)))


def _matchers(structured, vocab: int) -> list:
    """Rows of one step: no grammar, matchers at different points of SHORT (strings, numbers, structure),
    one in an error state."""
    grammar = structured.compile(StructuredOutputsParams(json=SHORT))
    rng = np.random.default_rng(0)
    states = []
    for length in (0, 3, 6, 11, 17):
        m = grammar.matcher()
        for _ in _walk(m, rng, length, vocab):
            pass
        states.append(m)
    broken = grammar.matcher()
    broken.consume_token(0)  # <unk>: never allowed, the matcher is in an error state
    assert broken.is_error()
    return [None, states[0], states[1], None, states[2], broken, states[3], None, states[4]]


def _check_rows(out: torch.Tensor, logits: torch.Tensor, matchers: list, vocab: int) -> None:
    for i, m in enumerate(matchers):
        if m is None:
            assert torch.equal(out[i], logits[i]), i  # untouched, bit for bit
        elif m.is_error():
            assert bool(torch.isneginf(out[i]).all()), i
        else:
            allowed = torch.from_numpy(_allowed(m, vocab))
            assert 0 < int(allowed.sum()) < vocab
            assert torch.equal(torch.isneginf(out[i]), ~allowed), i
            assert torch.equal(out[i][allowed], logits[i][allowed]), i


@pytest.mark.parametrize("overlap", [False, True], ids=["after the forward", "on the worker thread"])
def test_cpu_constrain_masks_exactly_the_constrained_rows(llm, monkeypatch, overlap):
    structured = llm.llm_engine.structured
    monkeypatch.setattr(structured, "overlaps", lambda rows: overlap)
    V = llm.llm_engine.vocab_size
    matchers = _matchers(structured, V)
    logits = torch.randn(len(matchers), V, generator=torch.Generator().manual_seed(0))
    out = logits.clone()
    pending = structured.begin(matchers)
    assert isinstance(pending, list) != overlap  # the matchers themselves, or the worker's future
    structured.constrain(out, pending, [None] * len(matchers))
    _check_rows(out, logits, matchers, V)
    every = [m for m in matchers if m is not None]  # every row constrained: the one-add path
    out = logits[: len(every)].clone()
    structured.constrain(out, every, [None] * len(every))  # (the matchers themselves: computed now)
    _check_rows(out, logits[: len(every)], every, V)


def test_device_bitmask_path_gives_the_same_rows(llm):
    """The non-CPU path of `_masks` ((R, W) bitmask, rows without a grammar all ones) unpacked as on a GPU."""
    from llava_next.sampling.structured import StructuredDecoding, apply_on_device

    engine = llm.llm_engine
    cpu = engine.structured
    device = StructuredDecoding(engine._tokenizer_json, engine.vocab_size, engine.eos_token_ids, torch.device("meta"))
    device._tokenizer, device._executor = cpu._ll_tokenizer(), cpu._executor  # share the built tokenizer
    V = engine.vocab_size
    matchers = _matchers(cpu, V)
    words = device.begin(matchers).result()  # (R, W) int32 on the host
    assert words.shape == (len(matchers), device.words)
    logits = torch.randn(len(matchers), V, generator=torch.Generator().manual_seed(1))
    out = logits.clone()
    apply_on_device(out, words, torch.arange(32, dtype=torch.int32))
    _check_rows(out, logits, matchers, V)


def test_overlap_only_where_a_core_is_free(llm, monkeypatch):
    from llava_next.sampling import structured as module

    engine = llm.llm_engine
    gpu = module.StructuredDecoding(engine._tokenizer_json, engine.vocab_size, engine.eos_token_ids,
                                    torch.device("meta"))
    cpu = engine.structured
    monkeypatch.setattr(module.os, "cpu_count", lambda: 4)
    for threads, rows, expected in ((4, 64, False), (3, 64, True), (3, module.OVERLAP_MIN_ROWS - 1, False),
                                    (3, module.OVERLAP_MIN_ROWS, True)):
        monkeypatch.setattr(module.torch, "get_num_threads", lambda t=threads: t)
        assert cpu.overlaps(rows) is expected, (threads, rows)
        assert gpu.overlaps(rows) is True


def test_short_string_slices_change_no_mask(llm):
    import llguidance as ll

    engine = llm.llm_engine
    ours = engine.structured._ll_tokenizer()
    plain = ll.LLTokenizer(engine._tokenizer_json(), n_vocab=engine.vocab_size,
                           eos_token=engine.eos_token_ids or None, slices=[])
    V = engine.vocab_size
    rng = np.random.default_rng(0)
    compared = 0
    for schema in [SHORT] + cases.schemas(6, seed=3):
        text = ll.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides={"whitespace_flexible": False})
        a, b = ll.LLMatcher(ours, text, log_level=0), ll.LLMatcher(plain, text, log_level=0)
        for _ in range(40):
            if a.is_stopped():
                break
            allowed = _allowed(a, V)
            assert np.array_equal(allowed, _allowed(b, V))
            compared += 1
            token = int(rng.choice(np.flatnonzero(allowed)))
            assert a.consume_token(token) and b.consume_token(token)
    assert compared > 100
