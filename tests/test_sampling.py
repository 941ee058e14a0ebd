"""Sampling parity with transformers: each logits processor, transformers' own processor list inside a real
`generate`, seeded sampling, argument validation, and stop criteria. transformers' kwargs reach the pipeline
through compat's conversion into the one SamplingParams (vLLM's fields): `hf(**kwargs)`."""

import math
import os
import shutil

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer
from transformers.generation import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llava_next.compat.generate_args import (
    check_sampling_args,
    sampling_params,
    validate_max_new_tokens,
)
from llava_next.errors import GenerationArgumentError
from llava_next.sampling.logits import LogitsPipeline, sample_next_token
from llava_next.sampling.params import SamplingParams
from llava_next.sampling.stopping import StopStrings, eos_reached, eos_token_tensor

B, V, T = 3, 1000, 40
SEEDS = [0, 1, 2, 3]


def random_logits(seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, V, generator=g) * 3).mul(4).round().div(4)  # (B, V), quantised: many ties
    logits[0, :5] = logits[0, :5].max()  # ties at the top
    logits[1, torch.randint(0, V, (50,), generator=g)] = -math.inf  # already masked entries
    return logits


def history(seed):
    g = torch.Generator().manual_seed(seed + 100)
    ids = torch.randint(0, V + 3, (B, T), generator=g)  # (B, T); a few ids past the lm_head vocab
    pads = torch.tensor([0, 5, 12])  # left padding per row
    valid = torch.arange(T)[None, :] >= pads[:, None]  # (B, T)
    return ids, pads, valid


def assert_same(ours, ref):
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert torch.equal(ours, ref), (ours != ref).nonzero()[:5]


def hf(**kwargs) -> SamplingParams:
    """transformers' generate() kwargs (its defaults: do_sample=False, top_k=50) as the one SamplingParams."""
    return sampling_params(kwargs)


def run(params, logits, ids=None, **kw):
    ids = torch.zeros(B, 1, dtype=torch.long) if ids is None else ids
    return LogitsPipeline(params)(ids, logits, **kw)


# ---- single processors, bitwise ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty(seed, penalty):
    logits = random_logits(seed)
    before = logits.clone()
    ids, pads, valid = history(seed)
    ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    for do_sample in (False, True):  # a processor, not a warper: greedy applies it too
        params = hf(do_sample=do_sample, top_k=0, repetition_penalty=penalty)
        assert_same(run(params, logits, ids), ref)
    # left padding ignored, as transformers' generate does through `prompt_ignore_length`
    ref = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=pads)(ids, logits.clone())
    assert_same(run(hf(repetition_penalty=penalty), logits, ids, valid=valid), ref)
    assert torch.equal(logits, before)  # input untouched


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "name, value, ref_cls",
    [("temperature", t, TemperatureLogitsWarper) for t in (0.3, 0.7, 1.5)]
    + [("top_k", k, TopKLogitsWarper) for k in (1, 3, 7, 50, 999, 1000, 5000)]
    + [("top_p", p, TopPLogitsWarper) for p in (0.01, 0.3, 0.9, 0.999)]
    + [("min_p", p, MinPLogitsWarper) for p in (0.01, 0.1, 0.5, 1.0)],
)
def test_warper(seed, name, value, ref_cls):
    logits = random_logits(seed)
    params = hf(do_sample=True, **{"top_k": 0, name: value})
    ref = ref_cls(value)(torch.zeros(B, 1, dtype=torch.long), logits.clone())
    assert_same(run(params, logits), ref)
    # warpers do nothing when not sampling (greedy ignores them, as in transformers)
    greedy = hf(do_sample=False, **({} if name == "top_k" else {name: value}))
    assert torch.equal(run(greedy, logits), logits)
    if name != "temperature":  # the one class's own terms: temperature < 1e-5 is greedy, whatever the warpers say
        assert torch.equal(run(SamplingParams(**{"temperature": 0.0, name: value}), logits), logits)


