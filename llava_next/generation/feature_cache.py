"""Image-embedding cache: the same image asked a new question is not encoded again.

Keyed exactly, not by a hash: an entry holds the image's tiles, and a lookup compares tiles with
`torch.equal` (on the device; one sync per candidate with the same shape and size), so a collision can
never return another image's features. Least recently used entries are dropped past `capacity`.

Entries are only valid for the weights that made them: `check_weights(stamp)` (weights.weights_stamp of the
vision tower, projector and image_newline) empties the cache when they changed (in place, reloaded, cast).

Leaves out: sharing across processes or models; the cache belongs to one model object and holds packed,
projected features ready to merge into the prompt.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class ImageFeatureCache:
    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._entries: OrderedDict[int, tuple[torch.Tensor, tuple[int, int], torch.Tensor]] = OrderedDict()
        self._next = 0
        self._stamp: tuple | None = None  # the weights the entries were computed with
        self.hits = self.misses = 0

    def check_weights(self, stamp: tuple):
        """Drop every entry if the weights changed since the entries were made."""
        if stamp != self._stamp:
            self._entries.clear()
            self._stamp = stamp

    def get(self, tiles: torch.Tensor, size: tuple[int, int]) -> torch.Tensor | None:
        """Packed features (tokens, D) of an image whose tiles (n, 3, S, S) and (H, W) were seen, else None."""
        for key, (stored, stored_size, features) in self._entries.items():
            if stored_size == size and stored.shape == tiles.shape and stored.dtype == tiles.dtype \
                    and stored.device == tiles.device and torch.equal(stored, tiles):
                self._entries.move_to_end(key)
                self.hits += 1
                return features
        self.misses += 1
        return None

    def put(self, tiles: torch.Tensor, size: tuple[int, int], features: torch.Tensor):
        if self.capacity <= 0:
            return
        self._entries[self._next] = (tiles.detach().clone(), size, features.detach())
        self._next += 1
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self):
        self._entries.clear()
