"""EngineArgs: the engine's settings (vLLM's names), checked before anything is built.

`LLMEngine(model, processor, **engine_args)` takes these as keywords; `LLM(...)` and `llava-next serve` pass
theirs through. None means "the engine's default", decided in llm_engine.py from the device (max_num_seqs 16 on
a CPU, 128 on a GPU; max_num_batched_tokens 2048 / 8192) or the model (max_model_len: its context).

Leaves out: the settings of the server and of tensor-parallel workers (entrypoints/, tp_workers.py).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class EngineArgs:
    max_model_len: int | None = None
    max_num_seqs: int | None = None  # default 16 on CPU, 128 on GPU
    max_num_batched_tokens: int | None = None  # default 2048 on CPU, 8192 on GPU
    kv_cache_memory_bytes: int | None = None
    num_kv_blocks: int | None = None  # exact pool size (tests); overrides kv_cache_memory_bytes
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    enable_prefix_caching: bool = True
    limit_mm_per_prompt: dict | int | None = None
    tensor_parallel_size: int = 1
    seed: int = 0
    eos_token_id: int | list[int] | None = None
    encoder_cache_tokens: int | None = None
    runner_mode: str | None = None  # model_runner.ModelRunner's: eager, static, graph (default: graph on CUDA)

    def check(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory_bytes",
                     "num_kv_blocks", "encoder_cache_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if isinstance(self.tensor_parallel_size, bool) or not isinstance(self.tensor_parallel_size, int) \
                or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive int, got {self.tensor_parallel_size!r}")
