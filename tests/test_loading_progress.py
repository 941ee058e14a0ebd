"""from_pretrained shows a loading bar over the checkpoint's bytes on a terminal, and nothing otherwise."""

from __future__ import annotations

import torch

from llava_next import LlavaNextForConditionalGeneration
from tiny import save_tiny


def test_loading_bar_when_asked_and_quiet_otherwise(tmp_path, capsys, monkeypatch):
    folder, _ = save_tiny(tmp_path / "m", "mistral")
    capsys.readouterr()
    monkeypatch.delenv("LLAVA_NEXT_PROGRESS", raising=False)
    LlavaNextForConditionalGeneration.from_pretrained(folder)  # stderr is captured: not a terminal
    assert "Loading weights" not in capsys.readouterr().err
    monkeypatch.setenv("LLAVA_NEXT_PROGRESS", "1")
    model = LlavaNextForConditionalGeneration.from_pretrained(folder)
    err = capsys.readouterr().err
    assert "Loading weights (1 file(s))" in err and "100%" in err
    assert model.lm_head.weight.dtype == torch.float32  # the bar changes nothing about what is loaded
