"""Stop criteria: EOS ids as a device tensor, and stop strings.

EOS checks are torch ops (`torch.isin`), safe in the decode loop. Stop strings need text, so they are
checked on the host by decoding each row's last few tokens; run them only when stop_strings is set.

A stop string stops a row when it occurs in the decoded tail and ends inside the text of the newest
token, as transformers' `StopStringCriteria` requires (an occurrence further back does not stop it).
Leaves out: transformers' tensorised vocabulary matcher (it works on token strings, we on decoded
text: they can differ only around special tokens and decode-time cleanup), max_time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from llava_next.errors import GenerationArgumentError


def eos_token_tensor(
    eos_token_id: int | Sequence[int] | torch.Tensor | None, device: torch.device | str | None = None
) -> torch.Tensor | None:
    """int, list of ints or tensor -> (E,) long tensor on `device`; None stays None."""
    if eos_token_id is None:
        return None
    ids = eos_token_id.tolist() if isinstance(eos_token_id, torch.Tensor) else eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids)
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise GenerationArgumentError(f"`eos_token_id` must be a token id or a list of them, got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.long, device=device)


def eos_reached(next_tokens: torch.Tensor, eos: torch.Tensor | None) -> torch.Tensor:
    """(B,) new tokens -> (B,) bool, True where the token is an EOS id. No host sync."""
    if eos is None:
        return torch.zeros_like(next_tokens, dtype=torch.bool)
    return torch.isin(next_tokens, eos)


class StopStrings:
    """`stop_strings` (str or list) checked on the decoded tail of each row.

    tokenizer: anything with `decode(ids: list[int]) -> str`.
    """

    def __init__(self, tokenizer: Any, stop_strings: str | Sequence[str]):
        strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not strings or not all(isinstance(s, str) and s for s in strings):
            raise GenerationArgumentError(f"`stop_strings` must be non-empty strings, got {stop_strings!r}")
        self.tokenizer = tokenizer
        self.stop_strings = tuple(strings)
        # A character can take up to 4 byte-fallback tokens; one more token absorbs the leading-space
        # stripping that SentencePiece decoders apply to the first token of a decode.
        self.window = 4 * max(len(s) for s in strings) + 2

    def row_matches(self, ids: Sequence[int]) -> bool:
        """Whether a stop string ends inside the text of the last token of `ids`."""
        tail = list(ids[-self.window :])
        if not tail:
            return False
        before = self.tokenizer.decode(tail[:-1])
        text = self.tokenizer.decode(tail)
        new_from = len(os.path.commonprefix([before, text]))  # where the newest token's text begins
        return any(text.find(s, max(0, new_from - len(s) + 1)) != -1 for s in self.stop_strings)

    def __call__(self, sequences: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """(..., T) token ids (host sync when on a device) -> (...) bool on the same device.

        Only the last `window` ids of each row go to the host: the check never reads further back."""
        if not isinstance(sequences, torch.Tensor):
            return torch.tensor([self.row_matches(r) for r in sequences], dtype=torch.bool)
        tails = sequences[..., -self.window:]
        rows = tails.reshape(-1, tails.shape[-1]).tolist()
        found = torch.tensor([self.row_matches(r) for r in rows], dtype=torch.bool, device=sequences.device)
        return found.view(sequences.shape[:-1])
