"""C1 (BENCHMARKS.md): the continuous-batching engine against transformers' left-padded batch and against our
generate() run one request at a time, in one process, on the same seeded random weights (CPU, `tiny` shape).

Workloads: 16 requests, W5's 8 image sizes cycled, 8 random text tokens after each image;
  - "forced":  every request 128 new tokens (greedy, min = max = 128);
  - "mixed":   per-request lengths 8..128 (evenly spread); transformers' padded batch must run to the longest
               row, so its useful tokens are the same sum of per-request lengths.
Protocol: a correctness gate first (our generate() == transformers on two requests; engine == our generate()
on all 16, 16 tokens); then `--runs` timed runs per side, alternating, images fresh for every timed call (a new
pixel seed each run, so no encoder or prefix cache carries over); medians. Split of each side's time into
prefill and decode: the engine's own step timers (steps with any prefill chunk vs pure-decode steps),
transformers and generate() by timing max_new_tokens=1 (prefill + first token) separately.
Results: one JSON line per stage, and `--results` appends a section to bench/RESULTS.md.

Needs transformers (dev extra). Leaves out: GPU timings (bench/gpu_engine.py), sampling workloads.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import W5_SIZES, build_models, emit, make_inputs  # noqa: E402


def requests(ours, n: int, seed: int, prompt_tokens: int = 8):
    """n (input_ids row, pixel tiles, image size) triples with fresh pixels for `seed`."""
    sizes = [W5_SIZES[i % len(W5_SIZES)] for i in range(n)]
    out = []
    for i, size in enumerate(sizes):
        inputs, _ = make_inputs(ours, [size], prompt_tokens=prompt_tokens, seed=seed * 1000 + i)
        h, w = size[1], size[0]
        tiles = inputs["pixel_values"][0][: ours.config.geometry.num_tiles(h, w)]
        out.append((inputs["input_ids"][0].tolist(), tiles, tuple(int(v) for v in inputs["image_sizes"][0])))
    return out


def padded_batch(reqs):
    width = max(len(ids) for ids, _, _ in reqs)
    most = max(t.shape[0] for _, t, _ in reqs)
    ids = torch.tensor([[0] * (width - len(r)) + r for r, _, _ in reqs])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r, _, _ in reqs])
    pixels = torch.stack([torch.cat([t, t.new_zeros(most - t.shape[0], *t.shape[1:])]) for _, t, _ in reqs])
    sizes = torch.tensor([s for _, _, s in reqs])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes}


def engine_prompts(reqs):
    return [{"prompt_token_ids": ids, "multi_modal_data": {"image": [{"pixel_values": t, "image_size": s}]}}
            for ids, t, s in reqs]


def run_engine(llm, reqs, lengths):
    from llava_next import SamplingParams

    engine = llm.llm_engine
    before = dict(engine.step_times)
    params = [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n) for n in lengths]
    start = time.perf_counter()
    outs = llm.generate(engine_prompts(reqs), params, use_tqdm=False)
    total = time.perf_counter() - start
    split = {k: engine.step_times[k] - before[k] for k in ("prefill_s", "decode_s")}
    return total, split, [o.outputs[0].token_ids for o in outs]


def run_generate_one_by_one(model, reqs, lengths, new_override=None):
    start = time.perf_counter()
    tokens = []
    for (ids, tiles, size), n in zip(reqs, lengths):
        n = new_override or n
        model.model.feature_cache.clear()
        out = model.generate(torch.tensor([ids]), pixel_values=tiles[None], image_sizes=torch.tensor([size]),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False)
        tokens.append(out[0, len(ids):].tolist())
    return time.perf_counter() - start, tokens


def run_padded(model, reqs, lengths, new_override=None):
    inputs = padded_batch(reqs)
    n = new_override or max(lengths)
    if hasattr(model.model, "feature_cache"):
        model.model.feature_cache.clear()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--workloads", default="forced,mixed")
    parser.add_argument("--results", default=None, help="append a section to this RESULTS.md")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)

    import transformers

    import llava_next

    theirs, ours = build_models(args.shape, "cpu", torch.float32)
    llm = llava_next.LLM(ours, max_num_seqs=max(16, args.requests), max_num_batched_tokens=4096)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    env = {"stage": "env", "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "cpus": __import__("os").cpu_count(), "loadavg_at_start": " ".join(load),
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
           "requests": args.requests, "new_tokens": args.new_tokens, "shape": args.shape}
    emit(env)

    # correctness gate
    reqs = requests(ours, args.requests, seed=0)
    gate_n = 16
    a = theirs.generate(**padded_batch(reqs[:2]), max_new_tokens=gate_n, min_new_tokens=gate_n, do_sample=False)
    b = ours.generate(**padded_batch(reqs[:2]), max_new_tokens=gate_n, min_new_tokens=gate_n, do_sample=False)
    _, alone = run_generate_one_by_one(ours, reqs, [gate_n] * len(reqs))
    _, _, engine_tokens = run_engine(llm, reqs, [gate_n] * len(reqs))
    gate = {"stage": "gate", "transformers_equals_ours_batch": bool(torch.equal(a, b)),
            "engine_equals_generate_alone": engine_tokens == alone, "tokens": gate_n}
    emit(gate)
    if not (gate["transformers_equals_ours_batch"] and gate["engine_equals_generate_alone"]):
        print("correctness gate failed: no timing", file=sys.stderr)
        return 1

    results = []
    for workload in args.workloads.split(","):
        N = args.new_tokens
        if workload == "forced":
            lengths = [N] * args.requests
        else:
            lengths = [8 + round(i * (N - 8) / max(1, args.requests - 1)) for i in range(args.requests)]
        useful = sum(lengths)
        times = {"engine": [], "generate": [], "transformers": []}
        splits = {"engine": [], "generate_prefill": [], "transformers_prefill": []}
        warm = requests(ours, 2, seed=99)  # warm-up on two requests (the gate already ran every path once)
        run_engine(llm, warm, [4, 4])
        run_generate_one_by_one(ours, warm, [4, 4])
        for run in range(1, args.runs + 1):
            reqs = requests(ours, args.requests, seed=100 + run * 7 + (workload == "mixed"))
            t_engine, split, _ = run_engine(llm, reqs, lengths)
            t_gen, _ = run_generate_one_by_one(ours, reqs, lengths)
            t_gen1, _ = run_generate_one_by_one(ours, reqs, lengths, new_override=1)
            t_hf = t_hf1 = float("nan")
            if not args.skip_transformers:
                t_hf = run_padded(theirs, reqs, lengths)
                t_hf1 = run_padded(theirs, reqs, lengths, new_override=1)
            times["engine"].append(t_engine)
            times["generate"].append(t_gen)
            times["transformers"].append(t_hf)
            splits["engine"].append(split)
            splits["generate_prefill"].append(t_gen1)
            splits["transformers_prefill"].append(t_hf1)
            emit({"stage": f"run_{workload}", "run": run, "engine_s": t_engine, "generate_one_by_one_s": t_gen,
                  "transformers_padded_s": t_hf, "engine_prefill_s": split["prefill_s"],
                  "engine_decode_s": split["decode_s"], "generate_prefill_s": t_gen1, "transformers_prefill_s": t_hf1})
        med = {k: statistics.median(v) for k, v in times.items()}
        rec = {"stage": workload, "useful_tokens": useful,
               "engine_tok_s": useful / med["engine"], "generate_tok_s": useful / med["generate"],
               "transformers_tok_s": useful / med["transformers"],
               "engine_vs_transformers": med["transformers"] / med["engine"],
               "engine_vs_generate": med["generate"] / med["engine"],
               "engine_prefill_s": statistics.median(s["prefill_s"] for s in splits["engine"]),
               "engine_decode_s": statistics.median(s["decode_s"] for s in splits["engine"]),
               "generate_prefill_s": statistics.median(splits["generate_prefill"]),
               "transformers_prefill_s": statistics.median(splits["transformers_prefill"]),
               **{f"{k}_s": v for k, v in med.items()}}
        emit(rec)
        results.append(rec)
    if args.results:
        write_results(Path(args.results), env, gate, results, args)
    return 0


def write_results(path: Path, env, gate, results, args):
    lines = [f"\n## Engine C1 (CPU, {env['shape']} shape) — {env['date']}\n",
             f"Machine: {env['machine']}, {env['cpus']} CPUs, {env['threads']} torch threads, load average at start "
             f"{env['loadavg_at_start']} (other jobs shared the CPUs); torch {env['torch']}, transformers "
             f"{env['transformers']}, Python {env['python']}. `python bench/bench_engine.py --runs {args.runs}`: "
             f"{env['requests']} requests (W5 sizes cycled), medians of {args.runs} runs, fresh images per run. "
             f"Gate: ours == transformers {gate['transformers_equals_ours_batch']}, engine == generate() alone "
             f"{gate['engine_equals_generate_alone']}.\n",
             "| workload | useful tokens | engine s (prefill / decode) | generate() one by one s (prefill) | "
             "transformers padded s (prefill) | engine tok/s | vs transformers | vs generate() |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['stage']} | {r['useful_tokens']} | {r['engine_s']:.2f} ({r['engine_prefill_s']:.2f} / "
                     f"{r['engine_decode_s']:.2f}) | {r['generate_s']:.2f} ({r['generate_prefill_s']:.2f}) | "
                     f"{r['transformers_s']:.2f} ({r['transformers_prefill_s']:.2f}) | {r['engine_tok_s']:.0f} | "
                     f"{r['engine_vs_transformers']:.2f}x | {r['engine_vs_generate']:.2f}x |")
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
