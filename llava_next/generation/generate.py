"""generate(): prefill with images once, then a decode loop over a preallocated KV cache.

Semantics are transformers' `generate` for decoder-only models: output is prompt + new tokens, rows that
finished are padded with `pad_token_id`, the loop stops when every row has hit EOS (or a stop string) or
`max_new_tokens` is reached; the length defaults come from the checkpoint's generation_config.json.
Images are encoded once, in the prefill (`LlavaNextModel.embed`); the decode step only embeds tokens.
Positions come from the attention mask, so a left-padded row decodes exactly as it would alone; a padded
batch is prefilled run by run (rows of one length together, real tokens only) and then decodes together.
On a float32 CPU head, greedy and top-k sampling choose tokens through screened_head.py (same tokens).

Everything is validated before the first forward pass: the model inputs (`LlavaNextModel.check_inputs`),
the names and kinds of the generation arguments (`check_generate_kwargs`: a typo or an unknown name is refused,
as transformers does), their values (sampling.py), and the prompt (image tokens included) plus
`max_new_tokens` against the context (ContextLengthError). `max_time` stops the loop on the host, as
transformers' MaxTimeCriteria (the time counts from the start of the call, prefill included).

Leaves out: num_return_sequences > 1, assisted/contrastive decoding. Beam search lives in beam_search.py.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from functools import partial

import torch

from llava_next.errors import ContextLengthError, GenerationArgumentError
from llava_next.generation.runner import engine_for
from llava_next.compat.generation_config import BOOKKEEPING
from llava_next.generation.kv_cache import StaticKVCache
from llava_next.compat.modeling import positions_from_mask
from llava_next.generation.outputs import ModelOutput
from llava_next.sampling.logits import HF_DEFAULTS, UNSUPPORTED, LogitsPipeline, SamplingParams, check_number, validate_max_new_tokens
from llava_next.sampling.stopping import StopStrings, eos_reached, eos_token_tensor

# generate() keyword arguments that are about the loop, not about picking tokens.
_LOOP_ARGS = ("max_new_tokens", "max_length", "eos_token_id", "pad_token_id", "bos_token_id", "stop_strings",
              "streamer", "tokenizer", "generator", "return_dict_in_generate", "output_scores", "output_logits",
              "use_cache", "num_beams", "length_penalty", "early_stopping", "output_attentions",
              "output_hidden_states", "generation_config", "cache_implementation", "max_time", "reuse_prefix")
# transformers GenerationConfig fields that change no token here: bookkeeping, compile and cache settings, and
# assisted-decoding knobs that only act with an assistant model (refused in sampling.UNSUPPORTED).
_BOOKKEEPING = BOOKKEEPING + ("decoder_start_token_id", "is_assistant",
                "disable_compile", "compile_config", "cache_config", "max_cache_len", "low_memory",
                "prefill_chunk_size", "continuous_batching_config", "num_assistant_tokens",
                "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind",
                "target_lookbehind", "assistant_ensemble_weight", "max_matching_ngram_size")
# Model inputs transformers' generate() passes on to forward(): checked, or refused unless None.
_MODEL_KWARGS = ("position_ids", "past_key_values", "vision_feature_layer", "vision_feature_select_strategy")
# Every keyword generate() takes besides its named inputs; a name outside this set (a typo) is refused.
GENERATION_ARGUMENTS = frozenset(_LOOP_ARGS) | set(HF_DEFAULTS) | set(UNSUPPORTED) | set(_BOOKKEEPING)


@dataclass
class GenerationPlan:
    """Everything resolved from arguments + generation_config before any forward pass."""

    max_new_tokens: int
    eos: torch.Tensor | None
    pad_token_id: int
    sampling: SamplingParams
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    stop: StopStrings | None = None
    deadline: float | None = None  # time.monotonic() past which generation stops (max_time)

    def out_of_time(self) -> bool:
        """transformers' MaxTimeCriteria, on the host: True once max_time has passed since generate() began."""
        return self.deadline is not None and time.monotonic() > self.deadline


