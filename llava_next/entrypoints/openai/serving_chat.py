"""`/v1/chat/completions` and `/v1/completions` on the engine: validation, admission, rendering, streaming.

Order of work for one request (cheap checks first, so a bad or unlucky request costs nothing):
1. schema (protocol.py, strict pydantic), unsupported features, model name (404), SamplingParams (400);
2. messages: roles and parts, `<image>` typed as text (400), image count against the engine's per-prompt limit
   (before anything is fetched);
3. admission (`Admission`): `running + waiting` (sequences, n per request, counted by the server at once,
   without awaiting) beyond `max_num_seqs + max_queued_requests` is a 503 with Retry-After;
4. images fetched and decoded by media.MediaPolicy in its own bounded pool (a text-only request never queues
   behind images), then in a worker thread the chat template rendered and `LLMEngine.prepare` (tokens, image
   placeholders, `context_length_exceeded` before any encoder work);
5. `AsyncEngine.submit`; a stream is then SSE (sse.py: `data: {chunk}` ... `data: [DONE]`), else one JSON body.

Text deltas are the engine's `new_text` pieces, whose concatenation is exactly the decode of all output tokens
(the engine re-decodes the whole output each step and holds back a possible stop string). A client that goes
away aborts its engine request: streaming through the response generator's `finally`, non-streaming by racing
the result against the ASGI disconnect message. While draining (SIGTERM), requests still running when the
drain deadline comes are aborted; their streams end with an error event and `[DONE]`, non-streamed ones get 503.

Structured output and tool calls: constraints.py turns `response_format`, `tools`/`tool_choice` and
`structured_outputs` into the engine's constraint (compiled in the prepare worker) and renders `tool_calls`.
Logprobs are rendered by logprob_text.py, each token decoded in context: they concatenate to the text.

Prefix-cache isolation: a request's `cache_salt` goes with its prompt to the engine (block_pool.salt_root);
with `cache_salt_per_key` (`--cache-salt-per-key`) the bearer key's digest is mixed in too, so clients with
different keys never share prefix blocks (nor see each other's prompts in `cached_tokens`).

Leaves out: tool calls parsed from free text, `echo`, batched completion prompts, prompt logprobs, continuous
usage stats, `n > 1` via prefix sharing beyond what the engine does itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from llava_next.entrypoints.openai import constraints
from llava_next.entrypoints.openai import protocol as P
from llava_next.entrypoints.openai.errors import (
    APIError,
    bad_request,
    clean,
    from_library,
)
from llava_next.entrypoints.openai.logprob_text import (
    chat_logprobs,
    completion_logprobs,
)
from llava_next.entrypoints.openai.media import MediaPolicy
from llava_next.entrypoints.openai.sse import sse_stream
from llava_next.errors import EngineDeadError, ModelInputError, SamplingParamsError
from llava_next.preprocess.chat_messages import split_messages
from llava_next.sampling.params import SamplingParams

logger = logging.getLogger("llava_next.server")


class Admission:
    """The server's bound on work: sequences admitted (running + waiting in the engine, or about to be)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def acquire(self, n: int) -> None:
        if n > self.limit:  # could never be admitted: not worth a retry
            raise bad_request(f"n={n} is more than this server admits at once ({self.limit} sequences)", "n",
                              "invalid_parameter")
        if self.used + n > self.limit:
            raise APIError(503, f"the server is at capacity ({self.limit} sequences running or queued); retry later",
                           "service_unavailable", None, "server_overloaded", {"Retry-After": "1"})
        self.used += n

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)


class _Active:
    """One admitted request, for the drain (SIGTERM) logic."""

    def __init__(self, request_id: str):
        self.request_id, self.shutdown = request_id, False


