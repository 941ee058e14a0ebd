"""`LLM`: vLLM's offline API over the engine: `generate(prompts, sampling_params)` and `chat(messages)`.

`LLM(model)` takes a checkpoint folder / hub id (loaded here: the weights through loading.pretrained into
model_runner.EngineModel, the processor through preprocess.processor.LlavaNextProcessor) or an already built
model object with `.model` (a LlavaNextCore) and `.lm_head` (then pass `processor=` for text prompts).
Results come back in the order of the inputs, one RequestOutput each; `use_tqdm` shows a bar over requests.

Chat messages use OpenAI's content parts: {"type": "text", "text"}, {"type": "image_url", "image_url":
{"url": "data:..." | path | URL}}, {"type": "image", "image": PIL}; they are rendered by the processor's chat
template (add_generation_prompt=True) and the images go with the prompt in order (preprocess/chat_messages.py).

`LLM(path, tensor_parallel_size=N)` (N > 1) starts N - 1 worker processes (tp_workers.py): this process is
rank 0 and schedules, the workers follow; each rank loads only its slices of the decoder. `shutdown()` (also
at garbage collection and interpreter exit) stops them; a worker's death makes every later call raise
EngineDeadError. `kv_cache_memory_bytes` is per rank.

Leaves out: beam search, embeddings/score APIs, LoRA, `llm.encode`, prompt logprobs.
"""

from __future__ import annotations

import atexit
import itertools

import torch

from llava_next.engine.llm_engine import LLMEngine
from llava_next.engine.model_runner import EngineModel
from llava_next.errors import ModelInputError
from llava_next.loading.dtypes import torch_dtype
from llava_next.preprocess.chat_messages import load_part, split_messages
from llava_next.sampling.params import SamplingParams

_counter = itertools.count()


class LLM:
    def __init__(self, model, dtype="auto", device=None, max_model_len=None, max_num_seqs=None,
                 max_num_batched_tokens=None, kv_cache_memory_bytes=None, block_size: int = 16,
                 enable_prefix_caching: bool = True, limit_mm_per_prompt=None, tensor_parallel_size: int = 1,
                 seed: int = 0, processor=None, **engine_args):
        self._tp_leader, generation = None, None
        if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) \
                or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive int, got {tensor_parallel_size!r}")
        if tensor_parallel_size > 1:
            if isinstance(model, torch.nn.Module):
                raise ValueError("tensor_parallel_size > 1 needs a checkpoint path or hub id, not a built model: "
                                 "each rank loads only its own slices of the weights")
            from llava_next.engine import tp_workers
            from llava_next.loading.hub import MODEL_PATTERNS, resolve_folder

            folder = resolve_folder(model, allow_patterns=MODEL_PATTERNS)  # downloaded once, read by every rank
            self._tp_leader, built, generation = tp_workers.start(folder, tensor_parallel_size,
                                                                 torch_dtype(dtype) or "auto", device)
            atexit.register(self._tp_leader.stop)  # the leader, not self: an unused LLM can still be collected
        elif isinstance(model, torch.nn.Module):
            built = model
            if device is not None:
                built = built.to(device)
            if torch_dtype(dtype) is not None:
                built = built.to(torch_dtype(dtype))
        else:
            from llava_next.loading.pretrained import load_pretrained

            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            built, generation = load_pretrained(EngineModel, model, dtype=torch_dtype(dtype) or "auto",
                                                device_map=str(device))
        if processor is None and not isinstance(model, torch.nn.Module):  # a checkpoint path or hub id
            from llava_next.preprocess.processor import LlavaNextProcessor

            processor = LlavaNextProcessor.from_pretrained(model)
        self.model, self.processor = built, processor
        # the checkpoint's generation_config.json EOS ids, unless given (nothing is stashed on the model)
        engine_args.setdefault("eos_token_id", (generation or {}).get("eos_token_id"))
        try:
            self.llm_engine = LLMEngine(built, processor, tp_leader=self._tp_leader,
                                        tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                                        max_num_seqs=max_num_seqs,
                                        max_num_batched_tokens=max_num_batched_tokens,
                                        kv_cache_memory_bytes=kv_cache_memory_bytes, block_size=block_size,
                                        enable_prefix_caching=enable_prefix_caching,
                                        limit_mm_per_prompt=limit_mm_per_prompt, seed=seed, **engine_args)
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self):
        """Stop the tensor-parallel workers (no-op with one process); the LLM cannot generate afterwards."""
        leader, self._tp_leader = getattr(self, "_tp_leader", None), None
        if leader is not None:
            atexit.unregister(leader.stop)
            leader.stop()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass

    def get_tokenizer(self):
        return None if self.processor is None else self.processor.tokenizer

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True):
        """One RequestOutput per prompt, in order. Every prompt is validated before any runs: one bad prompt
        fails the call (a typed ValueError) and nothing is queued."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        engine = self.llm_engine
        prepared = [engine.prepare(p, sp) for p, sp in zip(prompts, params)]
        return self._run(prepared, use_tqdm)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True):
        """messages: one conversation (a list of {"role", "content"}) or a list of them."""
        if self.processor is None:
            raise ModelInputError("chat() needs a processor (its chat template)")
        prompts = []
        for conversation in messages if messages and isinstance(messages[0], list) else [messages]:
            turns, images = split_messages(conversation, load=load_part)
            text = self.processor.apply_chat_template(turns, chat_template=chat_template,
                                                      add_generation_prompt=add_generation_prompt)
            prompts.append({"prompt": text, "multi_modal_data": {"image": images}})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prepared, use_tqdm: bool):
        engine = self.llm_engine
        ids = [f"llm-{next(_counter)}" for _ in prepared]
        bar = None
        done = {}
        try:
            for request_id, p in zip(ids, prepared):  # a failure here leaves none of this call's prompts queued
                engine.add_request(request_id, p)
            if use_tqdm:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
            while len(done) < len(ids):
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for request_id in ids:
                if request_id not in done:
                    engine.abort(request_id)
            engine.step()  # report and free the aborted requests
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[i] for i in ids]
