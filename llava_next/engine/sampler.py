"""Per-sequence token choice for one engine step, on the logits of the positions that sample.

Rows whose sequence wants plain greedy decoding are chosen together (one argmax). Every other row runs the
logits pipeline generate() uses (sampling/logits.py: repetition penalty, EOS suppression until `min_tokens`,
temperature, top-k, top-p, min-p; built once per sequence), after vLLM's presence and frequency penalties
over the tokens generated so far, then draws with the sequence's own torch.Generator when it has a seed (so
a seeded request gives the same tokens alone or in any crowd) or the engine's generator otherwise.
`logprobs` are vLLM's default: log-softmax of the raw model logits, the sampled token plus the top k.

Leaves out: logit_bias, allowed/bad words, the Gumbel trick, batched top-k/top-p over rows.
"""

from __future__ import annotations

import torch

from llava_next.engine.outputs import Logprob
from llava_next.engine.request import Sequence
from llava_next.sampling.logits import LogitsPipeline


def _plain_greedy(seq: Sequence) -> bool:
    """Greedy with no penalties: an argmax (after EOS/stop ids are masked while min_tokens holds them back)."""
    p = seq.params
    return p.greedy and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)  # for unseeded sampled requests
        self._pipelines: dict[int, LogitsPipeline] = {}

    def forget(self, seq: Sequence) -> None:
        self._pipelines.pop(id(seq), None)

    def _pipeline(self, seq: Sequence) -> LogitsPipeline:
        pipe = self._pipelines.get(id(seq))
        if pipe is None:
            stops = sorted(set(seq.eos_token_ids) | set(seq.stop_token_ids))  # min_tokens holds back all of them
            pipe = LogitsPipeline(seq.params.to_internal(), stops or None, seq.prompt_len)
            self._pipelines[id(seq)] = pipe
        return pipe

    def __call__(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[int], list[dict | None]]:
        """logits (n, V) for n sampling sequences -> their next token ids and (when asked) logprob dicts."""
        logits = logits.float()
        tokens = [0] * len(seqs)
        greedy_rows = [i for i, s in enumerate(seqs) if _plain_greedy(s)]
        if greedy_rows:
            rows = logits[greedy_rows]
            for j, i in enumerate(greedy_rows):  # min_tokens: EOS and stop ids get -inf (the pipeline's rule)
                seq = seqs[i]
                if seq.num_output_tokens < seq.params.min_tokens and (seq.eos_token_ids or seq.stop_token_ids):
                    stops = sorted(set(seq.eos_token_ids) | set(seq.stop_token_ids))
                    rows[j, [t for t in stops if t < rows.shape[-1]]] = float("-inf")
            picked = rows.argmax(-1).tolist()
            for i, t in zip(greedy_rows, picked):
                tokens[i] = t
        for i, seq in enumerate(seqs):
            if i in greedy_rows:
                continue
            tokens[i] = self._one(seq, logits[i: i + 1])
        logprobs = [self._logprobs(seq, logits[i], tokens[i]) if seq.params.logprobs is not None else None
                    for i, seq in enumerate(seqs)]
        return tokens, logprobs

    def _one(self, seq: Sequence, row: torch.Tensor) -> int:
        p = seq.params
        if p.presence_penalty or p.frequency_penalty:
            out = seq.output_ids
            if out:
                counts = torch.bincount(torch.tensor(out, device=row.device), minlength=row.shape[-1])[: row.shape[-1]]
                row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        pipe = self._pipeline(seq)
        history = torch.tensor(seq.token_ids, device=row.device)[None]  # (1, t)
        scores = pipe(history, row)
        if seq.generator is None and not p.greedy and seq.params.seed is not None:
            seq.generator = torch.Generator(device=row.device).manual_seed(seq.params.seed)
        generator = seq.generator if seq.generator is not None else self.generator
        return int(pipe.sample(scores, generator)[0])

    @staticmethod
    def _logprobs(seq: Sequence, row: torch.Tensor, token: int) -> dict[int, Logprob]:
        lp = torch.log_softmax(row, dim=-1)  # (V,)
        k = seq.params.logprobs
        out: dict[int, Logprob] = {}
        if k:
            values, ids = torch.topk(lp, k)
            for rank, (i, v) in enumerate(zip(ids.tolist(), values.tolist()), start=1):
                out[i] = Logprob(v, rank)
        if token not in out:
            out = {token: Logprob(float(lp[token]), int((lp > lp[token]).sum()) + 1), **out}
        return out
