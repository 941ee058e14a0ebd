"""Literal hub files, written here by hand so that they are an oracle independent of the library's constants.

HUB_PREPROCESSOR_CONFIG is llava-hf/llava-v1.6-mistral-7b-hf's preprocessor_config.json (the other llava-hf
LLaVA-NeXT repos carry the same CLIP values). Never build it from llava_next's defaults or CLIP_MEAN/CLIP_STD:
a test that does compares the library with itself.
"""

from __future__ import annotations

import json
from pathlib import Path

HUB_PREPROCESSOR_CONFIG = {
    "aspect_ratio_setting": "anyres",
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "LlavaNextImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaNextProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}


def write_hub_preprocessor_config(folder: Path) -> Path:
    """Write HUB_PREPROCESSOR_CONFIG as `folder`/preprocessor_config.json (folder created); return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR_CONFIG, indent=2) + "\n")
    return folder
