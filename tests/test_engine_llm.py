"""The offline API: LLM(path) loads weights and processor, generate() on strings / image prompts / token ids,
chat() with OpenAI content parts, results in input order, equal to our generate() on the same tokens; the
sampling features (seeded sampling alone and in a crowd, n, logprobs, stop strings, stop token ids,
min_tokens, ignore_eos) and incremental detokenization."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

import llava_next
from llava_next import SamplingParams


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from llava_next.entrypoints.demo import build_demo_checkpoint

    folder = build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt", quiet=True)
    return folder, llava_next.LLM(str(folder), max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def reference_model(demo):
    return llava_next.LlavaNextForConditionalGeneration.from_pretrained(demo[0])


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _data_url(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _generate_alone(model, processor, prompt, images, new):
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    kwargs = {k: inputs[k] for k in ("pixel_values", "image_sizes") if k in inputs}
    out = model.generate(inputs["input_ids"], max_new_tokens=new, do_sample=False, **kwargs)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_generate_strings_images_and_ids_in_order(demo, reference_model):
    folder, llm = demo
    processor = llm.processor
    a, b = _image(300, 400, 1), _image(500, 200, 2)
    prompts = [
        "[INST] Describe nothing. [/INST]",
        {"prompt": "[INST] <image>\nWhat is this? [/INST]", "multi_modal_data": {"image": a}},
        {"prompt": "[INST] <image>\n<image>\nCompare. [/INST]", "multi_modal_data": {"image": [a, b]}},
        {"prompt_token_ids": [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793]},
    ]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outs[:3]] == [prompts[0], prompts[1]["prompt"], prompts[2]["prompt"]]
    for out, prompt in zip(outs[:3], prompts[:3]):
        text = prompt if isinstance(prompt, str) else prompt["prompt"]
        images = [] if isinstance(prompt, str) else prompt["multi_modal_data"]["image"]
        images = images if isinstance(images, list) else [images]
        want = _generate_alone(reference_model, processor, text, images, 6)
        assert out.outputs[0].token_ids[: len(want)] == want
        assert out.outputs[0].text == processor.decode(out.outputs[0].token_ids, skip_special_tokens=True)
        assert out.finished and out.outputs[0].finish_reason == "length"
    assert outs[3].prompt is None and outs[3].prompt_token_ids == prompts[3]["prompt_token_ids"]


def test_chat_with_data_url_and_pil_parts(demo):
    _, llm = demo
    image = _image(336, 500, 3)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    conv_url = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                                              {"type": "text", "text": "What is it?"}]}]
    conv_pil = [{"role": "user", "content": [{"type": "image", "image": image},
                                              {"type": "text", "text": "What is it?"}]}]
    outs = llm.chat([conv_url, conv_pil], params, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids  # the same pixels, the same prompt
    again = llm.chat(conv_url, params, use_tqdm=False)[0]
    assert again.num_cached_tokens >= len(again.prompt_token_ids) - 16  # the image's blocks are reused
    assert again.outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_seeded_sampling_same_alone_and_in_a_crowd(demo):
    _, llm = demo
    seeded = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate(["Tell me a story"], seeded, use_tqdm=False)[0].outputs[0].token_ids
    crowd_prompts = ["Tell me a story"] + [f"noise {i}" for i in range(5)]
    crowd_params = [seeded] + [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)] * 5
    crowd = llm.generate(crowd_prompts, crowd_params, use_tqdm=False)
    assert crowd[0].outputs[0].token_ids == alone
    other = llm.generate(["Tell me a story"], SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=99,
                                                             max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert other[0].outputs[0].token_ids != alone


def test_n_logprobs_and_penalties(demo):
    _, llm = demo
    params = SamplingParams(n=3, temperature=0.9, seed=7, max_tokens=5, logprobs=3, ignore_eos=True,
                            presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2)
    out = llm.generate(["Hello"], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # children get seed + index
    for c in out.outputs:
        assert len(c.token_ids) == 5 and len(c.logprobs) == 5
        for token, entry in zip(c.token_ids, c.logprobs):
            assert token in entry and 3 <= len(entry) <= 4
            assert all(lp.logprob <= 0 for lp in entry.values())
            assert sorted(lp.rank for lp in entry.values() if lp.rank <= 3) == [1, 2, 3]


def test_stop_rules_and_incremental_text(demo):
    _, llm = demo
    engine = llm.llm_engine
    base = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    full = llm.generate(["Once upon"], base, use_tqdm=False)[0].outputs[0]
    # a stop string taken from the middle of the greedy text: text cut before it, stop_reason = the string
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    assert stop.strip()
    cut = llm.generate(["Once upon"], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.find(stop)] and full.text.startswith(cut.text)
    # a stop token id ends the completion and is reported; min_tokens holds it back
    token = full.token_ids[3]
    first = full.token_ids.index(token)
    out = llm.generate(["Once upon"], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                     stop_token_ids=[token]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full.token_ids[: first + 1] and out.stop_reason == token
    out = llm.generate(["Once upon"], SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12,
                                                     stop_token_ids=[token]), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"
    # streaming pieces concatenate to the text and the token ids
    engine.add_request("stream", "Once upon", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                             stop=["zzzz"]))
    pieces, ids = [], []
    while engine.has_unfinished_requests():
        for o in engine.step():
            pieces.append(o.outputs[0].new_text)
            ids += o.outputs[0].new_token_ids
    assert "".join(pieces) == o.outputs[0].text == full.text and ids == full.token_ids


def test_eos_stops_unless_ignored(demo):
    _, llm = demo
    full = llm.generate(["Hi"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    eos = full[2]
    engine = llava_next.LLMEngine(llm.model, llm.processor, eos_token_id=eos)
    engine.add_request("eos", "Hi", SamplingParams(temperature=0.0, max_tokens=8))
    engine.add_request("ign", "Hi", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
    stopped = done["eos"]
    assert stopped.token_ids == full[: full.index(eos) + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason is None
    assert done["ign"].token_ids == full and done["ign"].finish_reason == "length"
