"""generate() TTFT and batch-1 decode cost on the tiny CPU shape, in this thread's CPU time (A/B on a busy machine).

    PYTHONPATH=<checkout> python bench/decode_cpu_time.py LABEL

Wall-clock timings on a shared 2-core machine move by 2x from run to run; this thread's CPU time (one torch
thread) moves far less, so two checkouts can be compared by running this script alternately with each on
PYTHONPATH. Workloads (greedy, our model only, the screened head on): "W3_image" (benchmark.py's W3 prompt,
one 300x200 image) and "text64" (64 text tokens). TTFT: min over 7 runs of max_new_tokens=1; decode: min over
5 runs of 65 tokens, minus TTFT, per token. The image cache is cleared before every run. Prints one JSON line.
Leaves out: transformers (bench/benchmark.py compares with it), GPU timings.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import build_models, make_inputs  # noqa: E402


def main(label: str) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    _, ours = build_models("tiny", "cpu", torch.float32)
    out = {"label": label}
    for name, kw in (("W3_image", dict(sizes=[(300, 200)])), ("text64", dict(sizes=[], text_only_tokens=64))):
        inputs, _ = make_inputs(ours, **kw)

        def run(n: int) -> float:
            ours.model.feature_cache.clear()
            start = time.thread_time()
            ours.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return time.thread_time() - start

        run(2), run(2)  # warm-up
        ttft = min(run(1) for _ in range(7))
        full = min(run(65) for _ in range(5))
        out[name] = {"ttft_ms": round(ttft * 1e3, 2), "ms_per_token": round((full - ttft) / 64 * 1e3, 3)}
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "")))