def _merged_generation_config(model, kwargs) -> dict:
    config = dict(getattr(model, "generation_config", None) or {})
    override = kwargs.get("generation_config")
    if override is not None:
        items = override.to_dict() if hasattr(override, "to_dict") else dict(override)
        config.update({k: v for k, v in items.items() if v is not None})
    return config


def check_generate_kwargs(model, kwargs: dict) -> None:
    """Refuse unknown names (typos) and arguments of the wrong kind before any work, as transformers'
    `_validate_model_kwargs` does; a None value means "not given", as there."""
    unknown = sorted(k for k, v in kwargs.items()
                     if v is not None and k not in GENERATION_ARGUMENTS and k not in _MODEL_KWARGS)
    if unknown:
        raise GenerationArgumentError(f"generate() got arguments it does not use: {unknown} (check for typos)")
    for name in ("position_ids", "past_key_values"):
        if kwargs.get(name) is not None:
            raise GenerationArgumentError(f"`{name}` is not supported by generate(): positions come from "
                                          "attention_mask and the KV cache is generate()'s own")
    model.model._check_overrides(kwargs.get("vision_feature_layer"), kwargs.get("vision_feature_select_strategy"))
    if kwargs.get("output_hidden_states"):
        raise GenerationArgumentError("`output_hidden_states=True` is not supported by generate(); run "
                                      "model(sequences, output_hidden_states=True) on its output instead")
    if kwargs.get("output_attentions"):
        raise GenerationArgumentError("`output_attentions=True` is not supported: attention runs in fused kernels "
                                      "that never form the attention weights")
    config = kwargs.get("generation_config")
    if config is not None and not isinstance(config, dict) and not hasattr(config, "to_dict"):
        raise GenerationArgumentError(f"`generation_config` must be a GenerationConfig or a dict, got {config!r}")
    streamer = kwargs.get("streamer")
    if streamer is not None and not all(callable(getattr(streamer, m, None)) for m in ("put", "end")):
        raise GenerationArgumentError(f"`streamer` must have put() and end() methods, got {streamer!r}")
    generator = kwargs.get("generator")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise GenerationArgumentError(f"`generator` must be a torch.Generator, got {generator!r}")
        if generator.device.type != model.device.type:
            raise GenerationArgumentError(f"`generator` is on {generator.device}, the model on {model.device}")
    strings = kwargs.get("stop_strings")
    if strings is not None:
        if not isinstance(strings, (str, list, tuple)) or not all(isinstance(x, str) for x in strings):
            raise GenerationArgumentError(f"`stop_strings` must be a string or a list of strings, got {strings!r}")
        if kwargs.get("tokenizer") is None:
            raise GenerationArgumentError("stop_strings needs tokenizer= (e.g. processor.tokenizer)")


