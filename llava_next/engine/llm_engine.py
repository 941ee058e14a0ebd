"""LLMEngine: requests in, a step at a time, outputs with new tokens out (vLLM's LLMEngine, in one process).

`prepare(prompt, params)` (engine/prepare.py) does everything that can fail on a bad request, before any model
work and without touching the engine's state (thread-safe, CPU only, so a server can run it in a thread pool):
tokenizing, `<image>` expansion, image tiles and pixel hashes, and every check, each a typed ValueError.

`step()` schedules (scheduler.py), runs the model (model_runner.py), appends each sampled token, detokenizes
incrementally (detokenizer.py: only the newest tokens, the text always equals decoding all tokens), applies stop rules (EOS,
stop token ids, stop strings after min_tokens, max_tokens, the context) and returns one RequestOutput per
request that got a token or finished this step. Finished and aborted requests release their blocks in the
step that ends them. The engine object itself is single-threaded: driver.py owns it from one thread.

Tensor parallelism: given a `tp_leader` (tp_workers.py; LLM(tensor_parallel_size=N) builds it), this engine
is rank 0: its model's decoder is sharded, the KV pool holds this rank's KV heads, the pool size it decides
is sent to the followers, and each step's plan is broadcast to them (model_runner.py). A worker's death ends
a step with EngineDeadError.

Leaves out: priorities, LoRA, prompt logprobs, a fused GPU paged kernel (attention_metadata.py gathers each
step's contexts instead).
"""

from __future__ import annotations

import logging
import time

import torch

from llava_next.engine.args import EngineArgs
from llava_next.engine.attention_metadata import (
    PagedKVCache,
    StepAttention,
    prefill_plan,
)
from llava_next.engine.block_pool import BlockPool
from llava_next.engine.detokenizer import (
    IncrementalDetokenizer,
    byte_token_ids,
    cleans_up,
    special_token_ids,
)
from llava_next.engine.encoder_cache import EncoderCache
from llava_next.engine.model_runner import ModelRunner
from llava_next.engine.outputs import CompletionOutput, RequestOutput
from llava_next.engine.prepare import RequestPreparer, image_limit
from llava_next.engine.request import PreparedRequest, Sequence
from llava_next.engine.scheduler import Scheduler
from llava_next.sampling.params import SamplingParams
from llava_next.sampling.structured import StructuredDecoding

logger = logging.getLogger(__name__)

CPU_KV_BYTES_CAP = 2 << 30  # a CPU pool is sized for max_model_len x max_num_seqs, at most this many bytes


class _Group:
    """The n sequences of one request."""

    def __init__(self, request_id: str, prepared: PreparedRequest, seqs: list[Sequence]):
        self.request_id, self.prepared, self.seqs = request_id, prepared, seqs


