"""Worker for tests/test_tensor_parallel.py, run by `python -m torch.distributed.run --nproc-per-node N`.

argv: a JSON file {"fixtures": {name: folder}, "out": folder, "fused": name}. For each fixture every rank loads
the checkpoint with tp_plan="auto", then writes out/<name>.rank<R>.pt: the image prompt's logits, greedy tokens,
sampled tokens (each rank seeded differently: generate() must sync them), the element count of the decoder
layers' parameters and the per-rank KV head count. "fused" also shards an already loaded, fused model
(shard_decoder on real weights) and decodes with the static runner.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tiny import IMAGE_TOKEN  # noqa: E402

NEW = 8
SIZE = (500, 316)


def prompt():
    """One image prompt: ids (1, T), pixel_values (1, tiles, 3, 336, 336), image_sizes (1, 2)."""
    from llava_next.model.anyres import AnyresGeometry

    geometry = AnyresGeometry()
    ids = [1, 101] + [IMAGE_TOKEN] * geometry.num_image_tokens(*SIZE) + [201, 300, 401]
    tiles = torch.randn(geometry.num_tiles(*SIZE), 3, 336, 336, generator=torch.Generator().manual_seed(1))
    return {"input_ids": torch.tensor([ids]), "pixel_values": tiles[None], "image_sizes": torch.tensor([SIZE])}


def layer_elements(model) -> int:
    return sum(p.numel() for p in model.model.language_model.layers.parameters())


def read_layer_elements(folder, tp, text_config) -> int:
    """Elements of the decoder layers' tensors this rank reads from the files (its slices only)."""
    from llava_next.loading.weights import _tensor_files
    from llava_next.parallel.loading import read_sharded
    from llava_next.parallel.tensor_parallel import layer_slicer

    tensors = read_sharded(_tensor_files(Path(folder), False), layer_slicer(tp, text_config))
    return sum(t.numel() for key, t in tensors if "language_model" in key and ".layers." in key)


def run(model, rank: int, runner_mode: str | None = None, sample: bool = True) -> dict:
    inputs = prompt()
    with torch.no_grad():
        logits = model(**inputs, logits_to_keep=4).logits[0]
    if runner_mode is not None:
        model.decode_runner(mode=runner_mode)
    greedy = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)[0, -NEW:]
    sampled = None
    if sample:
        torch.manual_seed(1000 + rank)  # differs per rank: generate() must give every rank rank 0's draws
        sampled = model.generate(**inputs, max_new_tokens=NEW, do_sample=True, temperature=1.5, top_k=0)[0, -NEW:]
    return {"logits": logits, "greedy": greedy, "sampled": sampled, "elements": layer_elements(model),
            "kv_heads": model.model.language_model.layers[0].self_attn.kv_heads}


def main():
    import torch.distributed as dist

    from llava_next.compat.modeling import LlavaNextForConditionalGeneration
    from llava_next.parallel.tensor_parallel import from_env, shard_decoder

    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    for name, folder in spec["fixtures"].items():
        # both spellings of transformers' options: tp_plan="auto" and tp_size=<world>
        options = {"tp_size": dist.get_world_size()} if name == spec.get("tp_size") else {"tp_plan": "auto"}
        model = LlavaNextForConditionalGeneration.from_pretrained(folder, **options)
        tp = model.tensor_parallel
        result = run(model, tp.rank)
        result["read_elements"] = read_layer_elements(folder, tp, model.config.text_config)
        torch.save(result, out / f"{name}.rank{tp.rank}.pt")
    if spec.get("fused"):
        tp = from_env()
        model = LlavaNextForConditionalGeneration.from_pretrained(spec["fixtures"][spec["fused"]])
        model.model.language_model.fuse_projections()
        shard_decoder(model.model.language_model, tp)
        model.tensor_parallel = tp
        torch.save(run(model, tp.rank, runner_mode="static"), out / f"fused.rank{tp.rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
