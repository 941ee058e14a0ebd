"""Tokenizer: a thin layer over the `tokenizers` library that loads a checkpoint's tokenizer like transformers 5.x.

What transformers does for the llava-hf checkpoints (model_type "llava_next" maps to its generic
`TokenizersBackend`, whatever `tokenizer_class` the config names), and what this file reproduces:

- `tokenizer.json` is used verbatim: normalizer, pre-tokenizer, model, decoder and post-processor. The
  `add_bos_token` / `add_eos_token` keys of tokenizer_config.json are ignored when tokenizer.json exists
  (its post-processor already adds BOS); a missing post-processor means no special tokens are added.
- Special tokens (bos/eos/unk/sep/pad/cls/mask, any other `*_token` key such as `image_token`, and
  `extra_special_tokens` / `additional_special_tokens`) come from tokenizer_config.json, or from
  special_tokens_map.json + added_tokens.json for configs without `added_tokens_decoder`. Tokens that are
  not yet added tokens of the backend are added, as transformers does, so they are never split.
- `pad_token_id` is None when the checkpoint has no pad token (padding then raises, as in transformers).
- Decoding: the backend decoder; `clean_up_tokenization_spaces` is ignored for BPE models (all llava-hf
  tokenizers) unless `clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output` is set,
  exactly like transformers 5.x.
- Truncation (`truncation=True` / `max_length=`) truncates like the Rust tokenizer, but refuses to cut an
  image-token run: it raises `ContextLengthError` instead of silently dropping image placeholders.

Leaves out: sentence pairs, pre-tokenized input, stride/overflowing tokens, offsets, token type ids,
slow (sentencepiece-only) checkpoints without tokenizer.json, and remote-code tokenizers.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend
from tokenizers.processors import TemplateProcessing

from llava_next.preprocess.batch_feature import BatchFeature
from llava_next.errors import ContextLengthError
from llava_next.loading.hub import read_json

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"]
VERY_LARGE_INTEGER = int(1e30)  # transformers' "no model_max_length"
LARGE_INTEGER = int(1e20)


def _token_content(value) -> str | None:
    """A special-token entry of a config: a string, or a serialized AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    if isinstance(value, AddedToken):
        return value.content
    raise ValueError(f"a special token must be a string or an AddedToken dict, got {value!r}")


def _added_token(value, special: bool | None = None) -> AddedToken:
    """An AddedToken from a config entry (string or serialized dict), keeping its flags."""
    if isinstance(value, AddedToken):
        return value
    if isinstance(value, str):
        return AddedToken(value, special=True if special is None else special)
    fields = {k: v for k, v in value.items() if k in ("content", "single_word", "lstrip", "rstrip", "normalized", "special")}
    if special is not None:
        fields["special"] = special
    return AddedToken(**fields)


def _to_py(ids) -> Any:
    """Token ids from a tensor, an array, numpy scalars or nested lists, as plain Python ints/lists."""
    if hasattr(ids, "tolist"):
        return ids.tolist()
    if isinstance(ids, (list, tuple)):
        return [_to_py(i) for i in ids]
    return int(ids)


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: drop the space before punctuation and English contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def text_batch(text) -> tuple[list[str], bool]:
    """(texts, batched) of one string or a list of strings; ValueError for anything else."""
    if isinstance(text, str):
        return [text], False
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        return list(text), True
    raise ValueError("text must be a string or a list of strings")


