"""Image features by content hash, so each distinct image runs the vision tower once.

Entries are the packed features of one image, (num_image_tokens, D), keyed by `ImageItem.mm_hash` (a hash of
the tiles' bytes and the size). A sequence holds a reference on each image whose placeholders it has not
finished prefilling (a chunk may end inside an image: the next chunk takes the rest of the rows from here).
Unreferenced entries stay until the cache is over its capacity (in feature rows), then the least recently
used go first (vLLM's EncoderCacheManager, simplified). Entries belong to the weights that made them:
`check_weights(stamp)` (model/stamp.py over the vision tower, projector and image_newline) empties the cache
when they changed (in place, reloaded, cast). generate() (compat/modeling.py) and the engine share this cache.

Leaves out: an encoder compute budget per step (every image a step's chunks touch is encoded in that step).
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, capacity_tokens: int):
        self.capacity = capacity_tokens
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()  # mm_hash -> (tokens, D), LRU order
        self.refs: dict[str, set] = {}  # mm_hash -> holders (Sequence.key: request id and index)
        self.num_encoded = 0  # images run through the tower (tests: once per distinct image)
        self.num_hits = 0  # lookups served from the cache
        self._stamp: tuple | None = None  # the weights the entries were computed with

    def __contains__(self, mm_hash: str) -> bool:
        return mm_hash in self.entries

    @property
    def num_tokens(self) -> int:
        return sum(e.shape[0] for e in self.entries.values())

    def get(self, mm_hash: str) -> torch.Tensor | None:
        feats = self.entries.get(mm_hash)
        if feats is not None:
            self.entries.move_to_end(mm_hash)
            self.num_hits += 1
        return feats

    def check_weights(self, stamp: tuple) -> bool:
        """Drop every entry if the weights changed since the entries were made; True when they did."""
        if stamp == self._stamp:
            return False
        changed = self._stamp is not None
        self.entries.clear()
        self._stamp = stamp
        return changed

    def put(self, mm_hash: str, features: torch.Tensor) -> None:
        """Store one image's packed features (counted as one encoder run), then trim unreferenced entries."""
        self.entries[mm_hash] = features
        self.entries.move_to_end(mm_hash)
        self.num_encoded += 1
        self._trim()

    def acquire(self, mm_hash: str, holder) -> None:
        self.refs.setdefault(mm_hash, set()).add(holder)

    def release(self, mm_hash: str, holder) -> None:
        holders = self.refs.get(mm_hash)
        if holders is not None:
            holders.discard(holder)
            if not holders:
                del self.refs[mm_hash]
        self._trim()

    def release_all(self, holder) -> None:
        for mm_hash in [h for h, holders in self.refs.items() if holder in holders]:
            self.release(mm_hash, holder)

    def _trim(self) -> None:
        total = self.num_tokens
        for mm_hash in list(self.entries):
            if total <= self.capacity:
                break
            if mm_hash not in self.refs:
                total -= self.entries.pop(mm_hash).shape[0]

    def clear(self) -> None:
        self.entries.clear()
        self.refs.clear()
