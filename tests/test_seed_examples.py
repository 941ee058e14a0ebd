"""The seed's code blocks (shared/seed/llava_next.md), run as users run them, with llava_next and with transformers.

Each block below is the seed's text verbatim (checked against the seed file when it is present). At run time
only these substitutions are made, the ones a machine without the hub or a GPU needs:
- `from transformers import` -> `from llava_next import` (ours) or left as is (the reference);
- the hub id -> a local checkpoint folder: tiny random Mistral weights (tests/tiny.py) + the hub-layout processor
  files of llava-v1.6-mistral-7b-hf (real Mistral tokenizer and chat template);
- image URLs -> PNG files of scikit-image photographs; `requests.get` is patched to open local files, so the
  blocks' `Image.open(requests.get(url, stream=True).raw)` runs unchanged;
- `device=0` and "cuda" -> "cpu".
The dtypes are the seed's: bfloat16 for the pipeline, float16 for the AutoModel and multi-image blocks (float16
works on the CPU with torch 2.13, so nothing is changed to float32).
The 4-bit block is tested elsewhere (quantization).

Each block's output (the pipeline's return value, or what it prints) must be identical between the two libraries.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

import pytest

from test_pipeline import full_checkpoint, photo

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "llava_next.md"
HUB_ID = "llava-hf/llava-v1.6-mistral-7b-hf"

PIPELINE_BLOCK = '''\
import torch  
from transformers import pipeline  

pipeline = pipeline(  
    task="image-text-to-text",  
    model="llava-hf/llava-v1.6-mistral-7b-hf",  
    device=0,  
    torch_dtype=torch.bfloat16  
)  
messages = [  
    {  
        "role": "user",  
        "content": [  
            {  
                "type": "image",  
                "url": "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg",  
            },  
            { "type": "text", "text": "Describe this image."},  
        ]  
    }  
]  
pipeline(text=messages, max_new_tokens=20, return_full_text=False)
'''

AUTOMODEL_BLOCK = '''\
import torch  
import requests  
from PIL import Image  
from transformers import AutoProcessor, LlavaNextForConditionalGeneration  

processor = AutoProcessor.from_pretrained("llava-hf/llava-v1.6-mistral-7b-hf")  
model = LlavaNextForConditionalGeneration.from_pretrained("llava-hf/llava-v1.6-mistral-7b-hf", torch_dtype=torch.float16).to("cuda")  

url = "https://github.com/haotian-liu/LLaVA/blob/1a91fc274d7c35a9b50b3cb29c4247ae5837ce39/images/llava_v1_5_radar.jpg?raw=true"  
image = Image.open(requests.get(url, stream=True).raw)  

conversation = [  
    {  
        "role": "user",  
        "content": [  
            {"type": "image"},  
            {"type": "text", "text": "What is shown in this image?"},  
        ],  
    },  
]  
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)  
inputs = processor(image, prompt, return_tensors="pt").to("cuda")  
output = model.generate(**inputs, max_new_tokens=100)  
print(processor.decode(output[0], skip_special_tokens=True))  
'''

MULTI_IMAGE_BLOCK = '''\
from transformers import LlavaNextProcessor, LlavaNextForConditionalGeneration
from PIL import Image
import requests, torch

processor = LlavaNextProcessor.from_pretrained("llava-hf/llava-v1.6-mistral-7b-hf")
model = LlavaNextForConditionalGeneration.from_pretrained(
    "llava-hf/llava-v1.6-mistral-7b-hf", torch_dtype=torch.float16
).to("cuda")

# Load multiple images
url1 = "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/transformers/model_doc/llava_next_ocr.png"
url2 = "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/transformers/model_doc/llava_next_comparison.png"

image1 = Image.open(requests.get(url1, stream=True).raw)
image2 = Image.open(requests.get(url2, stream=True).raw)

conversation = [
    {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare these two images and describe the differences."}]}
]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor([image1, image2], prompt, return_tensors="pt").to("cuda")

output = model.generate(**inputs, max_new_tokens=100)
print(processor.decode(output[0], skip_special_tokens=True))
'''

# URL in the seed -> scikit-image photograph standing in for it
PHOTOS = {
    "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/pipeline-cat-chonk.jpeg": "chelsea",
    "https://github.com/haotian-liu/LLaVA/blob/1a91fc274d7c35a9b50b3cb29c4247ae5837ce39/images/llava_v1_5_radar.jpg?raw=true": "coffee",
    "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/transformers/model_doc/llava_next_ocr.png": "astronaut",
    "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/transformers/model_doc/llava_next_comparison.png": "rocket",
}


def _code_blocks(markdown: str) -> list[str]:
    return re.findall(r"```(?:python|py)\n(.*?)```", markdown, flags=re.DOTALL)


def test_blocks_are_the_seeds():
    """The copies above are the seed's blocks, character for character (when the seed file is here)."""
    if not SEED.is_file():
        pytest.skip(f"{SEED} not present")
    blocks = _code_blocks(SEED.read_text(encoding="utf-8"))
    for block in (PIPELINE_BLOCK, AUTOMODEL_BLOCK, MULTI_IMAGE_BLOCK):
        assert block in blocks


