"""O1 (BENCHMARKS.md): the host overhead of one pure-decode engine step, next to generate()'s decode step.

Model: a 32-layer Mistral-shaped decoder of hidden 64 (4 heads, 2 KV heads, vocab 32064; a tiny CLIP tower
that never runs), random weights, CPU fp32: compute is nothing, what remains is host work (op dispatch).
For 1, 16 and 64 running sequences (8-token text prompts, ignore_eos, prefilled and warmed up first) it
counts the aten ops one engine step dispatches (torch.profiler, every `aten::` event, nested ones included)
and times the step (median of `--steps`: wall time and this thread's CPU time), greedy and temperature 0.8 / top-p 0.9; then the same for
generate()'s eager decode step (its runner's one-token step + argmax) at the same batch sizes on the same model.
Prints one JSON line per measurement; `--results` appends a Markdown section to bench/RESULTS.md.

Only public engine API is used (LLMEngine, SamplingParams), so the script also measures older checkouts
(`PYTHONPATH=<checkout> python bench/overhead.py`). Leaves out: GPU timings (bench/gpu_engine.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def build_model(layers: int = 32, hidden: int = 64, seed: int = 0):
    from llava_next.compat.modeling import LlavaNextForConditionalGeneration
    from llava_next.config import LlavaNextConfig
    from llava_next.loading.weights import finish_build

    text = {"model_type": "mistral", "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32064,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None}
    vision = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 336, "patch_size": 14,
              "projection_dim": 32}
    config = LlavaNextConfig.from_dict({"text_config": text, "vision_config": vision, "image_token_index": 32000})
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() >= 2 else p.normal_(1.0, 0.1)
    finish_build(model)
    return model.eval()


def count_ops(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def median_time(fn, steps: int) -> tuple[float, float]:
    """Median wall time and median CPU time of this thread (torch runs on 1 thread here, so the CPU time is the
    step's own work, much less sensitive than the wall time to other jobs on a shared machine)."""
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def engine_step(model, batch: int, sampled: bool, steps: int) -> dict:
    from llava_next import SamplingParams
    from llava_next.engine.llm_engine import LLMEngine

    engine = LLMEngine(model, None, max_num_seqs=max(batch, 1), max_num_batched_tokens=4096, max_model_len=1024)
    kind = {"temperature": 0.8, "top_p": 0.9} if sampled else {"temperature": 0.0}
    params = SamplingParams(max_tokens=600, ignore_eos=True, **kind)
    for i in range(batch):
        engine.add_request(f"r{i}", {"prompt_token_ids": [1] + [100 + (7 * i + j) % 30000 for j in range(8)]},
                           params)
    for _ in range(3):  # prefill (one step), then two decode steps of warm-up
        engine.step()
    assert len(engine.scheduler.running) == batch and not engine.scheduler.waiting, "not a pure-decode step"
    ops = count_ops(engine.step)
    wall, cpu = median_time(engine.step, steps)
    return {"side": "engine", "batch": batch, "sampling": "temp0.8/top-p0.9" if sampled else "greedy",
            "aten_ops": ops, "step_ms": round(wall * 1e3, 3), "cpu_ms": round(cpu * 1e3, 3)}


def generate_step(model, batch: int, steps: int) -> dict:
    runner = model.decode_runner()
    tokens = torch.full((batch,), 100)
    if hasattr(runner, "cache_for"):  # before issue 19: generate()'s own static cache and DecodeRunner.step
        cache = runner.cache_for(batch, 8 + 2 * steps + 8, torch.float32)
        cache.reserve(8)  # a prefilled 8-token prompt (the values do not matter for the op count)
        position = [8]

        def step():
            logits = runner.step(tokens, torch.full((batch,), position[0]), cache)
            position[0] += 1
            return logits.argmax(-1)
    else:  # generate() on the engine's ModelRunner (compat/paged_rows.py)
        from llava_next.compat.paged_rows import prefill

        rows, _ = prefill(runner, model.model.embed(torch.full((batch, 8), 100)), None, 2 * steps + 8, False, True)

        def step():
            return rows.decode(tokens).argmax(-1)

    step()
    ops = count_ops(step)
    wall, cpu = median_time(step, steps)
    return {"side": "generate()", "batch": batch, "sampling": "greedy", "aten_ops": ops,
            "step_ms": round(wall * 1e3, 3), "cpu_ms": round(cpu * 1e3, 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement (median)")
    parser.add_argument("--label", default="", help="a name for this run in the results (e.g. before/after)")
    parser.add_argument("--results", action="store_true", help="append a section to bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model()
    rows = []
    with torch.inference_mode():
        for batch in args.batches:
            for sampled in (False, True):
                rows.append(engine_step(model, batch, sampled, args.steps))
                print(json.dumps(rows[-1]), flush=True)
            rows.append(generate_step(model, batch, args.steps))
            print(json.dumps(rows[-1]), flush=True)
    if args.results:
        write_results(rows, args)


def write_results(rows, args):
    by = {(r["side"], r["sampling"], r["batch"]): r for r in rows}
    title = (f"\n### O1 engine step overhead {args.label} ({datetime.date.today()}, {platform.machine()} CPU, "
             f"1 thread, torch {torch.__version__}; 2-core machine shared with other jobs: wall times are noisy)\n")
    lines = [title,
             "| step | " + " | ".join(f"{b} seq: ops / CPU ms / wall ms" for b in args.batches) + " |",
             "|---|" + "---|" * len(args.batches)]
    for side, sampling in (("engine", "greedy"), ("engine", "temp0.8/top-p0.9"), ("generate()", "greedy")):
        cells = [f"{by[(side, sampling, b)]['aten_ops']:,} / {by[(side, sampling, b)]['cpu_ms']:.1f} / "
                 f"{by[(side, sampling, b)]['step_ms']:.1f}" for b in args.batches]
        lines.append(f"| {side} {sampling} | " + " | ".join(cells) + " |")
    top, low = max(args.batches), min(args.batches)
    for sampling in ("greedy", "temp0.8/top-p0.9"):
        e = by[("engine", sampling, top)]["aten_ops"]
        ratio_batch = e / by[("engine", sampling, low)]["aten_ops"]
        ratio_generate = e / by[("generate()", "greedy", top)]["aten_ops"]
        lines.append(f"\n{sampling}: ops at {top} / ops at {low} = {ratio_batch:.2f}x; "
                     f"vs generate() at {top}: {ratio_generate:.2f}x")
    path = Path(__file__).resolve().parent / "RESULTS.md"
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
