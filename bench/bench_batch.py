"""Rows/s of `llava-next batch` with 1 and 2 Ray workers: a folder of mixed-size images, the demo checkpoint.

    python bench/bench_batch.py [--images 32] [--workers 1,2] [--max-tokens 16] [--batch-size 4] [--device cpu]
                                [--model DIR] [--dtype auto]

Each worker count is one fresh `llava-next batch` run in its own process (it starts its own local Ray cluster,
127.0.0.1 only), into an empty output, so start-up (Ray, actors, engine loading) is in the wall time. Prints,
per run, the wall time, rows/s over the whole run and rows/s after the first batch arrived (the steady rate),
as JSON lines, then a markdown table for bench/RESULTS.md.

Implements: the measurement only. Leaves out: a real checkpoint's quality (the demo weights are random; their
shape is tiny but the image geometry and token counts are the real ones), multi-node clusters, and GPU runs
unless --device cuda is passed on a machine with GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(300, 451), (512, 512), (400, 600), (427, 640), (80, 120), (512, 200), (80, 600), (336, 672),
         (17, 900), (640, 480), (1000, 750), (224, 224)]


def make_images(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = [data.chelsea(), data.astronaut(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        if i % 3 == 2:
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        else:
            image = Image.fromarray(photos[i % len(photos)]).resize((w, h))
        image.save(folder / f"img{i:04d}.{'png' if i % 2 else 'jpg'}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: a fresh demo checkpoint)")
    args = ap.parse_args()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "RAY_worker_niceness": "0",  # Ray's default nice 15 measures the machine's other load, not us
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            sys.path.insert(0, str(ROOT))
            from llava_next.entrypoints.demo import build_demo_checkpoint

            model = str(build_demo_checkpoint(tmp / "demo"))
        images = tmp / "images"
        images.mkdir()
        make_images(images, args.images)
        for workers in [int(w) for w in args.workers.split(",")]:
            out = tmp / f"out-{workers}.jsonl"
            command = [sys.executable, "-m", "llava_next.entrypoints.cli", "batch", model, "--input", str(images),
                       "--prompt", "Describe this image in one sentence.", "--output", str(out),
                       "--max-tokens", str(args.max_tokens), "--num-workers", str(workers),
                       "--batch-size", str(args.batch_size), "--device", args.device, "--dtype", args.dtype]
            start = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
                                  check=False)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            summary = [line for line in done.stderr.splitlines() if "rows; captioned" in line][-1]
            rate = float(re.search(r"errors, ([0-9.]+) rows/s", summary).group(1))
            steady = re.search(r"([0-9.]+) after the first batch", summary)
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            result = {"workers": workers, "rows": len(rows), "errors": sum(r["error"] is not None for r in rows),
                      "actors": len({r["worker"] for r in rows}), "wall_s": round(wall, 1),
                      "rows_per_s_job": rate, "rows_per_s_steady": float(steady.group(1)) if steady else None,
                      "rows_per_s_wall": round(len(rows) / wall, 3)}
            print(json.dumps(result), flush=True)
            results.append(result)
    print("\n| workers | rows | actors used | wall s (Ray + actors + engine start included) | rows/s, wall "
          "| rows/s, job | rows/s after the first batch |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workers']} | {r['rows']} | {r['actors']} | {r['wall_s']} | {r['rows_per_s_wall']} "
              f"| {r['rows_per_s_job']} | {r['rows_per_s_steady']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
