"""screened_head.py: the error bound holds, and the screened token is the one the full float32 logits give.

The bound is checked against float32 and float64 logits on inputs chosen to stress it (cancellation, heavy
tails, wide dynamic range, large hidden sizes); greedy tokens against `process(x @ W.T).argmax()` with the
greedy processors (repetition penalty, EOS suppression), exact ties, NaN rows and flat distributions; top-k
sampling against the full pipeline with the same RNG draws (processed scores equal position for position, up to
the GEMM's rounding); and
generate() against transformers, greedy and sampling, with the screen on (it is the CPU default) and off.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from llava_next.compat.generate_args import sampling_params
from llava_next.sampling.logits import LogitsPipeline
from llava_next.sampling.screened_head import ScreenedHead, screen_applies


def _cases(D, seed):
    g = torch.Generator().manual_seed(seed)
    V = 3000
    normal = torch.randn(V, D, generator=g)
    x = torch.randn(4, D, generator=g)
    heavy = torch.randn(V, D, generator=g) / torch.rand(V, D, generator=g).clamp_min(1e-3)
    wide = normal * torch.exp2(torch.randint(-40, 40, (V, D), generator=g).float())
    # rows almost orthogonal to x[0]: the dot product cancels, so only the bound's norm term can cover it
    cancel = normal - (normal @ x[0])[:, None] * x[0] / x[0].dot(x[0]) + 1e-3 * torch.randn(V, D, generator=g)
    yield "normal", x, normal
    yield "heavy", x * 50, heavy
    yield "wide", x, wide
    yield "cancel", x, cancel
    yield "positive", x.abs(), normal.abs()


@pytest.mark.parametrize("D", [64, 256, 1024, 4096])
def test_bound_covers_float32_and_exact_logits(D):
    for name, x, W in _cases(D, seed=D):
        head = ScreenedHead(W.contiguous())
        a, e = head.bounds(x)
        fp32 = F.linear(x, W)
        exact = (x.double() @ W.double().T)
        assert ((a - fp32).abs() <= e).all(), name
        assert ((a.double() - exact).abs() <= e.double()).all(), name
        # and it is not vacuous: on random logits of a narrow model the screen keeps a few tokens of 3,000
        # (wider ones have flatter random logits relative to the int8 error: more candidates, or the full head)
        if name == "normal" and D <= 1024:
            candidates = (a + e >= (a - e).amax(-1, keepdim=True)).sum(-1)  # (4,)
            assert candidates.max() <= 0.02 * W.shape[0], candidates


def _random_head(seed: int, V: int, D: int, rows: int = 1):
    """(generator, W (V, D), ScreenedHead(W), x (rows, D)) from one seed."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, D, generator=g)
    return g, W, ScreenedHead(W), torch.randn(rows, D, generator=g)


def _pipeline(**kwargs):
    """The pipeline of transformers' generate() kwargs (converted into the one SamplingParams)."""
    return LogitsPipeline(sampling_params(kwargs, prompt_len=5), eos_token_id=[2, 7], prompt_len=5)


def _greedy(head, x, pipeline=None, history=None):
    """The screened greedy token(s) of x, with `pipeline`'s processors (none: plain argmax)."""
    if pipeline is None:
        return head(x, 1, lambda s: s, lambda s: s.argmax(-1))
    return head(x, 1, partial(pipeline.monotone, history), partial(pipeline.choose, history))


@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.7])
@pytest.mark.parametrize("batch", [1, 3])
def test_tokens_equal_the_full_argmax(penalty, batch):
    g = torch.Generator().manual_seed(int(penalty * 10) + batch)
    V, D = 8000, 64
    W = torch.randn(V, D, generator=g) * 0.1
    head = ScreenedHead(W)
    pipeline = _pipeline(repetition_penalty=penalty, min_new_tokens=3)
    for step in range(40):
        x = torch.randn(batch, D, generator=g) * 4
        history = torch.randint(0, V, (batch, 5 + step % 6), generator=g)
        expected = pipeline(history, F.linear(x, W)).argmax(-1)
        got = _greedy(head, x, pipeline, history)
        assert torch.equal(got, expected), (step, got, expected)
    assert head.screened_steps == 40 and head.full_steps == 0


def test_where_bf16_logits_pick_another_token_the_screen_still_picks_the_float32_one():
    _, W, head, x = _random_head(6, 2000, 64, rows=3000)
    expected = F.linear(x, W).argmax(-1)  # (3000,)
    misled = (F.linear(x.bfloat16(), W.bfloat16()).float().argmax(-1) != expected).nonzero().squeeze(1)
    assert misled.numel() >= 10  # bf16 alone gets these wrong
    for i in misled.tolist():
        assert int(_greedy(head, x[i:i + 1])) == int(expected[i])


def test_a_suppressed_winner_and_an_exact_tie_resolve_as_the_full_argmax():
    g = torch.Generator().manual_seed(3)
    V, D = 5000, 32
    W = torch.randn(V, D, generator=g)
    x = torch.randn(1, D, generator=g)
    top = int(F.linear(x, W).argmax())
    W[top + 1:top + 2] = W[top]  # an exact tie right after the winner: argmax keeps the first
    W[7] = W[top] * 2  # an EOS id that would win, suppressed while below min_new_tokens
    head = ScreenedHead(W)
    pipeline = _pipeline(min_new_tokens=10)
    history = torch.zeros(1, 6, dtype=torch.long)
    assert int(_greedy(head, x, pipeline, history)) == top
    late = torch.zeros(1, 20, dtype=torch.long)  # past min_new_tokens: EOS 7 wins
    assert int(_greedy(head, x, pipeline, late)) == 7
    assert head.full_steps == 0


