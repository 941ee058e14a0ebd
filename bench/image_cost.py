"""Memory and time of the server's image preparation for one request of N solid W x H PNGs (issue 22, item 4).

    python bench/image_cost.py [--tree PATH] [--n 8] [--size 6000]

Runs, in a fresh subprocess per measurement, what the server's image pool does for one chat request: the
`MediaPolicy` (server defaults) loads every `data:` URL, then the default `LlavaNextImageProcessor` makes the
anyres tiles. Prints the outcome (ok, or the 400 message), the wall time and the peak RSS above the RSS before
the first image (ru_maxrss). `--tree` measures another checkout (e.g. the code before this change).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import base64, io, json, resource, sys, time
from PIL import Image
n, size = int(sys.argv[1]), int(sys.argv[2])
buf = io.BytesIO()
Image.new("RGB", (size, size), (200, 30, 40)).save(buf, "PNG")
url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
from llava_next.entrypoints.openai.media import MediaPolicy
from llava_next.preprocess.image_processor import LlavaNextImageProcessor
policy, processor = MediaPolicy(), LlavaNextImageProcessor()
def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
before = rss_kb()
start = time.perf_counter()
try:
    images = policy.load_all([url] * n) if hasattr(policy, "load_all") else [policy.load(url) for _ in range(n)]
    tiles = processor(images, return_tensors="np")["pixel_values"]
    outcome = f"ok, pixel_values {tuple(tiles.shape)}"
except ValueError as exc:
    outcome = f"refused: {exc}"
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import llava_next
print(json.dumps({"module": llava_next.__file__, "request_bytes": len(url) * n, "outcome": outcome[:160], "wall_s": round(wall, 2),
                  "peak_extra_mb": round((peak - before) / 1024, 1)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--size", type=int, default=6000)
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=args.tree)
    done = subprocess.run([sys.executable, "-c", CHILD, str(args.n), str(args.size)], env=env, cwd=args.tree,
                          capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({"tree": args.tree, "n": args.n, "size": args.size, **result}))


if __name__ == "__main__":
    main()