class Tokenizer:
    """A checkpoint's tokenizer: `tokenizer(text)`, `decode(ids)` and the special-token attributes of transformers."""

    model_input_names = ("input_ids", "attention_mask")
    chat_template: str | dict | None = None  # the checkpoint's template(s), as transformers' tokenizer carries it

    def __init__(self, backend: Backend, config: dict | None = None, name_or_path: str = ""):
        self.config = dict(config or {})
        self.name_or_path = name_or_path
        self._backend = backend
        backend.no_truncation()  # truncation and padding are done per call, never through backend state
        json_padding = backend.padding
        backend.no_padding()
        if backend.post_processor is None:
            # matches transformers: no post-processor means no special tokens are added
            backend.post_processor = TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
        backend.encode_special_tokens = bool(self.config.get("split_special_tokens", False))

        cfg = self.config
        self.padding_side = cfg.get("padding_side") or (json_padding or {}).get("direction") or "right"
        self.truncation_side = cfg.get("truncation_side", "right")
        for side in (self.padding_side, self.truncation_side):
            if side not in ("left", "right"):
                raise ValueError(f"padding/truncation side must be 'left' or 'right', got {side!r}")
        max_len = cfg.get("model_max_length")
        self.model_max_length = int(max_len) if max_len is not None else VERY_LARGE_INTEGER
        self.clean_up_tokenization_spaces = bool(cfg.get("clean_up_tokenization_spaces", False))
        self._force_cleanup = bool(cfg.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))

        # Named special tokens, then model-specific ones (image_token, ...), then the extra list.
        self._special: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            content = _token_content(cfg.get(name))
            if content is None and name == "pad_token" and json_padding:
                content = json_padding.get("pad_token")
            if content is not None:
                self._special[name] = content
        for name, value in cfg.items():
            if name.endswith("_token") and name not in SPECIAL_TOKEN_NAMES and isinstance(value, (str, dict)):
                if _token_content(value) is not None:
                    self._special[name] = _token_content(value)
        for name, value in (cfg.get("model_specific_special_tokens") or {}).items():
            self._special[name] = _token_content(value)
        extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or []
        if isinstance(extra, dict):
            self._special.update({k: _token_content(v) for k, v in extra.items()})
            extra = []
        self._extra_special = [_token_content(t) for t in extra]
        self._register_special_tokens(cfg, extra)
        self.protected_token_ids: frozenset[int] = self._default_protected_ids()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json, special_tokens_map.json, added_tokens.json) from a folder or hub id.

        kwargs as transformers: settings of tokenizer_config.json (`padding_side="left"`, `truncation_side`,
        `model_max_length`, `pad_token="<pad>"`, ...: `TOKENIZER_SETTINGS` and any `*_token`) override the file;
        hub options go to the hub; `use_fast` and `trust_remote_code` are ignored; anything else is a TypeError.
        """
        from llava_next.loading.hub import hub_options, resolve_folder

        overrides = pop_tokenizer_settings(kwargs)
        for name in CALL_DEFAULTS_IGNORED:  # transformers stores these in init_kwargs; they change nothing here
            kwargs.pop(name, None)
        hub = hub_options(kwargs, f"{cls.__name__}.from_pretrained")
        folder = resolve_folder(name_or_path, allow_patterns=TOKENIZER_FILES, **hub)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"tokenizer.json not found in {str(name_or_path)!r}; only checkpoints with a fast tokenizer file are supported"
            )
        config = read_json(folder / "tokenizer_config.json", required=False)
        if "added_tokens_decoder" not in config:
            # Legacy layout: special_tokens_map.json overrides the config, added_tokens.json lists added tokens.
            config.update(read_json(folder / "special_tokens_map.json", required=False))
            added = read_json(folder / "added_tokens.json", required=False)
            if added:
                special = {_token_content(config.get(n)) for n in SPECIAL_TOKEN_NAMES}
                special |= {_token_content(t) for t in config.get("additional_special_tokens") or []}
                config["_legacy_added_tokens"] = {
                    str(i): {"content": t, "normalized": t not in special, "special": t in special} for t, i in added.items()
                }
        config.update(overrides)
        tokenizer = cls(Backend.from_file(str(tokenizer_file)), config, name_or_path=str(name_or_path))
        from llava_next.preprocess.chat_template import load_chat_template

        tokenizer.chat_template = load_chat_template(folder, processor_json=False)
        return tokenizer

    def _register_special_tokens(self, cfg: dict, extra: list) -> None:
        """Add the config's added tokens and the special tokens the backend does not know yet (transformers' __init__)."""
        backend = self._backend
        present = backend.get_added_tokens_decoder().values()
        known, encoder = {repr(t) for t in present}, {t.content for t in present}
        decoder = cfg.get("added_tokens_decoder")
        if decoder is None:  # legacy added_tokens.json: tokenizer.json's own entries take precedence
            in_json = backend.get_added_tokens_decoder()
            decoder = {i: t for i, t in (cfg.get("_legacy_added_tokens") or {}).items() if int(i) not in in_json}
        to_add = [_added_token(v) for _, v in sorted(decoder.items(), key=lambda kv: int(kv[0]))]
        to_add = [t for t in to_add if repr(t) not in known]
        encoder |= {t.content for t in to_add}
        raw = {name: cfg.get(name, content) for name, content in self._special.items()}
        for value in [*raw.values(), *extra]:
            if _token_content(value) not in encoder:
                to_add.append(_added_token(value, special=True))
                encoder.add(_token_content(value))
        if to_add:
            backend.add_tokens(to_add)

    def _default_protected_ids(self) -> frozenset[int]:
        """Ids that truncation must never cut: the image placeholder, when the vocabulary has one."""
        token = self._special.get("image_token", "<image>")
        token_id = self._backend.token_to_id(token)
        return frozenset() if token_id is None else frozenset({token_id})

    # ------------------------------------------------------------------ special tokens and vocabulary

    def _token(self, name: str) -> str | None:
        return self._special.get(name)

    def _token_id(self, name: str) -> int | None:
        token = self._special.get(name)
        return None if token is None else self.convert_tokens_to_ids(token)

    bos_token = property(lambda self: self._token("bos_token"))
    eos_token = property(lambda self: self._token("eos_token"))
    unk_token = property(lambda self: self._token("unk_token"))
    bos_token_id = property(lambda self: self._token_id("bos_token"))
    eos_token_id = property(lambda self: self._token_id("eos_token"))
    unk_token_id = property(lambda self: self._token_id("unk_token"))

    @property
    def pad_token(self) -> str | None:
        return self._special.get("pad_token")

    @pad_token.setter
    def pad_token(self, value: str | None) -> None:
        """`tokenizer.pad_token = tokenizer.eos_token`, as users do with transformers."""
        if value is None:
            self._special.pop("pad_token", None)
        else:
            self._special["pad_token"] = str(value)

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    def __getattr__(self, name: str):
        # Other named / model-specific special tokens: sep_token, cls_token, image_token, image_token_id, ...
        special = self.__dict__.get("_special", {})
        if name.endswith("_token") and (name in special or name in SPECIAL_TOKEN_NAMES):
            return special.get(name)
        if name.endswith("_token_id") and (name[:-3] in special or name[:-3] in SPECIAL_TOKEN_NAMES):
            return self._token_id(name[:-3])
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (model-specific ones included) as strings, like transformers 5.x."""
        return dict(self._special)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self._special.values(), *self._extra_special]))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def backend_tokenizer(self) -> Backend:
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Size of the full vocabulary, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def get_added_vocab(self) -> dict[str, int]:
        decoder = self._backend.get_added_tokens_decoder()
        return {tok.content: i for i, tok in sorted(decoder.items())}

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        """Token string(s) to id(s); unknown tokens map to the unk id (None without one)."""
        if isinstance(tokens, str):
            token_id = self._backend.token_to_id(tokens)
            return self._token_id("unk_token") if token_id is None else token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        """Id(s) to token string(s); `skip_special_tokens` drops the named and extra special tokens."""
        ids = _to_py(ids)
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._backend.id_to_token(i) for i in ids if i not in skip]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).tokens

    # ------------------------------------------------------------------ encoding

    def __call__(
        self,
        text: str | list[str],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool | None = None,
        **unused,
    ) -> BatchFeature:
        """Encode one text or a batch: `input_ids` and `attention_mask`, padded and tensorised on request."""
        texts, batched = text_batch(text)
        strategy, max_length, truncate = self._strategies(padding, truncation, max_length)
        ids = [self._encode_one(t, add_special_tokens, max_length if truncate else None) for t in texts]
        masks = [[1] * len(x) for x in ids]
        if strategy != "do_not_pad":
            ids, masks = self._pad(ids, masks, strategy, max_length, pad_to_multiple_of, padding_side)
        data = {"input_ids": ids}
        if return_attention_mask is not False:
            data["attention_mask"] = masks
        if return_tensors is not None:
            if len({len(x) for x in ids}) > 1:
                raise ValueError(
                    "sequences of different lengths cannot be stacked into one tensor; pass padding=True"
                )
        elif not batched:
            data = {k: v[0] for k, v in data.items()}
        return BatchFeature(data, tensor_type=return_tensors)

    def encode(self, text: str, add_special_tokens: bool = True, truncation: bool | str | None = None,
               max_length: int | None = None, **unused) -> list[int]:
        """Token ids of one text."""
        _, max_length, truncate = self._strategies(False, truncation, max_length)
        return self._encode_one(text, add_special_tokens, max_length if truncate else None)

    def _strategies(self, padding, truncation, max_length) -> tuple[str, int | None, bool]:
        """transformers' rules: padding strategy, effective max_length and whether to truncate."""
        if max_length is not None and padding is False and truncation is None:
            truncation = True  # transformers: a max_length alone turns on truncation
        if padding is True or padding == "longest":
            strategy = "longest"
        elif padding is False or padding is None or padding == "do_not_pad":
            strategy = "do_not_pad"
        elif padding == "max_length":
            strategy = "max_length"
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        truncate = truncation not in (None, False, "do_not_truncate")
        if truncate and truncation not in (True, "longest_first", "only_first"):
            raise ValueError(f"unsupported truncation strategy {truncation!r}")
        if max_length is None:
            known = self.model_max_length <= LARGE_INTEGER
            if strategy == "max_length":
                strategy, max_length = ("max_length", self.model_max_length) if known else ("do_not_pad", None)
            if truncate:
                truncate, max_length = (True, self.model_max_length) if known else (False, max_length)
        if strategy != "do_not_pad" and self.pad_token_id is None:
            raise ValueError(
                "asking to pad but the tokenizer has no padding token; set `tokenizer.pad_token = tokenizer.eos_token`"
            )
        return strategy, max_length, truncate

    def _encode_one(self, text: str, add_special_tokens: bool, max_length: int | None) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if max_length is None or len(ids) <= max_length:
            return ids
        # Same steps as the Rust tokenizer: truncate the content to leave room for the specials, then add them.
        encoding = self._backend.encode(text, add_special_tokens=False)
        room = max_length - (self._backend.num_special_tokens_to_add(False) if add_special_tokens else 0)
        encoding.truncate(max(room, 0), direction=self.truncation_side)
        truncated = self._backend.post_process(encoding, add_special_tokens=add_special_tokens).ids
        kept = sum(i in self.protected_token_ids for i in truncated)
        total = sum(i in self.protected_token_ids for i in ids)
        if kept != total:
            raise ContextLengthError(
                f"truncating this prompt from {len(ids)} to max_length={max_length} tokens would cut "
                f"{total - kept} of its {total} image tokens; raise max_length or send a smaller image or shorter text"
            )
        return truncated

    def _pad(self, ids, masks, strategy, max_length, multiple, side):
        side = side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        target = max(len(x) for x in ids) if strategy == "longest" or max_length is None else max_length
        if multiple:
            target = -(-target // multiple) * multiple
        pad_id = self.pad_token_id
        out_ids, out_masks = [], []
        for seq, mask in zip(ids, masks):
            n = max(target - len(seq), 0)
            if side == "right":
                out_ids.append(seq + [pad_id] * n)
                out_masks.append(mask + [0] * n)
            else:
                out_ids.append([pad_id] * n + seq)
                out_masks.append([0] * n + mask)
        return out_ids, out_masks

    # ------------------------------------------------------------------ decoding

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None,
               **unused) -> str | list[str]:
        """Ids to text; a batch (list of lists, 2-D tensor) gives a list of strings, as in transformers 5.x."""
        token_ids = _to_py(token_ids)
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if token_ids and isinstance(token_ids[0], list):
            return [self._decode_one(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in token_ids]
        return self._decode_one(token_ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(self, sequences, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None, **unused) -> list[str]:
        result = self.decode(sequences, skip_special_tokens, clean_up_tokenization_spaces)
        return [result] if isinstance(result, str) else result

    def _decode_one(self, ids: list[int], skip_special_tokens: bool, clean_up: bool | None) -> str:
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        clean_up = self.clean_up_tokenization_spaces if clean_up is None else clean_up
        # NOTE: transformers 5.x ignores clean-up for BPE models (it corrupts " ." in real text).
        if clean_up and (type(self._backend.model).__name__ != "BPE" or self._force_cleanup):
            text = clean_up_tokenization(text)
        return text

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, folder: str | os.PathLike) -> list[str]:
        """Write tokenizer.json and tokenizer_config.json (current padding side and special tokens)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / "tokenizer.json"))
        config = copy.deepcopy({k: v for k, v in self.config.items() if not k.startswith("_")})
        config.pop("additional_special_tokens", None)
        config.update(self._special)
        if self._extra_special:
            config["extra_special_tokens"] = list(self._extra_special)
        config["padding_side"] = self.padding_side
        config["truncation_side"] = self.truncation_side
        # AddedToken's state is the {content, single_word, lstrip, rstrip, normalized, special} dict transformers writes
        added = sorted(self._backend.get_added_tokens_decoder().items())
        config["added_tokens_decoder"] = {str(i): token.__getstate__() for i, token in added}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return [str(folder / "tokenizer.json"), str(folder / "tokenizer_config.json")]

    def __repr__(self) -> str:
        return (f"Tokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, len={len(self)}, "
                f"padding_side={self.padding_side!r}, special_tokens={self._special})")


# tokenizer_config.json keys a `from_pretrained` kwarg may override (besides any `*_token` name).
TOKENIZER_SETTINGS = frozenset({
    "padding_side", "truncation_side", "model_max_length", "clean_up_tokenization_spaces", "split_special_tokens",
    "extra_special_tokens", "additional_special_tokens",
    "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
})


# `from_pretrained` kwargs transformers accepts (and keeps in init_kwargs) that have no effect on loading.
CALL_DEFAULTS_IGNORED = ("padding", "max_length", "truncation", "return_tensors", "stride")


def pop_tokenizer_settings(kwargs: dict) -> dict:
    """Take the tokenizer_config.json overrides (`TOKENIZER_SETTINGS`, `*_token`) out of `from_pretrained` kwargs."""
    settings = {k: kwargs.pop(k) for k in list(kwargs)
                if k in TOKENIZER_SETTINGS or (k.endswith("_token") and k != "use_auth_token")}
    if settings.get("model_max_length") is not None:
        value = settings["model_max_length"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model_max_length must be a positive int, got {value!r}")
    for name in ("padding_side", "truncation_side"):
        if name in settings and settings[name] not in ("left", "right"):
            raise ValueError(f"{name} must be 'left' or 'right', got {settings[name]!r}")
    return {k: v for k, v in settings.items() if v is not None or k.endswith("_token")}


__all__ = ["Tokenizer", "clean_up_tokenization", "pop_tokenizer_settings", "text_batch"]
