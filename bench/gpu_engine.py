"""GPU checks of the engine (issue 12's GPU bullet), one prepared script; tested on the CPU at the tiny shape.

Stages (each prints one JSON line; a time cap stops starting new stages):
  parity   bf16 greedy: engine vs our generate() one by one on 16 W5 requests, first 16 tokens (report the
           first differing step when a near-tie differs)
  kernel   the engine's paged attention (one decode token per sequence, context 2,500) against contiguous SDPA
           at batch 1, 32, 64: ms per layer call
  w5       W5's 8 sizes cycled, 32 and 64 requests at once, 128 forced new tokens: output tok/s (goal >= 1,500
           at 32)
  batch1   batch-1 decode through the engine vs generate() (CUDA-graph runner): tok/s and ratio (goal >= 0.9)
  e2       256 requests, one image each (2.3-2.9k prompt tokens), 128 new tokens, all at once: request/s
           (goal >= 9)

Usage on the GPU machine:  python bench/gpu_engine.py --shape 7b --device cuda --cap-s 540
On a CPU (the check before a GPU run):  python bench/gpu_engine.py --shape tiny --device cpu --quick

Needs transformers (bench/benchmark.py builds the seeded random model). Leaves out: the Poisson serving run
(E3, through the server) and E4 (cached questions), which belong to the server's bench.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import W5_SIZES, build_models, emit, make_inputs, sync  # noqa: E402


def requests(ours, n, seed, device, dtype, sizes=None, prompt_tokens=8):
    sizes = sizes or [W5_SIZES[i % len(W5_SIZES)] for i in range(n)]
    out = []
    for i, size in enumerate(sizes[:n]):
        inputs, _ = make_inputs(ours, [size], prompt_tokens=prompt_tokens, device="cpu", seed=seed * 1000 + i)
        h, w = size[1], size[0]
        tiles = inputs["pixel_values"][0][: ours.config.geometry.num_tiles(h, w)].to(dtype)
        out.append({"prompt_token_ids": inputs["input_ids"][0].tolist(),
                    "multi_modal_data": {"image": [{"pixel_values": tiles,
                                                    "image_size": tuple(int(v) for v in inputs["image_sizes"][0])}]}})
    return out


def engine_run(llm, prompts, new_tokens):
    from llava_next import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens)
    sync(llm.llm_engine.device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync(llm.llm_engine.device)
    return time.perf_counter() - start, outs


def generate_alone(ours, prompt, new_tokens, device):
    image = prompt["multi_modal_data"]["image"][0]
    ours.model.feature_cache.clear()
    ids = torch.tensor([prompt["prompt_token_ids"]], device=device)
    out = ours.generate(ids, pixel_values=image["pixel_values"][None].to(device),
                        image_sizes=torch.tensor([image["image_size"]], device=device),
                        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def stage_parity(llm, ours, device, dtype, n, tokens):
    prompts = requests(ours, n, 1, device, dtype)
    _, outs = engine_run(llm, prompts, tokens)
    same, first_diff = 0, []
    for prompt, out in zip(prompts, outs):
        want = generate_alone(ours, prompt, tokens, device)
        got = out.outputs[0].token_ids
        if got == want:
            same += 1
        else:
            first_diff.append(next(i for i, (a, b) in enumerate(zip(got, want)) if a != b))
    emit({"stage": "parity", "requests": n, "tokens": tokens, "identical": same, "first_differing_steps": first_diff})


def stage_kernel(ours, device, dtype, batches, context, runs=20):
    import numpy as np

    from llava_next.engine.attention_metadata import PagedKVCache, StepAttention, plan_step

    text = ours.config.text_config
    H, Hkv, Hd = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    bs = 16
    for B in batches:
        blocks_per = -(-(context + 1) // bs)
        cache = PagedKVCache(1, B * blocks_per + 1, bs, Hkv, Hd, dtype, device)
        cache.keys.normal_()
        cache.values.normal_()
        tables = [list(range(i * blocks_per, (i + 1) * blocks_per)) for i in range(B)]
        plan = plan_step(np.full(B, context), np.ones(B, np.int64), tables, bs, cache.scratch_block, [None], B,
                         np.arange(B))
        meta = StepAttention.build(cache, [None], plan, torch.device(device))[0]
        q = torch.randn(1, H, B, Hd, device=device, dtype=dtype)
        k = torch.randn(1, Hkv, B, Hd, device=device, dtype=dtype)
        kd = torch.randn(B, Hkv, context + 1, Hd, device=device, dtype=dtype)
        qd = torch.randn(B, H, 1, Hd, device=device, dtype=dtype)

        def paged():
            meta.attend(0, q, k, k, None, Hd ** -0.5, "sdpa")

        def dense():
            F.scaled_dot_product_attention(qd, kd, kd, enable_gqa=True)

        result = {"stage": "kernel", "batch": B, "context": context}
        for name, fn in (("paged_ms", paged), ("contiguous_sdpa_ms", dense)):
            fn()
            sync(device)
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                fn()
                sync(device)
                times.append((time.perf_counter() - start) * 1e3)
            result[name] = statistics.median(times)
        result["paged_over_contiguous"] = result["paged_ms"] / result["contiguous_sdpa_ms"]
        emit(result)


def stage_w5(llm, ours, device, dtype, counts, new_tokens):
    for n in counts:
        engine_run(llm, requests(ours, min(n, 4), 90 + n, device, dtype), 4)  # warm-up
        seconds, outs = engine_run(llm, requests(ours, n, 100 + n, device, dtype), new_tokens)
        stats = llm.llm_engine.stats()
        emit({"stage": "w5", "requests": n, "new_tokens": new_tokens, "seconds": seconds,
              "output_tok_s": n * new_tokens / seconds, "goal_tok_s_at_32": 1500,
              "prefill_steps_s": stats["prefill_s"], "decode_steps_s": stats["decode_s"]})


def stage_batch1(llm, ours, device, dtype, new_tokens):
    generate_alone(ours, requests(ours, 1, 7, device, dtype)[0], 8, device)  # warm-up / graph capture
    timings = {}
    for label, n, seed in (("short", 2, 8), ("long", new_tokens, 9)):  # fresh pixels: no prefix-cache hit
        prompt = requests(ours, 1, seed, device, dtype)[0]
        sync(device)
        start = time.perf_counter()
        generate_alone(ours, prompt, n, device)
        sync(device)
        timings[f"generate_{label}"] = time.perf_counter() - start
        start = time.perf_counter()
        engine_run(llm, [prompt], n)
        timings[f"engine_{label}"] = time.perf_counter() - start
    gen = (new_tokens - 2) / (timings["generate_long"] - timings["generate_short"])
    eng = (new_tokens - 2) / (timings["engine_long"] - timings["engine_short"])
    emit({"stage": "batch1", "generate_decode_tok_s": gen, "engine_decode_tok_s": eng, "ratio": eng / gen,
          "goal_ratio": 0.9})


def stage_e2(llm, ours, device, dtype, n, new_tokens):
    sizes = [(1000, 750), (1024, 1024), (800, 1000), (1008, 336)]  # 2.3-2.9k prompt tokens each
    prompts = requests(ours, n, 300, device, dtype, sizes=[sizes[i % len(sizes)] for i in range(n)])
    seconds, _ = engine_run(llm, prompts, new_tokens)
    emit({"stage": "e2", "requests": n, "new_tokens": new_tokens, "seconds": seconds, "request_s": n / seconds,
          "output_tok_s": n * new_tokens / seconds, "goal_request_s": 9})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="bfloat16 on cuda, float32 on cpu by default")
    parser.add_argument("--stages", default="parity,kernel,w5,batch1,e2")
    parser.add_argument("--quick", action="store_true", help="tiny counts (the CPU check of this script)")
    parser.add_argument("--cap-s", type=float, default=540.0, help="start no new stage after this many seconds")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    t0 = time.perf_counter()

    import llava_next

    _, ours = build_models(args.shape, args.device, dtype)
    emit({"stage": "env", "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
          "torch": torch.__version__, "shape": args.shape, "dtype": str(dtype), "build_s": time.perf_counter() - t0})
    quick = args.quick
    llm = llava_next.LLM(ours, max_num_seqs=4 if quick else 256, max_num_batched_tokens=args.max_num_batched_tokens,
                         kv_cache_memory_bytes=(64 << 20) if quick else None)
    emit({"stage": "engine", "kv_blocks": llm.llm_engine.pool.num_blocks, "block_size": llm.llm_engine.block_size,
          "setup_s": time.perf_counter() - t0})
    plan = {
        "parity": lambda: stage_parity(llm, ours, args.device, dtype, 2 if quick else 16, 4 if quick else 16),
        "kernel": lambda: stage_kernel(ours, args.device, dtype, [1, 2] if quick else [1, 32, 64],
                                       64 if quick else 2500, runs=3 if quick else 20),
        "w5": lambda: stage_w5(llm, ours, args.device, dtype, [2] if quick else [32, 64], 4 if quick else 128),
        "batch1": lambda: stage_batch1(llm, ours, args.device, dtype, 6 if quick else 128),
        "e2": lambda: stage_e2(llm, ours, args.device, dtype, 3 if quick else 256, 4 if quick else 128),
    }
    for name in args.stages.split(","):
        if time.perf_counter() - t0 > args.cap_s:
            emit({"stage": name, "skipped": "time cap"})
            continue
        try:
            plan[name]()
        except Exception as exc:  # one failed stage must not cost the others
            emit({"stage": name, "error": f"{type(exc).__name__}: {exc}"})
    emit({"stage": "done", "total_s": time.perf_counter() - t0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
