"""The `llava-next` command line, run in-process (`main([...])`, stdout captured), and the demo checkpoint.

The demo checkpoint is built once, in a subprocess where `import transformers` fails, by `llava-next
demo-checkpoint`; the same subprocess loads it with llava_next and generates. Then transformers loads it too, and
its processor ids and greedy tokens must equal ours.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_pipeline import photo

from llava_next.entrypoints.cli import main

QUESTION = "What is shown in this image?"

# Runs in a fresh interpreter with transformers unimportable: build with the CLI, load, generate greedily.
WITHOUT_TRANSFORMERS = r"""
import json, sys
sys.modules["transformers"] = None  # any `import transformers` now raises ImportError
from llava_next.entrypoints.cli import main
assert main(["demo-checkpoint", sys.argv[1]]) == 0
from PIL import Image
from llava_next import AutoProcessor, LlavaNextForConditionalGeneration
processor = AutoProcessor.from_pretrained(sys.argv[1])
model = LlavaNextForConditionalGeneration.from_pretrained(sys.argv[1])
conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sys.argv[3]}]}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(images=Image.open(sys.argv[2]), text=prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=10)
print(json.dumps({"prompt": prompt, "input_ids": inputs["input_ids"][0].tolist(),
                  "output": output[0].tolist(), "transformers": sys.modules["transformers"] is not None}))
