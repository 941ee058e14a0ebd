"""The batch job's inputs and output (entrypoints/batch/ray_job.py), issue 22 item 10.

Without Ray: an output path that is a folder fails before any work (Ray is never imported); a `Captioner` built
and called outside Ray never imports or starts Ray (even with RAY_ADDRESS naming a dead cluster); `merge` after a
kill between the replace and the cleanup writes no row twice; repeated parquet paths get one key per row.
With the module's local Ray cluster (one run, then a rerun): a FIFO named .jpg is an error row (not a hang), a
symlink to /dev/zero is an error row (regular files only, byte cap), and a file whose name is not UTF-8 is
captioned with its name carried losslessly, then skipped on the rerun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from argparse import Namespace

import pytest
from test_batch_ray import (  # noqa: F401
    PROMPT,
    RAY_ENV,
    ROOT,
    _images,
    batch,
    checkpoint,
    cluster,
    reference,
)

from llava_next.entrypoints.batch import ray_job
from llava_next.entrypoints.batch import rows as batch_rows


def test_an_output_folder_fails_before_any_work(tmp_path):
    out = tmp_path / "captions.jsonl"
    out.mkdir()
    args = Namespace(output=str(out), input=str(tmp_path / "missing"), ray_address=None)
    with pytest.raises(ValueError, match="not a file"):
        ray_job.run(args)


def test_captioner_outside_ray_never_starts_ray(checkpoint):  # noqa: F811
    code = ("import sys, io, time\n"
            "from llava_next.entrypoints.batch.ray_job import Captioner\n"
            "from PIL import Image\n"
            f"c = Captioner({checkpoint!r}, 'Describe.', max_tokens=2, dtype='float32')\n"
            "buf = io.BytesIO(); Image.new('RGB', (40, 30), 'red').save(buf, 'PNG')\n"
            "t = time.monotonic(); out = c({'bytes': [buf.getvalue()]})\n"
            "assert out.column('error').to_pylist() == [None], out\n"
            "assert c.worker.endswith(':local'), c.worker\n"
            "assert 'ray' not in sys.modules or not sys.modules['ray'].is_initialized(), 'ray started'\n"
            "print('OK', round(time.monotonic() - t, 2))\n")
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:9", PYTHONPATH=str(ROOT))  # a stale cluster address
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90,
                          check=False)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


def test_merge_after_a_kill_between_replace_and_cleanup_writes_no_row_twice(tmp_path):
    out = tmp_path / "captions.jsonl"
    rows = [{"image": f"/x/{i}.png", "text": f"t{i}", "error": None, "worker": "w"} for i in range(3)]
    batch_rows.write_part(out, rows[:2], "run1", 0)
    assert batch_rows.merge(out) == (2, 2)
    first = out.read_bytes()
    # the same run killed after os.replace(tmp, OUT) but before the parts were removed: they are still there
    batch_rows.write_part(out, rows[:2], "run1", 0)
    batch_rows.write_part(out, rows[2:], "run2", 0)
    assert batch_rows.merge(out) == (3, 1)
    lines = out.read_bytes().splitlines(keepends=True)
    assert b"".join(lines[:2]) == first and len(lines) == 3
    assert [json.loads(line)["image"] for line in lines] == [r["image"] for r in rows]


def test_repeated_parquet_paths_get_one_key_per_row():
    assert batch_rows.row_keys(["a.png", "b.png", "a.png", "a.png"]) == ["a.png", "b.png", "a.png#2", "a.png#3"]


def test_non_utf8_names_round_trip_through_jsonl(tmp_path):
    name = os.fsdecode(b"/data/caf\xe9-\xff.png")  # Latin-1 bytes: not UTF-8
    out = tmp_path / "c.jsonl"
    batch_rows.write_part(out, [{"image": name, "text": "t", "error": None, "worker": "w"}], "r", 0)
    batch_rows.merge(out)
    out.read_text(encoding="utf-8")  # still a UTF-8 file
    assert [row["image"] for _, row in batch_rows.read_output(out)] == [name]
    assert os.fsencode(name) == b"/data/caf\xe9-\xff.png"


def test_fifo_dev_zero_and_non_utf8_names_in_a_real_run(checkpoint, cluster, reference, capsys,  # noqa: F811
                                                        tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "in"
    folder.mkdir()
    png = dict(_images())["chelsea_small.jpg"]
    odd = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")  # not UTF-8
    with open(odd, "wb") as f:
        f.write(png)
    os.mkfifo(folder / "pipe.jpg")
    os.symlink("/dev/zero", folder / "zero.png")
    out = tmp_path / "captions.jsonl"
    start = time.monotonic()
    err = batch(checkpoint, cluster, folder, out, capsys, workers=1, batch_size=4)
    assert time.monotonic() - start < 240
    rows = {r["image"]: r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert set(rows) == {os.fsdecode(odd), str(folder / "pipe.jpg"), str(folder / "zero.png")}
    assert rows[os.fsdecode(odd)]["error"] is None
    assert rows[os.fsdecode(odd)]["text"] == reference(folder / "caf\udce9.jpg")
    for bad in ("pipe.jpg", "zero.png"):
        assert rows[str(folder / bad)]["text"] is None and "regular file" in rows[str(folder / bad)]["error"]
    assert "captioned 3 now (2 errors" in err
    err = batch(checkpoint, cluster, folder, out, capsys, workers=1, batch_size=4)  # the rerun: nothing to do
    assert "captioned 0 now" in err and "skipped 3" in err
    # a parquet file whose path column repeats a path: every row is captioned
    source = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"image": [png, png, b"junk"], "path": ["a.jpg", "a.jpg", "a.jpg"]}), source)
    pout = tmp_path / "dup.jsonl"
    err = batch(checkpoint, cluster, source, pout, capsys, workers=1, batch_size=4)
    images = [json.loads(line)["image"] for line in pout.read_text(encoding="utf-8").splitlines()]
    assert sorted(images) == ["a.jpg", "a.jpg#1", "a.jpg#2"] and "captioned 3 now (1 errors" in err
