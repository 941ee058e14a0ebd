"""Beam search (and beam sampling) with transformers 5.23's `_beam_search` semantics, on the engine's runner.

Images are encoded once: the prefill embeds the prompt for each batch row and repeats it `num_beams` times
(`prefill(repeat=num_beams)`), where transformers expands pixel_values and runs the vision tower on every
copy. After each step the beams fork their block tables by parent (compat/paged_rows.Rows.fork: full blocks
shared, the partial last block copied on write), unless every beam continued its own row. One host sync per
step decides both that and whether the search goes on.

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

Leaves out: num_return_sequences > 1 (refused by generate_args.py), group/constrained beam search, streamers
(transformers refuses them with beams too), low_memory.
"""

from __future__ import annotations

import torch

from llava_next.compat.outputs import ModelOutput
from llava_next.compat.paged_rows import decode_step, prefill, prompt_ids
from llava_next.errors import GenerationArgumentError
from llava_next.sampling.logits import LogitsPipeline

_NEG = -1.0e9  # transformers' "impossible" score


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, N, ...) and index (B, M) -> (B, M, ...): t[b, index[b, m]]."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


class _Beams:
    """The state of a beam search over B rows of n beams, and its per-step update, transformers' arithmetic.

    running_*: the n live beams of each row; seqs/finished_scores/parents/is_finished: the n best finished
    hypotheses; parents hold, per step, the flat row of the beam each token was appended to.
    """

    def __init__(self, prompt: torch.Tensor, n: int, n_eos: int, max_new: int, fill: int, plan):
        B, P = prompt.shape
        device = prompt.device
        self.B, self.n, self.P, self.max_length = B, n, P, P + max_new
        self.K = max(2, 1 + n_eos) * n  # candidates kept per step, so that n unfinished ones always remain
        self.plan = plan
        self.running_seqs = torch.full((B, n, self.max_length), fill, dtype=torch.long, device=device)
        self.running_seqs[:, :, :P] = prompt[:, None]
        self.seqs = self.running_seqs.clone()  # finished hypotheses
        self.running_scores = torch.zeros(B, n, dtype=torch.float32, device=device)
        self.running_scores[:, 1:] = _NEG  # only beam 0 is live at the first step
        self.finished_scores = torch.full((B, n), _NEG, dtype=torch.float32, device=device)
        self.is_finished = torch.zeros(B, n, dtype=torch.bool, device=device)
        self.can_improve = torch.ones(B, 1, dtype=torch.bool, device=device)
        self.running_parents = torch.full((B, n, max_new), -1, dtype=torch.int32, device=device)
        self.parents = self.running_parents.clone()
        self.top_n = torch.arange(self.K, device=device) < n  # (K,) candidates allowed into the finished set
        self.row_offset = torch.arange(B, device=device)[:, None] * n  # (B, 1)
        self.flat_rows = torch.arange(B * n, device=device)

    def history(self, cur_len: int) -> torch.Tensor:
        return self.running_seqs[:, :, :cur_len].reshape(self.B * self.n, cur_len)  # (B*n, cur_len)

    def step(self, log_probs: torch.Tensor, step: int, do_sample: bool, generator) -> tuple[bool, torch.Tensor | None]:
        """Advance by one token from processed log-probs (B*n, V). Returns (go on?, the parent row of each
        new beam (a list of B*n) when beams moved, else None); one host sync."""
        B, n, K, P, plan = self.B, self.n, self.K, self.P, self.plan
        cur_len = P + step
        V = log_probs.shape[-1]
        total = (log_probs.view(B, n, V) + self.running_scores[:, :, None]).reshape(B, n * V)
        if do_sample:  # top-K continuations over all beams of a row
            picked = torch.multinomial(torch.softmax(total, dim=-1), num_samples=K, generator=generator)
            cand_scores = torch.gather(total, 1, picked)
        else:
            cand_scores, picked = torch.topk(total, k=K)
        beam = picked // V  # (B, K) parent beam within the row
        cand_seqs = _gather(self.running_seqs, beam)
        cand_seqs[:, :, cur_len] = picked % V
        cand_parents = _gather(self.running_parents, beam)
        cand_parents[:, :, step] = (beam + self.row_offset).to(torch.int32)  # parent as a flat row index
        hits = self._ends(cand_seqs, cur_len)
        # the best n unfinished candidates keep running
        live_scores = cand_scores + hits.to(torch.float32) * _NEG
        keep = torch.topk(live_scores, k=n)[1]
        self.running_seqs = _gather(cand_seqs, keep)
        self.running_scores = _gather(live_scores, keep)
        self.running_parents = _gather(cand_parents, keep)
        self._finish(cand_seqs, cand_scores, cand_parents, hits, cur_len)
        go_on = torch.any(self.can_improve) & ~(torch.all(self.is_finished) & (plan.early_stopping is True)) \
            & ~torch.all(hits)
        rows = self.running_parents[:, :, step].reshape(-1).long()  # (B*n,) parent row of each new beam
        go_on, moved, *rows = torch.cat((torch.stack((go_on, torch.any(rows != self.flat_rows))), rows)).tolist()
        return bool(go_on), rows if moved else None

    def _ends(self, cand_seqs: torch.Tensor, cur_len: int) -> torch.Tensor:
        """(B, K) bool: which candidates end here (EOS, a stop string, the length budget, max_time)."""
        plan = self.plan
        if cur_len + 1 >= self.max_length or plan.out_of_time():  # max_time: every candidate stops, as transformers
            return torch.ones(cand_seqs.shape[:2], dtype=torch.bool, device=cand_seqs.device)
        hits = torch.zeros(cand_seqs.shape[:2], dtype=torch.bool, device=cand_seqs.device)
        if plan.eos is not None:
            hits = torch.isin(cand_seqs[:, :, cur_len], plan.eos)
        if plan.stop is not None:
            hits = hits | plan.stop(cand_seqs[:, :, : cur_len + 1])  # (B, K)
        return hits

    def _finish(self, cand_seqs, cand_scores, cand_parents, hits, cur_len: int) -> None:
        """Finished candidates among the top n replace worse finished hypotheses; then whether a running beam
        can still beat the worst finished one (transformers' early_stopping rules)."""
        P, n, plan = self.P, self.n, self.plan
        just_finished = hits & self.top_n[None, :]
        penalised = cand_scores / ((cur_len + 1 - P) ** plan.length_penalty)
        full = torch.all(self.is_finished, dim=-1, keepdim=True) & (plan.early_stopping is True)
        penalised += full.to(torch.float32) * _NEG
        penalised += (~self.can_improve).to(torch.float32) * _NEG
        penalised += (~just_finished) * _NEG
        merged_scores = torch.cat((self.finished_scores, penalised), dim=1)
        best = torch.topk(merged_scores, k=n)[1]
        self.seqs = _gather(torch.cat((self.seqs, cand_seqs), dim=1), best)
        self.finished_scores = _gather(merged_scores, best)
        self.parents = _gather(torch.cat((self.parents, cand_parents), dim=1), best)
        self.is_finished = _gather(torch.cat((self.is_finished, just_finished), dim=1), best)
        new_len = cur_len + 1
        if plan.early_stopping == "never" and plan.length_penalty > 0.0:
            best_len = self.max_length - P
        else:
            best_len = new_len - P
        best_running = self.running_scores[:, :1] / (best_len ** plan.length_penalty)
        worst_finished = torch.where(self.is_finished, torch.min(self.finished_scores, dim=1, keepdim=True)[0], _NEG)
        self.can_improve = self.can_improve & torch.any(best_running > worst_finished, dim=-1, keepdim=True)

    def best(self):
        """(sequences (B, P + generated), their scores (B,), beam indices (B, generated)) of the best hypotheses."""
        seqs, scores, parents = self.seqs[:, 0], self.finished_scores[:, 0], self.parents[:, 0]
        generated = int((parents + 1).bool().sum(dim=1).max())
        return seqs[:, : self.P + generated], scores, parents[:, :generated]


