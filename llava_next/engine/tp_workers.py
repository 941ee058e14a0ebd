"""Tensor parallel for the engine: `LLM(model, tensor_parallel_size=N)` starts and owns N - 1 worker processes.

Rank 0 is the caller's process: it schedules, runs the vision tower, builds the step's embeddings, samples and
detokenizes, exactly as with one process; its decoder is sharded (parallel/). Ranks 1..N-1 are processes this
module starts as a module entry point (`python -m llava_next.engine.tp_workers RANK WORLD PORT PATH DTYPE DEVICE`,
as torchrun starts its ranks), never multiprocessing's spawn: spawn re-imports the caller's `__main__`, so a plain
script without an `if __name__ == "__main__":` guard would run again in every worker (and die there). Each worker
watches its parent and exits when it goes away. Each loads only its slices of the decoder
(parallel.loading.ShardedLoad), holds a paged KV pool of the same number of blocks for its own KV heads, and
follows rank 0's plan. Everything goes through torch.distributed (gloo on CPU, NCCL on GPU; rendezvous on
127.0.0.1, so one machine): per step `broadcast_object_list([("step", plan)])` (the step's
attention_metadata.StepPlan: host arrays of positions, slots and block-table reads, from which every rank
builds the same metadata) and then one `broadcast` of the (1, T, D) input embeddings, after which every rank
runs the same decoder forward with its two all-reduces per layer. The followers never run the vision tower,
the lm_head or the sampler: rank 0's tokens are the only ones, so sampling needs no synchronisation.

A worker that dies stops the engine: every broadcast first checks the workers' exit codes; a step that fails on
rank 0 for any reason (a collective broken by a peer that went away, or rank 0's own error) leaves the ranks
out of step, so the workers are stopped and the step raises EngineDeadError, naming the dead worker (rank, pid,
exit code) when there is one; later calls raise it at once. Rank 0's process group has a timeout (TIMEOUT_S)
so a stuck, living peer also ends in an error, never a hang; a worker that fails while starting is reported
as soon as it exits. `stop()` sends the workers a stop plan, joins them and kills any left, by pid.

Leaves out: several machines (the rendezvous is 127.0.0.1), pipeline parallelism, running the vision tower on
the followers (rank 0's embeddings are broadcast instead: T x D values per step, ~0.1 ms per 8k-token prefill
chunk of a 72B on NVLink), restarting a dead worker.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from llava_next.errors import EngineDeadError

TIMEOUT_S = 300  # a collective waiting longer than this on rank 0 fails (a stuck worker)
IDLE_TIMEOUT_S = 7 * 24 * 3600  # followers wait for the next step plan as long as the engine idles
JOIN_S = 30


def _init_group(rank: int, world: int, store, backend: str, timeout_s: float):
    saved = os.environ.get("GLOO_SOCKET_IFNAME")
    if backend == "gloo" and saved is None and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # the rendezvous is 127.0.0.1: gloo must use loopback too
    try:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    finally:
        if saved is None:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)


def _rendezvous(leader: TPLeader, world: int, store) -> None:
    """Wait until every worker has connected to rank 0's store, checking that none died meanwhile (a worker that
    fails to start is an error at once, not a TIMEOUT_S wait)."""
    keys = [f"ready{rank}" for rank in range(1, world)]
    deadline = time.monotonic() + TIMEOUT_S
    while not store.check(keys):
        leader.check_alive()
        if time.monotonic() > deadline:
            raise EngineDeadError(f"tensor-parallel workers did not connect within {TIMEOUT_S} s")
        time.sleep(0.05)


def _device(rank: int, device_type: str) -> torch.device:
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _load(path, rank: int, world: int, device: torch.device, dtype):
    from llava_next.engine.model_runner import EngineModel
    from llava_next.loading.pretrained import load_pretrained
    from llava_next.parallel.loading import ShardedLoad
    from llava_next.parallel.tensor_parallel import TensorParallel

    tp = TensorParallel(rank, world, None, device)
    return load_pretrained(EngineModel, path, dtype=dtype, tensor_parallel=ShardedLoad(tp))


def _watch_parent(parent: int) -> None:
    """Exit this worker when the process that started it is gone (killed rank 0 must not leave ranks behind)."""

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="llava-next-tp-parent").start()


def _worker(rank: int, world: int, port: int, path: str, dtype, device_type: str):
    """A follower rank: load its shard, then run the decoder on every plan rank 0 broadcasts until "stop"."""
    from llava_next.engine.attention_metadata import (
        PagedKVCache,
        StepAttention,
        prefill_plan,
    )

    if device_type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // world))  # the ranks share the machine's cores
    backend = "nccl" if device_type == "cuda" else "gloo"
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT_S))
    store.set(f"ready{rank}", "1")
    _init_group(rank, world, store, backend, IDLE_TIMEOUT_S)
    device = _device(rank, device_type)
    model, _ = _load(path, rank, world, device, dtype)
    decoder = model.model.language_model
    text = model.config.text_config
    kv_heads = decoder.layers[0].self_attn.kv_heads
    dtype = model.lm_head.weight.dtype

    def pool(num_blocks: int, block_size: int) -> PagedKVCache:  # this rank's KV heads, rank 0's block count
        return PagedKVCache(text.num_hidden_layers, num_blocks, block_size, kv_heads, text.head_dim, dtype, device)

    cache = None
    with torch.inference_mode():
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            kind, *args = box[0]
            if kind == "stop":
                break
            if kind == "setup":  # the pool: the number of blocks rank 0 decided
                cache = pool(*args)
                continue
            if kind == "profile":  # rank 0 profiles a worst-case forward: do the same one
                T, num_blocks, block_size = args
                probe = pool(num_blocks, block_size)
                plan, step_cache = prefill_plan(T, num_blocks, block_size, decoder.windows), probe
            else:  # "step"
                plan, step_cache = args[0], cache
            embeds = torch.empty(1, plan.num_tokens, text.hidden_size, dtype=dtype, device=device)
            dist.broadcast(embeds, src=0)
            meta, positions, _, _ = StepAttention.build(step_cache, decoder.windows, plan, device)
            decoder(embeds, positions[None], meta)
            if kind == "profile":
                del probe, step_cache
    dist.destroy_process_group()


class TPLeader:
    """Rank 0's side: the worker processes and the broadcasts of the plan."""

    def __init__(self, world: int, procs: list):
        self.world, self.procs = world, procs
        self.dead: str | None = None
        self.stopped = False

    # -- liveness ---------------------------------------------------------------------------------------------
    def _dead_workers(self) -> list[str]:
        return [f"worker rank {rank} (pid {p.pid}) exited with code {p.returncode}"
                for rank, p in enumerate(self.procs, start=1) if p.poll() is not None]

    def check_alive(self):
        if self.dead is None and not self.stopped:
            dead = self._dead_workers()
            if dead:
                self.dead = "; ".join(dead)
        if self.dead is not None:
            raise EngineDeadError(f"tensor parallel: {self.dead}; the engine is stopped, create a new LLM")
        if self.stopped:
            raise EngineDeadError("this tensor-parallel engine was shut down")

    def step_failed(self, exc: BaseException):
        """A step (or a broadcast) on rank 0 raised `exc`. The ranks are now out of step (a follower may sit in
        a collective rank 0 will never join), so the engine is over: the workers are stopped, and an Exception
        becomes EngineDeadError naming a dead worker if there is one (a KeyboardInterrupt is left to propagate)."""
        if isinstance(exc, EngineDeadError):
            raise exc
        # a dying peer's sockets (and its sentinel pipe) close a moment before the kernel reports its exit:
        # give it up to 2 s to become reapable
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and all(p.poll() is None for p in self.procs):
            time.sleep(0.01)
        dead = self._dead_workers()
        if self.dead is None:
            self.dead = "; ".join(dead) if dead else f"rank 0 failed mid-step ({type(exc).__name__}: {exc})"
        self.stop()
        if isinstance(exc, Exception):
            raise EngineDeadError(f"tensor parallel: {self.dead}; the engine is stopped ({type(exc).__name__}: "
                                  f"{exc})") from exc

    def _send(self, plan, embeds: torch.Tensor | None = None):
        self.check_alive()
        try:
            dist.broadcast_object_list([plan], src=0)
            if embeds is not None:
                dist.broadcast(embeds.contiguous(), src=0)
        except BaseException as exc:
            self.step_failed(exc)
            raise

    # -- the plan ---------------------------------------------------------------------------------------------
    def setup(self, num_blocks: int, block_size: int):
        self._send(("setup", num_blocks, block_size))

    def profile(self, embeds: torch.Tensor, num_blocks: int, block_size: int):
        self._send(("profile", embeds.shape[1], num_blocks, block_size), embeds)

    def step(self, plan, embeds: torch.Tensor):
        """Before rank 0's decoder forward of one engine step: its attention_metadata.StepPlan (host arrays)
        and embeds (1, T, D)."""
        self._send(("step", plan), embeds)

    def stop(self):
        if self.stopped:
            return
        self.stopped = True
        if self.dead is None and not self._dead_workers():  # in step: the workers wait for a plan
            with contextlib.suppress(RuntimeError):
                dist.broadcast_object_list([("stop",)], src=0)
            for p in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=JOIN_S)
        for p in self.procs:  # out of step (or slow to stop): they may sit in a collective forever
            if p.poll() is None:
                p.kill()  # by pid, our own child
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        if dist.is_initialized():
            dist.destroy_process_group()


