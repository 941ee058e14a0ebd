"""Dataset-scale captioning on Ray Data: `llava-next batch` and a Python API over a `ray.data.Dataset`.

    llava-next batch MODEL --input DIR|GLOB|FILE.parquet --prompt TEXT --output OUT.jsonl|OUT.parquet
        [--max-tokens N] [--temperature T] [--ray-address ADDR] [--num-workers N] [--batch-size N]
        [--dtype ...] [--device cpu|cuda] [--json-schema SCHEMA.json]

What it implements:
- `Captioner`: a `map_batches`-ready class. Each Ray actor builds one engine (`llava_next.LLM`, continuous
  batching) in its constructor; each call decodes the batch's image bytes with llava_next's own checks
  (`preprocess.images.decode_image`: format allow-list, pixel cap before decoding, truncation, EXIF, RGB; never
  Ray's `read_images`, whose resize would break anyres), sends the decodable ones through the chat template as
  one user message (the image, then the prompt) and adds the columns `text`, `error` (None, or a one-line
  reason) and `worker` (host:pid:actor id). A bad image, or an engine error on one image, becomes an error row;
  it never stops the job. With `json_schema` (`--json-schema FILE`) each answer is constrained to the schema
  (llguidance, sampling/structured.py): `text` is one JSON object that validates, or the row is an error
  ("cut at max_tokens") when the answer did not finish.
- `caption_dataset(ds, model, prompt, ...)`: `ds.map_batches(Captioner, ...)` with one actor per worker
  (`ActorPoolStrategy(size=num_workers)`), `num_gpus=1` per actor on CUDA, else `num_cpus=1`.
- `run(args)`, the `batch` command: lists the inputs (a folder, searched recursively for image suffixes; a glob;
  or one parquet file with an `image` column of bytes or of {bytes, path} structs, or a `bytes` column, plus an
  optional `path` column), skips those already in the output (resume), captions the rest on a local Ray
  cluster it starts (or the one at --ray-address), and writes one row per input: `image` (the path as found),
  `text`, `error`, `worker`. Rows are written as they arrive, one atomically renamed JSONL part file per batch
  under `OUT.parts/`, so a killed run loses at most the rows in flight; at the end the parts are merged into
  OUT: the rows already there first, byte for byte (JSONL) or value for value (parquet), then the new rows
  sorted by `image`. A rerun after a kill merges the earlier parts too. Progress (rows done / total, rows/s)
  goes to stderr when it is a terminal; nothing but a final summary line otherwise.

Resume matches inputs by the path as found, so rerun with the same --input spelling (a relative folder and its
absolute path are different inputs). Ray's start-up lines and its one "constructor arguments in the object
store" log line still reach stderr. Ray runs its workers at nice 15: on a shared machine set
RAY_worker_niceness=0 to run them at normal priority.

Leaves out: retrying error rows on a rerun (they count as written; delete them from OUT to retry), more than
one image or prompt per row, a directory of parquet files or webdataset shards as input, parquet inputs without
a `path` column beyond what fits in the driver (they are read there to number their rows), remote filesystems
(s3://, gs://) for the folder/glob inputs, per-row prompts, and tensor parallelism inside an actor.
`import llava_next` and the other commands never import ray: it is imported inside these functions.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from llava_next.errors import LlavaNextError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
COLUMNS = ("image", "text", "error", "worker")
MAX_ERROR_CHARS = 300
WAIT_FOR_WORKERS_S = 900  # every actor must have loaded its engine by then, else the job fails (never hangs)


class BatchJobError(LlavaNextError):
    """The Ray job failed (an actor died, the cluster went away): the rows flushed so far stay in OUT.parts/
    and a rerun of the same command resumes from them."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError("llava-next batch needs Ray Data: pip install 'llava_next[ray]'") from exc
    return ray


def _actor_device(device: str | None) -> str:
    """Inside a GPU actor Ray sets CUDA_VISIBLE_DEVICES to its one GPU, so every cuda:N means cuda."""
    if device is None:
        return "cpu"
    return "cuda" if str(device).startswith("cuda") else str(device)


# ---------------------------------------------------------------------- the map_batches class