@pytest.mark.parametrize("seed", SEEDS)
def test_chain_in_transformers_order(seed):
    logits = random_logits(seed)
    ids, pads, valid = history(seed)
    chain = [
        RepetitionPenaltyLogitsProcessor(1.2, prompt_ignore_length=pads),
        TemperatureLogitsWarper(0.8),
        TopKLogitsWarper(40),
        TopPLogitsWarper(0.9),
        MinPLogitsWarper(0.05),
    ]
    ref = logits.clone()
    for proc in chain:
        ref = proc(ids, ref)
    params = hf(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    assert_same(run(params, logits, ids, valid=valid), ref)


def test_min_new_tokens_and_device_length():
    logits = random_logits(0)
    ids, _, _ = history(0)
    params = hf(min_new_tokens=2)
    pipe = LogitsPipeline(params, eos_token_id=[2, 7], prompt_len=T)
    for cur_len, blocked in [(T, True), (T + 1, True), (T + 2, False)]:
        for length in (cur_len, torch.tensor(cur_len)):  # a host int or a 0-d device tensor
            out = pipe(ids, logits, cur_len=length)
            assert torch.isneginf(out[:, [2, 7]]).all().item() is blocked
            assert torch.equal(out[:, 8:], logits[:, 8:])
    assert LogitsPipeline(params).steps == ()  # without EOS ids there is nothing to suppress


# ---- transformers' own processor list, inside a real generate ---------------------------------------


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # peaked distributions, so top_p / min_p cut something
    return model


@pytest.mark.parametrize(
    "checkpoint_config, kwargs",
    [
        ({}, dict(do_sample=True)),  # transformers' default top_k=50
        ({"do_sample": True, "temperature": 0.6, "top_p": 0.9}, {}),  # from generation_config.json
        ({"temperature": 0.6, "top_p": 0.9}, dict(do_sample=True, top_k=None, temperature=0.9)),
        ({}, dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, min_p=0.02,
                  repetition_penalty=1.3, min_new_tokens=3)),
        ({}, dict(do_sample=False, repetition_penalty=1.5, min_new_tokens=2)),
        ({"min_length": 15}, dict(do_sample=True, top_k=None)),  # min_length counts the padded prompt (9)
        ({"min_length": 15}, dict(do_sample=True, min_new_tokens=2)),  # min_new_tokens replaces min_length
        ({}, dict(do_sample=False, min_length=12, min_new_tokens=5)),
    ],
)
def test_matches_transformers_generate(tiny_lm, checkpoint_config, kwargs):
    eos, pad = list(range(3, V, 5)), 0  # a fifth of the vocabulary ends a row: rows finish and get padded
    tiny_lm.generation_config = GenerationConfig(**checkpoint_config)
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(4, V, (B, 9), generator=g)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # left padding
    mask[2, :6] = 0
    prompt = prompt.masked_fill(mask == 0, pad)
    steps = 10
    torch.manual_seed(1234)
    out = tiny_lm.generate(
        input_ids=prompt, attention_mask=mask, max_new_tokens=steps, eos_token_id=eos, pad_token_id=pad,
        output_scores=True, output_logits=True, return_dict_in_generate=True, **kwargs,
    )
    P = prompt.shape[1]
    params = sampling_params(kwargs, tiny_lm.generation_config, P)
    pipe = LogitsPipeline(params, eos_token_id=eos, prompt_len=P)
    torch.manual_seed(1234)
    finished = torch.zeros(B, dtype=torch.bool)
    for t, (raw, processed) in enumerate(zip(out.logits, out.scores)):
        seq = out.sequences[:, : P + t]
        valid = torch.cat([mask, torch.ones(B, t, dtype=mask.dtype)], dim=1).bool()
        scores = pipe(seq, raw, valid=valid)
        assert_same(scores, processed)
        token = sample_next_token(scores, params)
        token = torch.where(finished, pad, token)
        assert torch.equal(token, out.sequences[:, P + t])
        finished |= eos_reached(token, eos_token_tensor(eos))
    assert finished.any() and len(out.scores) > 2  # padded rows were exercised