def plan_generation(model, prompt_len: int, kwargs: dict, embedded_prompt: bool = False) -> GenerationPlan:
    """Check the arguments, then resolve lengths, special ids and sampling settings (transformers' priority order).

    embedded_prompt: the prompt came as inputs_embeds alone, so (as transformers) the output holds only the new
    tokens and min_length does not count the prompt."""
    start = time.monotonic()  # transformers' MaxTimeCriteria counts from here, before the prefill
    check_generate_kwargs(model, kwargs)
    gen = _merged_generation_config(model, kwargs)

    def pick(name, default=None):
        if kwargs.get(name) is not None:
            return kwargs[name]
        return gen.get(name, default) if gen.get(name) is not None else default

    max_new, max_length = pick("max_new_tokens"), pick("max_length")
    if max_length is not None:
        check_number("max_length", max_length, integer=True)
    context = model.config.text_config.max_position_embeddings
    if max_new is None and max_length is None:
        max_new = max(1, min(20, context - prompt_len))  # transformers: 20 new tokens when nothing is set
    elif max_new is None:
        max_new = max_length - prompt_len
        if max_new <= 0:
            raise GenerationArgumentError(
                f"the prompt has {prompt_len} tokens, already at max_length={max_length}; set max_new_tokens instead"
            )
    max_new = validate_max_new_tokens(max_new)
    if prompt_len + max_new > context:
        raise ContextLengthError(
            f"prompt of {prompt_len} tokens (image tokens included) + max_new_tokens={max_new} exceeds the model's "
            f"context of {context} tokens; shorten the prompt, use fewer or smaller images, or lower max_new_tokens"
        )
    text_cfg = model.config.text_config
    eos_id = pick("eos_token_id", text_cfg.eos_token_id)
    eos = eos_token_tensor(eos_id, device=model.device)
    pad = pick("pad_token_id", text_cfg.pad_token_id)
    if pad is None:
        pad = int(eos[0]) if eos is not None else 0  # as transformers: pad with the (first) EOS id
    vocab = model.get_input_embeddings().num_embeddings  # finished rows feed the pad id back in
    check_number("pad_token_id", pad, integer=True)
    if not 0 <= pad < vocab:
        raise GenerationArgumentError(f"`pad_token_id` must be a token id in 0..{vocab - 1}, got {pad}")
    num_beams = pick("num_beams", 1)
    check_number("num_beams", num_beams, integer=True)
    if num_beams < 1:
        raise GenerationArgumentError(f"`num_beams` must be >= 1, got {num_beams}")
    length_penalty = pick("length_penalty", 1.0)
    check_number("length_penalty", length_penalty)
    early_stopping = pick("early_stopping", False)
    if early_stopping not in (True, False, "never"):
        raise GenerationArgumentError(f"`early_stopping` must be True, False or 'never', got {early_stopping!r}")
    sampling_kwargs = {k: v for k, v in kwargs.items() if k not in _LOOP_ARGS}
    gen_sampling = {k: v for k, v in gen.items() if k not in _LOOP_ARGS}
    sampling = SamplingParams.from_generate_kwargs(sampling_kwargs, gen_sampling)
    if embedded_prompt:
        sampling = dataclasses.replace(sampling, min_length=max(sampling.min_length - prompt_len, 0))
    stop = None if kwargs.get("stop_strings") is None else StopStrings(kwargs["tokenizer"], kwargs["stop_strings"])
    max_time = pick("max_time")
    if max_time is not None:
        check_number("max_time", max_time)
        if max_time <= 0:
            raise GenerationArgumentError(f"`max_time` must be > 0 seconds, got {max_time}")
    deadline = None if max_time is None else start + max_time
    return GenerationPlan(max_new, eos, pad, sampling, num_beams, float(length_penalty), early_stopping, stop,
                          deadline)


RAGGED_MIN_TOKENS = 128  # padded batches at least this wide are prefilled run by run (shorter: launches dominate)


def ragged_prefill_runs(attention_mask: torch.Tensor) -> list[tuple[slice, int]] | None:
    """(rows, pad) runs of consecutive equally padded rows, to prefill one by one; None: one batched pass.

    A padded batch needs a masked attention, which takes a slow kernel (SDPA's math path on a CPU, no flash
    kernel on a GPU) and computes the pad positions too; runs of equally long rows take the plain causal
    kernel over real tokens only. Only left-padded masks (0...0 1...1 per row) with no empty row qualify.
    """
    B, T = attention_mask.shape
    if B == 1 or T < RAGGED_MIN_TOKENS:
        return None
    lengths = attention_mask.long().sum(1)  # (B,)
    pads = T - lengths
    left_padded = torch.arange(T, device=attention_mask.device)[None] >= pads[:, None]  # (B, T)
    if not bool((attention_mask.bool() == left_padded).all()) or int(lengths.min()) == 0 or int(pads.max()) == 0:
        return None
    runs, first = [], 0
    pads = pads.tolist()
    for row in range(1, B + 1):
        if row == B or pads[row] != pads[first]:
            runs.append((slice(first, row), pads[first]))
            first = row
    return runs


