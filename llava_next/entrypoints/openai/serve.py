"""`llava-next serve`: the flags checked, the socket bound at once, the model loaded in a background thread, the
server run until SIGTERM/SIGINT and the process ended with exit status 0 after the drain (api_server.py builds
the app, the state and the uvicorn server this runs).

The socket listens before the model loads, so `/health` answers 503 ("loading") meanwhile; a load that fails
stops the server and is reported by the CLI as one line. After the drain the process leaves through
`os._exit(0)`: everything is closed by then, and the interpreter's teardown with torch loaded takes seconds
(and aborts when the loader thread is still inside torch).

Leaves out: TLS, several workers, daemonising (run it under a supervisor).
"""

import logging
import os
import signal
import socket
import threading

from llava_next.entrypoints.openai import api_server
from llava_next.entrypoints.openai.connections import allowed_hosts


def run(server, sock: socket.socket | None = None) -> None:
    """Run until a signal; a re-raised SIGTERM/SIGINT (uvicorn does that at exit) is swallowed so we exit 0."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock] if sock is not None else None)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve_from_args(args, error_cls=RuntimeError) -> int:
    """`llava-next serve`: check the flags, listen at once (/health is 503 while the model loads), load the model
    in a background thread, serve until SIGTERM/SIGINT, exit 0 after the drain."""
    import sys
    from pathlib import Path

    from llava_next.entrypoints.openai.media import MediaPolicy

    if args.tensor_parallel_size != 1:
        raise error_cls("--tensor-parallel-size > 1 is not supported by the engine yet")
    if args.max_queued_requests < 0:
        raise error_cls("--max-queued-requests must be >= 0")
    if args.limit_mm_per_prompt is not None and args.limit_mm_per_prompt < 0:
        raise error_cls("--limit-mm-per-prompt must be >= 0")
    if not (args.shutdown_timeout > 0):
        raise error_cls("--shutdown-timeout must be > 0")
    if not 0 <= args.port <= 65535:
        raise error_cls(f"--port must be in 0..65535, got {args.port}")
    keys = args.api_key
    if keys is None and os.environ.get("LLAVA_NEXT_API_KEY") is not None:
        keys = [os.environ["LLAVA_NEXT_API_KEY"]]
    keys = [keys] if isinstance(keys, str) else keys
    if keys is not None and any(not key.strip() for key in keys):
        raise error_cls("the API key (--api-key or $LLAVA_NEXT_API_KEY) is empty: no client could use the server; "
                        "set a non-empty key or unset it")
    if args.cache_salt_per_key and keys is None:
        raise error_cls("--cache-salt-per-key needs --api-key (the salt is the client's key)")
    for name in ("header_timeout", "body_timeout", "send_timeout"):
        if not getattr(args, name) > 0:
            raise error_cls(f"--{name.replace('_', '-')} must be > 0")
    template = None
    if args.chat_template is not None:
        try:
            template = Path(args.chat_template).read_text(encoding="utf-8")
        except OSError as exc:
            raise error_cls(f"--chat-template {args.chat_template}: {exc.strerror or exc}") from exc
    if args.allowed_local_media_path is not None and not Path(args.allowed_local_media_path).is_dir():
        raise error_cls(f"--allowed-local-media-path {args.allowed_local_media_path}: not a folder")
    if args.quantization:  # LLM takes no quantization argument
        raise error_cls(f"--quantization {args.quantization} is not supported by the engine yet")
    from llava_next.entrypoints.llm import LLM  # torch: after the cheap checks

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = args.served_model_name or [args.model]
    state = api_server.ServerState(names, keys, args.max_request_bytes, args.shutdown_timeout,
                                   allowed_hosts=allowed_hosts(args.host, args.allowed_hosts),
                                   limit_concurrency=args.limit_concurrency, header_timeout=args.header_timeout,
                                   body_timeout=args.body_timeout, send_timeout=args.send_timeout,
                                   cache_salt_per_key=args.cache_salt_per_key,
                                   metrics_without_auth=args.metrics_without_auth)
    media = MediaPolicy(frozenset(args.allowed_media_domains), args.allowed_local_media_path)
    app = api_server.build_app(state, ui=not getattr(args, "no_ui", False))
    server = api_server.make_server(app, state, args.host, args.port, args.log_level)
    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        raise error_cls(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc

    def load() -> None:
        try:
            from llava_next.engine.driver import AsyncEngine

            llm = LLM(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                      max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                      limit_mm_per_prompt=args.limit_mm_per_prompt)
            api_server.make_serving(AsyncEngine(llm.llm_engine), state, media=media,
                                    max_num_seqs=llm.llm_engine.max_num_seqs,
                                    max_queued_requests=args.max_queued_requests, chat_template=template)
            print(f"llava-next: serving {names[0]!r} at http://{args.host}:{sock.getsockname()[1]} "
                  f"(max_model_len {llm.llm_engine.max_model_len}, max_num_seqs {llm.llm_engine.max_num_seqs})",
                  file=sys.stderr, flush=True)
        except BaseException as exc:  # noqa: BLE001 (reported as one line by the CLI after the server stops)
            state.load_error = " ".join(str(exc).split()) or type(exc).__name__
            state.phase = "failed"
            server.should_exit = True

    print(f"llava-next: loading {args.model} ...", file=sys.stderr, flush=True)
    loader = threading.Thread(target=load, name="llava-next-load", daemon=True)
    loader.start()
    run(server, sock)
    if state.load_error is not None:
        raise error_cls(f"could not load {args.model}: {state.load_error}")
    if loader.is_alive():
        print("llava-next: stopped while loading the model", file=sys.stderr, flush=True)
    # Everything is closed: skip the interpreter's teardown, which takes seconds with torch loaded (and aborts
    # when the loader thread is still inside torch), so the exit stays within --shutdown-timeout.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
