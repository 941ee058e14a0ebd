"""`llava-next` command line: argument parsing only; the work is done by the library.

    llava-next generate --image cat.png --prompt "What is shown in this image?"   (streams the answer)
    llava-next chat [--image PATH]             interactive: /image PATH, /reset, /quit
    llava-next demo-checkpoint DIR             an offline checkpoint with RANDOM weights (llava_next.entrypoints.demo)
    llava-next batch MODEL --input DIR|GLOB|FILE.parquet --prompt TEXT --output OUT.jsonl|OUT.parquet
                                               caption a dataset on Ray Data (llava_next.entrypoints.batch.ray_job)
    llava-next serve MODEL [--port 8000] ...   the OpenAI-compatible server (llava_next.entrypoints.openai)

`--model` is a checkpoint folder or a hub id (default llava-hf/llava-v1.6-mistral-7b-hf). Bad input (a missing
folder or image, an unreachable hub, an out-of-range argument) ends with one line on stderr, `llava-next: error:
...`, and exit status 1, never a traceback. Sampling is off unless --temperature > 0, --top-p or --top-k is given.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from llava_next.errors import LlavaNextError
from llava_next.loading.dtypes import DTYPES

DEFAULT_MODEL = "llava-hf/llava-v1.6-mistral-7b-hf"
CHAT_HELP = "Commands: /image PATH (attach an image to your next message), /reset (new conversation), /quit"


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


# ---------------------------------------------------------------------- argument parsing


def _checked(kind, name: str, ok, expected: str):
    """An argparse type: `kind(text)` that must satisfy `ok`, else "must be {expected}, got {text}".

    `name` is what argparse says when `kind` itself fails ("invalid _top_k value: 'x'")."""

    def parse(text: str):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value

    parse.__name__ = name
    return parse


_positive_int = _checked(int, "_positive_int", lambda v: v > 0, "a positive integer")
_temperature = _checked(float, "_temperature", lambda v: math.isfinite(v) and v >= 0,
                        "a finite number >= 0 (0: greedy)")
_top_p = _checked(float, "_top_p", lambda v: math.isfinite(v) and 0 < v <= 1, "a number in (0, 1]")
_top_k = _checked(int, "_top_k", lambda v: v >= 0, "an integer >= 0 (0: no top-k filter)")
_penalty = _checked(float, "_penalty", lambda v: math.isfinite(v) and v > 0, "a finite number > 0 (1: no penalty)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint folder or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--image", action="append", default=[], metavar="PATH|URL",
                   help="an image (path, file://, http(s) or data: URL); repeat for several")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256, help="tokens to generate at most (256)")
    p.add_argument("--temperature", type=_temperature, default=None,
                   help="sample at this temperature (0 or unset: greedy)")
    p.add_argument("--top-p", type=_top_p, default=None, help="nucleus sampling threshold in (0, 1] (turns sampling on)")
    p.add_argument("--top-k", type=_top_k, default=None, help="sample from the k most likely tokens (turns sampling on)")
    p.add_argument("--repetition-penalty", type=_penalty, default=None, help="repetition penalty > 0 (1: none)")
    p.add_argument("--allow-local-network", action="store_true",
                   help="let http(s) image URLs reach loopback, private and link-local addresses")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="weights dtype (auto: the checkpoint's)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of streaming it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-next", description="LLaVA-NeXT (LLaVA-1.6) in pure PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="{generate,chat,demo-checkpoint,serve,batch}")
    sub.required = True
    gen = sub.add_parser("generate", help="answer one prompt about images, streaming the answer")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True, help="the question or instruction")
    chat = sub.add_parser("chat", help="interactive multi-turn chat (stdin)", description=CHAT_HELP)
    _add_model_args(chat)
    demo = sub.add_parser("demo-checkpoint", help="write an offline demo checkpoint with RANDOM weights")
    demo.add_argument("dir", help="folder to create")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights (0)")
    demo.add_argument("--force", action="store_true", help="overwrite a non-empty folder")
    demo.add_argument("--quiet", action="store_true",
                      help="no RANDOM WEIGHTS warning here (generate and chat print it when they load the checkpoint)")
    batch = sub.add_parser("batch", help="caption a folder, glob or parquet file of images on Ray Data (resumable)")
    batch.add_argument("model", help="checkpoint folder or hub id")
    batch.add_argument("--input", required=True, help="a folder of images, a glob, or a .parquet file")
    batch.add_argument("--prompt", required=True, help="the instruction, sent with each image")
    batch.add_argument("--output", required=True, help="OUT.jsonl or OUT.parquet; a rerun skips rows already there")
    batch.add_argument("--max-tokens", type=_positive_int, default=64, help="tokens per caption at most (64)")
    batch.add_argument("--temperature", type=_temperature, default=0.0, help="0 (default): greedy")
    batch.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    batch.add_argument("--num-workers", type=_positive_int, default=1, help="Ray actors, one engine each (1)")
    batch.add_argument("--batch-size", type=_positive_int, default=8, help="images per engine call (8)")
    batch.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="weights dtype (auto: the checkpoint's)")
    batch.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (default) or cuda: one GPU per worker")
    batch.add_argument("--json-schema", default=None, metavar="FILE",
                       help="constrain each answer to this JSON schema: one validating JSON object per image")
    serve = sub.add_parser("serve", help="the OpenAI-compatible HTTP server (needs the 'serve' extra)")
    serve.add_argument("model", help="checkpoint folder or hub id")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (8000)")
    serve.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="model name(s) clients use (default: MODEL as given)")
    serve.add_argument("--api-key", action="append", default=None, metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on every API route (not /health, not the chat page); repeat for several "
                            "keys (default: $LLAVA_NEXT_API_KEY, else none; an empty key is refused)")
    serve.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                       help="Host header values answered, against DNS rebinding ('*': any; default: the --host "
                            "address, plus localhost, 127.0.0.1 and ::1 when it is loopback; any for 0.0.0.0)")
    serve.add_argument("--cache-salt-per-key", action="store_true",
                       help="isolate the prefix cache per API key (no cached_tokens oracle across keys)")
    serve.add_argument("--limit-concurrency", type=_positive_int, default=256,
                       help="open connections and tasks at most; beyond it uvicorn answers 503 (256)")
    serve.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds for a request's headers to arrive, then the connection is closed (10)")
    serve.add_argument("--body-timeout", type=float, default=30.0,
                       help="seconds for a request's body to arrive, then 408 (30)")
    serve.add_argument("--send-timeout", type=float, default=30.0,
                       help="seconds a client may stop reading its stream before the request is aborted (30)")
    serve.add_argument("--no-ui", action="store_true", help="do not serve the chat page at / (served by default)")
    serve.add_argument("--metrics-without-auth", action="store_true",
                       help="let /metrics be scraped without the API key")
    serve.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="weights dtype (auto: the checkpoint's)")
    serve.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    serve.add_argument("--max-model-len", type=_positive_int, default=None, help="context length (the model's)")
    serve.add_argument("--max-num-seqs", type=_positive_int, default=None, help="sequences run at once (16 CPU, 128 GPU)")
    serve.add_argument("--max-num-batched-tokens", type=_positive_int, default=None, help="tokens per engine step")
    serve.add_argument("--max-queued-requests", type=int, default=64,
                       help="sequences waiting beyond --max-num-seqs before 503 (64)")
    serve.add_argument("--limit-mm-per-prompt", type=int, default=None, metavar="N", help="images per prompt (8)")
    serve.add_argument("--allowed-media-domains", nargs="*", default=[], metavar="D",
                       help="host names whose http(s) image URLs may be fetched (default: none; public "
                            "addresses only, always)")
    serve.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                       help="allow file:// image URLs under this folder (default: none)")
    serve.add_argument("--quantization", default=None, choices=["bitsandbytes-4bit", "bitsandbytes-8bit", "8bit"],
                       help="load the weights quantized (bitsandbytes)")
    serve.add_argument("--tensor-parallel-size", type=_positive_int, default=1, help="GPUs per model (1)")
    serve.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template file")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds to finish in-flight requests after SIGTERM (30)")
    serve.add_argument("--max-request-bytes", type=_positive_int, default=32 * 1024 * 1024,
                       help="largest request body (32 MiB)")
    serve.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


# ---------------------------------------------------------------------- shared steps


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def usable_device(name: str | None):
    """--device as a torch.device, checked before anything is loaded: an unknown type or an absent GPU is a
    CliError (torch raises RuntimeError or AssertionError for those)."""
    import torch

    from llava_next.compat.pipeline import resolve_device

    try:
        device = resolve_device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise CliError(f"--device {name}: {_one_line(exc)}") from exc
    return device


def load(args):
    """(processor, model) for --model on --device in --dtype; warns about a demo (random) checkpoint."""
    from llava_next import AutoProcessor, LlavaNextForConditionalGeneration
    from llava_next.entrypoints.demo import WARNING, is_demo_checkpoint

    device = usable_device(args.device)
    if is_demo_checkpoint(args.model):
        _say(f"WARNING: {WARNING}")
    start = time.perf_counter()
    _say(f"Loading {args.model} ...")
    processor = AutoProcessor.from_pretrained(args.model)
    model = LlavaNextForConditionalGeneration.from_pretrained(args.model, dtype=args.dtype,
                                                              device=str(device))
    _say(f"Loaded in {time.perf_counter() - start:.1f} s ({model.dtype}, {model.device}).")
    return processor, model


def generation_kwargs(args) -> dict:
    """generate() arguments from the sampling flags: greedy unless a temperature > 0, top-p or top-k is given."""
    sample = (args.temperature is not None and args.temperature > 0) or args.top_p is not None or args.top_k is not None
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": sample}
    if getattr(args, "repetition_penalty", None) is not None:
        kwargs["repetition_penalty"] = args.repetition_penalty
    if sample:
        for name in ("temperature", "top_p", "top_k"):
            if getattr(args, name) is not None:
                kwargs[name] = getattr(args, name)
    return kwargs


def load_images(sources: list[str], allow_local_network: bool = False) -> list:
    from llava_next.preprocess.images import load_image

    return [load_image(source, allow_local_network=allow_local_network) for source in sources]


def render_prompt(processor, messages: list[dict]) -> str:
    """The checkpoint's chat template with a generation prompt; without a template, images then the texts."""
    if processor.chat_template:
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    parts = []
    for message in messages:
        for block in message["content"]:
            parts.append("<image>\n" if block["type"] == "image" else block["text"])
    return "".join(parts)