async def _disconnected(request) -> None:
    """Return when the client closes its connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class OpenAIServing:
    def __init__(self, engine, served_model_names: list[str], media: MediaPolicy, metrics, *,
                 max_num_seqs: int, max_queued_requests: int, chat_template: str | None = None,
                 executor: ThreadPoolExecutor | None = None, cache_salt_per_key: bool = False):
        self.engine = engine  # AsyncEngine
        self.llm = engine.engine  # LLMEngine
        self.names = list(served_model_names)
        self.media, self.metrics = media, metrics
        self.chat_template = chat_template
        self.cache_salt_per_key = cache_salt_per_key
        self.admission = Admission(max_num_seqs + max_queued_requests)
        self.executor = executor or ThreadPoolExecutor(max_workers=4, thread_name_prefix="llava-next-prep")
        self.active: dict[str, _Active] = {}
        self.created = int(time.time())
        self.tokenizer = self.llm.tokenizer
        self.processor = self.llm.processor
        self.image_limit = getattr(self.llm, "image_limit", 8)
        self.image_token = getattr(self.processor, "image_token", "<image>")

    # -- shared checks -------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise APIError(404, f"the model {clean(name, 80)!r} does not exist; this server serves "
                                f"{self.names[0]!r}", "not_found_error", "model", "model_not_found")

    def sampling_params(self, req, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        greedy_default = req.temperature is None  # OpenAI's default temperature is 1.0
        try:
            return SamplingParams(
                n=req.n, temperature=0.0 if req.top_p == 0 else 1.0 if greedy_default else float(req.temperature),
                top_p=1.0 if req.top_p in (None, 0) else float(req.top_p), top_k=req.top_k or 0,  # top_p 0: greedy
                min_p=req.min_p or 0.0, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos, max_tokens=max_tokens, min_tokens=req.min_tokens, logprobs=logprobs,
                repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
                presence_penalty=float(req.presence_penalty or 0.0),
                frequency_penalty=float(req.frequency_penalty or 0.0),
                skip_special_tokens=req.skip_special_tokens)
        except SamplingParamsError as exc:
            raise from_library(exc) from None

    def cache_salt(self, req, request) -> str | None:
        """The engine's cache salt: the client's `cache_salt`, and the API key's digest when salting per key."""
        salt = req.cache_salt
        if self.cache_salt_per_key:
            key = request.headers.get("authorization", "").encode("utf-8", "replace")
            salt = f"key:{hashlib.sha256(key).hexdigest()}|{salt or ''}"
        return salt

    def _common(self, req) -> None:
        problem = P.unsupported(req)
        if problem is not None:
            raise bad_request(problem[1], problem[0], "unsupported_parameter")
        self.check_model(req.model)

    # -- chat ----------------------------------------------------------------------------------------------
    def _conversation(self, req: P.ChatCompletionRequest) -> tuple[list[dict], list[str]]:
        """(messages for the chat template, image URLs in order); 400 for what the template cannot take."""
        try:  # the identity loader: the media policy fetches the URLs later, in its own pool
            messages, urls = split_messages(req.messages, image_token=self.image_token)
        except ModelInputError as exc:
            raise bad_request(str(exc), "messages", "invalid_content") from None
        if len(urls) > self.image_limit:
            raise bad_request(f"the request has {len(urls)} images; at most {self.image_limit} are allowed per "
                              "prompt (--limit-mm-per-prompt)", "messages", "too_many_images")
        return messages, urls

    def _prepare_chat(self, messages: list[dict], images: list, params: SamplingParams, salt: str | None):
        """Worker thread: template, engine.prepare (the images are loaded already, in the image pool)."""
        try:
            text = self.processor.apply_chat_template(messages, chat_template=self.chat_template,
                                                      add_generation_prompt=True)
        except ValueError as exc:
            raise bad_request(f"the chat template could not render the messages: {exc}", "messages",
                              "invalid_messages") from None
        salted = {} if salt is None else {"cache_salt": salt}
        return self.llm.prepare({"prompt": text, "multi_modal_data": {"image": images}, **salted}, params)

    async def chat(self, req: P.ChatCompletionRequest, request):
        arrival = time.monotonic()
        self._common(req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs", "invalid_parameter")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(req, max_tokens, logprobs)
        constraint, tools, field = constraints.plan(req)  # response_format, tools, structured_outputs (400s)
        params = constraints.with_constraint(params, constraint, req.logit_bias)
        messages, urls = self._conversation(req)
        salt = self.cache_salt(req, request)
        return await self._serve("chat", req, params, arrival, request, constraints.guard(
            lambda images: self._prepare_chat(messages, images, params, salt), field), urls, tools)

    # -- completions ---------------------------------------------------------------------------------------
    async def completion(self, req: P.CompletionRequest, request):
        arrival = time.monotonic()
        self._common(req)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad_request("batched prompts are not supported: send one prompt per request", "prompt",
                                  "unsupported_parameter")
            prompt = prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise bad_request("prompt must not be empty", "prompt", "invalid_parameter")
        if isinstance(prompt, str) and self.image_token in prompt:
            raise bad_request(f"the prompt holds the image placeholder {self.image_token!r}; /v1/completions takes "
                              "text only", "prompt", "invalid_content")
        params = self.sampling_params(req, req.max_tokens, req.logprobs)
        constraint, _, field = constraints.plan(req)  # vLLM's structured_outputs
        params = constraints.with_constraint(params, constraint, req.logit_bias)
        engine_prompt = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
        salt = self.cache_salt(req, request)
        if salt is not None:
            engine_prompt["cache_salt"] = salt
        return await self._serve("completion", req, params, arrival, request,
                                 constraints.guard(lambda _images: self.llm.prepare(engine_prompt, params), field))

    # -- the common path -----------------------------------------------------------------------------------
    async def _serve(self, kind: str, req, params: SamplingParams, arrival: float, request, prepare,
                     urls: list[str] = (), tools=None):
        if not self.engine.healthy:
            raise from_library(EngineDeadError("the engine is not running"))
        self.admission.acquire(params.n)  # no await before this line: the count is exact
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        active = _Active(request_id)
        handed_over = False
        try:
            loop = asyncio.get_running_loop()
            limit = self.media.timeout * max(1, len(urls)) + 20.0
            try:
                images = await asyncio.wait_for(loop.run_in_executor(
                    self.media.executor, self.media.load_all, list(urls)), limit) if urls else []
                prepared = await asyncio.wait_for(loop.run_in_executor(self.executor, prepare, images), limit)
            except asyncio.TimeoutError:
                raise bad_request("preparing the request took too long (image download or decoding)", "messages",
                                  "timeout") from None
            except Exception as exc:  # typed library errors -> 4xx; anything else -> 500 without details
                error = from_library(exc)
                if error.status >= 500:
                    logger.error("preparing %s failed", request_id, exc_info=exc)
                raise error from None
            self.active[request_id] = active
            stream = self.engine.submit(request_id, prepared)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            if req.stream:
                handed_over = True
                return sse_stream(self, kind, request_id, stream, prepared, params, arrival, include_usage, active,
                                  req.model or self.names[0], tools)
            return await self._full(kind, request_id, stream, prepared, params, arrival, request, active,
                                    req.model or self.names[0], tools)
        except EngineDeadError as exc:
            raise from_library(exc) from None
        finally:
            if not handed_over:
                self.active.pop(request_id, None)
                self.admission.release(params.n)

    async def _full(self, kind, request_id, stream, prepared, params, arrival, request, active, model, tools=None):
        async def consume():
            first, last = None, None
            async for out in stream:
                if first is None and any(c.token_ids for c in out.outputs):
                    first = time.monotonic()
                last = out
            return first, last

        task = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:  # the client left: free its slot now
                self.engine.abort(request_id)
                task.cancel()
                raise APIError(499, "the client closed the connection", "client_closed", None, "client_closed")
            first, out = task.result()
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
        if active.shutdown or any(c.finish_reason == "abort" for c in out.outputs):
            raise APIError(503, "the server is shutting down; the request was not finished", "service_unavailable",
                           None, "server_shutdown", {"Retry-After": "5"})
        now = time.monotonic()
        n_out = sum(len(c.token_ids) for c in out.outputs)
        self.metrics.observe(arrival, first, now, len(out.prompt_token_ids), n_out,
                             [c.finish_reason for c in out.outputs])
        use = P.usage(len(out.prompt_token_ids), n_out, out.num_cached_tokens)
        created = int(time.time())
        if kind == "chat":
            choices = [P.ChatChoice(index=c.index, message=P.ChatMessage(content=c.text) if tools is None else
                                    P.ChatMessage(content=None, tool_calls=tools.calls(c.index, c.text)),
                                    logprobs=chat_logprobs(self.tokenizer, c.token_ids, c.logprobs, params),
                                    finish_reason=c.finish_reason if tools is None else
                                    tools.finish_reason(c.finish_reason)) for c in out.outputs]
            body = P.ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=use)
        else:
            choices = [P.CompletionChoice(index=c.index, text=c.text,
                                          logprobs=completion_logprobs(self.tokenizer, c.token_ids, c.logprobs,
                                                                       params, 0),
                                          finish_reason=c.finish_reason) for c in out.outputs]
            body = P.CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=use)
        return body

    # -- draining ------------------------------------------------------------------------------------------
    def end_all(self) -> int:
        """Abort every admitted request (the drain deadline came); their responses end with an error."""
        for active in list(self.active.values()):
            active.shutdown = True
            self.engine.abort(active.request_id)
        return len(self.active)
