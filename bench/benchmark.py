"""bench/benchmark.py (formerly `llava-next bench`): ours against transformers in one process, after a correctness gate.

Protocol (shared/BENCHMARKS.md): one seeded random model of the chosen shape is built with transformers and
its tensors are handed to ours (same weights, no copy where dtype and device agree); a gate checks logits and
greedy tokens; then workloads W1-W7 are timed with synchronisation, warm-up, alternating ours/theirs and
medians. Every stage prints one JSON line; a table closes the run. A hard time cap stops starting new
stages so a GPU run fits one device call.

Shapes: `tiny` (CPU; decoder 256 wide, 2 layers; CLIP 64 wide, 2 layers; real 336/14 geometry and real
pinpoints, so sequence lengths are real) and `7b` (llava-v1.6-mistral-7b: Mistral 4096/32/32/8/14336, vocab
32064, CLIP ViT-L/14-336).

Needs transformers (the dev extra); it is imported only here, never by the library.
Leaves out: transformers' compiled static-cache variant (tens of seconds of compile per shape).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

SHAPES = {
    "tiny": dict(text=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                           num_key_value_heads=4),
                 vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)),
    "7b": dict(text=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8),
               vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)),
}
W5_SIZES = [(1000, 750), (640, 480), (336, 1008), (1200, 400), (512, 512), (800, 1000), (1024, 1024), (300, 200)]


def emit(record: dict):
    print(json.dumps(record), flush=True)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def build_models(shape: str, device: str, dtype: torch.dtype, seed: int = 0):
    """(transformers model, our model) sharing one set of seeded random weights."""
    from transformers import CLIPVisionConfig, MistralConfig
    from transformers import LlavaNextConfig as HFConfig
    from transformers import LlavaNextForConditionalGeneration as HFModel

    from llava_next.config import LlavaNextConfig
    from llava_next.compat.modeling import LlavaNextForConditionalGeneration
    from llava_next.loading.weights import finish_build, load_state

    spec = SHAPES[shape]
    text = MistralConfig(vocab_size=32064, max_position_embeddings=32768, rope_theta=1e6, sliding_window=None,
                         rms_norm_eps=1e-5, **spec["text"])
    vision = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, **spec["vision"])
    hf_cfg = HFConfig(text_config=text, vision_config=vision, image_token_index=32000)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            theirs = HFModel(hf_cfg)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        generator = torch.Generator(device=device).manual_seed(seed)
        for name, p in theirs.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02 if shape == "7b" else 0.1, generator=generator)
    theirs.eval()
    config = LlavaNextConfig.from_dict(hf_cfg.to_dict())
    with torch.device("meta"):
        ours = LlavaNextForConditionalGeneration(config)
    load_state(ours, theirs.state_dict().items(), dtype, device, source="transformers model")
    finish_build(ours)
    return theirs, ours.eval()


def make_inputs(ours, sizes, prompt_tokens: int = 8, device="cpu", dtype=torch.float32, seed: int = 0,
                text_only_tokens: int = 0):
    """Random images of (W, H) sizes -> model inputs (left-padded batch) built with our fast processor."""
    from llava_next.preprocess.image_processor_fast import LlavaNextImageProcessorFast

    rng = np.random.default_rng(seed)
    geometry = ours.config.geometry
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
    rows = []
    for w, h in sizes:
        n = geometry.num_image_tokens(h, w)
        rows.append([1] + [ours.config.image_token_index] * n + rng.integers(100, 30000, prompt_tokens).tolist())
    if text_only_tokens:
        rows = [[1] + rng.integers(100, 30000, text_only_tokens).tolist()]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if images and not text_only_tokens:
        processed = LlavaNextImageProcessorFast().preprocess(images, return_tensors="pt", device=device)
        inputs["pixel_values"] = processed["pixel_values"].to(device, dtype)
        inputs["image_sizes"] = processed["image_sizes"].to(device)
    return inputs, images


def gate(theirs, ours, inputs, device, tokens: int = 16, sample: bool = False) -> dict:
    """Correctness before timing: first-token logits and greedy tokens (and, with `sample`, tokens sampled
    from one seed)."""
    with torch.inference_mode():
        a = theirs(**inputs).logits[:, -1].float()
        b = ours(**inputs, logits_to_keep=1).logits[:, -1].float()
    diff = (a - b).abs().max().item()
    ga = theirs.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    gb = ours.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    same = torch.equal(ga.cpu(), gb.cpu())
    record = {"stage": "gate", "first_token_logits_max_abs_diff": diff, "greedy_tokens_identical": same,
              "tokens": tokens}
    if sample:
        drawn = []
        for model in (theirs, ours):
            torch.manual_seed(0)
            drawn.append(model.generate(**inputs, max_new_tokens=tokens, do_sample=True).cpu())
        record["sampled_tokens_identical"] = torch.equal(*drawn)
    if not same:
        prompt = inputs["input_ids"].shape[1]
        n = min(ga.shape[1], gb.shape[1])
        differs = (ga[:, :n] != gb[:, :n]).nonzero()
        step = int(differs[0, 1]) - prompt if len(differs) else n - prompt
        record["first_differing_step"] = step
        top2 = torch.topk(a[0], 2).values
        record["top2_gap_first_token"] = float(top2[0] - top2[1])
    return record


def time_pair(fn_ours, fn_theirs, device, runs: int):
    """Median seconds of each, alternating, after one warm-up each."""
    fn_ours(), fn_theirs()
    sync(device)
    t_ours, t_theirs = [], []
    for _ in range(runs):
        for fn, acc in ((fn_ours, t_ours), (fn_theirs, t_theirs)):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            acc.append(time.perf_counter() - start)
    return statistics.median(t_ours), statistics.median(t_theirs)


def generation_workload(name, theirs, ours, inputs, device, new_tokens, runs, sample: bool = False):
    """TTFT (max_new_tokens=1) and decode rate ((N-1) / (t_N - t_1)) for both libraries; greedy, or with
    `sample` transformers' default sampling (top_k=50) from the same seed."""
    def gen(model, n):
        def run():
            if hasattr(model.model, "feature_cache"):
                model.model.feature_cache.clear()  # cold: every run encodes its images (W6 measures the cache)
            if sample:
                torch.manual_seed(0)
            return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=sample)
        return run

    ttft_o, ttft_t = time_pair(gen(ours, 1), gen(theirs, 1), device, runs)
    full_o, full_t = time_pair(gen(ours, new_tokens), gen(theirs, new_tokens), device, runs)
    batch = inputs["input_ids"].shape[0]
    rec = {"stage": name + ("_sampled" if sample else ""), "batch": batch,
           "prompt_tokens": inputs["input_ids"].shape[1], "new_tokens": new_tokens,
           "ttft_ms": {"ours": ttft_o * 1e3, "transformers": ttft_t * 1e3},
           "decode_tok_s": {"ours": batch * (new_tokens - 1) / max(full_o - ttft_o, 1e-9),
                            "transformers": batch * (new_tokens - 1) / max(full_t - ttft_t, 1e-9)},
           "throughput_tok_s": {"ours": batch * new_tokens / full_o, "transformers": batch * new_tokens / full_t}}
    rec["decode_speedup"] = rec["decode_tok_s"]["ours"] / rec["decode_tok_s"]["transformers"]
    rec["ttft_speedup"] = ttft_t / ttft_o
    rec["throughput_speedup"] = full_t / full_o
    return rec