def user_message(text: str, n_images: int) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def answer(processor, model, messages: list[dict], images: list, args, reuse_prefix: bool = False) -> str:
    """Generate the assistant's reply to `messages` (images in order), streamed to stdout unless --no-stream.

    reuse_prefix (chat): the previous turns' keys and values stay in the cache, only the new turn is prefilled.
    """
    import torch

    from llava_next.compat.streaming import TextStreamer

    prompt = render_prompt(processor, messages)
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    inputs = inputs.to(dtype=model.dtype).to(model.device)
    streamer = None if args.no_stream else TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    output = model.generate(**inputs, **generation_kwargs(args), streamer=streamer, reuse_prefix=reuse_prefix)
    text = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    if streamer is None:
        print(text, flush=True)
    return text


# ---------------------------------------------------------------------- commands


def cmd_generate(args) -> int:
    images = load_images(args.image, args.allow_local_network)
    processor, model = load(args)
    answer(processor, model, [user_message(args.prompt, len(images))], images, args)
    return 0


def cmd_chat(args) -> int:
    """A REPL over stdin: each line is a user turn; /image PATH attaches an image to the next turn."""
    processor, model = load(args)
    interactive = sys.stdin.isatty()
    messages: list[dict] = []
    images: list = []  # every image of the conversation, in order
    pending = load_images(args.image, args.allow_local_network)  # images for the next user turn
    interrupted = False
    _say(CHAT_HELP)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            messages, images, pending = [], [], []
            _say("(conversation reset)")
            continue
        if line.startswith("/image"):
            source = line[len("/image"):].strip()
            if not source:
                _say("usage: /image PATH")
                continue
            try:
                pending.append(load_images([source], args.allow_local_network)[0])
            except (OSError, ValueError) as exc:
                _say(f"error: {_one_line(exc)}")
                continue
            _say(f"(image attached to your next message: {source})")
            continue
        if line.startswith("/"):
            _say(f"unknown command {line.split()[0]}; {CHAT_HELP}")
            continue
        turn = [*messages, user_message(line, len(pending))]
        try:
            reply = answer(processor, model, turn, [*images, *pending], args, reuse_prefix=not interrupted)
        except ValueError as exc:  # too long for the context, bad arguments: the turn is dropped, the chat goes on
            _say(f"error: {_one_line(exc)}")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer only: the turn is dropped, the chat goes on
            print(flush=True)
            _say("(answer interrupted; the chat goes on: /quit to leave)")
            interrupted = True  # the next turn prefills from scratch rather than trusting a half-written cache
            continue
        interrupted = False
        messages = [*turn, {"role": "assistant", "content": [{"type": "text", "text": reply}]}]
        images, pending = [*images, *pending], []
    return 0


