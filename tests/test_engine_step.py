"""The engine step at GPU shape: one attention call per layer whatever the batch, a mixed step (prefill chunks,
decodes, a sliding window that cuts) exact against transformers, bucketed (padded) decode steps giving the
same tokens as unpadded ones, and the bucketed decode forward traceable as one graph (torch.compile
fullgraph=True, the property a CUDA-graph capture needs)."""

from __future__ import annotations

import pytest
import torch
from engine_cases import case, reference, run

from llava_next.engine import attention_metadata
from llava_next.engine.llm_engine import LLMEngine
from llava_next.sampling.params import SamplingParams

WINDOW = 12  # Mistral's sliding window, shorter than the contexts below so it cuts
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _text(seed: int, n: int) -> dict:
    return {"prompt_token_ids": [1] + [100 + (37 * seed + 11 * j) % 30000 for j in range(n - 1)]}


def _count_attend(monkeypatch) -> list:
    calls = []
    original = attention_metadata.attend

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_metadata, "attend", counting)
    return calls


@pytest.mark.parametrize("batch", [1, 8])
def test_attention_calls_per_layer_do_not_grow_with_the_batch(tiny_pair, monkeypatch, batch):
    model, _ = tiny_pair("mistral")
    layers = model.config.text_config.num_hidden_layers
    engine = LLMEngine(model, None, block_size=4)
    for i in range(batch):
        engine.add_request(str(i), _text(i, 5 + 3 * i), GREEDY)
    engine.step()  # every prompt prefilled in one step (chunks of different lengths)
    calls = _count_attend(monkeypatch)
    engine.step()  # pure decode
    assert len(calls) == layers, f"{len(calls)} attention calls for {layers} layers at batch {batch}"
    assert all(shape[0] == batch for shape in calls)  # one call over every sequence
    calls.clear()
    engine.add_request("late", _text(99, 9), GREEDY)
    engine.add_request("later", _text(98, 7), GREEDY)
    engine.step()  # mixed: the decodes, plus two prefill chunks
    assert len(calls) == 2 * layers  # one call for the decode rows, one for the padded chunks


def test_mixed_step_with_sliding_window_is_exact(tiny_pair, monkeypatch):
    ours, hf = tiny_pair("mistral", text_overrides={"sliding_window": WINDOW})
    assert ours.model.language_model.windows == [WINDOW]
    engine = LLMEngine(ours, None, block_size=4, max_num_batched_tokens=24)
    seen = []  # (prefix token ids, logits row) of every sampled row
    execute = engine.runner.execute
    captured = {}
    hook = ours.lm_head.register_forward_hook(lambda m, i, o: captured.__setitem__("logits", o))

    def spy(step):
        kinds = sorted(n > 1 for _, _, n in step.scheduled)
        seqs, tokens, logprobs = execute(step)
        if kinds.count(True) >= 2 and kinds.count(False) >= 1:
            seen.append("mixed")
        for row, seq in enumerate(seqs):
            seen.append((list(seq.token_ids), captured["logits"][row].clone()))
        return seqs, tokens, logprobs

    monkeypatch.setattr(engine.runner, "execute", spy)
    prompts = [_text(1, 20), _text(2, 15), _text(3, 15), _text(4, 11)]
    done = {}
    try:
        engine.add_request("0", prompts[0], GREEDY)
        engine.step()  # the first prompt alone; then it decodes while the others prefill in chunks beside it
        for i in range(1, 4):
            engine.add_request(str(i), prompts[i], GREEDY)
        for _ in range(100):
            done.update({o.request_id: o for o in engine.step() if o.finished})
            if not engine.has_unfinished_requests():
                break
    finally:
        hook.remove()
    assert "mixed" in seen, "no step held decodes and two prefill chunks together"
    rows = [x for x in seen if x != "mixed"]
    assert len(rows) == 4 * GREEDY.max_tokens and max(len(ids) for ids, _ in rows) > 2 * WINDOW
    with torch.no_grad():
        for ids, logits in rows:
            want = hf(input_ids=torch.tensor([ids])).logits[0, -1]
            assert (logits - want).abs().max().item() < 1e-4, f"prefix of {len(ids)} tokens"
    assert all(len(done[str(i)].outputs[0].token_ids) == GREEDY.max_tokens for i in range(len(prompts)))


def test_bucketed_decode_gives_the_same_tokens_as_unpadded(tiny_pair):
    model, _ = tiny_pair("mistral")
    prompts = [case([(336, 336)], 1), _text(2, 30), _text(3, 7)]  # 3 sequences: padded to a bucket of 4
    params = SamplingParams(temperature=0.0, max_tokens=8)
    eager = run(LLMEngine(model, None, block_size=16, runner_mode="eager"), prompts, params)
    engine = LLMEngine(model, None, block_size=16, runner_mode="static")
    static = run(engine, prompts, params)
    assert [b for b, _ in engine.stats()["decode_buckets"]] == [4]  # 3 rows padded to the bucket of 4, every decode step
    for i, prompt in enumerate(prompts):
        want = reference(model, prompt, 8)
        assert static[str(i)].outputs[0].token_ids == eager[str(i)].outputs[0].token_ids == want


def test_bucketed_decode_forward_is_one_graph(tiny_pair):
    """torch.compile(fullgraph=True) raises on any graph break (a host sync, data-dependent Python): the
    bucketed decode forward traces whole. aot_eager checks the trace without Inductor's compile time."""
    model, _ = tiny_pair("mistral", text_overrides={"sliding_window": WINDOW})
    engine = LLMEngine(model, None, block_size=4, runner_mode="static")
    for i in range(3):
        engine.add_request(str(i), _text(i, 14 + i), SamplingParams(temperature=0.0, max_tokens=4))
    engine.step()
    engine.step()  # one bucketed decode step: builds the (4, 512) static step and fills its buffers
    step = engine.runner.steps[(4, 512)]
    with torch.inference_mode():
        eager = step._run()
        torch._dynamo.reset()
        compiled = torch.compile(step._run, fullgraph=True, backend="aot_eager")()
    torch._dynamo.reset()
    assert (compiled - eager).abs().max().item() < 1e-5
