"""Resolve a local folder or a Hugging Face hub id to files on disk; sort a loader's keyword arguments.

A local folder never touches the network. A hub id goes through `huggingface_hub` (its cache, its token,
`HF_HUB_OFFLINE`). A folder or id that does not exist gives an OSError that names it.

Keyword arguments of every `from_pretrained` here, as in transformers: the hub options (`HUB_OPTIONS`, with
`use_auth_token` as the old name of `token`) go to `huggingface_hub` only, and are not used for a local folder
(except `subfolder`); the loading options of transformers that change nothing here (`IGNORED_OPTIONS`) are
accepted and dropped; any other name is a TypeError raised before anything is read or downloaded.

Leaves out: remote code (`auto_map`) is never imported; `repo_type`, `variant`, `max_memory`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# What a model needs; pickle files are fetched only when the caller opts in.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]

HUB_OPTIONS = ("revision", "cache_dir", "token", "force_download", "local_files_only", "proxies", "subfolder")
# transformers loading options with nothing to do here, and why each is a no-op.
IGNORED_OPTIONS = {
    "trust_remote_code": "remote code (auto_map) is never imported",
    "low_cpu_mem_usage": "models are always built on the meta device and streamed tensor by tensor",
    "_fast_init": "weights are never initialised before loading",
    "offload_state_dict": "transformers ignores it too",
    "offload_folder": "nothing is offloaded to disk: a model lives on one device",
    "use_fast": "there is one tokenizer, built from tokenizer.json",
    "_from_auto": "transformers' telemetry",
    "_from_pipeline": "transformers' telemetry",
}

# Hub and ignored loading options: never "unused" config kwargs.
_LOADER_NAMES = frozenset(HUB_OPTIONS) | set(IGNORED_OPTIONS) | {"use_auth_token"}


def read_config(name_or_path, kwargs: dict, return_unused_kwargs: bool, where: str) -> tuple[dict, dict]:
    """(config.json as a dict, the kwargs that are neither hub nor loading options when `return_unused_kwargs`):
    the file side of `LlavaNextConfig.from_pretrained` (config field overrides are popped by the caller)."""
    unused = {k: kwargs.pop(k) for k in list(kwargs) if return_unused_kwargs and k not in _LOADER_NAMES}
    return read_json(resolve_file(name_or_path, "config.json", **hub_options(kwargs, where))), unused


def hub_options(kwargs: dict, where: str, accepted=()) -> dict:
    """Pop the hub options out of `kwargs` (None values dropped) and drop `IGNORED_OPTIONS`; a name left that
    is not in `accepted` is a TypeError naming it (and every other such name)."""
    hub = {name: kwargs.pop(name) for name in HUB_OPTIONS if name in kwargs}
    if "use_auth_token" in kwargs:
        old = kwargs.pop("use_auth_token")
        if hub.get("token") is not None and old is not None and old != hub["token"]:
            raise ValueError(f"{where}: token= and use_auth_token= (its old name) differ; pass only token=")
        if hub.get("token") is None:
            hub["token"] = old
    for name in IGNORED_OPTIONS:
        kwargs.pop(name, None)
    unexpected = sorted(set(kwargs) - set(accepted))
    if unexpected:
        raise TypeError(
            f"{where} got unexpected keyword argument(s) {', '.join(map(repr, unexpected))}; it accepts hub "
            f"options ({', '.join(HUB_OPTIONS)}), ignores {', '.join(sorted(IGNORED_OPTIONS))}"
            + (f", and takes {', '.join(sorted(accepted))}" if accepted else "")
        )
    subfolder = hub.get("subfolder")
    if subfolder is not None and (not isinstance(subfolder, (str, os.PathLike)) or Path(subfolder).is_absolute()
                                  or ".." in Path(subfolder).parts):
        raise ValueError(f"{where}: subfolder must be a relative path inside the checkpoint, got {subfolder!r}")
    return {k: v for k, v in hub.items() if v is not None and v != ""}


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_folder(name_or_path: str | os.PathLike, allow_patterns=None, **hub_kwargs) -> Path:
    """A local folder as is, or a hub snapshot downloaded (or taken from the cache) with `allow_patterns`;
    with `subfolder=`, that folder inside it."""
    hub_kwargs = hub_options(dict(hub_kwargs), "from_pretrained")
    subfolder = hub_kwargs.pop("subfolder", None)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _inside(path, subfolder, name_or_path)
    name = str(name_or_path)
    if path.exists():
        raise NotADirectoryError(f"{name!r} is a file; expected a checkpoint folder or a hub id")
    if not _looks_like_hub_id(name):
        raise FileNotFoundError(f"checkpoint folder {name!r} does not exist (and it is not a hub id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = allow_patterns or MODEL_PATTERNS
    if subfolder is not None:
        patterns = [f"{Path(subfolder).as_posix()}/{p}" for p in patterns]
    try:
        folder = Path(snapshot_download(name, allow_patterns=patterns, **hub_kwargs))
    except HFValidationError as exc:
        raise FileNotFoundError(f"{name!r} is neither a local folder nor a valid hub id: {exc}") from exc
    except Exception as exc:  # network down, repo missing, gated, offline mode without a cache
        raise OSError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Check the id and your connection, or pass a local folder."
        ) from exc
    return _inside(folder, subfolder, name_or_path)


def _inside(folder: Path, subfolder, name_or_path) -> Path:
    if subfolder is None:
        return folder
    target = folder / subfolder
    if not target.is_dir():
        raise FileNotFoundError(f"subfolder {str(subfolder)!r} not found in {str(name_or_path)!r}")
    return target


def resolve_file(name_or_path: str | os.PathLike, filename: str, required: bool = True, **hub_kwargs) -> Path | None:
    """One file of a local folder or a hub repo; None when optional and absent."""
    hub_kwargs = hub_options(dict(hub_kwargs), "from_pretrained")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        folder = _inside(path, hub_kwargs.get("subfolder"), name_or_path)
    else:
        folder = resolve_folder(name_or_path, allow_patterns=[filename], **hub_kwargs)
    target = folder / filename
    if target.is_file():
        return target
    if required:
        where = "hub repo " if not path.is_dir() else ""
        raise FileNotFoundError(f"{filename} not found in {where}{str(name_or_path)!r}")
    return None


def read_json(path: str | os.PathLike, required: bool = True) -> dict:
    """A checkpoint's JSON file as a dict ({} when absent and not required); a ValueError naming the file when
    it is not valid JSON or not a JSON object."""
    path = Path(path)
    if not required and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_shard_index(folder: str | os.PathLike) -> list[Path] | None:
    """The shard files `model.safetensors.index.json` names, as paths inside `folder` (None without an index).

    A CheckpointError naming the problem when the index is not JSON, has no `weight_map` object, maps a tensor
    to something other than a file name, or names a file outside the folder (`../x`, an absolute path, a link
    leading out) or one that is missing.
    """
    from llava_next.errors import CheckpointError

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        data = read_json(index)
    except (ValueError, OSError, UnicodeError) as exc:
        raise CheckpointError(f"{index}: cannot read the shard index: {exc}") from None
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' is missing or not a non-empty object of tensor -> shard file")
    root = folder.resolve()
    shards, outside, missing = [], [], []
    for name in sorted({v for v in weight_map.values() if isinstance(v, str)}):
        path = folder / name
        if not name or Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name or \
                path.resolve().parent != root:
            outside.append(name)
        elif not path.is_file():
            missing.append(name)
        else:
            shards.append(path)
    if any(not isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' values must be shard file names (strings)")
    if outside:
        raise CheckpointError(f"{index}: 'weight_map' names shard files outside the checkpoint folder: "
                              f"{', '.join(map(repr, outside[:5]))}; shards must be plain file names in the folder")
    if missing:
        raise CheckpointError(f"{folder}: shards listed in model.safetensors.index.json are missing: {missing}")
    return shards
