"""Constrained decoding through `LLM.generate` on the tiny random checkpoint (random weights: only the constraint
makes an output valid).

50 generated JSON schemas (tests/structured_cases.py) in one generate call, greedy and sampled with n = 2, in a
crowd of unconstrained requests whose tokens must equal their runs alone; every output parses and validates with
`jsonschema` and ends with finish_reason "stop". Regex, choice, Lark grammar, json_object, logit_bias, bad and
hostile constraints (typed errors, bounded compile time), preemption (tokens equal the unpreempted run) and a
grammar that cannot continue (only its request ends). `import llava_next` does not import llguidance.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import jsonschema
import pytest
import structured_cases as cases
from server_fixtures import full_checkpoint

from llava_next import (
    LLM,
    SamplingParams,
    StructuredOutputError,
    StructuredOutputsParams,
)


@pytest.fixture(scope="module")
def folder(tiny_checkpoint, tiny_root):
    return full_checkpoint(tiny_checkpoint, tiny_root)


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(str(folder), dtype="float32", device="cpu", max_num_seqs=64)


def _json(schema, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=cases.MAX_TOKENS, structured_outputs=StructuredOutputsParams(json=schema), **kw)


PLAIN = [("Describe the weather:", SamplingParams(temperature=0, max_tokens=12)),
         ("Count to ten:", SamplingParams(temperature=0.9, seed=11, max_tokens=12, n=2))]


def test_fifty_schemas_greedy_sampled_n2_in_a_crowd(llm):
    schemas = cases.schemas(50, seed=0)
    prompts, params = [], []
    for i, schema in enumerate(schemas):
        prompts.append(f"Give me JSON number {i}:")
        params.append(_json(schema, temperature=0))
    for i, schema in enumerate(schemas[::2]):
        prompts.append(f"Sample JSON {i}:")
        params.append(_json(schema, temperature=1.0, n=2, seed=100 + i))
    for prompt, sp in PLAIN:
        prompts.append(prompt)
        params.append(sp)
    outs = llm.generate(prompts, params, use_tqdm=False)
    checked = 0
    for out, sp in zip(outs, params):
        if sp.structured_outputs is None:
            continue
        for c in out.outputs:
            assert c.finish_reason == "stop", (c.finish_reason, c.text)
            value = json.loads(c.text)
            jsonschema.validate(value, sp.structured_outputs.json)
            assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', "", c.text)), c.text  # compact JSON
            assert not re.search(r"[\x00-\x1f]", c.text), c.text  # no raw control characters in strings
            checked += 1
    assert checked == 50 + 2 * 25
    alone = llm.generate([p for p, _ in PLAIN], [sp for _, sp in PLAIN], use_tqdm=False)
    for crowd, single in zip(outs[-len(PLAIN):], alone):
        assert [c.token_ids for c in crowd.outputs] == [c.token_ids for c in single.outputs]


def test_regex_choice_grammar_json_object(llm):
    params = [SamplingParams(temperature=t, seed=3, max_tokens=40, n=2,
                             structured_outputs=StructuredOutputsParams(regex=r)) for r in cases.REGEXES
              for t in (0.0, 1.0)]
    params += [SamplingParams(temperature=t, seed=5, max_tokens=20, structured_outputs=StructuredOutputsParams(
        choice=c)) for c in cases.CHOICES for t in (0.0, 1.0)]
    lark = 'start: "item-" NUM ("," "item-" NUM)*\nNUM: /[0-9]{1,2}/'
    params.append(SamplingParams(temperature=1.0, seed=2, max_tokens=30, structured_outputs=StructuredOutputsParams(
        grammar=lark)))
    outs = llm.generate(["Answer:"] * len(params), params, use_tqdm=False)
    for out, sp in zip(outs, params):
        so = sp.structured_outputs
        for c in out.outputs:
            if so.regex is not None:
                assert re.fullmatch(so.regex, c.text) and c.finish_reason == "stop", (so.regex, c.text)
            elif so.choice is not None:
                assert c.text in so.choice and c.finish_reason == "stop"
            elif c.finish_reason == "stop":  # the grammar's repetition may also run to max_tokens
                assert re.fullmatch(r"item-[0-9]{1,2}(,item-[0-9]{1,2})*", c.text), c.text
            else:
                assert re.fullmatch(r"item-[0-9]{1,2}(,item-[0-9]{1,2})*(,(item-?[0-9]{0,2})?)?|item-?[0-9]{0,2}",
                                    c.text), c.text
    out = llm.generate(["JSON:"], SamplingParams(temperature=0, max_tokens=30, structured_outputs=
                                                  StructuredOutputsParams(json_object=True)), use_tqdm=False)[0]
    text = out.outputs[0].text
    assert text.startswith("{")
    if out.outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_logit_bias(llm):
    base = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0].outputs[0]
    target = 1500 if base.token_ids[0] != 1500 else 1501
    biased = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4, logit_bias={target: 100}),
                          use_tqdm=False)[0].outputs[0]
    assert biased.token_ids == [target] * 4
    banned = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4,
                                                     logit_bias={str(base.token_ids[0]): -100}),
                          use_tqdm=False)[0].outputs[0]
    assert banned.token_ids[0] != base.token_ids[0]
    with pytest.raises(ValueError):
        SamplingParams(logit_bias={1: 101})
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate(["Hello"], SamplingParams(logit_bias={10**6: 1}), use_tqdm=False)


@pytest.mark.parametrize("bad, match", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nosuchtype"}}}), "json"),
    (dict(regex="(unclosed"), "regex"),
    (dict(grammar="start: undefined_rule"), "grammar"),
    (dict(json="{not json"), "not valid JSON"),
    (dict(json={"type": "string"}, regex="a"), "exactly one"),
    (dict(choice=[]), "choice"),
    (dict(json={"a" * 10: {"b": "c" * 70000}}), "bytes"),
])
def test_bad_constraints_are_typed_errors(llm, bad, match):
    with pytest.raises(StructuredOutputError, match=match):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(**bad)), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_hostile_schemas_are_refused_or_compile_fast(llm):
    deep: dict = {"type": "integer"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    hostile = [
        deep,
        {"type": "string", "minLength": 100000, "maxLength": 200000},
        {"type": "array", "items": {"type": "string", "pattern": "(a|aa)*b" * 20}, "minItems": 5000},
        {"type": "integer", "minimum": -10**30, "maximum": 10**30},
        {"enum": [f"value-{i}" * 4 for i in range(3000)]},
    ]
    for schema in hostile:
        start = time.perf_counter()
        try:
            llm.llm_engine.structured.compile(StructuredOutputsParams(json=schema))
        except StructuredOutputError:
            pass
        assert time.perf_counter() - start < 3.0, schema if len(json.dumps(schema)) < 200 else "large schema"


def test_compile_cache_and_no_import_at_package_import(llm):
    engine = llm.llm_engine
    p = StructuredOutputsParams(json={"type": "object", "properties": {"k": {"type": "boolean"}}})
    first = engine.structured.compile(p)
    again = engine.structured.compile(StructuredOutputsParams(json=json.dumps(p.json)))
    assert again is first  # the same canonical text hits the cache
    code = "import sys, llava_next; from llava_next import LLM, SamplingParams, StructuredOutputsParams; " \
           "import llava_next.engine.llm_engine; assert 'llguidance' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_preemption_keeps_the_constraint(folder, llm):
    schemas = cases.schemas(8, seed=7)
    params = [_json(s, temperature=0) for s in schemas]
    prompts = [f"Item {i}:" for i in range(len(params))]
    reference = llm.generate(prompts, params, use_tqdm=False)
    small = LLM(str(folder), dtype="float32", device="cpu", max_num_seqs=8, num_kv_blocks=14, block_size=16)
    outs = small.generate(prompts, params, use_tqdm=False)
    assert small.llm_engine.stats()["num_preemptions"] > 0
    for a, b, sp in zip(outs, reference, params):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        jsonschema.validate(json.loads(a.outputs[0].text), sp.structured_outputs.json)


@pytest.mark.parametrize("how", ["rejected token", "matcher in an error state"])
def test_a_grammar_that_cannot_continue_ends_only_its_request(llm, monkeypatch, how):
    engine = llm.llm_engine
    real = engine.structured.advance
    calls = {"n": 0}

    def advance(matcher, token):
        calls["n"] += 1
        if calls["n"] == 3 and how == "rejected token":
            return "error"
        if calls["n"] == 2 and how == "matcher in an error state":  # its next mask allows nothing
            real(matcher, token)
            matcher.consume_token(0)  # <unk>: never allowed by the regex
            return None
        return real(matcher, token)

    monkeypatch.setattr(engine.structured, "advance", advance)
    params = [SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(
        regex=r"[a-z]{30}")), SamplingParams(temperature=0, max_tokens=8)]
    outs = llm.generate(["a", "b"], params, use_tqdm=False)
    dead, plain = outs[0].outputs[0], outs[1].outputs[0]
    assert dead.finish_reason == "error" and len(dead.token_ids) == 2
    assert plain.finish_reason == "length" and len(plain.token_ids) == 8


def test_cpu_and_device_mask_paths_agree():
    """The GPU path (unpack by shifts + masked_fill) and the CPU path (the 0 / -inf addend added) give the same logits."""
    import torch

    from llava_next.sampling.structured import apply_on_device, cpu_addend

    g = torch.Generator().manual_seed(0)
    V = 32064 - 17  # not a multiple of 32: the last word is cut
    words = torch.randint(-2**31, 2**31 - 1, (5, (V + 31) // 32), generator=g, dtype=torch.int64).to(torch.int32)
    words[1] = -1
    words[2] = 0
    logits = torch.randn(5, V, generator=g)
    a, b = logits.clone(), logits.clone()
    a.add_(cpu_addend(words)[:, :V])  # what constrain adds on a CPU
    apply_on_device(b, words, torch.arange(32, dtype=torch.int32))
    assert torch.equal(a, b)
    assert torch.equal(a[1], logits[1]) and bool(torch.isneginf(a[2]).all())
    token = 32 * 7 + 5  # bit 5 of word 7
    assert bool(torch.isneginf(a[0, token])) != bool((words[0, 7] >> 5) & 1)