def start(path, world: int, dtype=None, device: str | torch.device | None = None):
    """Start ranks 1..world-1 and join the group as rank 0; returns (TPLeader, rank 0's model, generation)."""
    if dist.is_initialized():
        raise RuntimeError("LLM(tensor_parallel_size=N) starts its own worker processes and process group; this "
                           "process already has one (under torch.distributed.run use from_pretrained(tp_plan='auto'))")
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"tensor_parallel_size={world} needs {world} GPUs, {torch.cuda.device_count()} visible")
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"tensor parallel runs on cuda or cpu, not {device_type}")
    # rank 0's store on a port the OS picks (no race for a "free" port); the workers get its number
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=datetime.timedelta(seconds=TIMEOUT_S),
                          wait_for_workers=False)
    port = store.port
    procs = [_launch(rank, world, port, str(path), dtype, device_type) for rank in range(1, world)]
    leader = TPLeader(world, procs)
    try:
        _rendezvous(leader, world, store)
        _init_group(0, world, store, "nccl" if device_type == "cuda" else "gloo", TIMEOUT_S)
        model, generation = _load(path, 0, world, _device(0, device_type), dtype)
        leader.check_alive()
    except BaseException as exc:
        dead = leader._dead_workers()
        leader.stop()
        if dead:
            raise EngineDeadError(f"tensor parallel: {'; '.join(dead)} while starting") from exc
        raise
    return leader, model, generation


def _launch(rank: int, world: int, port: int, path: str, dtype, device_type: str) -> subprocess.Popen:
    """Start one follower as `python -m llava_next.engine.tp_workers ...` with this process's interpreter and the
    folder this package was imported from first on its path (so it runs the same code)."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    dtype_arg = dtype if isinstance(dtype, str) or dtype is None else str(dtype).removeprefix("torch.")
    cmd = [sys.executable, "-m", "llava_next.engine.tp_workers", str(rank), str(world), str(port), path,
           str(dtype_arg), device_type, str(os.getpid())]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)


def main(argv: list[str]) -> None:
    rank, world, port, path, dtype_arg, device_type, parent = argv
    _watch_parent(int(parent))
    dtype = None if dtype_arg == "None" else dtype_arg if dtype_arg == "auto" else getattr(torch, dtype_arg)
    _worker(int(rank), int(world), int(port), path, dtype, device_type)


if __name__ == "__main__":
    main(sys.argv[1:])
