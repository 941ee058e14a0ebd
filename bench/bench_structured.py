"""Cost of constrained decoding (issue 23): per decode step at 1 / 16 / 64 sequences, every sequence constrained
by a JSON schema vs the same sequences unconstrained, and the compile time of the 50 generated test schemas.

Engine: `llava_next.LLM` on the tiny random checkpoint of the tests (fp32, CPU unless --device cuda), text
prompts, greedy. The constrained schema is an array of at least 100 objects `{"name": <= 8 chars, "n": 0..99}`, so
no sequence finishes within the measured steps and the masks mix structure (few tokens allowed) and strings
(nearly all allowed); both sides use ignore_eos. Per setting: a warm-up generate, then `--runs`
alternating runs of each side; in each run n requests are added, prefilled, then --steps pure-decode
`engine.step()` calls are timed one by one. Reported: the fastest step (the least disturbed on a shared
machine) and the median step, each the best over runs, and the median CPU time of a step (`time.process_time`:
every thread of the process, the mask worker and llguidance's included; with `--threads 1` it is the step's
whole work, robust to other jobs on the machine). Components: the masks of 1/16/64 rows from fresh matchers
(llguidance keeps a matcher's last mask, so a repeated fill of one state measures nothing), their apply to the
logits, the matchers' advance. Compile: each of the 50 schemas compiled once on a fresh StructuredDecoding (no
cache), after the llguidance tokenizer is built (its build time is reported alone).

Usage: PYTHONPATH=. python bench/bench_structured.py [--runs 3] [--steps 32] [--threads N] [--device cpu|cuda]
Leaves out: sampled decoding, prefill cost (the mask applies to sampled positions only).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SCHEMA = {"type": "array", "minItems": 100, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                     "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "n"], "additionalProperties": False}}


def checkpoint(root: Path) -> Path:
    import processor_fixtures
    import tiny

    folder = root / "tiny-mistral"
    tiny.save_tiny(folder, "mistral", 0)
    for path in processor_fixtures.shared_processor_folder("mistral", "hub").iterdir():
        if path.name != "config.json":
            shutil.copy(path, folder / path.name)
    return folder


def decode_step_s(llm, n: int, steps: int, constrained: bool) -> tuple[float, float, float]:
    """(min wall, median wall, median CPU) seconds of one pure-decode `engine.step()` with n running sequences,
    over `steps` steps timed one by one (the minimum: the least disturbed step on a shared machine)."""
    from llava_next import SamplingParams, StructuredOutputsParams

    engine = llm.llm_engine
    so = StructuredOutputsParams(json=SCHEMA) if constrained else None
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True, structured_outputs=so)
    ids = [f"bench-{constrained}-{n}-{i}-{time.monotonic_ns()}" for i in range(n)]
    for i, request_id in enumerate(ids):
        engine.add_request(request_id, engine.prepare(f"Item list {i}:", params))
    while any(s.num_output_tokens == 0 for g in engine.groups.values() for s in g.seqs):
        engine.step()  # prefill (and first tokens)
    times, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        engine.step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    for request_id in ids:
        engine.abort(request_id)
    engine.step()
    return min(times), statistics.median(times), statistics.median(cpu)


def components(llm, repeats: int = 30) -> dict:
    """The constrained step's own work at 1/16/64 rows, each the fastest of `repeats`, in states the engine
    reached on SCHEMA: the masks (`_masks`: llguidance's fill and, on a CPU, the addend) of fresh matcher
    copies, their apply to the logits (`constrain` given them done), and the matchers' advance."""
    import torch

    from llava_next import SamplingParams, StructuredOutputsParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    outs = llm.generate([f"Item list {i}:" for i in range(64)], params, use_tqdm=False)
    grammar = engine.structured.compile(params.structured_outputs)
    out = {}
    for n in (1, 16, 64):
        states, last = [], []
        for k, o in enumerate(outs[:n]):  # each sequence stopped at a different point of its output
            tokens = o.outputs[0].token_ids
            cut = 1 + (7 * k) % (len(tokens) - 1)
            m = grammar.matcher()
            assert m.consume_tokens(tokens[:cut])
            states.append(m)
            last.append(tokens[cut])
        logits = torch.randn(n, engine.vocab_size)
        best = {"masks": float("inf"), "apply": float("inf"), "advance": float("inf")}
        for _ in range(repeats):
            matchers = [m.deep_copy() for m in states]
            start = time.perf_counter()
            masks = engine.structured._masks(matchers)  # on a CPU in constrain, else on begin's worker
            best["masks"] = min(best["masks"], time.perf_counter() - start)
            done = concurrent.futures.Future()
            done.set_result(masks)
            start = time.perf_counter()
            engine.structured.constrain(logits, done, [None] * n)
            best["apply"] = min(best["apply"], time.perf_counter() - start)
            start = time.perf_counter()
            for m, t in zip(matchers, last):
                engine.structured.advance(m, t)
            best["advance"] = min(best["advance"], time.perf_counter() - start)
        out[f"n{n}"] = {f"{k}_ms": round(v * 1e3, 3) for k, v in best.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    import llguidance
    import structured_cases
    import torch

    from llava_next import LLM, StructuredOutputsParams
    from llava_next.sampling.structured import StructuredDecoding

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp())
    folder = checkpoint(root)
    llm = LLM(str(folder), dtype="float32", device=args.device, max_num_seqs=64)
    results = {"device": args.device, "torch": torch.__version__, "llguidance": llguidance.__version__,
               "threads": torch.get_num_threads(), "steps": args.steps, "runs": args.runs,
               "load_avg_before": [round(x, 2) for x in os.getloadavg()]}
    for n in (1, 16, 64):
        decode_step_s(llm, n, 4, True)  # warm-up (tokenizer, cache, allocations)
        decode_step_s(llm, n, 4, False)
        plain, constrained = [], []
        for _ in range(args.runs):
            plain.append(decode_step_s(llm, n, args.steps, False))
            constrained.append(decode_step_s(llm, n, args.steps, True))
        row = {}
        for i, kind in enumerate(("min", "median", "cpu")):
            p, c = min(r[i] for r in plain), min(r[i] for r in constrained)
            row.update({f"plain_{kind}_ms": round(p * 1e3, 3), f"constrained_{kind}_ms": round(c * 1e3, 3),
                        f"overhead_{kind}_pct": round(100 * (c / p - 1), 1)})
        results[f"n{n}"] = row
        print(json.dumps({"sequences": n, **row}), flush=True)
    results["load_avg_after_steps"] = [round(x, 2) for x in os.getloadavg()]
    results["components"] = components(llm)
    print(json.dumps({"components": results["components"]}), flush=True)
    engine = llm.llm_engine
    fresh = StructuredDecoding(engine._tokenizer_json, engine.vocab_size, engine.eos_token_ids, engine.device)
    start = time.perf_counter()
    fresh._ll_tokenizer()
    results["tokenizer_build_s"] = round(time.perf_counter() - start, 3)
    times = []
    for schema in structured_cases.schemas(50, seed=0):
        start = time.perf_counter()
        fresh.compile(StructuredOutputsParams(json=schema))
        times.append(time.perf_counter() - start)
    results["compile_50"] = {"total_ms": round(sum(times) * 1e3, 1), "median_ms": round(statistics.median(times) * 1e3, 2),
                             "max_ms": round(max(times) * 1e3, 2)}
    print(json.dumps(results), flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
