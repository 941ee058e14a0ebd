"""The engine's batched sampler (engine/sampler.py) against the per-row pipeline generate() uses
(sampling/logits.py LogitsPipeline, plus vLLM's presence/frequency penalties by their formula): seeded rows
draw the same tokens in a crowd, unseeded rows follow the same distribution (chi-square), each penalty
matches its formula (sign included), top-k ranks, min_tokens, the grammar-mask hook, edge values that once
stopped the engine, and a failing row that ends alone."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from llava_next.engine.request import PreparedRequest, Sequence
from llava_next.engine.sampler import Sampler
from llava_next.sampling.logits import LogitsPipeline
from llava_next.sampling.params import SamplingParams

V = 97
EOS = (2,)


def make_seq(params: SamplingParams, prompt: list[int], request_id: str, index: int = 0) -> Sequence:
    prepared = PreparedRequest(None, list(prompt), [], params)
    return Sequence(request_id, index, prepared, params, EOS)


def reference_token(seq: Sequence, logits: torch.Tensor, generator: torch.Generator) -> int:
    """The engine's former per-row path: presence/frequency over the output, then the pipeline, one draw."""
    p = seq.params
    row = logits[None].float()
    if p.presence_penalty or p.frequency_penalty:
        counts = torch.bincount(torch.tensor(seq.output_ids, dtype=torch.long), minlength=V)[:V]
        row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    stops = sorted(set(seq.eos_token_ids) | set(seq.stop_token_ids))
    pipe = LogitsPipeline(p, stops or None, seq.prompt_len)
    scores = pipe(torch.tensor(seq.token_ids)[None], row)
    return int(pipe.sample(scores, generator)[0])


def crowd_params():
    seeded = [
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=11),
        SamplingParams(temperature=1.3, min_p=0.05, seed=12, presence_penalty=0.7, frequency_penalty=0.4),
        SamplingParams(temperature=1.0, repetition_penalty=1.4, top_p=0.7, seed=13, min_tokens=4),
        SamplingParams(temperature=0.6, top_k=5, seed=-14, repetition_penalty=0.8, frequency_penalty=-0.5),
        SamplingParams(temperature=1.0, seed=2**63 - 1),
    ]
    unseeded = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=3, presence_penalty=1.0),
                SamplingParams(temperature=0.0, repetition_penalty=1.3), SamplingParams(temperature=0.0)]
    return seeded, unseeded


def test_seeded_rows_equal_the_per_row_pipeline_in_a_crowd():
    seeded, unseeded = crowd_params()
    rng = torch.Generator().manual_seed(0)
    seqs = [make_seq(p, torch.randint(3, V, (9,), generator=rng).tolist(), f"r{i}")
            for i, p in enumerate(seeded + unseeded)]
    refs = [make_seq(p, list(s.token_ids), f"ref{i}") for i, (p, s) in enumerate(zip(seeded, seqs))]
    ref_gens = [torch.Generator().manual_seed(p.seed % 2**64) for p in seeded]
    sampler = Sampler(torch.device("cpu"), seed=5)
    for step in range(12):
        logits = torch.randn(len(seqs), V, generator=rng) * 3
        logits[:, EOS[0]] += 4.0  # EOS likely: min_tokens has to hold it back
        order = list(range(len(seqs)))[::-1] if step % 2 else list(range(len(seqs)))  # rows move in the batch
        tokens, _ = sampler([seqs[i] for i in order], logits[order])
        got = dict(zip(order, tokens))
        for i, ref in enumerate(refs):
            want = reference_token(ref, logits[i], ref_gens[i])
            assert got[i] == want, (step, i)
            ref.token_ids.append(want)
        greedy_pen = len(seeded) + 2  # greedy with a repetition penalty: deterministic too
        assert got[greedy_pen] == reference_token(seqs[greedy_pen], logits[greedy_pen], None)
        for i, seq in enumerate(seqs):
            seq.token_ids.append(got[i])
    assert all(EOS[0] not in s.output_ids[:4] for s in (seqs[2], refs[2]))


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def test_unseeded_rows_follow_the_pipeline_distribution():
    torch.manual_seed(0)
    logits = torch.randn(V) * 2
    params = SamplingParams(temperature=0.7, top_k=8, top_p=0.95, presence_penalty=0.3)
    ref = make_seq(params, [5, 6, 7], "ref")
    pipe = LogitsPipeline(params, None, 3)
    probs = torch.softmax(pipe(torch.tensor(ref.token_ids)[None], logits[None]), -1)[0]  # no output yet: no counts
    support = probs.nonzero().squeeze(1).tolist()
    sampler = Sampler(torch.device("cpu"), seed=3)
    counts = torch.zeros(V)
    rows = 64
    for step in range(100):  # a fresh crowd each step: every row is at its first token
        seqs = [make_seq(params, [5, 6, 7], f"s{step}-{i}") for i in range(rows)]
        tokens, _ = sampler(seqs, logits.expand(rows, V))
        for seq in seqs:
            sampler.forget(seq)
        counts += torch.bincount(torch.tensor(tokens), minlength=V).float()
    n = counts.sum()
    assert set(counts.nonzero().squeeze(1).tolist()) <= set(support)  # never a token outside top-k / top-p
    expected = probs[support] * n
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    assert stat < chi2_critical(len(support) - 1), stat