"""


@pytest.fixture(scope="module")
def cat(tiny_root) -> str:
    return photo(str(tiny_root), "chelsea")


@pytest.fixture(scope="module")
def demo(tmp_path_factory, cat):
    """(folder, the subprocess's results) of a demo checkpoint built and used without transformers."""
    folder = tmp_path_factory.mktemp("demo") / "demo-checkpoint"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", WITHOUT_TRANSFORMERS, str(folder), cat, QUESTION],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "RANDOM WEIGHTS" in done.stderr  # the build warns
    return folder, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def library(demo):
    from llava_next import AutoProcessor, LlavaNextForConditionalGeneration

    folder, _ = demo
    return AutoProcessor.from_pretrained(folder), LlavaNextForConditionalGeneration.from_pretrained(folder)


_REPLIES: dict[str, str] = {}


def reply(library, messages, images, max_new_tokens, **kwargs) -> str:
    """What the library answers (greedy unless kwargs say otherwise): the decode of the new tokens."""
    key = json.dumps([messages, images, max_new_tokens, sorted(kwargs.items())])
    if not kwargs.get("do_sample") and key in _REPLIES:
        return _REPLIES[key]
    processor, model = library
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
    _REPLIES[key] = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return _REPLIES[key]


def user(text, n_images=0):
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


# ---------------------------------------------------------------------- demo checkpoint


def test_demo_checkpoint_matches_transformers(demo, cat):
    import transformers
    from PIL import Image
    from transformers.utils import logging

    logging.set_verbosity_error()
    folder, ours = demo
    assert ours["transformers"] is False  # built, loaded and run without transformers
    config = json.loads((folder / "config.json").read_text())
    assert config["llava_next_demo"]["random_weights"] is True and "RANDOM" in config["llava_next_demo"]["warning"]
    processor = transformers.AutoProcessor.from_pretrained(folder)
    model, info = transformers.LlavaNextForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # every tensor of the hub layout present, nothing extra
    prompt = processor.apply_chat_template([user(QUESTION, 1)], add_generation_prompt=True)
    assert prompt == ours["prompt"] == "[INST] <image>\nWhat is shown in this image? [/INST]"
    inputs = processor(images=Image.open(cat), text=prompt, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ours["input_ids"]
    output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert output[0].tolist() == ours["output"]
    assert processor.tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]


def test_demo_tokenizer_is_transformers_conversion(demo):
    """tokenizer.json's BPE vocabulary and merges equal transformers' conversion of the same sentencepiece file."""
    import processor_fixtures

    folder, _ = demo
    ours = json.loads((folder / "tokenizer.json").read_text())["model"]
    reference = json.loads(processor_fixtures.mistral_tokenizer_json())["model"]
    assert ours["vocab"] == reference["vocab"]
    assert ours["merges"] == reference["merges"]


def test_demo_checkpoint_is_deterministic(demo, tmp_path, capsys):
    folder, _ = demo
    again = tmp_path / "again"
    assert main(["demo-checkpoint", str(again)]) == 0
    assert "demo checkpoint" in capsys.readouterr().out

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert {p.name: digest(p) for p in again.iterdir()} == {p.name: digest(p) for p in folder.iterdir()}
    # a non-empty folder is refused without --force: one line, exit status 1
    assert main(["demo-checkpoint", str(again)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llava-next: error:") and "not empty" in err


# ---------------------------------------------------------------------- generate


@pytest.mark.parametrize("stream", [True, False])
def test_generate_prints_the_library_answer(demo, library, cat, capsys, stream):
    folder, _ = demo
    argv = ["generate", "--model", str(folder), "--image", cat, "--prompt", QUESTION, "--max-new-tokens", "12"]
    assert main(argv + ([] if stream else ["--no-stream"])) == 0
    captured = capsys.readouterr()
    expected = reply(library, [user(QUESTION, 1)], [cat], 12)
    assert "\n" not in expected  # so streamed pieces join to exactly the decode
    assert captured.out == expected + "\n"
    assert "RANDOM WEIGHTS" in captured.err  # the demo checkpoint is labelled when used


def test_generate_sampling_flags(demo, library, capsys):
    folder, _ = demo
    argv = ["generate", "--model", str(folder), "--prompt", "Say something.", "--max-new-tokens", "8", "--no-stream",
            "--temperature", "1.5", "--top-k", "50", "--seed", "3"]
    assert main(argv) == 0 and main(argv) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second  # --seed makes sampling reproducible
    torch.manual_seed(3)
    assert first == reply(library, [user("Say something.")], [], 8, do_sample=True, temperature=1.5, top_k=50)
    assert first != reply(library, [user("Say something.")], [], 8)


def test_errors_are_one_line(tmp_path, demo, capsys, monkeypatch):
    folder, _ = demo
    missing = tmp_path / "no-such-checkpoint"
    assert main(["generate", "--model", str(missing), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("llava-next: error:") and str(missing) in err

    assert main(["generate", "--model", str(folder), "--image", str(tmp_path / "none.png"), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.png" in err and "Traceback" not in err

    # the hub cannot be reached: huggingface_hub fails with a multi-line message; the CLI prints one line
    import huggingface_hub

    def unreachable(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError(
            "An error happened while trying to locate the files on the Hub.\nCheck your internet connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    assert main(["generate", "--prompt", "hi"]) == 1  # the default model, llava-hf/llava-v1.6-mistral-7b-hf
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("llava-next: error:") and "llava-hf/llava-v1.6-mistral-7b-hf" in err
    assert "internet connection" in err

    with pytest.raises(SystemExit) as exit_info:  # argparse: usage error, status 2
        main(["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "0"])
    assert exit_info.value.code == 2


def test_console_script_offline(tmp_path):
    """The installed `llava-next` entry point, offline with an empty hub cache: one line, non-zero status."""
    script = Path(sys.executable).with_name("llava-next")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "llava_next.entrypoints.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(command + ["generate", "--prompt", "hi"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("llava-next: error:") and "llava-hf/llava-v1.6-mistral-7b-hf" in lines[-1]
    assert "Traceback" not in done.stderr and done.stdout == ""


# ---------------------------------------------------------------------- chat


def test_chat_two_turns_with_an_image_then_reset(demo, library, cat, capsys, monkeypatch):
    folder, _ = demo
    script = f"/image {cat}\n{QUESTION}\nAnd its colour?\n/image {cat}.missing\n/reset\nHello there\n/quit\nignored\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["chat", "--model", str(folder), "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()

    first = reply(library, [user(QUESTION, 1)], [cat], 6)
    history = [user(QUESTION, 1), {"role": "assistant", "content": [{"type": "text", "text": first}]}]
    second = reply(library, [*history, user("And its colour?")], [cat], 6)
    third = reply(library, [user("Hello there")], [], 6)
    assert captured.out == f"{first}\n{second}\n{third}\n"
    assert "image file not found" in captured.err and "(conversation reset)" in captured.err


@pytest.mark.parametrize("device", ["bogus", "cuda:7" if torch.cuda.is_available() else "cuda"])
def test_unusable_device_is_one_line(tmp_path, capsys, device):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--device", device]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llava-next: error: --device") and "Traceback" not in err


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_bad_temperature_is_a_usage_error(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--temperature", value])
    assert exit_info.value.code == 2
    assert "--temperature" in capsys.readouterr().err


def test_library_errors_that_are_not_value_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import llava_next.entrypoints.cli
    from llava_next.errors import LlavaNextError

    def fail(args):
        raise LlavaNextError("something the library refused\nsecond line")

    monkeypatch.setattr(llava_next.entrypoints.cli, "cmd_generate", fail)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 1
    assert capsys.readouterr().err == "llava-next: error: something the library refused second line\n"


def test_demo_checkpoint_into_a_non_empty_folder_names_the_cli_flag(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["demo-checkpoint", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and "overwrite=True" not in err