class Prefill:
    """Images + prompt -> a filled KV cache, the last position's hidden state (B, D) and logits (B, V, unless
    head=False); also the per-row next position."""

    def __init__(self, model, input_ids, attention_mask, pixel_values, image_sizes, inputs_embeds, extra_slots: int,
                 batch_repeat: int = 1, reuse_prefix: bool = False, head: bool = True):
        core = model.model
        embeds = core.embed(input_ids, pixel_values, image_sizes, inputs_embeds)  # (B, T, D)
        B, T, _ = embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=embeds.device)
        attention_mask = attention_mask.to(embeds.device)
        if batch_repeat > 1:  # beam search: every beam starts from its row's prompt
            embeds = embeds.repeat_interleave(batch_repeat, 0)
            attention_mask = attention_mask.repeat_interleave(batch_repeat, 0)
        positions = positions_from_mask(attention_mask)
        engine = engine_for(model)
        reused = engine.take_prefix(embeds, T + extra_slots) if reuse_prefix and bool(attention_mask.all()) else None
        if reused is not None:  # the conversation so far is already in the cache: run only the new tokens
            self.cache, start = reused
            hidden = core.language_model(embeds[:, start:], positions[:, start:], None, cache=self.cache)
            last = hidden[:, -1]  # (1, D)
        else:
            self.cache = engine.cache_for(embeds.shape[0], T + extra_slots, embeds.dtype)
            runs = ragged_prefill_runs(attention_mask) if batch_repeat == 1 else None
            if runs is None:  # one pass over the padded batch
                last = core.language_model(embeds, positions, attention_mask.bool(), cache=self.cache)[:, -1]
            else:  # run by run, real tokens only, each into its own slots of the batch cache
                last = torch.cat([core.language_model(embeds[rows, p:], positions[rows, p:], None,
                                                      cache=self.cache.row_view(rows, p))[:, -1]
                                  for rows, p in runs])
                self.cache.filled(T)
        self.embeds = embeds if reuse_prefix else None
        self.hidden = last  # (B, D)
        self.logits = model.lm_head(self.hidden) if head else None  # (B, V): lm_head only where we sample
        self.next_position = positions[:, -1] + 1  # (B,) matches HF: the last position + 1, padding or not


def decode_step(model, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
                head: bool = True) -> torch.Tensor:
    """tokens (B,), positions (B,) -> logits (B, V) for the next token (or, head=False, the last hidden state
    (B, D)); writes one cache slot."""
    return engine_for(model).step(tokens, positions, cache, head=head)


def _prompt_ids(input_ids, inputs_embeds):
    if input_ids is not None:
        return input_ids
    # Without input_ids transformers returns only the new tokens; an empty (B, 0) prompt does the same.
    return torch.empty(inputs_embeds.shape[0], 0, dtype=torch.long, device=inputs_embeds.device)


_LOCK = threading.Lock()


