"""Model outputs: attribute, key and index access like transformers' ModelOutput (`out.logits`, `out[0]`)."""

from __future__ import annotations

from collections import OrderedDict


class ModelOutput(OrderedDict):
    """An ordered dict of the non-None fields, readable as attributes; `out[0]` is the first field."""

    def __init__(self, **fields):
        super().__init__((k, v) for k, v in fields.items() if v is not None)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            if name.startswith("__"):
                raise AttributeError(name) from None
            return None

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return tuple(self.values())[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())
