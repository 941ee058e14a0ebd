"""`llava-next batch` and the Ray Data API (llava_next.entrypoints.batch.ray_job) on a local 2-CPU Ray cluster.

What it checks: a folder of mixed-size images (scikit-image photographs resized and cropped, generated ones in
several formats) plus a corrupt file gives one row each, with captions equal to our `generate()`'s greedy
caption of the same image (LlavaNextForConditionalGeneration + LlavaNextProcessor on the same tiny checkpoint)
and an error row for the corrupt file; two actors shared the work (the `worker` column); a rerun after adding
images, and after a "killed" run left a part file, captions only the new images and keeps the earlier rows byte
for byte; a parquet input/output; `caption_dataset` on a dataset the caller built.

The cluster is `ray.init(num_cpus=2, include_dashboard=False)` in the test process, on 127.0.0.1 with its own
temp dir, shut down at the end; every wait is bounded (the job fails if its actors do not start in time).
Leaves out: GPUs, joining a separate cluster (--ray-address), multi-node clusters, and killing a real run
mid-way (a part file written by hand stands in for the killed run's flushed rows).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_pipeline import full_checkpoint

from llava_next.entrypoints.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Describe this image in one sentence."
MAX_TOKENS = 4
# loopback stays loopback; no auth token; no usage reporting; workers at normal priority (Ray's default nice 15
# starves them on a shared CI machine)
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_worker_niceness": "0"}


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster of 2 CPUs on 127.0.0.1, started in this process for the module and shut down after.

    The `batch` command and `caption_dataset` find it initialised and use it as it is. Its workers import this
    checkout's llava_next (PYTHONPATH), not another installed copy."""
    import ray

    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING",
             _temp_dir=str(tmp_path_factory.mktemp("ray")), _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        yield "local"
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tiny_root) -> str:
    return str(full_checkpoint(tiny_checkpoint, tiny_root))


def _images():
    """(file name, encoded bytes) of 12 images of mixed sizes and formats."""
    import numpy as np
    from PIL import Image
    from skimage import data

    def encode(image, fmt):
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        return buf.getvalue()

    chelsea, astronaut = Image.fromarray(data.chelsea()), Image.fromarray(data.astronaut())
    coffee, rocket = Image.fromarray(data.coffee()), Image.fromarray(data.rocket())
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 336 * 672 * 3).reshape(336, 672, 3).astype(np.uint8)
    rgba = rng.integers(0, 256, (64, 96, 4), dtype=np.uint8)
    return [
        ("chelsea.png", encode(chelsea, "PNG")),                                   # 451 x 300
        ("chelsea_small.jpg", encode(chelsea.resize((120, 80)), "JPEG")),
        ("astronaut.jpg", encode(astronaut, "JPEG")),                              # 512 x 512
        ("astronaut_tall.png", encode(astronaut.crop((150, 0, 350, 512)), "PNG")),  # 200 x 512
        ("coffee.webp", encode(coffee, "WEBP")),                                   # 600 x 400
        ("coffee_wide.png", encode(coffee.crop((0, 150, 600, 230)), "PNG")),        # 600 x 80
        ("rocket.png", encode(rocket.resize((213, 320)), "PNG")),
        ("camera_gray.png", encode(Image.fromarray(data.camera()).resize((300, 300)), "PNG")),
        ("noise.bmp", encode(Image.fromarray(rng.integers(0, 256, (17, 900, 3), dtype=np.uint8)), "BMP")),
        ("gradient.png", encode(Image.fromarray(gradient), "PNG")),                # 672 x 336
        ("alpha.png", encode(Image.fromarray(rgba, "RGBA"), "PNG")),
        ("palette.gif", encode(chelsea.resize((90, 60)).convert("P"), "GIF")),
    ]


CORRUPT = b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 40  # a JPEG header and nothing after it


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch") / "set"
    root.mkdir()
    for name, data in _images():
        (root / name).write_bytes(data)
    (root / "corrupt.jpg").write_bytes(CORRUPT)
    (root / "notes.txt").write_text("not an image suffix: not an input")
    return root


