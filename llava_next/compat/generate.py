"""generate(): transformers' generate() as a front on the engine's ModelRunner (compat/paged_rows.py).

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

import torch

from llava_next.compat.beam_search import beam_search
from llava_next.compat.generate_args import plan_generation
from llava_next.compat.outputs import ModelOutput
from llava_next.compat.paged_rows import Rows, decode_step, prefill, prompt_ids
from llava_next.errors import GenerationArgumentError
from llava_next.sampling.logits import LogitsPipeline
from llava_next.sampling.stopping import eos_reached


def generate(model, input_ids=None, attention_mask=None, pixel_values=None, image_sizes=None, inputs_embeds=None,
             **kwargs):
    """transformers-compatible generate: returns (B, prompt + new) ids, or a ModelOutput with return_dict_in_generate.

    Beyond transformers: `reuse_prefix=True` (batch 1) keeps the KV blocks of this call, and a next call whose
    prompt starts with the same tokens and images (a conversation's next turn) prefills only what is new.
    A `streamer` is always ended, also when the call fails (before or during generation), so its consumer
    never waits forever; the error is re-raised here.
    """
    try:
        return _generate(model, input_ids, attention_mask, pixel_values, image_sizes, inputs_embeds, kwargs)
    except BaseException:
        end = getattr(kwargs.get("streamer"), "end", None)
        if callable(end):
            end()
        raise


def _generate(model, input_ids, attention_mask, pixel_values, image_sizes, inputs_embeds, kwargs):
    model.model.check_inputs(input_ids, attention_mask, pixel_values, image_sizes, inputs_embeds)
    prompt_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    plan = plan_generation(model, prompt_len, kwargs)
    if plan.num_beams > 1:
        return beam_search(model, plan, input_ids, attention_mask, pixel_values, image_sizes, inputs_embeds, kwargs)
    streamer = kwargs.get("streamer")
    batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
    if streamer is not None and batch > 1:
        raise GenerationArgumentError(f"a streamer takes one sequence, got a batch of {batch}")
    want_scores, want_logits = bool(kwargs.get("output_scores")), bool(kwargs.get("output_logits"))
    # NOTE: one model object, one generation at a time: concurrent calls would share the model's runner (pooled
    # caches, the compiled step), so they are serialised by the model's own lock instead of cross-wired.
    with model.generation_lock, torch.inference_mode():
        prompt = prompt_ids(input_ids, inputs_embeds).to(model.device)
        B, P = prompt.shape  # P = 0 with inputs_embeds alone: the output is the new tokens only
        reuse = bool(kwargs.get("reuse_prefix"))
        processors = LogitsPipeline(plan.sampling, plan.eos, P)
        # Greedy or top-k sampling without scores on a float32 CPU head: the screened lm_head (screened_head.py).
        runner = model.decode_runner()
        screen = runner.head_screen(processors.screen_k, want_scores or want_logits)
        embeds = model.model.embed(input_ids, pixel_values, image_sizes, inputs_embeds)  # (B, T, D)
        rows, first = prefill(runner, embeds, attention_mask, plan.max_new_tokens, reuse, head=screen is None)
        sequences = torch.full((B, P + plan.max_new_tokens), plan.pad_token_id, dtype=torch.long,
                               device=model.device)
        sequences[:, :P] = prompt
        # Left padding is not "seen" by the repetition penalty (transformers' prompt_ignore_length).
        valid = None
        if attention_mask is not None:
            leading_pad = (attention_mask != 0).int().argmax(1).to(model.device)  # (B,)
            valid = torch.arange(sequences.shape[1], device=model.device)[None] >= leading_pad[:, None]
        vocab = model.lm_head.out_features
        seen = LogitsPipeline.seen_tokens(prompt, vocab, None if valid is None else valid[:, :P]) \
            if processors.uses_history else None
        scores, raw_logits = [], []
        if streamer is not None:
            streamer.put(prompt.cpu())
        pick = _token_picker(processors, screen, kwargs.get("generator"), valid, seen,
                             scores if want_scores else None, raw_logits if want_logits else None)
        try:
            length = _decode_loop(plan, rows, first, sequences, P, pick, seen, valid, streamer, head=screen is None)
        except BaseException:
            rows.release()
            raise
        if streamer is not None:
            streamer.end()
        if reuse:  # remember what the cache holds (prompt + all but the last new token) for the next turn
            new = model.model.language_model.embed_tokens(sequences[:, P:length - 1])
            runner.remember(torch.cat([embeds, new], dim=1), rows)
        else:
            rows.release()
        out = sequences[:, :length]
    if kwargs.get("return_dict_in_generate"):
        return ModelOutput(sequences=out, scores=tuple(scores) if want_scores else None,
                           logits=tuple(raw_logits) if want_logits else None)
    return out


def _token_picker(processors: LogitsPipeline, screen, generator, valid, seen, scores: list | None,
                  raw_logits: list | None):
    """pick(out (B, V) logits or (B, D) hidden, history (B, t)) -> tokens (B,): the mode is decided here, once,
    so the loop carries no flags. `seen` is the incremental repetition mask (None without the penalty)."""
    def view(history):
        return None if valid is None else valid[:, : history.shape[1]]

    if screen is not None:  # greedy or top-k sampling through the screened lm_head
        def pick(out, history):
            seen_here = view(history)
            return screen(out, processors.screen_k,
                          lambda logits: processors.monotone(history, logits, seen_here, seen=seen),
                          lambda logits: processors.choose(history, logits, seen_here, generator, seen))
        return pick
    if scores is None and raw_logits is None:
        def pick(out, history):
            return processors.sample(processors(history, out, view(history), seen=seen), generator)
        return pick

    def pick(out, history):  # output_scores / output_logits: keep copies (the graph reuses its output buffer)
        processed = processors(history, out, view(history), seen=seen)
        if scores is not None:
            scores.append(processed.clone())
        if raw_logits is not None:
            raw_logits.append(out.float().clone())
        return processors.sample(processed, generator)
    return pick


def _decode_loop(plan, rows: Rows, out: torch.Tensor, sequences: torch.Tensor, prompt_len: int, pick, seen, valid,
                 streamer, head: bool) -> int:
    """Fill sequences[:, prompt_len:] token by token until every row stopped or the budget is spent; returns
    the filled length. Finished rows get pad_token_id."""
    B = sequences.shape[0]
    unfinished = torch.ones(B, dtype=torch.bool, device=sequences.device)
    pad = torch.tensor(plan.pad_token_id, device=sequences.device)
    stop, eos = plan.stop, plan.eos
    length = prompt_len
    for step in range(plan.max_new_tokens):
        tokens = torch.where(unfinished, pick(out, sequences[:, :length]), pad)  # (B,)
        sequences[:, length] = tokens
        length += 1
        if seen is not None:  # valid: transformers ignores each row's first leading-pad-many positions
            LogitsPipeline.mark_seen(seen, tokens, None if valid is None else valid[:, length - 1])
        if streamer is not None:
            streamer.put(tokens.cpu())
        unfinished &= ~eos_reached(tokens, eos)
        if stop is not None:
            unfinished &= ~stop(sequences[:, :length])
        if step + 1 == plan.max_new_tokens or plan.out_of_time() or not bool(unfinished.any()):
            break
        out = decode_step(rows, tokens, head)
    return length