def test_nan_rows_and_flat_logits_take_the_full_head():
    g, W, head, x = _random_head(4, 4000, 32, rows=2)
    x[1, 3] = float("nan")
    assert torch.equal(_greedy(head, x), F.linear(x, W).argmax(-1))  # NaN row: argmax as torch gives it
    assert head.full_steps == 1
    flat = ScreenedHead(torch.ones(4000, 32))  # every logit equal: every token a candidate
    assert int(_greedy(flat, torch.randn(1, 32, generator=g))) == 0
    assert flat.full_steps == 1 and flat.screened_steps == 0


def test_an_in_place_weight_change_rebuilds_the_bf16_copy():
    _, W, head, x = _random_head(5, 4000, 32)
    assert torch.equal(_greedy(head, x), F.linear(x, W).argmax(-1))
    with torch.no_grad():
        W.neg_()  # the old winner is now the loser
    assert torch.equal(_greedy(head, x), F.linear(x, W).argmax(-1))


SAMPLING = [dict(), dict(temperature=0.7, top_p=0.9), dict(top_k=5, min_p=0.05, repetition_penalty=1.3),
            dict(temperature=1.5, top_k=200, top_p=0.95, min_new_tokens=8)]


@pytest.mark.parametrize("kwargs", SAMPLING)
def test_top_k_sampling_sees_the_same_scores_and_draws_the_same_tokens(kwargs):
    g, W, head, _ = _random_head(8, 8000, 64)
    W.mul_(0.3)  # logits of a few units: top_p and min_p cut inside the top k
    pipeline = _pipeline(do_sample=True, **kwargs)
    assert pipeline.screen_k == kwargs.get("top_k", 50)
    for step in range(30):
        x = torch.randn(1, 64, generator=g) * 4
        history = torch.randint(0, 8000, (1, 5 + step % 6), generator=g)
        seen = []
        draw = torch.Generator().manual_seed(step)
        got = head(x, pipeline.screen_k, partial(pipeline.monotone, history),
                   lambda s: seen.append(s) or pipeline.choose(history, s, generator=draw))  # noqa: B023
        full = F.linear(x, W)
        # the same processed scores: the same tokens kept, values equal up to the GEMM's rounding
        screened, reference = pipeline(history, seen[0]), pipeline(history, full)
        assert torch.equal(torch.isfinite(screened), torch.isfinite(reference)), step
        assert torch.allclose(screened, reference, rtol=0, atol=1e-5), step
        expected = pipeline.choose(history, full, generator=torch.Generator().manual_seed(step))
        assert torch.equal(got, expected), step
    assert head.screened_steps == 30 and head.full_steps == 0


def test_sampling_without_top_k_or_with_a_huge_one_takes_the_full_head():
    assert _pipeline(do_sample=True, top_k=0).screen_k is None
    assert _pipeline(do_sample=False, top_k=0).screen_k == 1
    g, W, head, x = _random_head(9, 4000, 32)
    pipeline = _pipeline(do_sample=True, top_k=10**6)  # more than the vocabulary: everything is kept
    history = torch.zeros(1, 6, dtype=torch.long)
    got = head(x, pipeline.screen_k, partial(pipeline.monotone, history),
               partial(pipeline.choose, history, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(got, pipeline.choose(history, F.linear(x, W), generator=torch.Generator().manual_seed(0)))
    assert head.full_steps == 1


def test_screen_applies_only_to_plain_float32_cpu_heads():
    assert screen_applies(torch.nn.Linear(8, 16, bias=False))
    assert not screen_applies(torch.nn.Linear(8, 16, bias=True))
    assert not screen_applies(torch.nn.Linear(8, 16, bias=False).to(torch.bfloat16))


def test_generate_matches_transformers_with_the_screen_on_and_off(tiny_pair):
    ours, theirs = tiny_pair("mistral")
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [0, 0, 1, 12, 13, 14, 15, 16]])
    mask = (ids != 0).long()
    kwargs = dict(max_new_tokens=24, do_sample=False, repetition_penalty=1.2, min_new_tokens=24)
    expected = theirs.generate(input_ids=ids, attention_mask=mask, **kwargs)
    try:
        engine = ours.decode_runner(mode=None)  # a fresh runner: its screen counts start at 0
        got = ours.generate(input_ids=ids, attention_mask=mask, **kwargs)
        assert torch.equal(got, expected)
        assert engine._screen.screened_steps == 24 and engine._screen.full_steps == 0
        # scores requested, or screening switched off: the full head, same tokens
        out = ours.generate(input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True,
                            **kwargs)
        assert torch.equal(out.sequences, expected) and engine._screen.screened_steps == 24
        ours.decode_runner(screen_head=False)
        assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, **kwargs), expected)
        assert ours.decode_runner()._screen is None
    finally:
        ours.decode_runner(mode=None)  # back to the default runner for the other tests


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=0.8, top_p=0.9, repetition_penalty=1.1)])
def test_sampled_generate_matches_transformers_with_the_same_seed(tiny_pair, kwargs):
    ours, theirs = tiny_pair("llama")
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [0, 0, 1, 12, 13, 14, 15, 16]])
    mask = (ids != 0).long()
    kwargs = dict(max_new_tokens=16, do_sample=True, **kwargs)  # transformers' default top_k=50 applies
    engine = ours.decode_runner()
    before = engine._screen.screened_steps if engine._screen is not None else 0
    for seed in range(3):
        torch.manual_seed(seed)
        expected = theirs.generate(input_ids=ids, attention_mask=mask, **kwargs)
        torch.manual_seed(seed)
        assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, **kwargs), expected), seed
    assert ours.decode_runner()._screen.screened_steps > before
