"""The batch job's rows on disk: its inputs listed, their keys, the output's part files, resume and the merge.

- `list_inputs`: a folder (recursively, image suffixes only), a glob, or one parquet file; `_parquet_dataset`
  reads a parquet input for Ray Data (rows keyed by their `path`, or `FILE#i` without a path column; a path
  repeated in the column gets `PATH#i` from its second row on, `row_keys`, so no row is dropped).
- Rows are flushed per batch as atomically renamed JSONL part files under `OUT.parts/` (`write_part`);
  `merge` writes OUT as its old rows (byte for byte for JSONL) plus the parts' rows not already there, sorted by
  `image`, then removes the parts; a kill between the replace and the cleanup leaves parts whose rows are in
  OUT, and the next merge skips them.
- File names need not be UTF-8: a row's `image` is the str `os.fsdecode` gives (surrogate escapes); JSONL
  writes it with JSON escapes (lossless with Python's json, the file stays UTF-8); parquet, whose strings must
  be UTF-8, gets `\\xNN` text for the undecodable bytes (`_parquet_text`; resume compares in that form).

Leaves out: remote filesystems, a directory of parquet files, error rows retried on a rerun.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
COLUMNS = ("image", "text", "error", "worker")
MAX_ERROR_CHARS = 300


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # a non-UTF-8 file name in a message
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


def _display(path) -> str:
    """A path (str, or bytes of any encoding) as printable UTF-8 text for messages."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# ---------------------------------------------------------------------- inputs


def list_inputs(spec: str):
    """("files", [paths as found, sorted]) for a folder or a glob; ("parquet", path) for one .parquet file."""
    if spec.endswith(".parquet") and os.path.isfile(spec):
        return "parquet", spec
    if os.path.isdir(spec):
        found = [os.path.join(root, name) for root, dirs, names in os.walk(spec) for name in names
                 if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")]
        if not found:
            raise ValueError(f"--input {spec}: no image files ({', '.join(IMAGE_SUFFIXES)}) in that folder")
        return "files", sorted(found)
    found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    if not found:
        raise ValueError(f"--input {spec}: no such folder, parquet file, or files matching that pattern")
    return "files", found


def _parquet_columns(path: str) -> tuple[str, str | None]:
    import pyarrow.parquet as pq

    names = pq.ParquetFile(path).schema_arrow.names
    image = "image" if "image" in names else "bytes" if "bytes" in names else None
    if image is None:
        raise ValueError(f"--input {path}: no 'image' or 'bytes' column (columns: {names})")
    return image, ("path" if "path" in names else None)


def _parquet_dataset(ray, path: str, done: set[str]):
    """(dataset with `image_bytes` and `path`, total rows, rows still to do) for one parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image, path_col = _parquet_columns(path)
    total = pq.ParquetFile(path).metadata.num_rows
    paths = None if path_col is None else [
        str(p) for p in pq.read_table(path, columns=[path_col]).column(path_col).to_pylist()]
    # no path column (rows numbered FILE#i), or a repeated path that would be one row (repeats numbered
    # PATH#i): the keys are made here and travel as the `path` column
    if paths is None or len(set(paths)) < len(paths):
        keys = [f"{path}#{i}" for i in range(total)] if paths is None else row_keys(paths)
        table = pq.read_table(path, columns=[image]).append_column("path", pa.array(keys, pa.string()))
        table = table.filter(pa.array([k not in done for k in keys]))
        return ray.data.from_arrow(table), total, table.num_rows
    todo = sum(1 for p in paths if p not in done)
    ds = ray.data.read_parquet(path, columns=[image, path_col])
    if done:
        frozen = frozenset(done)
        ds = ds.filter(lambda row: str(row[path_col]) not in frozen)
    return ds, total, todo


def row_keys(paths: list[str]) -> list[str]:
    """One key per row: the path, and for the second and later rows with the same path `PATH#ROW` (ROW the row
    number in the file), so every row of a parquet file with repeated paths gets its own output row."""
    seen, keys = set(), []
    for i, p in enumerate(paths):
        keys.append(p if p not in seen else f"{p}#{i}")
        seen.add(p)
    return keys


# ---------------------------------------------------------------------- output, resume


def _output_format(path: str) -> str:
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"--output {path}: must end in .jsonl or .parquet")


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _json_line(row: dict) -> str:
    """One JSONL line; a file name that is not UTF-8 (surrogate-escaped by os.fsdecode) is written with JSON
    escapes (`\\udcff`), which json.loads turns back into the same str: lossless, and the file stays UTF-8."""
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(row, ensure_ascii=True)
    return line + "\n"


def _parquet_text(value):
    """Parquet strings must be UTF-8: undecodable bytes of a file name become `\\xNN` text there."""
    return None if value is None else _display(value)


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row["image"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"cannot resume from {path}: line {number} is not a row with an 'image' "
                                 f"({_one_line(exc)})") from exc
            rows.append((line if line.endswith("\n") else line + "\n", row))
    return rows


def read_output(out: Path) -> list[tuple[str | None, dict]]:
    """The rows already in OUT, in order: (the raw JSONL line or None for parquet, the row)."""
    if not out.is_file():
        return []
    if _output_format(str(out)) == "jsonl":
        return _read_jsonl(out)
    import pyarrow.parquet as pq

    return [(None, row) for row in pq.read_table(out).to_pylist()]


def read_parts(out: Path) -> list[dict]:
    parts = _parts_dir(out)
    if not parts.is_dir():
        return []
    return [row for part in sorted(parts.glob("part-*.jsonl")) for _, row in _read_jsonl(part)]


def write_part(out: Path, rows: list[dict], run_id: str, index: int) -> None:
    """One batch of rows as its own JSONL file, flushed and renamed into place (never half-written)."""
    parts = _parts_dir(out)
    parts.mkdir(parents=True, exist_ok=True)
    final = parts / f"part-{run_id}-{index:06d}.jsonl"
    tmp = parts / f".{final.name}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(_json_line(row) for row in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


def merge(out: Path) -> tuple[int, int]:
    """OUT = its rows as they are + the parts' rows not already there, sorted by image; then the parts go.
    Returns (rows in OUT, rows added)."""
    old = read_output(out)
    key = _parquet_text if _output_format(str(out)) == "parquet" else str
    seen = {row["image"] for _, row in old}
    new = {}
    for row in read_parts(out):  # a row already in OUT (a kill between the replace and the cleanup) is skipped
        if key(row["image"]) not in seen and row["image"] not in new:
            new[row["image"]] = {c: row.get(c) for c in COLUMNS}
    added = [new[k] for k in sorted(new)]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    if _output_format(str(out)) == "jsonl":
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line for line, _ in old)
            for row in added:
                f.write(_json_line(row))
            f.flush()
            os.fsync(f.fileno())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [row for _, row in old] + added
        names = list(COLUMNS) + [k for k in (old[0][1] if old else {}) if k not in COLUMNS]
        pq.write_table(pa.table({k: pa.array([_parquet_text(r.get(k)) for r in rows], pa.string())
                                 for k in names}), tmp)
    os.replace(tmp, out)
    parts = _parts_dir(out)
    if parts.is_dir():
        for part in parts.iterdir():
            part.unlink()
        parts.rmdir()
    return len(old) + len(added), len(added)
