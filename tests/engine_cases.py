"""Prompts for the engine tests: token ids with expanded image placeholders plus preprocessed tiles, and the
reference tokens from our generate() on each prompt alone (greedy), memoised per (backbone, prompt, length)."""

from __future__ import annotations

import hashlib

import torch

from llava_next.model.anyres import AnyresGeometry
from tiny import IMAGE_TOKEN

GEOMETRY = AnyresGeometry()

# (image sizes, text seed): several sizes and modes, two images in one prompt, text only
MIXED = [
    ([(500, 316)], 1),
    ([(200, 300), (336, 1008)], 2),
    ([], 3),
    ([(750, 1000)], 4),
    ([(336, 336)], 5),
]


def tiles(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(GEOMETRY.num_tiles(h, w), 3, 336, 336, generator=g)


def token_ids(sizes, seed: int) -> list[int]:
    ids = [1, 100 + seed]
    for h, w in sizes:
        ids += [IMAGE_TOKEN] * GEOMETRY.num_image_tokens(h, w) + [200 + seed, 300]
    return ids + [400 + seed, 500 + seed]


def case(sizes, seed: int, image_seed: int | None = None) -> dict:
    """An engine prompt: {"prompt_token_ids", "multi_modal_data"} with preprocessed images."""
    image_seed = seed if image_seed is None else image_seed
    images = [{"pixel_values": tiles(h, w, 10 * image_seed + i), "image_size": (h, w)}
              for i, (h, w) in enumerate(sizes)]
    prompt = {"prompt_token_ids": token_ids(sizes, seed)}
    if images:
        prompt["multi_modal_data"] = {"image": images}
    return prompt


_REFERENCE: dict = {}


def reference(model, prompt: dict, new: int, key=None) -> list[int]:
    """Greedy new tokens of our generate() on this prompt alone (EOS included when it comes)."""
    images = (prompt.get("multi_modal_data") or {}).get("image", [])
    pixels = tuple(hashlib.sha256(im["pixel_values"].numpy().tobytes()).hexdigest() for im in images)
    memo = (id(model), repr(prompt["prompt_token_ids"]), pixels, new, key)  # the same ids with other pixels differ
    if memo not in _REFERENCE:
        ids = torch.tensor([prompt["prompt_token_ids"]])
        kwargs = {}
        if images:
            kwargs = dict(pixel_values=torch.cat([im["pixel_values"] for im in images]),
                          image_sizes=torch.tensor([im["image_size"] for im in images]))
        out = model.generate(ids, max_new_tokens=new, do_sample=False, **kwargs)[0, ids.shape[1]:].tolist()
        eos = model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or ())
        for i, t in enumerate(out):
            if t in eos:
                out = out[: i + 1]
                break
        _REFERENCE[memo] = out
    return _REFERENCE[memo]


def run(engine, prompts: list[dict], params, stagger: int = 0, check=None) -> dict[str, object]:
    """Submit prompts (all at once, or one every `stagger` steps), step to the end; final outputs by id.
    check(engine, scheduler_output) runs after each scheduling decision when given."""
    pending = list(enumerate(prompts))
    done = {}
    steps = 0
    while pending or engine.has_unfinished_requests():
        if pending and (stagger == 0 or steps % stagger == 0):
            batch = pending if stagger == 0 else pending[:1]
            for i, p in batch:
                engine.add_request(str(i), p, params[i] if isinstance(params, list) else params)
            pending = pending[len(batch):]
        for out in engine.step():
            if out.finished:
                assert out.request_id not in done, "a finished request was reported twice"
                done[out.request_id] = out
        steps += 1
        assert steps < 10_000
    return done
