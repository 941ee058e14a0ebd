"""The engine sampler's cost per step: wall time and aten op count for 1, 16 and 64 sampled rows, for the
batched sampler (engine/sampler.py) and the per-row sampler it replaced (read from git, `--before REV`).

Rows: a 256-token prompt plus 128 output tokens each (the old sampler re-read that history every step), the
Mistral vocabulary (32064), fp32 logits on the CPU (or `--device cuda`). Workloads:
  - greedy:    temperature 0;
  - sampled:   temperature 0.8, top_p 0.9 (unseeded);
  - penalized: temperature 0.8, top_k 50, top_p 0.9, min_p 0.05, repetition 1.1, presence 0.5, frequency 0.3,
               half the rows seeded.
Each step appends the sampled tokens (as the engine does); wall time is the median of `--steps` steps after
two warm-up steps; ops are counted with a TorchDispatchMode over one step (every aten call, views included).
Prints one JSON line per (sampler, workload, rows); `--results` appends a table to bench/RESULTS.md.

Leaves out: the lm_head and the rest of the step (bench/ has the engine benchmarks for those).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llava_next.engine.request import PreparedRequest, Sequence
from llava_next.engine.sampler import Sampler
from llava_next.sampling.params import SamplingParams

V = 32064
WORKLOADS = {
    "greedy": lambda i: SamplingParams(temperature=0.0),
    "sampled": lambda i: SamplingParams(temperature=0.8, top_p=0.9),
    "penalized": lambda i: SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                                          presence_penalty=0.5, frequency_penalty=0.3,
                                          seed=i if i % 2 else None),
}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def old_sampler_class(rev: str):
    """The engine's Sampler as of git revision `rev` (the per-row one), loaded as a module."""
    source = subprocess.check_output(["git", "-C", str(ROOT), "show", f"{rev}:llava_next/engine/sampler.py"], text=True)
    module = types.ModuleType("old_sampler")
    exec(compile(source, f"{rev}:sampler.py", "exec"), module.__dict__)  # noqa: S102 (our own file, from git)
    return module.Sampler


def make_rows(workload: str, rows: int, gen: torch.Generator) -> list[Sequence]:
    seqs = []
    for i in range(rows):
        params = WORKLOADS[workload](i)
        prompt = torch.randint(3, V, (256,), generator=gen).tolist()
        seq = Sequence(f"b{i}", 0, PreparedRequest(None, prompt, [], params), params, (2,))
        seq.token_ids.extend(torch.randint(3, V, (128,), generator=gen).tolist())
        seq.generator = None  # the old sampler keeps its generator here
        seqs.append(seq)
    return seqs


def measure(sampler, workload: str, rows: int, steps: int, device: str) -> dict:
    gen = torch.Generator().manual_seed(rows)
    seqs = make_rows(workload, rows, gen)
    logits = [torch.randn(rows, V, generator=gen).to(device) * 3 for _ in range(steps + 3)]
    times = []
    for s in range(steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens, _ = sampler(seqs, logits[s])  # returns host ints: the step's sync is inside
        times.append(time.perf_counter() - t0)
        for seq, t in zip(seqs, tokens):
            seq.token_ids.append(t)
    counter = CountOps()
    with counter:
        tokens, _ = sampler(seqs, logits[-1])
    return {"ms": round(statistics.median(times[2:]) * 1e3, 3), "ops": counter.count}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default="ff5eb55", help="git revision holding the per-row sampler")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: a shared machine's "
                    "descheduled worker threads would dominate every parallel op)")
    ap.add_argument("--results", action="store_true", help="append a section to bench/RESULTS.md")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    samplers = {"before": old_sampler_class(args.before), "after": Sampler}
    table = {}
    for workload in WORKLOADS:
        for rows in (1, 16, 64):
            for name, cls in samplers.items():
                result = measure(cls(torch.device(args.device), 0), workload, rows, args.steps, args.device)
                table[(workload, rows, name)] = result
                print(json.dumps({"sampler": name, "workload": workload, "rows": rows, **result}), flush=True)
    if args.results:
        lines = [(f"\n## Engine sampler per step (batched vs per-row) — "
                  f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M+00:00}\n"),
                 (f"Machine: {platform.machine()}, 2-core CPU shared with other jobs (load average at start {load}); "
                 f"torch {torch.__version__}, Python {platform.python_version()}, device {args.device}, "
                 f"{args.threads} torch thread(s). `python bench/bench_sampler.py --before {args.before} "
                 f"--steps {args.steps} --threads {args.threads}`: vocab {V}, "
                 "256 prompt + 128 output tokens per row, median wall ms of a step, aten ops of one step "
                 "(TorchDispatchMode, views included). before = the per-row sampler of `--before`.\n"),
                 "| workload | rows | before ms | after ms | before ops | after ops |", "|---|---|---|---|---|---|"]
        for workload in WORKLOADS:
            for rows in (1, 16, 64):
                b, a = table[(workload, rows, "before")], table[(workload, rows, "after")]
                lines.append(f"| {workload} | {rows} | {b['ms']} | {a['ms']} | {b['ops']} | {a['ops']} |")
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
