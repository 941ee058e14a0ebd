"""Resolve a local folder or a Hugging Face hub id to files on disk.

A local folder never touches the network. A hub id goes through `huggingface_hub` (its cache, its token,
`HF_HUB_OFFLINE`). A folder or id that does not exist gives an OSError that names it.

Leaves out: remote code (`auto_map`) is never imported.
"""

from __future__ import annotations

import os
from pathlib import Path

# What a model needs; pickle files are fetched only when the caller opts in.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_folder(name_or_path: str | os.PathLike, allow_patterns=None, **hub_kwargs) -> Path:
    """A local folder as is, or a hub snapshot downloaded (or taken from the cache) with `allow_patterns`."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise NotADirectoryError(f"{name!r} is a file; expected a checkpoint folder or a hub id")
    if not _looks_like_hub_id(name):
        raise FileNotFoundError(f"checkpoint folder {name!r} does not exist (and it is not a hub id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns or MODEL_PATTERNS, **hub_kwargs))
    except HFValidationError as exc:
        raise FileNotFoundError(f"{name!r} is neither a local folder nor a valid hub id: {exc}") from exc
    except Exception as exc:  # network down, repo missing, gated, offline mode without a cache
        raise OSError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Check the id and your connection, or pass a local folder."
        ) from exc


def resolve_file(name_or_path: str | os.PathLike, filename: str, required: bool = True, **hub_kwargs) -> Path | None:
    """One file of a local folder or a hub repo; None when optional and absent."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        target = path / filename
        if target.is_file():
            return target
        if required:
            raise FileNotFoundError(f"{filename} not found in {str(name_or_path)!r}")
        return None
    folder = resolve_folder(name_or_path, allow_patterns=[filename], **hub_kwargs)
    target = folder / filename
    if target.is_file():
        return target
    if required:
        raise FileNotFoundError(f"{filename} not found in hub repo {str(name_or_path)!r}")
    return None