def localize(block: str, library: str, checkpoint: Path, root: Path) -> str:
    """Apply the substitutions of the module docstring (and nothing else)."""
    code = block.replace(HUB_ID, str(checkpoint)).replace('"cuda"', '"cpu"').replace("device=0,", 'device="cpu",')
    for url, name in PHOTOS.items():
        code = code.replace(url, photo(str(root), name))
    if library == "llava_next":
        code = code.replace("from transformers import", "from llava_next import")
    assert "https://" not in code and "cuda" not in code and HUB_ID not in code
    return code


class _LocalResponse:
    def __init__(self, path: str):
        self.raw = open(path, "rb")  # noqa: SIM115 - closed by PIL when the image is loaded, as with requests


def run_block(code: str):
    """exec the block; return (value of a final bare expression, or None; everything it printed)."""
    tree = ast.parse(code)
    last = tree.body[-1] if isinstance(tree.body[-1], ast.Expr) else None
    if last is not None:
        tree.body = tree.body[:-1]
    namespace: dict = {"__name__": "__seed_example__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(tree, "<seed block>", "exec"), namespace)
        value = eval(compile(ast.Expression(last.value), "<seed block>", "eval"), namespace) if last else None
    return value, out.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tiny_root):
    return full_checkpoint(tiny_checkpoint, tiny_root)


@pytest.fixture(autouse=True)
def local_requests(monkeypatch):
    """`requests.get(path, stream=True).raw` opens a local file; anything else is refused (no network here)."""
    import requests

    def get(url, *args, **kwargs):
        if not Path(url).is_file():
            raise AssertionError(f"the test tried to fetch {url!r}")
        return _LocalResponse(url)

    monkeypatch.setattr(requests, "get", get)


@pytest.mark.parametrize("block", [PIPELINE_BLOCK, AUTOMODEL_BLOCK, MULTI_IMAGE_BLOCK],
                         ids=["pipeline", "automodel", "multi-image"])
def test_seed_block_matches_transformers(block, checkpoint, tiny_root):
    from transformers.utils import logging

    logging.set_verbosity_error()
    ours = run_block(localize(block, "llava_next", checkpoint, tiny_root))
    reference = run_block(localize(block, "transformers", checkpoint, tiny_root))
    assert ours == reference
    value, printed = ours
    if block is PIPELINE_BLOCK:
        assert printed == "" and isinstance(value, list) and isinstance(value[0]["generated_text"], str)
        assert value[0]["input_text"][0]["content"][1]["text"] == "Describe this image."
    else:  # the decoded prompt and the new tokens
        assert value is None and printed.startswith("[INST]") and "[/INST]" in printed
        assert len(printed.split("[/INST]", 1)[1].strip()) > 0
