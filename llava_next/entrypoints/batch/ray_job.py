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
- `run(args)`, the `batch` command: lists the inputs, skips those already in the output (resume), captions the
  rest on a local Ray cluster it starts (or the one at --ray-address) and writes one row per input: `image`
  (the path as found), `text`, `error`, `worker`, flushed per batch and merged at the end (rows.py). An output
  path that is a folder fails before any work. Inputs are read only as regular files of at most `max_bytes`
  (a FIFO named .jpg, a device, a symlink to /dev/zero are error rows, never a hang), their names carried as
  bytes through Ray. Progress (rows done / total, rows/s) goes to stderr when it is a terminal.

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

import os
import socket
import sys
import time
import uuid
from pathlib import Path

from llava_next.entrypoints.batch import rows as files
from llava_next.entrypoints.batch.rows import (
    _display,
    _one_line,
    _parquet_text,
    _parts_dir,
    read_output,
)
from llava_next.errors import LlavaNextError

MAX_IMAGE_BYTES = 64 * 1024 * 1024  # an input file (or parquet cell) larger than this is an error row
WAIT_FOR_WORKERS_S = 900  # every actor must have loaded its engine by then, else the job fails (never hangs)


class BatchJobError(LlavaNextError):
    """The Ray job failed (an actor died, the cluster went away): the rows flushed so far stay in OUT.parts/
    and a rerun of the same command resumes from them."""


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
                 engine_kwargs: dict | None = None, max_bytes: int = MAX_IMAGE_BYTES, json_schema: dict | None = None):
        from llava_next.entrypoints.llm import LLM
        from llava_next.sampling.params import SamplingParams
        from llava_next.sampling.structured_params import StructuredOutputsParams

        self.prompt = prompt
        self.image_column, self.path_column, self.keep_image_column = image_column, path_column, keep_image_column
        self.max_bytes = max_bytes
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

        from llava_next.preprocess.images import decode_image, read_regular_file

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
            source = _display(path) if path else f"row {i}"
            try:
                if data is None:
                    if not path:
                        raise ValueError("no image bytes and no path")
                    # a regular file only (a FIFO named .jpg would block this actor forever), at most max_bytes
                    data = read_regular_file(path, self.max_bytes, name=source)
                elif len(data) > self.max_bytes:
                    raise ValueError(f"{source}: {len(data):,} bytes, over the limit of {self.max_bytes:,}")
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
    ray = sys.modules.get("ray")  # never import (and so never start or dial) Ray outside a Ray worker
    if ray is None or not ray.is_initialized():
        return "local"
    try:
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
    fmt = files._output_format(args.output)
    if out.exists() and not out.is_file():  # found now, not after the whole job
        raise ValueError(f"--output {_display(out)}: exists and is not a file")
    if _parts_dir(out).exists() and not _parts_dir(out).is_dir():
        raise ValueError(f"--output {_display(out)}: {_display(_parts_dir(out))} exists and is not a folder")
    schema = _json_schema(getattr(args, "json_schema", None))
    kind, found = files.list_inputs(args.input)
    if fmt == "parquet" and out.is_file():
        read_output(out)  # fail early on an unreadable output
    key = _parquet_text if fmt == "parquet" else str  # the text a row's `image` has once written to OUT
    done = {row["image"] for _, row in read_output(out)} | {key(row["image"]) for row in files.read_parts(out)}

    ray = _import_ray()
    started = connect(ray, args.ray_address)
    try:
        _quiet_ray_data(ray, stream.isatty())
        if kind == "files":
            todo = [p for p in found if key(p) not in done]
            total = len(found)
            # paths travel as bytes: a file name need not be UTF-8, and Arrow strings must be
            ds = ray.data.from_items([{"path": os.fsencode(p)} for p in todo]) if todo else None
        else:
            ds, total, n_todo = files._parquet_dataset(ray, found, done)
            todo = range(n_todo)
        image_column = "bytes" if kind == "files" else files._parquet_columns(found)[0]
        progress = Progress(total, total - len(todo), stream)
        run_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
        if len(todo):
            captioned = caption_dataset(
                ds, args.model, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                num_workers=args.num_workers, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                image_column=image_column, path_column="path", json_schema=schema)
            try:
                for index, batch in enumerate(captioned.iter_batches(batch_size=None, batch_format="pyarrow")):
                    rows = [{"image": os.fsdecode(r["path"]) if isinstance(r["path"], bytes) else str(r["path"]),
                             "text": r["text"], "error": r["error"],
                             "worker": r["worker"]} for r in batch.to_pylist()]
                    files.write_part(out, rows, run_id, index)
                    progress.update(len(rows), sum(r["error"] is not None for r in rows))
            except ray.exceptions.RayError as exc:
                progress.close()
                raise BatchJobError(f"the Ray job failed after {progress.new} rows ({_one_line(exc)}); they are "
                                    f"kept in {_parts_dir(out)}: rerun the same command to resume") from exc
        progress.close()
        n_rows, _ = files.merge(out)
    finally:
        if started:
            ray.shutdown()
    steady = progress.steady_rate()
    steady = "" if steady is None else f", {steady:.2f} after the first batch"
    stream.write(f"{out}: {n_rows} rows; captioned {progress.new} now ({progress.errors} errors, "
                 f"{progress.rate():.2f} rows/s{steady}), skipped {total - len(todo)} already written\n")
    stream.flush()
    return 0