# ---- sampling --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_seeded_sampling(seed):
    params = hf(do_sample=True, temperature=0.9, top_p=0.95)
    scores = run(params, random_logits(seed))
    a = sample_next_token(scores, params, torch.Generator().manual_seed(seed))
    b = sample_next_token(scores, params, torch.Generator().manual_seed(seed))
    ref = torch.multinomial(torch.softmax(scores, -1), 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
    assert a.shape == (B,) and a.dtype == torch.long
    assert torch.equal(a, b) and torch.equal(a, ref)
    assert torch.isfinite(scores.gather(1, a[:, None])).all()  # never a filtered token
    greedy = hf()
    assert torch.equal(sample_next_token(scores, greedy), scores.argmax(-1))


def test_draws_follow_the_distribution():
    params = hf(do_sample=True, top_k=0)
    scores = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next_token(scores, params, g) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=4) / 4000
    assert freq[3] == 0 and abs(freq[0] - 0.7) < 0.03 and abs(freq[1] - 0.2) < 0.03


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda():
    params = hf(do_sample=True, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05,
                repetition_penalty=1.2, min_new_tokens=2)
    pipe = LogitsPipeline(params, eos_token_id=[2], prompt_len=T)
    ids, _, valid = history(0)
    ids, valid, logits = ids.cuda(), valid.cuda(), random_logits(0).cuda()
    cur_len = torch.tensor(T, device="cuda")
    pipe(ids, logits, valid=valid, cur_len=cur_len)  # first call builds the EOS mask
    g = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample_next_token(pipe(ids, logits, valid=valid, cur_len=cur_len), params, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- arguments -------------------------------------------------------------------------------------

BAD = [
    ("temperature", dict(do_sample=True, temperature=0.0)),
    ("temperature", dict(do_sample=True, temperature=-1.0)),
    ("temperature", dict(temperature=math.nan)),
    ("temperature", dict(do_sample=True, temperature=math.inf)),
    ("temperature", dict(do_sample=True, temperature=5e-6)),  # the one class would read it as greedy
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.01)),
    ("top_p", dict(top_p=-0.5)),
    ("top_p", dict(top_p=math.nan)),
    ("top_k", dict(top_k=-1)),
    ("top_k", dict(top_k=5.0)),
    ("top_k", dict(top_k=True)),
    ("min_p", dict(min_p=-0.1)),
    ("min_p", dict(min_p=1.5)),
    ("min_p", dict(min_p=math.inf)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=-2.0)),
    ("repetition_penalty", dict(repetition_penalty=math.nan)),
    ("do_sample", dict(do_sample="yes")),
    ("min_new_tokens", dict(min_new_tokens=-1)),
    ("min_length", dict(min_length=-3)),
]


@pytest.mark.parametrize("name, kwargs", BAD)
def test_bad_arguments(name, kwargs):
    with pytest.raises(GenerationArgumentError, match=name) as info:
        check_sampling_args(kwargs)
    assert isinstance(info.value, ValueError)
    with pytest.raises(GenerationArgumentError, match=name):
        sampling_params(kwargs)


def test_greedy_tolerates_sampling_only_values():
    p = hf(do_sample=False, temperature=0.0)  # ignored, as in transformers
    assert p.greedy and p.temperature == 0.0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, math.nan, None, "8"])
def test_max_new_tokens(bad):
    with pytest.raises(GenerationArgumentError, match="max_new_tokens"):
        validate_max_new_tokens(bad)
    assert validate_max_new_tokens(1) == 1


def test_from_generate_kwargs_priority():
    p = sampling_params({})  # transformers' defaults: greedy (its top_k=50 acts only when sampling)
    assert p == SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=None) and p.greedy
    assert sampling_params({"do_sample": True}).top_k == 50
    ckpt = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": None, "eos_token_id": 2}
    p = sampling_params({"max_new_tokens": 5, "pixel_values": object()}, ckpt)
    assert (p.greedy, p.temperature, p.top_p, p.top_k) == (False, 0.6, 0.9, 50)
    p = sampling_params({"temperature": 0.2, "top_p": None}, ckpt)
    assert (p.temperature, p.top_p) == (0.2, 1.0)  # an explicit None turns a step off
    user = GenerationConfig(temperature=0.3)
    p = sampling_params({"generation_config": user}, GenerationConfig(**ckpt))
    assert (p.greedy, p.temperature, p.top_p) == (False, 0.3, 0.9)
    p = sampling_params({"do_sample": True, "top_k": None})
    assert p.top_k == 0 and not p.greedy  # transformers' None: top_k off