def penalty_case(**kw):
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5, -0.5, 0.0, 3.0, -2.0]])
    prompt, output = [0, 7], [2, 2, 4, 1]
    seq = make_seq(SamplingParams(temperature=0.0, **kw), prompt, "p")
    seq.token_ids.extend(output)
    counts = torch.bincount(torch.tensor(output), minlength=8).float()
    seen = torch.zeros(8, dtype=torch.bool)
    seen[prompt + output] = True
    got = Sampler(torch.device("cpu")).scores([seq], logits)[0]
    return logits[0], counts, seen, got


def test_presence_penalty_formula():
    logits, counts, _, got = penalty_case(presence_penalty=0.75)
    assert torch.equal(got, logits - 0.75 * (counts > 0).float())


def test_frequency_penalty_formula():
    logits, counts, _, got = penalty_case(frequency_penalty=0.5)
    assert torch.equal(got, logits - 0.5 * counts)


def test_repetition_penalty_formula_over_prompt_and_output():
    logits, _, seen, got = penalty_case(repetition_penalty=1.5)
    want = torch.where(seen, torch.where(logits < 0, logits * 1.5, logits / 1.5), logits)
    assert torch.equal(got, want)
    assert got[0] == 1.0 / 1.5 and got[7] == -3.0 and got[6] == 3.0  # prompt tokens count, unseen ones do not


