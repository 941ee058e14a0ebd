"""Beam search (and beam sampling) with transformers 5.23's `_beam_search` semantics, over one shared KV cache.

Images are encoded once: the prefill embeds the prompt for each batch row and repeats it `num_beams` times
(`Prefill(batch_repeat=num_beams)`), where transformers expands pixel_values and runs the vision tower on every
copy. After each step the cache rows are gathered by beam parent (`StaticKVCache.reorder`), unless every beam
continued its own row. One host sync per step decides both that and whether the search goes on.

The search itself follows transformers' vectorised formulation step for step, so the same float32 operations
pick the same beams:

* scores: `log_softmax(float32 logits)`, then the logits processors applied to the log-probs (repetition
  penalty, min_length / min_new_tokens; with `do_sample` temperature / top_k / top_p / min_p keeping
  `len(eos) + 1` tokens), then the running beam score is added. At the first step only beam 0 is live
  (the others start at -1e9).
* candidates: the top `K = max(2, 1 + len(eos)) * num_beams` of the flattened (num_beams * vocab) scores
  per batch row (`torch.multinomial` without replacement when sampling).
* a candidate whose last token is EOS (or that reaches max_length or max_time, or a stop string) is finished:
  it joins the finished set (length-penalised score `sum_logprobs / new_tokens ** length_penalty`) only if it
  is among the top `num_beams` candidates; the best `num_beams` unfinished candidates keep running.
* stop: per batch row transformers' early-stop heuristic (`early_stopping` False / True / "never"), and the
  loop ends when no row can improve, every row is full with `early_stopping=True`, or all candidates hit a
  stop criterion.

Output: the best finished hypothesis per row, prompt included (only new tokens with `inputs_embeds` alone),
cropped to the longest returned hypothesis; shorter ones are filled with transformers' fill value
(`pad_token_id`, or the first EOS when pad is 0, or -1 without EOS). `return_dict_in_generate=True` gives
`sequences`, `beam_indices`, and with `output_scores` `sequences_scores` + per-step processed log-probs
`scores`, with `output_logits` the raw float32 `logits`.

Leaves out: num_return_sequences > 1 (refused by SamplingParams), group/constrained beam search, streamers
(transformers refuses them with beams too), low_memory.
"""

from __future__ import annotations

import torch

from llava_next.errors import GenerationArgumentError
from llava_next.generation.prefill import Prefill, decode_step, prompt_ids
from llava_next.generation.outputs import ModelOutput
from llava_next.sampling.logits import LogitsPipeline

_NEG = -1.0e9  # transformers' "impossible" score


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, N, ...) and index (B, M) -> (B, M, ...): t[b, index[b, m]]."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