def beam_search(model, plan, input_ids, attention_mask, pixel_values, image_sizes, inputs_embeds, kwargs):
    """generate() with num_beams > 1: (B, prompt + new) ids, or a ModelOutput with return_dict_in_generate."""
    if kwargs.get("streamer") is not None:
        raise GenerationArgumentError("`streamer` cannot be used with beam search; set num_beams=1")
    n, eos, params = plan.num_beams, plan.eos, plan.sampling
    want_scores, want_logits = kwargs.get("output_scores"), kwargs.get("output_logits")
    n_eos = 0 if eos is None else eos.numel()
    # transformers: `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1` (a pad of 0 is falsy)
    fill = -1 if eos is None else (plan.pad_token_id if plan.pad_token_id != 0 else int(eos[0]))
    with model.generation_lock, torch.inference_mode():
        device = model.device
        prompt = prompt_ids(input_ids, inputs_embeds).to(device)  # (B, P); P = 0 with inputs_embeds alone
        P = prompt.shape[1]
        # transformers' beam sampling keeps at least #EOS + 1 tokens (2 without EOS ids) in top_k / top_p / min_p
        processors = LogitsPipeline(params, eos, P, min_tokens_to_keep=n_eos + 1 if eos is not None else 2)
        ignore = None  # repetition penalty skips each row's left padding, as transformers' prompt_ignore_length
        if params.repetition_penalty != 1.0 and attention_mask is not None:
            ignore = (attention_mask.to(device) != 0).int().argmax(dim=1).repeat_interleave(n)  # (B*n,)
        embeds = model.model.embed(input_ids, pixel_values, image_sizes, inputs_embeds)  # (B, T, D)
        kv, logits = prefill(model.decode_runner(), embeds, attention_mask, plan.max_new_tokens, False, True, n)
        try:
            beams = _Beams(prompt, n, n_eos, plan.max_new_tokens, fill, plan)
            seqs, finished_scores, parents, scores, raw_logits = _search(beams, kv, logits, processors, ignore, plan,
                                                                         kwargs, want_scores, want_logits)
        finally:
            kv.release()
    if kwargs.get("return_dict_in_generate"):
        return ModelOutput(sequences=seqs, sequences_scores=finished_scores if want_scores else None,
                           scores=tuple(scores) if want_scores else None,
                           logits=tuple(raw_logits) if want_logits else None, beam_indices=parents)
    return seqs


def _search(beams: _Beams, kv, logits, processors, ignore, plan, kwargs, want_scores, want_logits):
    """The step loop: processed log-probs -> beams.step -> fork the block tables -> one decode step."""
    P, device, params = beams.P, logits.device, plan.sampling
    scores, raw_logits = [], []
    for step in range(plan.max_new_tokens):
        cur_len = P + step
        logits32 = logits.float()
        log_probs = torch.log_softmax(logits32, dim=-1)  # (B*n, V)
        valid = None if ignore is None else torch.arange(cur_len, device=device)[None, :] >= ignore[:, None]
        log_probs = processors(beams.history(cur_len), log_probs, valid)  # (B*n, V), sampling steps included
        if want_scores:
            scores.append(log_probs)
        if want_logits:
            raw_logits.append(logits32.clone())
        go_on, rows = beams.step(log_probs, step, not params.greedy, kwargs.get("generator"))
        if not go_on:
            break
        if rows is not None:  # each beam continues from its parent's blocks (skipped when none moved)
            kv.fork(rows)
        logits = decode_step(kv, beams.running_seqs[:, :, cur_len].reshape(-1), True)
    return (*beams.best(), scores, raw_logits)