class Captioner:
    """One engine per Ray actor; `__call__(batch)` adds `text`, `error` and `worker` to a batch of images.

    The batch (a pyarrow Table, a pandas DataFrame or a dict of arrays) has `image_column` of encoded image bytes
    (or {bytes, path} structs as Hugging Face datasets store images), or, when that column is absent, a
    `path_column` of local paths to read. The image column is dropped from the output unless
    `keep_image_column`; every other column is passed through. Use it as
    `ds.map_batches(Captioner, fn_constructor_kwargs={...}, compute=ActorPoolStrategy(size=N), batch_format="pyarrow")`.
    """

    def __init__(self, model: str, prompt: str, *, max_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, dtype: str = "auto", device: str | None = "cpu",
                 image_column: str = "bytes", path_column: str = "path", keep_image_column: bool = False,
                 engine_kwargs: dict | None = None, json_schema: dict | None = None):
        from llava_next.engine.llm import LLM
        from llava_next.engine.params import SamplingParams
        from llava_next.sampling.structured_params import StructuredOutputsParams

        self.prompt = prompt
        self.image_column, self.path_column, self.keep_image_column = image_column, path_column, keep_image_column
        constraint = None if json_schema is None else StructuredOutputsParams(json=json_schema)
        self.params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                                     structured_outputs=constraint)
        self.llm = LLM(model, dtype=dtype, device=_actor_device(device), **(engine_kwargs or {}))
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{_actor_id()}"

    # one conversation per image: the chat template renders a user message with the image and the prompt
    def _conversation(self, image) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": self.prompt}]}]

    def caption(self, images: list) -> list[tuple[str | None, str | None]]:
        """(text, error) per PIL image: all in one engine call; if that fails, one by one so only the bad
        ones become errors (the engine validates every prompt before it runs any)."""
        if not images:
            return []
        try:
            outputs = self.llm.chat([self._conversation(im) for im in images], self.params, use_tqdm=False)
            return [self._result(out.outputs[0]) for out in outputs]
        except Exception:  # isolate the failing image below
            if len(images) == 1:
                raise
        results = []
        for image in images:
            try:
                results.append(self.caption([image])[0])
            except Exception as exc:  # noqa: BLE001 - one image's failure is its row's error
                results.append((None, f"{type(exc).__name__}: {_one_line(exc)}"))
        return results

    def _result(self, out) -> tuple[str | None, str | None]:
        if self.params.structured_outputs is not None and out.finish_reason != "stop":
            return None, f"StructuredOutputError: the JSON answer was cut at max_tokens ({out.finish_reason})"
        return out.text, None

    def __call__(self, batch):
        import pyarrow as pa

        from llava_next.preprocess.images import decode_image

        table = _to_arrow(batch)
        n = table.num_rows
        paths = (table.column(self.path_column).to_pylist() if self.path_column in table.column_names
                 else [None] * n)
        if self.image_column in table.column_names:
            raw = table.column(self.image_column).to_pylist()
        elif self.path_column in table.column_names:
            raw = [None] * n
        else:
            raise KeyError(f"the batch has neither an {self.image_column!r} column of image bytes nor a "
                           f"{self.path_column!r} column of paths; columns: {table.column_names}")
        images, errors = [None] * n, [None] * n
        for i in range(n):
            data, path = raw[i], paths[i]
            if isinstance(data, dict):  # {bytes, path}: Hugging Face datasets' Image feature
                data, path = data.get("bytes"), path or data.get("path")
            source = str(path) if path else f"row {i}"
            try:
                if data is None:
                    if not path:
                        raise ValueError("no image bytes and no path")
                    with open(path, "rb") as f:
                        data = f.read()
                images[i] = decode_image(bytes(data), source=source)
            except Exception as exc:  # noqa: BLE001 - a bad file is an error row, never a failed job
                errors[i] = f"{type(exc).__name__}: {_one_line(exc)}"
        ok = [i for i in range(n) if images[i] is not None]
        texts = [None] * n
        for i, (text, error) in zip(ok, self.caption([images[i] for i in ok])):
            texts[i], errors[i] = text, error
        if not self.keep_image_column and self.image_column in table.column_names:
            table = table.drop_columns([self.image_column])
        table = table.drop_columns([c for c in ("text", "error", "worker") if c in table.column_names])
        table = table.append_column("text", pa.array(texts, pa.string()))
        table = table.append_column("error", pa.array(errors, pa.string()))
        return table.append_column("worker", pa.array([self.worker] * n, pa.string()))


