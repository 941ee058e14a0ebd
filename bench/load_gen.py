"""A load generator for `llava-next serve` (like `vllm bench serve`), with the real `openai` client.

    python bench/load_gen.py --base-url http://127.0.0.1:8000/v1 --model NAME --num-requests 200 \
        --request-rate 4 --max-concurrency 64 --image-sizes 336x336,1000x750,300x200 --image-ratio 0.7

N requests are drawn from a seeded mix: a prompt of a random length (words, from --prompt-words LO-HI), with
probability --image-ratio one image (a random-pixel PNG of a size drawn from --image-sizes, sent as a data:
URL). Arrivals are Poisson at --request-rate requests/s (`inf`: all at once); at most --max-concurrency are in
flight. Streamed requests (default) give TTFT (first content delta), ITL (gaps between content deltas) and
TPOT ((e2e - TTFT) / (output tokens - 1), output tokens from the usage chunk); --no-stream gives e2e only.
The report (text, and JSON with --json) has completed/failed requests, request throughput, output tok/s, and
p50/p99 (mean too) of TTFT, TPOT, ITL and e2e in milliseconds.

`--overhead CHECKPOINT` instead measures the server's cost over the offline engine: the same chat request,
--overhead-runs times, alternating between `llava_next.LLM(...).chat` and the full server path (the openai
client, HTTP on 127.0.0.1, FastAPI, the thread pool, AsyncEngine's thread) served by uvicorn in a thread of
this process on its own engine of the same checkpoint. Alternating and one process keep the comparison fair on
a small shared machine (a server subprocess measured against the offline engine in another process mostly
measures the two processes' torch threads competing for the cores). It reports both p50s, their difference
and the p50 of the paired differences.

Leaves out: goodput/SLO accounting, dataset files (ShareGPT etc.), multi-turn sessions, the completions API.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llava_next, not an installed one

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly", "judge", "every", "box", "of", "mixed", "pickled", "vegetables", "near", "the", "old", "harbour", "at", "dawn"]


def png_data_url(width: int, height: int, rng: random.Random) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_requests(args) -> list[dict]:
    rng = random.Random(args.seed)
    lo, hi = (int(v) for v in args.prompt_words.split("-"))
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.image_sizes.split(",") if s]
    images: dict[tuple[int, int], str] = {}
    out = []
    for i in range(args.num_requests):
        text = f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
        content: list[dict] = []
        if sizes and rng.random() < args.image_ratio:
            w, h = rng.choice(sizes)
            if (w, h) not in images or args.unique_images:
                images[(w, h)] = png_data_url(w, h, rng)
            content.append({"type": "image_url", "image_url": {"url": images[(w, h)]}})
        content.append({"type": "text", "text": text})
        out.append({"messages": [{"role": "user", "content": content}], "max_tokens": args.max_tokens})
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    f, c = math.floor(k), math.ceil(k)
    return values[f] + (values[c] - values[f]) * (k - f)


def summary(name: str, values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {f"{name}_p50_ms": pct(ms, 0.5), f"{name}_p99_ms": pct(ms, 0.99),
            f"{name}_mean_ms": statistics.fmean(ms) if ms else float("nan")}


async def run_load(args) -> dict:
    import openai

    requests = make_requests(args)
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key or "none", max_retries=0,
                                timeout=args.timeout)
    rng = random.Random(args.seed + 1)
    limit = asyncio.Semaphore(args.max_concurrency)
    ttft, tpot, itl, e2e, out_tokens, errors = [], [], [], [], [], []
    extra = {"ignore_eos": True} if args.ignore_eos else {}

    async def one(body):
        async with limit:
            start = time.perf_counter()
            try:
                if args.stream:
                    stream = await client.chat.completions.create(
                        model=args.model, temperature=args.temperature, stream=True,
                        stream_options={"include_usage": True}, extra_body=extra, **body)
                    first = last = None
                    n = 0
                    async for chunk in stream:
                        now = time.perf_counter()
                        if chunk.choices and chunk.choices[0].delta.content:
                            if first is None:
                                first = now
                            else:
                                itl.append(now - last)
                            last = now
                        if chunk.usage is not None:
                            n = chunk.usage.completion_tokens
                    end = time.perf_counter()
                    if first is not None:
                        ttft.append(first - start)
                        if n > 1:
                            tpot.append((end - first) / (n - 1))
                else:
                    r = await client.chat.completions.create(model=args.model, temperature=args.temperature,
                                                             extra_body=extra, **body)
                    end = time.perf_counter()
                    n = r.usage.completion_tokens
                e2e.append(end - start)
                out_tokens.append(n)
            except Exception as exc:  # noqa: BLE001 (counted, never fatal)
                errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")

    tasks = []
    start = time.perf_counter()
    for body in requests:
        tasks.append(asyncio.ensure_future(one(body)))
        if math.isfinite(args.request_rate):
            await asyncio.sleep(rng.expovariate(args.request_rate))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    await client.close()
    report = {"completed": len(e2e), "failed": len(errors), "duration_s": duration,
              "request_throughput": len(e2e) / duration, "output_throughput": sum(out_tokens) / duration,
              "total_output_tokens": sum(out_tokens), "max_concurrency": args.max_concurrency,
              "request_rate": args.request_rate, "stream": args.stream,
              **summary("ttft", ttft), **summary("tpot", tpot), **summary("itl", itl), **summary("e2e", e2e)}
    if errors:
        report["first_errors"] = errors[:5]
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_overhead(args) -> dict:
    """p50 latency of one non-streamed chat request: offline engine vs the server (see the module docstring)."""
    import threading

    import openai

    from llava_next import LLM, SamplingParams
    from llava_next.engine.driver import AsyncEngine
    from llava_next.entrypoints.openai import api_server
    from llava_next.entrypoints.openai.media import MediaPolicy

    rng = random.Random(args.seed)
    content = [{"type": "text", "text": "Describe the picture in detail."}]
    if args.overhead_image:
        w, h = (int(v) for v in args.overhead_image.lower().split("x"))
        content.insert(0, {"type": "image_url", "image_url": {"url": png_data_url(w, h, rng)}})
    messages = [{"role": "user", "content": content}]
    runs = args.overhead_runs
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    llm = LLM(args.overhead, dtype="float32", device="cpu")  # the offline engine
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)

    # the server: its own engine on the same checkpoint, uvicorn in a thread of this process
    served_llm = LLM(args.overhead, dtype="float32", device="cpu")
    state = api_server.ServerState(["bench"])
    api_server.make_serving(AsyncEngine(served_llm.llm_engine), state, media=MediaPolicy(),
                            max_num_seqs=served_llm.llm_engine.max_num_seqs)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = api_server.make_server(api_server.build_app(state), state, "127.0.0.1", sock.getsockname()[1])
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="none", max_retries=0,
                           timeout=120)
    body = {"model": "bench", "messages": messages, "max_tokens": args.max_tokens, "temperature": 0,
            "extra_body": {"ignore_eos": True}}
    offline, served, diffs = [], [], []
    try:
        client.chat.completions.create(**body)  # warm-ups (and the connection)
        llm.chat(messages, params, use_tqdm=False)
        for _ in range(runs):  # interleaved, so drifts in the machine's load hit both alike
            t = time.perf_counter()
            out = llm.chat(messages, params, use_tqdm=False)
            offline.append(time.perf_counter() - t)
            t = time.perf_counter()
            r = client.chat.completions.create(**body)
            served.append(time.perf_counter() - t)
            diffs.append(served[-1] - offline[-1])
        same = r.choices[0].message.content == out[0].outputs[0].text
    finally:
        server.should_exit = True
        thread.join(30)
    off50, srv50 = pct(offline, 0.5), pct(served, 0.5)
    return {"runs": runs, "max_tokens": args.max_tokens, "image": args.overhead_image or None,
            "offline_p50_ms": off50 * 1000, "server_p50_ms": srv50 * 1000, "overhead_p50_ms": (srv50 - off50) * 1000,
            "paired_overhead_p50_ms": pct(diffs, 0.5) * 1000,
            "offline_p99_ms": pct(offline, 0.99) * 1000, "server_p99_ms": pct(served, 0.99) * 1000,
            "same_text": same}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="served model name (default: the server's first)")
    p.add_argument("--api-key", default=os.environ.get("LLAVA_NEXT_API_KEY"))
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson rate, req/s (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-sizes", default="336x336,1000x750,300x200", help="WxH,... ('' for text only)")
    p.add_argument("--image-ratio", type=float, default=0.7, help="share of requests with an image")
    p.add_argument("--unique-images", action="store_true", help="new pixels per request (no prefix-cache hits)")
    p.add_argument("--prompt-words", default="8-64", help="prompt length range in words, LO-HI")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--overhead", default=None, metavar="CHECKPOINT", help="measure server vs offline instead")
    p.add_argument("--overhead-runs", type=int, default=30)
    p.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval for the overhead run")
    p.add_argument("--overhead-image", default=None, metavar="WxH", help="add an image to the overhead request")
    args = p.parse_args(argv)
    if args.overhead:
        report = run_overhead(args)
    else:
        if args.model is None:
            import openai

            args.model = openai.OpenAI(base_url=args.base_url, api_key=args.api_key or "none",
                                       max_retries=0).models.list().data[0].id
        report = asyncio.run(run_load(args))
    for key, value in report.items():
        print(f"{key:>24}: {value:.2f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report.get("failed", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