class LLMEngine:
    def __init__(self, model, processor=None, tp_leader=None, **engine_args):
        args = EngineArgs(**engine_args)
        args.check()
        world = 1 if tp_leader is None else tp_leader.world
        if args.tensor_parallel_size != world:
            raise ValueError(f"tensor_parallel_size={args.tensor_parallel_size} but the model runs on {world} "
                             "rank(s); use LLM(model_path, tensor_parallel_size=N), which starts the workers")
        self.tp_leader = tp_leader
        # KV heads this rank holds (per rank when the decoder is sharded)
        self.kv_heads = model.model.language_model.layers[0].self_attn.kv_heads
        self.model, self.processor = model, processor
        self.config = model.config
        text = self.config.text_config
        self.geometry = model.model.geometry
        self.vocab_size = model.model.language_model.embed_tokens.num_embeddings
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.max_model_len = min(args.max_model_len or text.max_position_embeddings, text.max_position_embeddings)
        on_gpu = self.device.type == "cuda"
        self.max_num_seqs = args.max_num_seqs or (128 if on_gpu else 16)
        self.max_num_batched_tokens = args.max_num_batched_tokens or (8192 if on_gpu else 2048)
        self.image_limit = image_limit(args.limit_mm_per_prompt)
        self.eos_token_ids = self._eos_ids(args.eos_token_id)
        self.block_size = args.block_size
        num_blocks = self._num_blocks(args, text)
        if tp_leader is not None:
            tp_leader.setup(num_blocks, args.block_size)  # every rank's pool: the same blocks, its own heads
        self.kv_cache = PagedKVCache(text.num_hidden_layers, num_blocks, args.block_size, self.kv_heads,
                                     text.head_dim, self.dtype, self.device)
        self.pool = BlockPool(num_blocks, args.block_size, args.enable_prefix_caching)
        self.encoder_cache = EncoderCache(args.encoder_cache_tokens or max(4 * self.max_num_batched_tokens, 16384))
        self.scheduler = Scheduler(self.pool, self.encoder_cache, self.max_num_seqs, self.max_num_batched_tokens,
                                   self.max_model_len)
        self.structured = StructuredDecoding(self._tokenizer_json, self.vocab_size, self.eos_token_ids, self.device,
                                             self.max_num_seqs)
        self.runner = ModelRunner(model, self.kv_cache, self.encoder_cache, args.seed, tp_leader, args.runner_mode,
                                  self.structured)
        self.preparer = RequestPreparer(self.config, processor, self.vocab_size, self.max_model_len, self.image_limit,
                                        args.block_size, num_blocks, self.structured)
        self.groups: dict[str, _Group] = {}
        self._aborted: list[_Group] = []
        self.step_times = {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0}
        self._byte_ids: tuple | None = None  # the tokenizer's (byte-fallback, special) token ids

    # -- set-up --------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return None if self.processor is None else self.processor.tokenizer

    def _tokenizer_json(self) -> str | None:
        """The tokenizer's `tokenizer.json` text (llguidance builds its own tokenizer from it)."""
        return None if self.tokenizer is None else self.tokenizer.backend_tokenizer.to_str()

    def _eos_ids(self, given) -> tuple[int, ...]:
        if given is None:
            gen = getattr(self.model, "generation_config", None)  # a dict, an object with the field, or None
            given = gen.get("eos_token_id") if isinstance(gen, dict) else getattr(gen, "eos_token_id", None)
        if given is None:
            given = self.config.text_config.eos_token_id
        if given is None and self.tokenizer is not None:
            given = self.tokenizer.eos_token_id
        if given is None:
            return ()
        return tuple(int(i) for i in ([given] if isinstance(given, int) else given))

    def _num_blocks(self, args: EngineArgs, text) -> int:
        per_block = PagedKVCache.bytes_per_block(text.num_hidden_layers, args.block_size, self.kv_heads,
                                                 text.head_dim, self.dtype)
        if args.num_kv_blocks is not None:
            return args.num_kv_blocks
        if args.kv_cache_memory_bytes is not None:
            budget = args.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            budget = self._profile_gpu_budget(args)
        else:
            wanted = -(-self.max_model_len // args.block_size) * self.max_num_seqs * per_block
            budget = min(wanted, CPU_KV_BYTES_CAP)
        blocks = budget // per_block
        if blocks < 1:
            raise ValueError(f"the KV cache budget of {budget} bytes holds no block of {per_block} bytes")
        return int(blocks)

    def _profile_gpu_budget(self, args: EngineArgs) -> int:
        """Free device memory after a worst-case forward (the budget of tokens, the most images), as vLLM."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        with torch.inference_mode():
            vision = self.config.vision_config
            n_images = max(1, min(self.image_limit, 2))
            tiles = torch.zeros(n_images * self.geometry.num_tiles(1008, 1008), 3, vision.image_size,
                                vision.image_size, device=self.device, dtype=self.dtype)
            self.model.model.encode_images(tiles, [(1008, 1008)] * n_images)
            probe = PagedKVCache(self.config.text_config.num_hidden_layers, 1 + -(-self.max_num_batched_tokens //
                                 args.block_size), args.block_size, self.kv_heads,
                                 self.config.text_config.head_dim, self.dtype, self.device)
            T = self.max_num_batched_tokens
            decoder = self.model.model.language_model
            plan = prefill_plan(T, probe.num_blocks, args.block_size, decoder.windows)
            meta = StepAttention.build(probe, decoder.windows, plan, self.device)[0]
            embeds = torch.zeros(1, T, self.config.text_config.hidden_size, device=self.device, dtype=self.dtype)
            if self.tp_leader is not None:  # the followers run the same worst-case forward
                self.tp_leader.profile(embeds, probe.num_blocks, args.block_size)
            hidden = decoder(embeds, torch.arange(T, device=self.device)[None], meta)
            self.model.lm_head(hidden[0, -self.max_num_seqs:])
            del probe, meta, hidden, embeds, tiles
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free
        return int(total * args.gpu_memory_utilization - used_by_others - peak)

    # -- preparing requests (thread-safe) -----------------------------------------------------------------
    def prepare(self, prompt, params: SamplingParams | None = None) -> PreparedRequest:
        """Validate and preprocess one prompt (engine/prepare.py); raises a typed ValueError. Thread-safe."""
        return self.preparer.prepare(prompt, params)

    # -- the request lifecycle (engine thread) ------------------------------------------------------------
    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None) -> None:
        """Queue a request (a prompt or a PreparedRequest); raises the typed errors of prepare()."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        prepared = prompt if isinstance(prompt, PreparedRequest) else self.prepare(prompt, params)
        p = prepared.params
        seqs = [Sequence(request_id, i, prepared, p.child(i), self.eos_token_ids) for i in range(p.n)]
        self.groups[request_id] = _Group(request_id, prepared, seqs)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Stop a request now: its blocks are freed, the next step reports it once with finish_reason "abort"."""
        group = self.groups.get(request_id)
        if group is None:
            return
        for seq in group.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
                self.runner.sampler.forget(seq)
        self._aborted.append(group)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def num_requests(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        return len(self.scheduler.running), len(self.scheduler.waiting)

    def stats(self) -> dict:
        running, waiting = self.num_requests()
        return dict(num_running=running, num_waiting=waiting, kv_blocks_used=self.pool.num_used,
                    kv_blocks_total=self.pool.num_blocks, prefix_cache_hit_tokens=self.pool.hit_tokens,
                    prefix_cache_queried_tokens=self.pool.queried_tokens,
                    kv_blocks_allocated=self.pool.num_allocated, kv_blocks_released=self.pool.num_released,
                    num_preemptions=self.scheduler.num_preemptions, images_encoded=self.encoder_cache.num_encoded,
                    encoder_cache_hits=self.encoder_cache.num_hits, decode_buckets=sorted(self.runner.steps),
                    encoder_cache_entries=len(self.encoder_cache.entries),
                    encoder_cache_held=len(self.encoder_cache.refs), **self.step_times)

    def step(self) -> list[RequestOutput]:
        touched: dict[str, _Group] = {g.request_id: g for g in self._aborted}
        self._aborted = []
        if self.scheduler.waiting:  # new prompts may hit the caches: not with features or keys of older weights
            self.runner.check_weights(self.pool)
        step = self.scheduler.schedule()
        if not step.is_empty:
            t0 = time.perf_counter()
            try:
                seqs, tokens, logprobs = self.runner.execute(step)
            except BaseException as exc:
                logger.exception("engine step failed (%d sequences scheduled)", len(step.scheduled))
                if self.tp_leader is not None:  # the ranks are out of step: stop them, EngineDeadError
                    self.tp_leader.step_failed(exc)
                raise
            for seq, _, num_new in step.scheduled:
                self.scheduler.update(seq, num_new)
            for seq, token, lp in zip(seqs, tokens, logprobs):
                touched[seq.request_id] = self.groups[seq.request_id]
                if token is None:  # this row's sampling failed (logged by the sampler): this request only
                    self._fail(seq, self.runner.sampler.failures.get((seq.request_id, seq.index), "sampling failed"))
                    continue
                try:
                    self._append(seq, token, lp)
                except Exception as exc:  # e.g. detokenizing: this request only
                    logger.exception("request %r failed after sampling", seq.request_id)
                    self._fail(seq, repr(exc))
            kind = "decode_s" if all(n == 1 for _, _, n in step.scheduled) else "prefill_s"
            self.step_times[kind] += time.perf_counter() - t0
            self.step_times["steps"] += 1
        outputs = []
        for group in touched.values():
            out = self._output(group)
            outputs.append(out)
            if out.finished:
                self.groups.pop(group.request_id, None)
        return outputs

    # -- outputs -------------------------------------------------------------------------------------------
    def _append(self, seq: Sequence, token: int, logprobs) -> None:
        grammar = None if seq.matcher is None else self.structured.advance(seq.matcher, token)
        if grammar == "error":  # the grammar cannot continue: end this request only, without the token
            self._fail(seq, f"its grammar rejected token {token}")
            return
        seq.token_ids.append(token)
        if seq.logprobs is not None:
            seq.logprobs.append(logprobs)
        p = seq.params
        n_out = seq.num_output_tokens
        reason = stop_reason = None
        if token in seq.eos_token_ids and n_out > p.min_tokens - 1:
            reason = "stop"
        elif token in seq.stop_token_ids and n_out > p.min_tokens - 1:
            reason, stop_reason = "stop", token
        if self.tokenizer is not None:
            if seq.detokenizer is None:
                seq.detokenizer = self._detokenizer(p.skip_special_tokens)
            unchanged = seq.detokenizer.update(seq.token_ids, seq.prompt_len)  # text[:unchanged] as before
            seq.text = seq.detokenizer.text
            if reason is None and p.stop and n_out >= p.min_tokens:
                longest = max(len(s) for s in p.stop)
                start = max(0, unchanged - longest + 1)
                found = [(seq.text.find(s, start), s) for s in p.stop]
                found = [(i, s) for i, s in found if i != -1]
                if found:
                    cut, string = min(found)
                    seq.text = seq.text[:cut]
                    reason, stop_reason = "stop", string
        if reason is None and grammar == "end":  # the constraint is complete
            reason = "stop"
        if reason is None and (n_out >= seq.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason, stop_reason)
            self.runner.sampler.forget(seq)

    def _detokenizer(self, skip_special_tokens: bool) -> IncrementalDetokenizer:
        if self._byte_ids is None:  # once per engine
            self._byte_ids = byte_token_ids(self.tokenizer), special_token_ids(self.tokenizer)
        return IncrementalDetokenizer(self.tokenizer, skip_special_tokens, self._byte_ids[0],
                                      not cleans_up(self.tokenizer), self._byte_ids[1])

    def _fail(self, seq: Sequence, reason: str) -> None:
        """End one sequence with finish_reason "error"; the rest of the batch goes on."""
        logger.error("request %r (completion %d) ends with an error: %s", seq.request_id, seq.index, reason)
        self.scheduler.finish(seq, "error")
        self.runner.sampler.forget(seq)

    def _completion(self, seq: Sequence) -> CompletionOutput:
        out_ids = seq.output_ids
        visible = len(seq.text)
        if not seq.finished:
            if seq.params.stop:  # hold back what could still become a stop string
                visible = len(seq.text) - max(len(s) for s in seq.params.stop) + 1
            if seq.detokenizer is not None:  # UTF-8 pieces a later byte token may still change: held back
                visible = min(visible, seq.detokenizer.stable_chars)
            visible = max(seq.sent_text, visible)
        new_ids, new_text = out_ids[seq.sent_tokens:], seq.text[seq.sent_text:visible]
        seq.sent_tokens, seq.sent_text = len(out_ids), visible
        return CompletionOutput(seq.index, seq.text[:visible] if not seq.finished else seq.text, out_ids,
                                None if seq.logprobs is None else list(seq.logprobs), seq.finish_reason,
                                seq.stop_reason, new_ids, new_text)

    def _output(self, group: _Group) -> RequestOutput:
        completions = [self._completion(s) for s in group.seqs]
        first = group.seqs[0]
        return RequestOutput(group.request_id, group.prepared.prompt, group.prepared.prompt_token_ids,  # shared
                             completions, all(s.finished for s in group.seqs), first.num_cached_tokens or 0)