def cmd_demo_checkpoint(args) -> int:
    from llava_next.entrypoints.demo import build_demo_checkpoint

    try:
        folder = build_demo_checkpoint(args.dir, seed=args.seed, overwrite=args.force, quiet=args.quiet)
    except FileExistsError as exc:  # the library's message names its overwrite=True argument
        raise CliError(f"{args.dir!r} is not empty; choose another folder or pass --force to overwrite it") from exc
    print(f"Wrote the demo checkpoint to {folder}")
    print(f"Try: llava-next generate --model {folder} --image PATH --prompt \"What is shown in this image?\"")
    return 0


def cmd_serve(args) -> int:
    """`llava-next serve`: the server imports fastapi/uvicorn, so only this command needs the 'serve' extra."""
    try:
        from llava_next.entrypoints.openai.serve import serve_from_args
    except ImportError as exc:
        raise CliError(f"serve needs the 'serve' extra (pip install 'llava_next[serve]'): {exc}") from exc
    return serve_from_args(args, CliError)


def cmd_batch(args) -> int:
    from llava_next.entrypoints.batch.ray_job import run

    return run(args)


# ---------------------------------------------------------------------- entry point


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        command = {"generate": cmd_generate, "chat": cmd_chat, "demo-checkpoint": cmd_demo_checkpoint,
                   "serve": cmd_serve, "batch": cmd_batch}[args.command]
        return command(args)
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except (CliError, LlavaNextError, OSError, ValueError, ImportError) as exc:
        if os.environ.get("LLAVA_NEXT_DEBUG"):
            raise
        # OSError: missing folder/file, hub unreachable; ValueError: bad image, bad argument, context too long;
        # LlavaNextError: every error the library raises on purpose
        _say(f"llava-next: error: {_one_line(exc)}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