def test_penalties_together_in_the_engine_order():
    logits, counts, seen, got = penalty_case(presence_penalty=-0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    x = logits - 0.25 * counts + 0.5 * (counts > 0).float()
    assert torch.equal(got, torch.where(seen, torch.where(x < 0, x * 2.0, x / 2.0), x))


def test_counts_follow_sampled_tokens_incrementally():
    seq = make_seq(SamplingParams(temperature=0.0, frequency_penalty=1.0), [3], "c")
    sampler = Sampler(torch.device("cpu"))
    logits = torch.zeros(1, 8)
    logits[0, 5] = 2.5  # chosen until its count makes it fall below 0
    picked = []
    for _ in range(4):
        token = sampler([seq], logits)[0][0]
        seq.token_ids.append(token)
        picked.append(token)
    assert picked == [5, 5, 5, 0]  # 2.5, 1.5, 0.5, then -0.5 < 0
    assert sampler.scores([seq], logits)[0, 5] == 2.5 - 3


def test_sampled_tokens_stay_inside_top_k():
    torch.manual_seed(1)
    logits = torch.randn(1, V)
    top = set(torch.topk(logits[0], 3).indices.tolist())
    sampler = Sampler(torch.device("cpu"))
    seqs = [make_seq(SamplingParams(temperature=5.0, top_k=3), [4], f"k{i}") for i in range(32)]
    seen = set()
    for _ in range(30):
        tokens, _ = sampler(seqs, logits.expand(32, V))
        seen |= set(tokens)
    assert seen == top


def test_min_tokens_holds_back_eos_and_stop_ids():
    params = SamplingParams(temperature=1.0, top_k=2, min_tokens=3, stop_token_ids=[9, 10**6], seed=1)
    seq = make_seq(params, [4], "m")
    logits = torch.full((1, 20), -5.0)
    logits[0, [EOS[0], 9]] = 10.0  # EOS and the stop id are the two best
    sampler = Sampler(torch.device("cpu"))
    out = []
    for _ in range(5):
        token = sampler([seq], logits)[0][0]
        seq.token_ids.append(token)
        out.append(token)
    assert all(t not in (EOS[0], 9) for t in out[:3]) and all(t in (EOS[0], 9) for t in out[3:])


def test_masked_tokens_never_chosen_and_a_row_with_nothing_allowed_fails_alone():
    """What a grammar mask leaves (sampling/structured.py writes -inf over disallowed tokens before the sampler):
    only allowed tokens are drawn, and a row with nothing allowed fails alone."""
    sampler = Sampler(torch.device("cpu"))
    seqs = [make_seq(SamplingParams(temperature=1.0, seed=i), [4], f"g{i}") for i in range(3)]
    allowed = torch.zeros(3, 70, dtype=torch.bool)
    allowed[0, [5, 66]] = True
    allowed[1] = True
    logits = torch.zeros(3, 70).masked_fill(~allowed, float("-inf"))
    seen = set()
    for _ in range(40):
        tokens, _ = sampler(seqs, logits)
        seen.add(tokens[0])
        assert tokens[1] is not None and tokens[2] is None  # row 2 allows nothing: it fails alone
    assert seen == {5, 66}
    assert ("g2", 0) in sampler.failures and list(sampler.failures) == [("g2", 0)]


def test_edge_values_give_finite_choices():
    sampler = Sampler(torch.device("cpu"))
    torch.manual_seed(2)
    logits = torch.randn(6, V) * 4
    logits[1, [10, 11, 12]] = torch.tensor([-1.0, 1.0, -1.0])  # one positive prompt token for the 1e-40 penalty
    params = [SamplingParams(temperature=1e-45), SamplingParams(temperature=1.0, repetition_penalty=1e-40),
              SamplingParams(temperature=1.0, top_p=5e-324), SamplingParams(temperature=1.0, top_p=1e-300),
              SamplingParams(temperature=1e300, repetition_penalty=1e300), SamplingParams(temperature=1e-5, seed=3)]
    seqs = [make_seq(p, [10, 11, 12], f"e{i}") for i, p in enumerate(params)]
    for _ in range(3):
        tokens, _ = sampler(seqs, logits)
        assert all(t is not None for t in tokens), sampler.failures
        assert tokens[0] == int(logits[0].argmax())  # below 1e-5: greedy
        assert tokens[1] == 11  # its penalised score is huge but finite: it wins
        assert tokens[2] == int(logits[2].argmax()) and tokens[3] == int(logits[3].argmax())  # top_p ~0: the best
        for seq, t in zip(seqs, tokens):
            seq.token_ids.append(t)
    rep_row = sampler.scores(seqs[1:2], logits[1:2])[0]
    assert not rep_row.isnan().any() and rep_row[11] > 1e37


def test_a_failing_row_ends_alone_and_is_logged(monkeypatch, caplog):
    sampler = Sampler(torch.device("cpu"))
    seqs = [make_seq(SamplingParams(temperature=1.0, seed=i), [4], f"f{i}") for i in range(4)]
    real = Sampler._sample

    def failing(self, rows, logits):
        if any(r.seq.request_id == "f2" for r in rows):
            raise RuntimeError("injected sampling fault")
        return real(self, rows, logits)

    monkeypatch.setattr(Sampler, "_sample", failing)
    logits = torch.randn(4, V)
    alone = [Sampler(torch.device("cpu"))([make_seq(s.params, [4], s.request_id)], logits[i: i + 1])[0][0]
             for i, s in enumerate(seqs)]
    with caplog.at_level(logging.ERROR, logger="llava_next.engine.sampler"):
        tokens, _ = sampler(seqs, logits)
    assert tokens[2] is None and [tokens[i] for i in (0, 1, 3)] == [alone[i] for i in (0, 1, 3)]
    assert "injected sampling fault" in sampler.failures[("f2", 0)]
    assert any(r.exc_info and "injected" in str(r.exc_info[1]) for r in caplog.records)


def test_logprobs_batched_match_a_direct_log_softmax():
    sampler = Sampler(torch.device("cpu"))
    seqs = [make_seq(SamplingParams(temperature=0.0, logprobs=k), [4], f"l{k}") for k in (0, 2, 5)]
    logits = torch.randn(3, V)
    tokens, logprobs = sampler(seqs, logits)
    for i, (k, entry) in enumerate(zip((0, 2, 5), logprobs)):
        lp = torch.log_softmax(logits[i], -1)
        top = torch.topk(lp, k).indices.tolist() if k else []
        assert list(entry)[-k:] == top if k else list(entry) == [tokens[i]]
        assert entry[tokens[i]].rank == 1 and abs(entry[tokens[i]].logprob - float(lp[tokens[i]])) < 1e-6


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_fail_their_row_only(temperature):
    sampler = Sampler(torch.device("cpu"))
    seqs = [make_seq(SamplingParams(temperature=temperature), [4], f"n{i}") for i in range(3)]
    logits = torch.randn(3, V)
    logits[1, 7] = float("nan")
    tokens, _ = sampler(seqs, logits)
    assert tokens[1] is None and tokens[0] is not None and tokens[2] is not None
    assert list(sampler.failures) == [("n1", 0)]
    if temperature == 0.0:
        assert [tokens[0], tokens[2]] == [int(logits[0].argmax()), int(logits[2].argmax())]


def test_a_row_whose_set_up_fails_ends_alone(monkeypatch, caplog):
    sampler = Sampler(torch.device("cpu"))
    seqs = [make_seq(SamplingParams(temperature=0.0, repetition_penalty=1.2), [4], f"u{i}") for i in range(3)]
    real = Sampler._new_slot

    def failing(self, seq, vocab):
        if seq.request_id == "u1":
            raise MemoryError("injected: no room for a count slot")
        return real(self, seq, vocab)

    monkeypatch.setattr(Sampler, "_new_slot", failing)
    logits = torch.randn(3, V)
    with caplog.at_level(logging.ERROR, logger="llava_next.engine.sampler"):
        tokens, _ = sampler(seqs, logits)
    assert tokens[1] is None and tokens[0] is not None and tokens[2] is not None
    assert "no room" in sampler.failures[("u1", 0)] and any(r.exc_info for r in caplog.records)