def beam_search(model, plan, input_ids, attention_mask, pixel_values, image_sizes, inputs_embeds, kwargs):
    """generate() with num_beams > 1: (B, prompt + new) ids, or a ModelOutput with return_dict_in_generate."""
    n = plan.num_beams
    early_stopping = plan.early_stopping  # True, False or "never" (checked by plan_generation)
    if kwargs.get("streamer") is not None:
        raise GenerationArgumentError("`streamer` cannot be used with beam search; set num_beams=1")
    length_penalty = plan.length_penalty
    stop = plan.stop
    want_scores, want_logits = kwargs.get("output_scores"), kwargs.get("output_logits")
    return_dict = kwargs.get("return_dict_in_generate")
    generator = kwargs.get("generator")

    eos = plan.eos
    n_eos = 0 if eos is None else eos.numel()
    K = max(2, 1 + n_eos) * n  # candidates kept per step, so that n unfinished ones always remain
    # transformers: `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1` (a pad of 0 is falsy)
    fill = -1 if eos is None else (plan.pad_token_id if plan.pad_token_id != 0 else int(eos[0]))

    params = plan.sampling
    do_sample = params.do_sample
    with model.generation_lock, torch.inference_mode():
        device = model.device
        prompt = prompt_ids(input_ids, inputs_embeds).to(device)  # (B, P); P = 0 with inputs_embeds alone
        B, P = prompt.shape
        max_new = plan.max_new_tokens
        max_length = P + max_new
        # transformers' beam sampling keeps at least #EOS + 1 tokens (2 without EOS ids) in top_k / top_p / min_p
        processors = LogitsPipeline(params, eos, P, min_tokens_to_keep=n_eos + 1 if eos is not None else 2)
        ignore = None  # repetition penalty skips each row's left padding, as transformers' prompt_ignore_length
        if params.repetition_penalty != 1.0 and attention_mask is not None:
            ignore = (attention_mask.to(device) != 0).int().argmax(dim=1).repeat_interleave(n)  # (B*n,)

        prefill = Prefill(model, input_ids, attention_mask, pixel_values, image_sizes, inputs_embeds,
                          max_new, batch_repeat=n)
        cache, logits, position = prefill.cache, prefill.logits, prefill.next_position

        running_seqs = torch.full((B, n, max_length), fill, dtype=torch.long, device=device)
        running_seqs[:, :, :P] = prompt[:, None]
        seqs = running_seqs.clone()  # finished hypotheses
        running_scores = torch.zeros(B, n, dtype=torch.float32, device=device)
        running_scores[:, 1:] = _NEG  # only beam 0 is live at the first step
        finished_scores = torch.full((B, n), _NEG, dtype=torch.float32, device=device)
        is_finished = torch.zeros(B, n, dtype=torch.bool, device=device)
        can_improve = torch.ones(B, 1, dtype=torch.bool, device=device)
        running_parents = torch.full((B, n, max_new), -1, dtype=torch.int32, device=device)
        parents = running_parents.clone()
        top_n = torch.arange(K, device=device) < n  # (K,) candidates allowed into the finished set
        row_offset = torch.arange(B, device=device)[:, None] * n  # (B, 1)
        flat_rows = torch.arange(B * n, device=device)
        scores, raw_logits = [], []

        for step in range(max_new):
            cur_len = P + step
            logits32 = logits.float()
            log_probs = torch.log_softmax(logits32, dim=-1)  # (B*n, V)
            history = running_seqs[:, :, :cur_len].reshape(B * n, cur_len)
            valid = None
            if ignore is not None:
                valid = torch.arange(cur_len, device=device)[None, :] >= ignore[:, None]
            log_probs = processors(history, log_probs, valid)  # (B*n, V), sampling steps included
            if want_scores:
                scores.append(log_probs)
            if want_logits:
                raw_logits.append(logits32.clone())
            V = log_probs.shape[-1]
            total = (log_probs.view(B, n, V) + running_scores[:, :, None]).reshape(B, n * V)

            # top-K continuations over all beams of a row
            if do_sample:
                picked = torch.multinomial(torch.softmax(total, dim=-1), num_samples=K, generator=generator)
                cand_scores = torch.gather(total, 1, picked)
            else:
                cand_scores, picked = torch.topk(total, k=K)
            beam = picked // V  # (B, K) parent beam within the row
            cand_seqs = _gather(running_seqs, beam)
            cand_seqs[:, :, cur_len] = picked % V
            cand_parents = _gather(running_parents, beam)
            cand_parents[:, :, step] = (beam + row_offset).to(torch.int32)  # parent as a flat row index

            # which candidates end here
            if cur_len + 1 >= max_length or plan.out_of_time():  # max_time: every candidate stops, as transformers
                hits = torch.ones(B, K, dtype=torch.bool, device=device)
            else:
                hits = torch.zeros(B, K, dtype=torch.bool, device=device)
                if eos is not None:
                    hits = torch.isin(cand_seqs[:, :, cur_len], eos)
                if stop is not None:
                    hits = hits | stop(cand_seqs[:, :, : cur_len + 1])  # (B, K)

            # the best n unfinished candidates keep running
            live_scores = cand_scores + hits.to(torch.float32) * _NEG
            keep = torch.topk(live_scores, k=n)[1]
            running_seqs = _gather(cand_seqs, keep)
            running_scores = _gather(live_scores, keep)
            running_parents = _gather(cand_parents, keep)

            # finished candidates among the top n replace worse finished hypotheses
            just_finished = hits & top_n[None, :]
            penalised = cand_scores / ((cur_len + 1 - P) ** length_penalty)
            full = torch.all(is_finished, dim=-1, keepdim=True) & (early_stopping is True)
            penalised += full.to(torch.float32) * _NEG
            penalised += (~can_improve).to(torch.float32) * _NEG
            penalised += (~just_finished) * _NEG
            best = torch.topk(torch.cat((finished_scores, penalised), dim=1), k=n)[1]
            seqs = _gather(torch.cat((seqs, cand_seqs), dim=1), best)
            finished_scores = _gather(torch.cat((finished_scores, penalised), dim=1), best)
            parents = _gather(torch.cat((parents, cand_parents), dim=1), best)
            is_finished = _gather(torch.cat((is_finished, just_finished), dim=1), best)

            # can a running beam still beat the worst finished one?
            new_len = cur_len + 1
            if early_stopping == "never" and length_penalty > 0.0:
                best_len = max_length - P
            else:
                best_len = new_len - P
            best_running = running_scores[:, :1] / (best_len ** length_penalty)
            worst_finished = torch.where(is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], _NEG)
            can_improve = can_improve & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
            go_on = torch.any(can_improve) & ~(torch.all(is_finished) & (early_stopping is True)) \
                & ~torch.all(hits)
            rows = running_parents[:, :, step].reshape(-1).long()  # (B*n,) parent row of each new beam
            go_on, moved = torch.stack((go_on, torch.any(rows != flat_rows))).tolist()  # one host sync per step
            if not go_on:
                break

            if moved:  # each beam continues from its parent's cache (skipped when every beam kept its own row)
                cache.reorder(rows)
            logits = decode_step(model, running_seqs[:, :, new_len - 1].reshape(-1), position, cache)
            position = position + 1

        seqs, finished_scores, parents = seqs[:, 0], finished_scores[:, 0], parents[:, 0]  # best per row
        generated = int((parents + 1).bool().sum(dim=1).max())
        seqs, parents = seqs[:, : P + generated], parents[:, :generated]

    if return_dict:
        return ModelOutput(sequences=seqs, sequences_scores=finished_scores if want_scores else None,
                           scores=tuple(scores) if want_scores else None,
                           logits=tuple(raw_logits) if want_logits else None, beam_indices=parents)
    return seqs
