"""Malformed checkpoints (issue 15, item 2) and CLI argument checks (item 5), through the public API and the CLI.

Each malformed config.json or shard index gives a `CheckpointError` naming the field, at load time and quickly
(a 100,000-layer config is refused before anything is built); the CLI answers each in one line on stderr with a
non-zero status and no traceback. Sampling flags out of range are argparse usage errors before any model loads;
Ctrl-C during a chat answer drops that answer and the chat goes on; pipeline(device=0) without CUDA is an error.

Leaves out: the tensor-level checks (missing/misshaped tensors: tests/test_weights.py).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from llava_next.config import LlavaNextConfig
from llava_next.entrypoints.cli import main
from llava_next.errors import CheckpointError


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    from llava_next.entrypoints.demo import build_demo_checkpoint

    return Path(build_demo_checkpoint(tmp_path_factory.mktemp("hard") / "demo"))


def _with_config(demo_folder: Path, tmp_path: Path, change) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(demo_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _set(path: str, value):
    def change(config):
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return change


BAD_CONFIGS = {
    "text hidden_act evil": ("text_config.hidden_act", "evil", "hidden_act"),
    "vision hidden_act evil": ("vision_config.hidden_act", "evil", "hidden_act"),
    "projector act evil": ("projector_hidden_act", "evil", "projector_hidden_act"),
    "torch_dtype evil": ("torch_dtype", "evil", "dtype"),
    "torch_dtype int8": ("torch_dtype", "int8", "dtype"),
    "torch_dtype int64": ("torch_dtype", "int64", "dtype"),
    "torch_dtype bool": ("torch_dtype", "bool", "dtype"),
    "dtype number": ("dtype", 7, "dtype"),
    "hidden_size abc": ("text_config.hidden_size", "abc", "hidden_size"),
    "hidden_size negative": ("text_config.hidden_size", -64, "hidden_size"),
    "hidden_size zero": ("text_config.hidden_size", 0, "hidden_size"),
    "hidden_size bool": ("text_config.hidden_size", True, "hidden_size"),
    "hidden_size float": ("text_config.hidden_size", 64.5, "hidden_size"),
    "hidden_size huge": ("text_config.hidden_size", 1 << 30, "hidden_size"),
    "vocab huge": ("text_config.vocab_size", 1 << 40, "vocab_size"),
    "heads not dividing": ("text_config.num_key_value_heads", 3, "num_key_value_heads"),
    "heads zero": ("text_config.num_attention_heads", 0, "num_attention_heads"),
    "layers 100000": ("text_config.num_hidden_layers", 100000, "num_hidden_layers"),
    "vision layers 100000": ("vision_config.num_hidden_layers", 100000, "num_hidden_layers"),
    "vision heads not dividing": ("vision_config.num_attention_heads", 7, "num_attention_heads"),
    "vision patch zero": ("vision_config.patch_size", 0, "patch_size"),
    "rms eps string": ("text_config.rms_norm_eps", "x", "rms_norm_eps"),
    "pinpoints zero": ("image_grid_pinpoints", [[0, 0]], "image_grid_pinpoints"),
    "pinpoints not list": ("image_grid_pinpoints", "336x672", "image_grid_pinpoints"),
    "pinpoints triple": ("image_grid_pinpoints", [[336, 672, 1]], "image_grid_pinpoints"),
    "pinpoints strings": ("image_grid_pinpoints", [["a", "b"]], "image_grid_pinpoints"),
    "pinpoints empty": ("image_grid_pinpoints", [], "image_grid_pinpoints"),
    "text_config not object": ("text_config", [1, 2], "text_config"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS), ids=list(BAD_CONFIGS))
def test_malformed_config_is_a_checkpoint_error_naming_the_field(case, demo_folder, tmp_path, capsys):
    path, value, field = BAD_CONFIGS[case]
    folder = _with_config(demo_folder, tmp_path, _set(path, value))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=field):
        LlavaNextConfig.from_pretrained(folder)
    from llava_next import LlavaNextForConditionalGeneration

    with pytest.raises(CheckpointError, match=field):
        LlavaNextForConditionalGeneration.from_pretrained(folder)
    assert time.perf_counter() - start < 5
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("llava-next: error:") and field in last and "Traceback" not in err
    assert len(last) < 400


def _with_index(demo_folder: Path, tmp_path: Path, index) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(demo_folder, folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


BAD_INDEXES = {
    "no weight_map": ({"metadata": {}}, "weight_map"),
    "weight_map list": ({"weight_map": ["model.safetensors"]}, "weight_map"),
    "dot-dot": ({"weight_map": {"lm_head.weight": "../../x.safetensors"}}, "outside"),
    "absolute": ({"weight_map": {"lm_head.weight": "/etc/x.safetensors"}}, "outside"),
    "subfolder dot-dot": ({"weight_map": {"lm_head.weight": "a/../../x.safetensors"}}, "outside"),
    "non-string": ({"weight_map": {"lm_head.weight": 3}}, "weight_map"),
}


@pytest.mark.parametrize("case", list(BAD_INDEXES), ids=list(BAD_INDEXES))
def test_bad_shard_index_is_a_checkpoint_error(case, demo_folder, tmp_path, capsys):
    index, words = BAD_INDEXES[case]
    folder = _with_index(demo_folder, tmp_path, index)
    outside = tmp_path / "x.safetensors"
    shutil.copy(demo_folder / "model.safetensors", outside)  # a real file outside the folder: still refused
    from llava_next import LlavaNextForConditionalGeneration

    with pytest.raises(CheckpointError, match=words):
        LlavaNextForConditionalGeneration.from_pretrained(folder)
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("llava-next: error:") and "Traceback" not in err


def test_a_good_index_still_loads(demo_folder, tmp_path):
    from safetensors import safe_open

    from llava_next import LlavaNextForConditionalGeneration

    with safe_open(str(demo_folder / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    folder = _with_index(demo_folder, tmp_path, {"weight_map": {n: "model.safetensors" for n in names}})
    assert LlavaNextForConditionalGeneration.from_pretrained(folder) is not None


@pytest.mark.parametrize("flag,value", [("--top-p", "2"), ("--top-p", "0"), ("--top-p", "nan"), ("--top-k", "-5"),
                                        ("--repetition-penalty", "0"), ("--repetition-penalty", "-1"),
                                        ("--repetition-penalty", "inf")])
def test_sampling_flags_are_checked_before_the_model_loads(flag, value, tmp_path, capsys, monkeypatch):
    import llava_next.entrypoints.cli as cli

    monkeypatch.setattr(cli, "load", lambda args: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", str(tmp_path), "--prompt", "hi", flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_ctrl_c_during_a_chat_answer_keeps_the_chat(demo_folder, capsys, monkeypatch):
    import llava_next.entrypoints.cli as cli

    real = cli.answer
    calls = []

    def answer(*args, **kwargs):
        calls.append(kwargs.get("reuse_prefix"))
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "answer", answer)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\nsecond question\n/quit\n"))
    assert main(["chat", "--model", str(demo_folder), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "interrupted" in captured.err and len(calls) == 2
    assert calls[1] is False  # the turn after an interrupt does not trust the cache


def test_ctrl_c_inside_generate_streaming(demo_folder, capsys, monkeypatch):
    """KeyboardInterrupt raised from inside generation (the streamer) ends that answer only."""
    from llava_next.compat import streaming

    real_put = streaming.TextStreamer.put
    state = {"n": 0}

    def put(self, value):
        state["n"] += 1
        if state["n"] == 2:
            raise KeyboardInterrupt
        return real_put(self, value)

    monkeypatch.setattr(streaming.TextStreamer, "put", put)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\nsecond question\n/quit\n"))
    assert main(["chat", "--model", str(demo_folder), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "interrupted" in captured.err
    assert state["n"] > 2  # the second question was answered


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
@pytest.mark.parametrize("device", [0, "cuda", "cuda:0", torch.device("cuda")])
def test_pipeline_cuda_device_without_cuda_is_one_clear_error(device, demo_folder):
    from llava_next import pipeline

    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pipeline("image-text-to-text", model=str(demo_folder), device=device)
