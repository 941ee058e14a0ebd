"""Where does a 7b decode step go? Times generate()'s CUDA-graph step and profiles two eager steps.

    python bench/gpu_decode_profile.py            # on a GPU, 7b shape, W1-length prompt (text only)

Prints JSON lines: ms per graph replay, ms per generate() step, bytes of weights read per step and the
implied bandwidth, and the top CUDA kernels of one eager step (torch.profiler).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import build_models, make_inputs  # noqa: E402
from llava_next.compat.paged_rows import prefill  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)  # CPU: tiny smoke test
    theirs, ours = build_models("7b" if gpu else "tiny", device, dtype)
    del theirs
    weight_bytes = sum(p.numel() * p.element_size() for n, p in ours.named_parameters() if "vision" not in n
                       and "projector" not in n and "embed_tokens" not in n)
    inputs, _ = make_inputs(ours, [(1000, 750)], device=device, dtype=dtype, text_only_tokens=2350)
    with torch.inference_mode():
        engine = ours.decode_runner()
        embeds = ours.model.embed(inputs["input_ids"])
        rows, logits = prefill(engine, embeds, inputs["attention_mask"], 256, False, True)
        tokens = logits.argmax(-1)
        for _ in range(3):  # capture + warm
            rows.decode(tokens)
        sync()
        n = 50
        start = time.perf_counter()
        for _ in range(n):
            rows.decode(tokens)
        sync()
        graph_ms = (time.perf_counter() - start) / n * 1e3
        print(json.dumps({"stage": "graph_step", "ms": graph_ms, "weights_gb": weight_bytes / 1e9,
                          "implied_tb_s": weight_bytes / (graph_ms / 1e3) / 1e12,
                          "cache_len": int(rows.lengths.max()), "mode": engine.mode}), flush=True)
        rows.release()
        # generate() end to end, per new token
        for n_new in (2, 66):
            sync()
            t = time.perf_counter()
            ours.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new)
            sync()
            print(json.dumps({"stage": "generate", "new": n_new, "s": time.perf_counter() - t}), flush=True)
        # two eager steps of the same runner under the profiler
        ours.decode_runner(mode="eager")
        rows, logits = prefill(ours.decode_runner(), embeds, inputs["attention_mask"], 8, False, True)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                rows.decode(tokens)
            sync()
        table = prof.key_averages().table(sort_by="cuda_time_total" if gpu else "cpu_time_total", row_limit=14, max_name_column_width=70)
        print(table, flush=True)


if __name__ == "__main__":
    main()
