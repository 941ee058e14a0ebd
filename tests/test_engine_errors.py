"""Bad requests are refused up front with typed ValueErrors naming what was wrong; nothing already running is
disturbed and the next call works."""

from __future__ import annotations

import pytest
import torch

import llava_next
from engine_cases import case, reference, run
from llava_next import SamplingParams
from llava_next.engine.llm_engine import LLMEngine
from llava_next.errors import (ContextLengthError, ImageTokenMismatchError, InvalidImageError, KVCacheCapacityError,
                               ModelInputError, SamplingParamsError, TooManyImagesError)

GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 17), ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("min_p", 2.0), ("max_tokens", 0), ("max_tokens", "8"), ("min_tokens", -1),
    ("logprobs", 21), ("stop", ["x"] * 17), ("stop", "y" * 257), ("stop", [""]), ("stop_token_ids", [-1]),
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0), ("seed", 2**64),
    ("ignore_eos", 1), ("temperature", True),
])
def test_sampling_params_are_validated(field, value):
    with pytest.raises(SamplingParamsError, match=field):
        SamplingParams(**{field: value})
    assert issubclass(SamplingParamsError, ValueError)


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(SamplingParamsError, match="min_tokens"):
        SamplingParams(min_tokens=9, max_tokens=8)


def test_bad_requests_refused_before_any_work(tiny_pair):
    model, _ = tiny_pair("mistral")
    engine = LLMEngine(model, None, max_model_len=4096, limit_mm_per_prompt={"image": 1}, num_kv_blocks=200)
    good = case([(200, 300)], 1)
    engine.add_request("running", good, GREEDY)
    engine.step()  # a request is mid-flight while the bad ones arrive
    two = case([(200, 300), (336, 336)], 2)
    with pytest.raises(TooManyImagesError):
        engine.prepare(two, GREEDY)
    long = {"prompt_token_ids": [5] * 4000}
    with pytest.raises(ContextLengthError, match="max_model_len"):
        engine.prepare(long, SamplingParams(max_tokens=100))
    with pytest.raises(KVCacheCapacityError, match="blocks"):
        engine.prepare({"prompt_token_ids": [5] * 3300}, SamplingParams(max_tokens=10))
    mismatch = dict(good, prompt_token_ids=good["prompt_token_ids"][:-5] + good["prompt_token_ids"][-2:])
    mismatch["prompt_token_ids"] = [t for t in good["prompt_token_ids"] if t != 32000][:10] + [32000] * 7
    with pytest.raises(ImageTokenMismatchError):
        engine.prepare(mismatch, GREEDY)
    no_image = {"prompt_token_ids": good["prompt_token_ids"]}
    with pytest.raises(ImageTokenMismatchError):
        engine.prepare(no_image, GREEDY)
    wrong_tiles = {"prompt_token_ids": good["prompt_token_ids"],
                   "multi_modal_data": {"image": [{"pixel_values": torch.zeros(2, 3, 336, 336), "image_size": (200, 300)}]}}
    with pytest.raises(InvalidImageError, match="tiles"):
        engine.prepare(wrong_tiles, GREEDY)
    with pytest.raises(ModelInputError):
        engine.prepare({"prompt_token_ids": [1, 99999]}, GREEDY)
    with pytest.raises(ModelInputError):
        engine.prepare({"prompt_token_ids": []}, GREEDY)
    with pytest.raises(ModelInputError):
        engine.prepare("text needs a processor", GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("running", good, GREEDY)
    assert engine.num_requests() == (1, 0)  # only the good one is in the engine
    done = run(engine, [case([], 3)], GREEDY)
    while engine.has_unfinished_requests():
        for out in engine.step():
            done[out.request_id] = out
    assert done["running"].outputs[0].token_ids == reference(model, good, 4)
    assert engine.stats()["kv_blocks_used"] == 0


def test_llm_generate_one_bad_prompt_fails_the_call_up_front(tiny_pair):
    model, _ = tiny_pair("mistral")
    llm = llava_next.LLM(model, max_model_len=2048)
    good = case([], 1)
    with pytest.raises(ContextLengthError):
        llm.generate([good, {"prompt_token_ids": [5] * 2100}], GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    out = llm.generate([good], GREEDY, use_tqdm=False)
    assert out[0].outputs[0].token_ids == reference(model, good, 4)


def test_abort_frees_blocks_and_reports_once(tiny_pair):
    model, _ = tiny_pair("mistral")
    engine = LLMEngine(model, None, max_num_batched_tokens=256)
    engine.add_request("a", case([(500, 316)], 1), SamplingParams(temperature=0.0, max_tokens=50))
    engine.add_request("b", case([], 2), SamplingParams(temperature=0.0, max_tokens=4))
    engine.step()
    assert engine.stats()["kv_blocks_used"] > 0
    engine.abort("a")
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == "a"]
    assert len(aborted) == 1 and aborted[0].finished and aborted[0].outputs[0].finish_reason == "abort"
    while engine.has_unfinished_requests():
        assert all(o.request_id != "a" for o in engine.step())
    assert engine.stats()["kv_blocks_used"] == 0