@pytest.fixture(scope="module")
def reference(checkpoint):
    """caption(path) -> our generate()'s greedy caption of that image file (cached)."""
    from PIL import Image

    from llava_next import LlavaNextForConditionalGeneration, LlavaNextProcessor
    from llava_next.preprocess.images import decode_image

    processor = LlavaNextProcessor.from_pretrained(checkpoint)
    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True)
    cache: dict[str, str] = {}

    def caption(path) -> str:
        key = str(path)
        if key not in cache:
            image = decode_image(Path(path).read_bytes()) if not isinstance(path, Image.Image) else path
            inputs = processor(images=image, text=prompt, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
            cache[key] = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return cache[key]

    return caption


def batch(checkpoint, cluster, input_, output, capsys, workers=2, batch_size=2) -> str:
    """Run `llava-next batch` in-process against the module's cluster; its stderr."""
    code = main(["batch", checkpoint, "--input", str(input_), "--prompt", PROMPT, "--output", str(output),
                 "--max-tokens", str(MAX_TOKENS), "--num-workers", str(workers), "--batch-size", str(batch_size),
                 "--dtype", "float32", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def first_run(checkpoint, cluster, folder, tmp_path_factory):
    """The folder captioned once by two workers: (output path, stderr)."""
    import contextlib

    out = tmp_path_factory.mktemp("out") / "captions.jsonl"
    err = io.StringIO()  # capsys is function-scoped: capture by hand
    with contextlib.redirect_stderr(err):
        code = main(["batch", checkpoint, "--input", str(folder), "--prompt", PROMPT, "--output", str(out),
                     "--max-tokens", str(MAX_TOKENS), "--num-workers", "2", "--batch-size", "2",
                     "--dtype", "float32", "--device", "cpu"])
    assert code == 0, err.getvalue()
    return out, err.getvalue()


# ---------------------------------------------------------------------- tests


def test_folder_gives_one_row_per_image_with_generate_captions(first_run, folder, reference):
    out, err = first_run
    rows = rows_of(out)
    expected = sorted(str(p) for p in folder.iterdir() if p.suffix != ".txt")
    assert [r["image"] for r in rows] == expected  # each input once, sorted, the path as found
    assert set(rows[0]) == {"image", "text", "error", "worker"}
    for row in rows:
        if row["image"].endswith("corrupt.jpg"):
            assert row["text"] is None and "InvalidImageError" in row["error"] and "\n" not in row["error"]
        else:
            assert row["error"] is None, row
            assert row["text"] == reference(row["image"]), row["image"]
    assert len({r["worker"] for r in rows}) >= 2, "both actors should have captioned"  # host:pid:actor id
    assert len({r["worker"].split(":")[1] for r in rows}) >= 2  # two processes
    assert not out.with_name(out.name + ".parts").exists()  # merged, parts removed
    assert f"captioned {len(expected)} now (1 errors" in err and "skipped 0" in err
    assert "\r" not in err  # not a terminal: no progress line


def test_rerun_captions_only_new_images_and_keeps_rows(first_run, folder, checkpoint, cluster, reference, capsys,
                                                      tmp_path):
    out, _ = first_run
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    # a killed run: its last flushed batch is a part file, not yet merged into OUT
    resumed = tmp_path / "captions.jsonl"
    resumed.write_text("".join(lines[:-1]), encoding="utf-8")
    parts = tmp_path / "captions.jsonl.parts"
    parts.mkdir()
    (parts / "part-killed-000000.jsonl").write_text(lines[-1], encoding="utf-8")
    more = folder.parent / "more"
    more.mkdir()
    names = _images()
    (more / "z_extra.png").write_bytes(names[0][1])
    (more / "a_extra.jpg").write_bytes(names[2][1])

    err = batch(checkpoint, cluster, f"{folder.parent}/*/*.*[gfp]", resumed, capsys)  # png, jpg, webp, bmp, gif

    assert "captioned 2 now (0 errors" in err and f"skipped {len(lines)} already written" in err
    new_lines = resumed.read_text(encoding="utf-8").splitlines(keepends=True)
    assert new_lines[:len(lines) - 1] == lines[:-1]  # earlier rows byte for byte, in place
    tail = [json.loads(line) for line in new_lines[len(lines) - 1:]]
    assert [r["image"] for r in tail] == sorted([json.loads(lines[-1])["image"], str(more / "a_extra.jpg"),
                                                str(more / "z_extra.png")])
    for row in tail:
        if "extra" in row["image"]:
            assert row["text"] == reference(row["image"]) and row["error"] is None
    images = [json.loads(line)["image"] for line in new_lines]
    assert len(images) == len(set(images)) == len(lines) + 2
    assert not parts.exists()
    # and a third run has nothing to do
    err = batch(checkpoint, cluster, f"{folder.parent}/*/*.*[gfp]", resumed, capsys)
    assert "captioned 0 now" in err and resumed.read_text(encoding="utf-8").splitlines(keepends=True) == new_lines


def test_parquet_in_and_out(checkpoint, cluster, folder, reference, capsys, tmp_path):
    """Hugging Face datasets' layout: an `image` struct {bytes, path}; no `path` column, so rows are FILE#i."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [folder / "coffee_wide.png", folder / "corrupt.jpg", folder / "alpha.png"]
    source = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": [{"bytes": f.read_bytes(), "path": f.name} for f in files],
                             "label": [0, 1, 2]}), source)
    out = tmp_path / "captions.parquet"
    err = batch(checkpoint, cluster, source, out, capsys, workers=1, batch_size=4)
    rows = sorted(pq.read_table(out).to_pylist(), key=lambda r: r["image"])
    assert [r["image"] for r in rows] == [f"{source}#{i}" for i in range(3)]
    assert rows[0]["text"] == reference(files[0]) and rows[2]["text"] == reference(files[2])
    assert rows[1]["text"] is None and rows[1]["error"].startswith("InvalidImageError")
    assert "captioned 3 now" in err


def test_caption_dataset_on_the_callers_dataset(checkpoint, cluster, folder, reference):
    import ray

    from llava_next.entrypoints.batch.ray_job import Captioner, caption_dataset

    files = [folder / "rocket.png", folder / "corrupt.jpg", folder / "noise.bmp"]
    ds = ray.data.from_items([{"bytes": f.read_bytes(), "name": f.name} for f in files])
    rows = caption_dataset(ds, checkpoint, PROMPT, max_tokens=MAX_TOKENS, num_workers=1, batch_size=3,
                           dtype="float32").take_all()
    rows = {r["name"]: r for r in rows}
    assert set(rows) == {f.name for f in files} and "bytes" not in rows["rocket.png"]
    assert rows["rocket.png"]["text"] == reference(files[0]) and rows["noise.bmp"]["text"] == reference(files[2])
    assert rows["corrupt.jpg"]["text"] is None and "corrupt.jpg" not in rows["corrupt.jpg"]["error"]  # no path
    assert callable(Captioner)


def test_llava_next_never_imports_ray():
    code = ("import sys; import llava_next, llava_next.entrypoints.cli, llava_next.entrypoints.batch.ray_job; "
            "from llava_next.entrypoints.cli import build_parser; build_parser(); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr


def test_progress_on_a_terminal_only():
    from llava_next.entrypoints.batch.ray_job import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Terminal(), io.StringIO()
    for stream in (tty, pipe):
        progress = Progress(total=10, done=4, stream=stream)
        progress.update(2, 0)
        progress.update(4, 1)
        progress.close()
    assert "\r10/10 rows" in tty.getvalue() and "rows/s, 1 errors" in tty.getvalue() and tty.getvalue().endswith("\n")
    assert pipe.getvalue() == ""


def test_json_schema_gives_one_validating_object_per_image(checkpoint, cluster, folder, capsys, tmp_path):
    """`--json-schema FILE`: every row's text is a JSON object that validates (random weights: only the
    constraint makes it so); a bad schema file fails before Ray runs anything."""
    import jsonschema

    schema = {"type": "object", "properties": {
        "subject": {"enum": ["cat", "person", "object", "pattern"]},
        "colors": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 2},
        "count": {"type": "integer", "minimum": 0, "maximum": 20}},
        "required": ["subject", "colors", "count"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    subset = tmp_path / "subset"
    subset.mkdir()
    for name in ("chelsea_small.jpg", "corrupt.jpg", "alpha.png", "noise.bmp"):
        (subset / name).write_bytes((folder / name).read_bytes())
    out = tmp_path / "objects.jsonl"
    code = main(["batch", checkpoint, "--input", str(subset), "--prompt", "Describe it as JSON.", "--output",
                 str(out), "--max-tokens", "80", "--num-workers", "1", "--batch-size", "4", "--dtype", "float32",
                 "--json-schema", str(tmp_path / "schema.json")])
    assert code == 0, capsys.readouterr().err
    rows = {Path(r["image"]).name: r for r in rows_of(out)}
    assert rows["corrupt.jpg"]["error"].startswith("InvalidImageError")
    for name in ("chelsea_small.jpg", "alpha.png", "noise.bmp"):
        assert rows[name]["error"] is None, rows[name]
        jsonschema.validate(json.loads(rows[name]["text"]), schema)
    (tmp_path / "bad.json").write_text("{not json")
    code = main(["batch", checkpoint, "--input", str(subset), "--prompt", "x", "--output", str(tmp_path / "b.jsonl"),
                 "--json-schema", str(tmp_path / "bad.json")])
    assert code != 0 and "not valid JSON" in capsys.readouterr().err