def _actor_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_actor_id() or "driver"
    except Exception:  # noqa: BLE001 - outside Ray (a plain call): no actor
        return "local"


def _to_arrow(batch):
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, dict):
        return pa.table({k: pa.array(list(v)) for k, v in batch.items()})
    return pa.Table.from_pandas(batch, preserve_index=False)  # pandas


def caption_dataset(ds, model: str, prompt: str, *, max_tokens: int = 64, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int | None = None, num_workers: int = 1, batch_size: int = 8,
                    dtype: str = "auto", device: str = "cpu", image_column: str = "bytes", path_column: str = "path",
                    keep_image_column: bool = False, engine_kwargs: dict | None = None, json_schema: dict | None = None,
                    **map_batches_kwargs):
    """`ds` with the caption columns (`text`, `error`, `worker`) added by `num_workers` Captioner actors.

    `ds` has `image_column` (encoded bytes) or `path_column` (local paths). Lazy, like every Ray Data
    transform: write it (`.write_parquet(...)`) or iterate it to run. Extra keyword arguments go to
    `map_batches` (e.g. `memory=`, `accelerator_type=`).
    """
    ray = _import_ray()

    resources = {"num_gpus": 1} if str(device).startswith("cuda") else {"num_cpus": 1}
    resources.update(map_batches_kwargs)
    return ds.map_batches(
        Captioner,
        fn_constructor_kwargs={"model": str(model), "prompt": prompt, "max_tokens": max_tokens,
                               "temperature": temperature, "top_p": top_p, "seed": seed, "dtype": dtype,
                               "device": device, "image_column": image_column, "path_column": path_column,
                               "keep_image_column": keep_image_column, "engine_kwargs": engine_kwargs,
                               "json_schema": json_schema},
        batch_size=batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=num_workers), **resources)


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
    if path_col is None:  # number the rows here: FILE#i
        table = pq.read_table(path, columns=[image])
        table = table.append_column("path", pa.array([f"{path}#{i}" for i in range(total)], pa.string()))
        keep = [p not in done for p in table.column("path").to_pylist()]
        table = table.filter(pa.array(keep))
        return ray.data.from_arrow(table), total, table.num_rows
    paths = pq.read_table(path, columns=[path_col]).column(path_col).to_pylist()
    todo = sum(1 for p in paths if str(p) not in done)
    ds = ray.data.read_parquet(path, columns=[image, path_col])
    if done:
        frozen = frozenset(done)
        ds = ds.filter(lambda row: str(row[path_col]) not in frozen)
    return ds, total, todo


# ---------------------------------------------------------------------- output, resume


def _output_format(path: str) -> str:
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"--output {path}: must end in .jsonl or .parquet")


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


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
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


def merge(out: Path) -> tuple[int, int]:
    """OUT = its rows as they are + the parts' rows not already there, sorted by image; then the parts go.
    Returns (rows in OUT, rows added)."""
    old = read_output(out)
    seen = {row["image"] for _, row in old}
    new = {}
    for row in read_parts(out):
        if row["image"] not in seen and row["image"] not in new:
            new[row["image"]] = {c: row.get(c) for c in COLUMNS}
    added = [new[k] for k in sorted(new)]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    if _output_format(str(out)) == "jsonl":
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line for line, _ in old)
            for row in added:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [row for _, row in old] + added
        names = list(COLUMNS) + [k for k in (old[0][1] if old else {}) if k not in COLUMNS]
        pq.write_table(pa.table({k: pa.array([r.get(k) for r in rows], pa.string()) for k in names}), tmp)
    os.replace(tmp, out)
    parts = _parts_dir(out)
    if parts.is_dir():
        for part in parts.iterdir():
            part.unlink()
        parts.rmdir()
    return len(old) + len(added), len(added)


# ---------------------------------------------------------------------- progress