@pytest.mark.parametrize("min_new, min_length, prompt_len, min_tokens",
                         [(None, 0, 9, 0), (3, 0, 9, 3), (None, 12, 9, 3), (None, 5, 9, 0), (None, 12, 0, 12),
                          (2, 14, 9, 2), (6, 14, 9, 6), (0, 12, 9, 0)])
def test_min_length_and_min_new_tokens_become_min_tokens(min_new, min_length, prompt_len, min_tokens):
    """EOS is blocked for min_tokens new tokens: min_new_tokens when set (transformers then sets min_length to
    prompt + min_new_tokens), else what min_length leaves after the padded prompt."""
    p = sampling_params({"min_new_tokens": min_new, "min_length": min_length}, prompt_len=prompt_len)
    assert p.min_tokens == min_tokens


@pytest.mark.parametrize("kwargs", [dict(num_beams=4), dict(typical_p=0.5), dict(no_repeat_ngram_size=3),
                                    dict(renormalize_logits=True), dict(num_return_sequences=2)])
def test_unsupported_arguments_refused(kwargs):
    with pytest.raises(GenerationArgumentError, match=next(iter(kwargs))):
        sampling_params(kwargs)
    sampling_params({"num_beams": 1, "typical_p": 1.0, "renormalize_logits": False})


# ---- stop criteria ---------------------------------------------------------------------------------


def test_eos_tensor():
    assert torch.equal(eos_token_tensor(2), torch.tensor([2]))
    assert torch.equal(eos_token_tensor([2, 32000]), torch.tensor([2, 32000]))
    assert torch.equal(eos_token_tensor(torch.tensor([5])), torch.tensor([5]))
    assert eos_token_tensor(None) is None
    for bad in ([], [-1], "2", [2.0], [True]):
        with pytest.raises(GenerationArgumentError, match="eos_token_id"):
            eos_token_tensor(bad)
    assert eos_reached(torch.tensor([2, 4, 9]), eos_token_tensor([9, 2])).tolist() == [True, False, True]
    assert eos_reached(torch.tensor([2, 4]), None).tolist() == [False, False]


class PieceTokenizer:
    """Tokens are the strings of a fixed list; decode joins them."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, **kwargs):
        return "".join(self.pieces[i] for i in ids)


@pytest.mark.parametrize(
    "pieces, stops",
    [  # transformers' StopStringCriteria docstring examples, for the stop string "stop"
        (["st", "op"], True), (["stop"], True), (["st", "opera"], True), (["sto", "pper"], True),
        (["las", "topper"], True), (["s", "to", "pped"], True),
        (["stop", "at"], False), (["st", "op", "at"], False), (["st", "opera", "tion"], False),
    ],
)
def test_stop_string_overlap_rule(pieces, stops):
    vocab = sorted({p for p in pieces})
    tok = PieceTokenizer(vocab)
    ids = [[vocab.index(p) for p in pieces]]
    assert StopStrings(tok, "stop")(ids).tolist() == [stops]
    assert StopStrings(tok, ["zzz", "stop"])(torch.tensor(ids)).tolist() == [stops]
    # a (B, K, T) tensor (beam search's candidates) with a long history: each row as checked alone
    long = torch.tensor([[[vocab.index(pieces[0])] * 40 + ids[0]] * 2] * 3)  # (3, 2, 40 + len)
    assert StopStrings(tok, "stop")(long).tolist() == [[stops] * 2] * 3


def test_stop_strings_match_transformers(tmp_path):
    import mistral_common

    src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    shutil.copy(src, tmp_path / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(tmp_path))
    stops = ["USER:", "stop", "\n\n", "龘"]
    ours, ref = StopStrings(tok, stops), StopStringCriteria(tok, stops)
    text = "I will stop here.\nUSER: hi\n\nASSISTANT: 龘 ok stopper nonstop USER"
    ids = tok.encode(text, add_special_tokens=False)
    hits = []
    for n in range(1, len(ids) + 1):
        prefix = torch.tensor([ids[:n]])
        assert ours(prefix).tolist() == ref(prefix, None).tolist(), tok.convert_ids_to_tokens(ids[:n])
        hits.append(bool(ours(prefix)))
    assert sum(hits) >= 6
    with pytest.raises(GenerationArgumentError, match="stop_strings"):
        StopStrings(tok, [""])