def generate(model, input_ids=None, attention_mask=None, pixel_values=None, image_sizes=None, inputs_embeds=None,
             **kwargs):
    """transformers-compatible generate: returns (B, prompt + new) ids, or a ModelOutput with return_dict_in_generate.

    Beyond transformers: `reuse_prefix=True` (batch 1) keeps the KV cache of this call, and a next call whose
    prompt starts with the same tokens and images (a conversation's next turn) prefills only what is new.
    """
    model.model.check_inputs(input_ids, attention_mask, pixel_values, image_sizes, inputs_embeds)
    prompt_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    plan = plan_generation(model, prompt_len, kwargs, embedded_prompt=input_ids is None)
    if plan.num_beams > 1:
        from llava_next.generation.beam_search import beam_search

        return beam_search(model, plan, input_ids, attention_mask, pixel_values, image_sizes, inputs_embeds, kwargs)
    streamer = kwargs.get("streamer")
    batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
    if streamer is not None and batch > 1:
        raise GenerationArgumentError(f"a streamer takes one sequence, got a batch of {batch}")
    stop = plan.stop
    want_scores, want_logits = kwargs.get("output_scores"), kwargs.get("output_logits")
    generator = kwargs.get("generator")
    # NOTE: one model object, one generation at a time: concurrent calls would share module state such as the
    # compiled step, so they are serialised instead of cross-wired.
    with _LOCK, torch.inference_mode():
        prompt = _prompt_ids(input_ids, inputs_embeds).to(model.device)
        B, P = prompt.shape  # P = 0 with inputs_embeds alone: the output is the new tokens only
        reuse = bool(kwargs.get("reuse_prefix"))
        processors = LogitsPipeline(plan.sampling, plan.eos, P)
        # Greedy or top-k sampling without scores on a float32 CPU head: the screened lm_head (screened_head.py).
        screen = engine_for(model).head_screen(processors.screen_k, bool(want_scores or want_logits))
        prefill = Prefill(model, input_ids, attention_mask, pixel_values, image_sizes, inputs_embeds,
                          plan.max_new_tokens, reuse_prefix=reuse, head=screen is None)
        cache, position = prefill.cache, prefill.next_position
        out = prefill.logits if screen is None else prefill.hidden  # (B, V) logits or (B, D) hidden
        sequences = torch.full((B, P + plan.max_new_tokens), plan.pad_token_id, dtype=torch.long,
                               device=model.device)
        sequences[:, :P] = prompt
        unfinished = torch.ones(B, dtype=torch.bool, device=model.device)
        # Left padding is not "seen" by the repetition penalty (transformers' prompt_ignore_length).
        valid = None
        if attention_mask is not None:
            leading_pad = (attention_mask != 0).int().argmax(1).to(model.device)  # (B,)
            valid = torch.arange(sequences.shape[1], device=model.device)[None] >= leading_pad[:, None]
        scores, raw_logits = [], []
        if streamer is not None:
            streamer.put(prompt.cpu())
        length = P
        try:
            for step in range(plan.max_new_tokens):
                history, seen = sequences[:, :length], None if valid is None else valid[:, :length]
                if screen is not None:
                    tokens = screen(out, processors.screen_k, partial(processors.monotone, history, valid=seen),
                                    partial(processors.choose, history, valid=seen, generator=generator))
                else:
                    processed = processors(history, out, seen)
                    if want_scores:
                        scores.append(processed.clone())  # may alias the graph's reused output buffer
                    if want_logits:
                        raw_logits.append(out.float().clone())  # the graph's output buffer is reused
                    tokens = processors.sample(processed, generator)  # (B,)
                tokens = torch.where(unfinished, tokens, plan.pad_token_id)
                sequences[:, length] = tokens
                length += 1
                if streamer is not None:
                    streamer.put(tokens.cpu())
                unfinished = unfinished & ~eos_reached(tokens, plan.eos)
                if stop is not None:
                    unfinished = unfinished & ~stop(sequences[:, :length])
                if step + 1 == plan.max_new_tokens or plan.out_of_time() or not bool(unfinished.any()):
                    break
                out = decode_step(model, tokens, position, cache, head=screen is None)
                position = position + 1
        finally:
            if streamer is not None:
                streamer.end()
        if reuse:  # remember what the cache holds (prompt + all but the last new token) for the next turn
            new = model.model.language_model.embed_tokens(sequences[:, P:length - 1])
            engine_for(model).remember(torch.cat([prefill.embeds, new], dim=1), cache)
        out = sequences[:, :length]
    if kwargs.get("return_dict_in_generate"):
        return ModelOutput(sequences=out, scores=tuple(scores) if want_scores else None,
                           logits=tuple(raw_logits) if want_logits else None)
    return out