class Progress:
    """`done/total rows, rows/s` on one rewritten stderr line, only when stderr is a terminal."""

    def __init__(self, total: int, done: int, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total, self.done, self.new, self.errors = total, done, 0, 0
        self.start = time.perf_counter()
        self.last = 0.0
        self.first = None  # (time, rows) of the first batch: the rate after it leaves out start-up
        self.end = None

    def update(self, rows: int, errors: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, rows)
        self.end = now
        self.done, self.new, self.errors = self.done + rows, self.new + rows, self.errors + errors
        if self.enabled and (now - self.last >= 0.5 or self.done >= self.total):
            self.last = now
            self.stream.write(f"\r{self.done}/{self.total} rows, {self.rate():.2f} rows/s, {self.errors} errors")
            self.stream.flush()

    def rate(self) -> float:
        """Rows per second since the job started (actor start-up and model loading included)."""
        return self.new / max((self.end or time.perf_counter()) - self.start, 1e-9)

    def steady_rate(self) -> float | None:
        """Rows per second after the first batch arrived (None with fewer than two batches)."""
        if self.first is None or self.end is None or self.end <= self.first[0]:
            return None
        return (self.new - self.first[1]) / (self.end - self.first[0])

    def close(self) -> None:
        if self.enabled and self.last:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------- Ray session


def connect(ray, address: str | None) -> bool:
    """Join the cluster at `address`, or start a local one; True when this call started the session (and so
    must shut it down). An already initialised session (a notebook, a test) is used as it is."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        return True
    # a local cluster's workers import this very llava_next (not another copy installed in site-packages)
    package_root = str(Path(__file__).resolve().parents[3])
    pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    return True


def _quiet_ray_data(ray, interactive: bool) -> None:
    import logging

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours replaces them
    # start work only when every actor has its engine (fair spread; too few CPUs/GPUs is an error, not a hang)
    ctx.wait_for_min_actors_s = WAIT_FOR_WORKERS_S
    if not interactive:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


# ---------------------------------------------------------------------- the command


def _json_schema(path: str | None) -> dict | None:
    """The --json-schema file's schema, checked (size, nesting, JSON) before Ray starts; ValueError/OSError."""
    if path is None:
        return None
    from llava_next.sampling.structured_params import StructuredOutputsParams

    text = Path(path).read_text(encoding="utf-8")
    try:
        return StructuredOutputsParams(json=text).json
    except ValueError as exc:
        raise ValueError(f"--json-schema {path}: {exc}") from None


def run(args, stream=None) -> int:
    """The `batch` command (args from cli.py). Returns the exit status; raises ValueError/OSError for bad
    arguments, which cli.py prints as one line."""
    stream = stream or sys.stderr
    out = Path(args.output)
    fmt = _output_format(args.output)
    kind, found = list_inputs(args.input)
    schema = _json_schema(getattr(args, "json_schema", None))
    if fmt == "parquet" and out.is_file():
        read_output(out)  # fail early on an unreadable output
    done = {row["image"] for _, row in read_output(out)} | {row["image"] for row in read_parts(out)}

    ray = _import_ray()
    started = connect(ray, args.ray_address)
    try:
        _quiet_ray_data(ray, stream.isatty())
        if kind == "files":
            todo = [p for p in found if p not in done]
            total = len(found)
            ds = ray.data.from_items([{"path": p} for p in todo]) if todo else None
        else:
            ds, total, n_todo = _parquet_dataset(ray, found, done)
            todo = range(n_todo)
        image_column = "bytes" if kind == "files" else _parquet_columns(found)[0]
        progress = Progress(total, total - len(todo), stream)
        run_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
        if len(todo):
            captioned = caption_dataset(
                ds, args.model, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                num_workers=args.num_workers, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                image_column=image_column, path_column="path", json_schema=schema)
            try:
                for index, batch in enumerate(captioned.iter_batches(batch_size=None, batch_format="pyarrow")):
                    rows = [{"image": str(r["path"]), "text": r["text"], "error": r["error"],
                             "worker": r["worker"]} for r in batch.to_pylist()]
                    write_part(out, rows, run_id, index)
                    progress.update(len(rows), sum(r["error"] is not None for r in rows))
            except ray.exceptions.RayError as exc:
                progress.close()
                raise BatchJobError(f"the Ray job failed after {progress.new} rows ({_one_line(exc)}); they are "
                                    f"kept in {_parts_dir(out)}: rerun the same command to resume") from exc
        progress.close()
        n_rows, _ = merge(out)
    finally:
        if started:
            ray.shutdown()
    steady = progress.steady_rate()
    steady = "" if steady is None else f", {steady:.2f} after the first batch"
    stream.write(f"{out}: {n_rows} rows; captioned {progress.new} now ({progress.errors} errors, "
                 f"{progress.rate():.2f} rows/s{steady}), skipped {total - len(todo)} already written\n")
    stream.flush()
    return 0