def peak_memory(fn, device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def probe_machine(device, dtype) -> dict:
    """Copy bandwidth (read + write, GB/s) and GEMM throughput (TFLOP/s) of this device in the bench dtype."""
    gpu = torch.device(device).type == "cuda"
    n = (1 << 30 if gpu else 1 << 28) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1)
    dst = torch.empty_like(src)
    side = 8192 if gpu else 1024
    a = torch.randn(side, side, device=device, dtype=dtype)

    def copy():
        dst.copy_(src)

    def gemm():
        torch.mm(a, a)

    out = {"stage": "probe"}
    for label, fn, work in (("copy_gb_s", copy, 2 * n * 4 / 1e9), ("gemm_tflop_s", gemm, 2 * side**3 / 1e12)):
        fn()
        sync(device)
        reps = 10 if gpu else 3
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        out[label] = work * reps / (time.perf_counter() - start)
    return out


def roofline(ours, inputs) -> dict:
    """Bytes a decode step reads (weights, mean KV over the run excluded) and FLOPs of the prefill, estimated.

    Decode: every decoder weight but the embedding table, plus the lm_head (fused or not, the same bytes; the
    CPU's screened greedy head reads half of it, so there ours' rate is an effective one).
    Prefill: 2 FLOPs per weight per real token (decoder and, per 336 tile of 577 tokens, vision tower and
    projector; the lm_head at one position per row) plus attention (2 T^2 H Hd per decoder layer per row,
    causal; 4 t^2 Dv per vision layer per tile).
    """
    core = ours.model
    text = ours.config.text_config
    embed = core.language_model.embed_tokens.weight
    dec = [p for p in core.language_model.parameters() if p is not embed]
    weight_bytes = sum(p.numel() * p.element_size() for p in dec) + ours.lm_head.weight.numel() * \
        ours.lm_head.weight.element_size()
    layer_params = sum(p.numel() for p in dec)  # the lm_head runs on one position per row only
    mask = inputs["attention_mask"]
    rows = mask.sum(1).tolist()
    flop = sum(2 * layer_params * t + 2 * ours.lm_head.weight.numel()
               + 2 * t * t * text.num_attention_heads * text.head_dim * text.num_hidden_layers for t in rows)
    if "image_sizes" in inputs:
        geometry = ours.config.geometry
        tiles = sum(geometry.num_tiles(int(h), int(w)) for h, w in inputs["image_sizes"].tolist())
        tokens = (ours.config.vision_config.image_size // ours.config.vision_config.patch_size) ** 2 + 1
        vis_params = sum(p.numel() for p in core.vision_tower.parameters()) + \
            sum(p.numel() for p in core.multi_modal_projector.parameters())
        layers = len(core.vision_tower.encoder.layers)
        flop += tiles * (2 * vis_params * tokens + 4 * tokens * tokens * ours.config.vision_config.hidden_size * layers)
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * embed.element_size()
    return {"weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token, "prefill_flop": flop}


def add_shares(rec: dict, model: dict, probe: dict | None) -> dict:
    """Decode GB/s and prefill TFLOP/s for both libraries (and as shares of the probe's copy/GEMM rates)."""
    batch, prompt, n = rec["batch"], rec["prompt_tokens"], rec["new_tokens"]
    step_bytes = model["weight_bytes"] + model["kv_bytes_per_token"] * batch * (prompt + n / 2)
    rec["decode_step_gb"] = step_bytes / 1e9
    rec["prefill_tflop"] = model["prefill_flop"] / 1e12
    for who in ("ours", "transformers"):
        steps_per_s = rec["decode_tok_s"][who] / batch
        gb_s = step_bytes * steps_per_s / 1e9
        tflop_s = model["prefill_flop"] / (rec["ttft_ms"][who] / 1e3) / 1e12
        rec.setdefault("decode_gb_s", {})[who] = gb_s
        rec.setdefault("prefill_tflop_s", {})[who] = tflop_s
        if probe:
            # copy moves 2 bytes per byte read; a decode step only reads
            rec.setdefault("decode_share_of_copy_bw", {})[who] = gb_s / (probe["copy_gb_s"] / 2)
            rec.setdefault("prefill_share_of_gemm", {})[who] = tflop_s / probe["gemm_tflop_s"]
    return rec


def profile_workload(ours, inputs, device, workload: str, steps: int = 64, top: int = 12) -> list[dict]:
    """torch.profiler over our prefill and `steps` decode steps of `inputs` (the difference of a 1-token and a
    (steps + 1)-token run): device time (CPU time on a CPU) by kind (gemm / attention / other), top kernels.
    On a GPU the decode steps run the CUDA graph's kernels without the graph (engine mode "static"), so every
    kernel is traced; their device time is the graph step's minus its launch gaps."""
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    def kernel_times(n):  # {name: (ms, calls)} of one generate(max_new_tokens=n), cold image cache
        def run():
            ours.model.feature_cache.clear()
            ours.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        run()
        sync(device)
        with profile(activities=activities) as prof:
            run()
            sync(device)
        out = {}
        for e in prof.key_averages():
            ms = (e.self_device_time_total if gpu else e.self_cpu_time_total) / 1e3
            if ms > 0 and not (gpu and e.key.startswith("aten::")):  # on a GPU: kernels, not the ops above them
                out[e.key] = (ms, e.count)
        return out

    def kind(name):
        low = name.lower()
        if any(k in low for k in ("flash", "fmha", "attention", "sdpa", "softmax")):
            return "attention"
        if any(k in low for k in ("gemm", "gemv", "nvjet", "cutlass", "sm90", "aten::mm", "_int_mm", "addmm",
                                  "matmul")):
            return "gemm"
        return "other"

    prefill = kernel_times(1)
    if gpu:  # kernels inside a CUDA graph may not be traced: decode with the same kernels, launched one by one
        ours.decode_runner(mode="static")
    try:
        both = kernel_times(steps + 1)
    finally:
        if gpu:
            ours.decode_runner(mode=None)  # the next generate uses a graph runner again
    decode = {k: (ms - prefill.get(k, (0.0, 0))[0], count - prefill.get(k, (0.0, 0))[1])
              for k, (ms, count) in both.items()}  # the decode steps alone: the difference of the two runs
    records = []
    for label, times in (("prefill", prefill), ("decode", decode)):
        kinds: dict[str, float] = {}
        for name, (ms, _) in times.items():
            kinds[kind(name)] = kinds.get(kind(name), 0.0) + ms
        ranked = sorted(times.items(), key=lambda item: -item[1][0])[:top]
        records.append({"stage": f"profile_{workload}_{label}", "workload": workload,
                        "steps": steps if label == "decode" else 1,
                        "total_ms": sum(kinds.values()), "ms_by_kind": kinds,
                        "top": [[name[:80], round(ms, 3), count] for name, (ms, count) in ranked]})
    return records


def preprocessing_workload(device, runs):
    """W7: our exact and fast processors against transformers' image processor, per image."""
    from transformers import LlavaNextImageProcessor as HFProcessor

    from llava_next.preprocess.image_processor import LlavaNextImageProcessor
    from llava_next.preprocess.image_processor_fast import LlavaNextImageProcessorFast

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in ((1000, 750), (1024, 1024))]
    hf = HFProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    exact, fast = LlavaNextImageProcessor(), LlavaNextImageProcessorFast()
    out = {"stage": "W7", "ms_per_image": {}}
    for label, fn in (("ours_exact_cpu", lambda im: exact.preprocess(im, return_tensors="pt")),
                      ("ours_fast", lambda im: fast.preprocess(im, return_tensors="pt", device=device)),
                      ("transformers", lambda im: hf.preprocess(im, return_tensors="pt"))):
        fn(images[0])
        sync(device)
        start = time.perf_counter()
        for _ in range(runs):
            for im in images:
                fn(im)
        sync(device)
        out["ms_per_image"][label] = (time.perf_counter() - start) / (runs * len(images)) * 1e3
    batch = [images[i % 2] for i in range(8)]
    fast.preprocess(batch, return_tensors="pt", device=device)
    sync(device)
    start = time.perf_counter()
    for _ in range(runs):
        fast.preprocess(batch, return_tensors="pt", device=device)
    sync(device)
    out["ms_per_image"]["ours_fast_batch8"] = (time.perf_counter() - start) / (runs * 8) * 1e3
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench/benchmark.py", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--workloads", default="W1,W2,W3,W4,W5,W6,W7")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=None, help="timed runs per measurement (median)")
    parser.add_argument("--batch", default=None, help="W5 batch sizes, comma separated (CPU 4; GPU 8,32)")
    parser.add_argument("--time-cap", type=float, default=420.0, help="seconds; no new stage starts after it")
    parser.add_argument("--sample", action="store_true",
                        help="W1-W5 sample (top_k=50, one seed for both) instead of decoding greedily")
    parser.add_argument("--profile", action="store_true",
                        help="end with torch.profiler splits of ours on W1 and the largest W5 batch")
    args = parser.parse_args(argv)
    device = args.device
    gpu = torch.device(device).type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    runs = args.runs or (5 if gpu else 3)
    batches = [int(b) for b in (args.batch or ("8,32" if gpu else "4")).split(",")]
    started = time.perf_counter()
    import transformers

    emit({"stage": "env", "torch": torch.__version__, "transformers": transformers.__version__,
          "device": torch.cuda.get_device_name() if gpu else "cpu", "threads": torch.get_num_threads(),
          "shape": args.shape, "dtype": str(dtype).replace("torch.", ""), "date": time.strftime("%Y-%m-%d")})
    t0 = time.perf_counter()
    theirs, ours = build_models(args.shape, device, dtype)
    emit({"stage": "build", "seconds": time.perf_counter() - t0})
    results = []
    probe = probe_machine(device, dtype)
    emit(probe)
    gate_inputs, _ = make_inputs(ours, [(300, 200)], device=device, dtype=dtype)
    g = gate(theirs, ours, gate_inputs, device, sample=args.sample)
    emit(g)
    if not (g["greedy_tokens_identical"] and g.get("sampled_tokens_identical", True)) and not gpu:
        print("correctness gate failed: not timing", file=sys.stderr)
        return 1
    single = {"W1": dict(sizes=[(1000, 750)]), "W2": dict(sizes=[(1024, 1024)]), "W3": dict(sizes=[(300, 200)]),
              "W4": dict(sizes=[(1000, 750)], text_only_tokens=2350)}
    for name in args.workloads.split(","):
        if time.perf_counter() - started > args.time_cap:
            emit({"stage": name, "skipped": "time cap reached"})
            continue
        if name in single:
            inputs, _ = make_inputs(ours, device=device, dtype=dtype, **single[name])
            rec = add_shares(generation_workload(name, theirs, ours, inputs, device, args.new_tokens, runs,
                                                 args.sample), roofline(ours, inputs), probe)
            if gpu and name == "W1":
                rec["peak_gib"] = {"ours": peak_memory(lambda: ours.generate(**inputs, max_new_tokens=16), device),
                                   "transformers": peak_memory(lambda: theirs.generate(**inputs, max_new_tokens=16),
                                                               device)}
        elif name == "W5":
            for b in batches:
                sizes = [W5_SIZES[i % len(W5_SIZES)] for i in range(b)]
                inputs, _ = make_inputs(ours, sizes, device=device, dtype=dtype)
                rec = add_shares(generation_workload(f"W5_b{b}", theirs, ours, inputs, device, args.new_tokens,
                                                     max(1, runs // 2), args.sample), roofline(ours, inputs), probe)
                if gpu:
                    rec["peak_gib"] = {"ours": peak_memory(lambda: ours.generate(**inputs, max_new_tokens=4), device),
                                       "transformers": peak_memory(
                                           lambda: theirs.generate(**inputs, max_new_tokens=4), device)}
                emit(rec)
                results.append(rec)
            continue
        elif name == "W6":
            rec = conversation_workload(theirs, ours, device, dtype, runs)
        elif name == "W7":
            rec = preprocessing_workload(device, runs * 4)
        else:
            raise SystemExit(f"unknown workload {name}")
        emit(rec)
        results.append(rec)
    if args.profile:
        targets = [("W1", [W5_SIZES[0]])]
        if "W5" in args.workloads.split(","):
            b = max(batches)
            targets.append((f"W5_b{b}", [W5_SIZES[i % len(W5_SIZES)] for i in range(b)]))
        for label, sizes in targets:
            if time.perf_counter() - started > args.time_cap:
                emit({"stage": f"profile_{label}", "skipped": "time cap reached"})
                continue
            inputs, _ = make_inputs(ours, sizes, device=device, dtype=dtype)
            for rec in profile_workload(ours, inputs, device, label):
                emit(rec)
    print_table(results)
    return 0


def conversation_workload(theirs, ours, device, dtype, runs):
    """W6: one image, 8 questions in turn, 32 new tokens each. Ours reuses the image features; then ours again
    with `reuse_prefix=True`, where each question also reuses the previous one's KV cache for the shared prefix
    (image and template), checked to give the same tokens."""
    questions = 8
    inputs, _ = make_inputs(ours, [(1000, 750)], device=device, dtype=dtype)
    rng = np.random.default_rng(1)
    variants = []
    for q in range(questions):
        ids = inputs["input_ids"].clone()
        ids[0, -8:] = torch.as_tensor(rng.integers(100, 30000, 8), device=device)
        variants.append(dict(inputs, input_ids=ids))

    def conversation(model, **extra):
        def run():
            return [model.generate(**v, max_new_tokens=32, min_new_tokens=32, do_sample=False, **extra)
                    for v in variants]
        return run

    repeats = max(1, runs // 2)
    t_o, t_t = time_pair(conversation(ours), conversation(theirs), device, repeats)
    reused = conversation(ours, reuse_prefix=True)
    same = all(torch.equal(a, b) for a, b in zip(conversation(ours)(), reused()))
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        reused()
        sync(device)
        times.append(time.perf_counter() - start)
    t_r = statistics.median(times)
    return {"stage": "W6", "questions": questions,
            "seconds": {"ours": t_o, "ours_reuse_prefix": t_r, "transformers": t_t},
            "speedup": t_t / t_o, "speedup_reuse_prefix": t_t / t_r, "reuse_prefix_tokens_identical": same}


def print_table(results):
    print("\n| stage | batch | TTFT ms ours / hf | decode tok/s ours / hf | throughput tok/s ours / hf | speedups |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "ttft_ms" in r:
            print(f"| {r['stage']} | {r['batch']} | {r['ttft_ms']['ours']:.1f} / {r['ttft_ms']['transformers']:.1f} | "
                  f"{r['decode_tok_s']['ours']:.1f} / {r['decode_tok_s']['transformers']:.1f} | "
                  f"{r['throughput_tok_s']['ours']:.1f} / {r['throughput_tok_s']['transformers']:.1f} | "
                  f"decode {r['decode_speedup']:.2f}x, TTFT {r['ttft_speedup']:.2f}x, "
                  f"throughput {r['throughput_speedup']:.2f}x |")
        elif r["stage"] == "W6":
            print(f"| W6 | 1 | 8 questions: {r['seconds']['ours']:.2f}s / {r['seconds']['transformers']:.2f}s "
                  f"(ours with reuse_prefix {r['seconds']['ours_reuse_prefix']:.2f}s) | | | "
                  f"{r['speedup']:.2f}x, {r['speedup_reuse_prefix']:.2f}x with reuse_prefix |")
        elif r["stage"] == "W7":
            ms = r["ms_per_image"]
            print("| W7 | - | preprocessing ms/image: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()) + " | | | |")


if __name__ == "__main__":
    sys.exit(main())
