"""One-call GPU check: bf16 / fp16 / 4-bit NF4 parity of llava_next against transformers at the 7b shape.

    python bench/gpu_quant_check.py                           # H100: --shape 7b --device cuda
    python bench/gpu_quant_check.py --shape tiny --device cpu # smoke test (bitsandbytes 4-bit runs on CPU)

Builds a random checkpoint of the llava-v1.6-mistral-7b shape (Mistral 4096 hidden / 32 layers / 32 heads /
8 kv / 14336 mlp / vocab 32064 + CLIP ViT-L/14-336, 24 layers) with transformers directly on the device in
bf16 (HF init skipped, weights filled with N(0, 0.02), token embeddings N(0, 1), norms 1), saves it with save_pretrained (safetensors)
under --dir, then, one model at a time (each freed before the next loads):
  bf16  : ours vs transformers, dtype=bfloat16, W1-like input (1000x750 image -> 2340 image tokens + a short
          prompt): first-token logits max |diff|, 16 greedy tokens (min_new_tokens=16) identical?
  fp16  : the same with dtype=float16;
  nf4   : the seed's 4-bit example path through both libraries: BitsAndBytesConfig(load_in_4bit=True,
          bnb_4bit_compute_dtype=float16, bnb_4bit_quant_type="nf4"), device_map="auto", dtype=float16 (what
          dtype "auto" gives on the published fp16 checkpoint); peak memory (max_memory_allocated) of load
          and of generate, logits diff, 16 greedy tokens, and whether the quantized bytes are identical.
Each stage prints one JSON line (a differing token reports its step and each library's top-2 gap there);
a last "summary" line collects the verdicts. A hard cap (--time-cap, default 420 s) stops the run with an
"abort" line, so it fits one device call. Inputs are random (fixed seed); no tokenizer or network is used.
The checkpoint folder is reused by a rerun on the same warm machine (a marker file records shape and seed).

On the device machine (its image has torch + transformers + accelerate, no bitsandbytes): carry the
bitsandbytes wheel as the device README describes, install it with --target /tmp/site, then
    PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_quant_check.py 2>&1 | tee $OUT/gpu_quant_check.log
with timeout_s of about 480 (the script stops itself at --time-cap). Without bitsandbytes the nf4 stage
reports "skipped" and the others still run. Exit status 0 only when every stage ran and its tokens matched.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IMAGE_TOKEN = 32000
IMAGE_HW = (750, 1000)  # W1: a 1000x750 (WxH) image -> 2340 image tokens
# "[INST] <image>\nWhat is shown in this image? [/INST]" in Mistral-like ids (exact ids do not matter here)
PROMPT_HEAD = [1, 733, 16289, 28793, 28705]
PROMPT_TAIL = [28705, 13, 3195, 349, 4894, 297, 456, 3469, 28804, 733, 28748, 16289, 28793]
NEW_TOKENS = 16
T0 = time.time()


def emit(stage: str, **fields):
    print(json.dumps({"stage": stage, "t": round(time.time() - T0, 1), **fields}, default=str), flush=True)


class TimeCap(Exception):
    pass


def shapes(name: str):
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    if name == "7b":
        text = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=32064, max_position_embeddings=32768, rope_theta=1000000.0,
                    sliding_window=None, rms_norm_eps=1e-5)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    elif name == "tiny":  # BENCHMARKS.md's CPU shape; every Linear width is a multiple of bitsandbytes' 64 block
        text = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=32064, max_position_embeddings=8192, sliding_window=None)
        vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      image_size=336, patch_size=14, projection_dim=64, hidden_act="quick_gelu")
    else:
        raise SystemExit(f"unknown --shape {name!r}")
    return LlavaNextConfig(text_config=MistralConfig(**text), vision_config=CLIPVisionConfig(**vision),
                           image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", tie_word_embeddings=False)


def no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def build_checkpoint(shape: str, device: str, folder: Path, seed: int):
    """Random bf16 checkpoint written by transformers; reused when its marker matches."""
    marker = folder / "gpu_quant_check.json"
    want = {"shape": shape, "seed": seed, "init": 2}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        emit("build", reused=str(folder))
        return
    from transformers import LlavaNextForConditionalGeneration

    config = shapes(shape)
    config.dtype = "bfloat16"
    start = time.time()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device), no_init():
            model = LlavaNextForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif p.dim() == 1 and "norm" in name:
                p.zero_()
            elif name.endswith("embed_tokens.weight"):
                # NOTE: unit-scale token embeddings, so each new token changes the next prediction (with
                # N(0, 0.02) everywhere a random model repeats one token and greedy parity says little)
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    built = time.time() - start
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    free()
    marker.write_text(json.dumps(want))
    emit("build", params=n_params, build_s=round(built, 1), save_s=round(time.time() - start - built, 1),
         folder=str(folder), bytes=sum(f.stat().st_size for f in folder.glob("*.safetensors")))


def make_inputs(device: str):
    from llava_next.model.anyres import AnyresGeometry

    geo = AnyresGeometry()
    n, tiles = geo.num_image_tokens(*IMAGE_HW), geo.num_tiles(*IMAGE_HW)
    g = torch.Generator().manual_seed(0)
    pixel_values = torch.zeros(1, 5, 3, 336, 336)
    pixel_values[0, :tiles] = torch.randn(tiles, 3, 336, 336, generator=g).clamp(-1.8, 2.2)  # CLIP-normalised range
    ids = torch.tensor([PROMPT_HEAD + [IMAGE_TOKEN] * n + PROMPT_TAIL])
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                pixel_values=pixel_values.to(device), image_sizes=torch.tensor([IMAGE_HW]).to(device)), n


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_reset(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak(device):
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.startswith("cuda") else None


def load(lib: str, folder: Path, dtype, device_map, quant: dict | None):
    if lib == "ours":
        from llava_next import BitsAndBytesConfig, LlavaNextForConditionalGeneration

        qc = BitsAndBytesConfig(**quant) if quant else None
        return LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=dtype, device_map=device_map,
                                                                 quantization_config=qc)
    import transformers
    from transformers import BitsAndBytesConfig, LlavaNextForConditionalGeneration

    transformers.logging.set_verbosity_error()
    qc = BitsAndBytesConfig(**quant) if quant else None
    return LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=dtype, device_map=device_map,
                                                             quantization_config=qc).eval()


def run_one(lib, folder, dtype, device, device_map, quant, inputs):
    """Load, generate 16 greedy tokens with logits; return everything on the CPU, then free the model."""
    peak_reset(device)
    start = time.time()
    model = load(lib, folder, dtype, device_map, quant)
    sync(device)
    load_s, load_peak = time.time() - start, peak(device)
    quant_bytes = None
    if quant:
        quant_bytes = {}
        for name, module in model.named_modules():
            if type(module).__name__ == "Linear4bit":  # checksum before any forward (CPU repacks in place)
                w = module.weight
                quant_bytes[name] = (int(w.data.view(torch.uint8).double().sum().item()),
                                     float(w.quant_state.absmax.double().sum().item()))
    batch = dict(inputs, pixel_values=inputs["pixel_values"].to(dtype))
    peak_reset(device)
    with torch.inference_mode():
        start = time.time()
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             return_dict_in_generate=True, output_logits=True, pad_token_id=0)
        sync(device)
    gen_s, gen_peak = time.time() - start, peak(device)
    tokens = out.sequences[0, -NEW_TOKENS:].cpu()
    logits = torch.stack([step[0].float().cpu() for step in out.logits])  # (16, V)
    n_quant = sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())
    del model, out
    free()
    return dict(load_s=round(load_s, 1), load_peak_gib=load_peak, generate_s=round(gen_s, 2),
                generate_peak_gib=gen_peak, quantized_modules=n_quant), tokens, logits, quant_bytes


def compare(stage, ours, theirs, extra=None):
    (info_o, tok_o, log_o, qb_o), (info_t, tok_t, log_t, qb_t) = ours, theirs
    first = (log_o[0] - log_t[0]).abs()
    result = dict(first_logits_max_abs_diff=round(first.max().item(), 5),
                  first_logits_scale=round(log_t[0].abs().max().item(), 3),
                  first_argmax_equal=bool(log_o[0].argmax() == log_t[0].argmax()),
                  tokens_equal=bool(torch.equal(tok_o, tok_t)), ours=info_o, transformers=info_t,
                  tokens_ours=tok_o.tolist(), tokens_transformers=tok_t.tolist())
    if not result["tokens_equal"]:
        step = int((tok_o != tok_t).nonzero()[0])
        gaps = {}
        for lib, logits in (("ours", log_o), ("transformers", log_t)):
            top = logits[step].topk(2)
            gaps[lib] = dict(top2_ids=top.indices.tolist(), top2_gap=round((top.values[0] - top.values[1]).item(), 5))
        result["first_difference"] = dict(step=step, **gaps)
    if qb_o is not None and qb_t is not None:
        shared = sorted(set(qb_o) & set(qb_t))
        result["quantized_bytes_identical"] = all(qb_o[n] == qb_t[n] for n in shared)
        result["quantized_only_by_transformers"] = sorted(set(qb_t) - set(qb_o))[:8]
    result.update(extra or {})
    emit(stage, **result)
    return result


STAGES = {
    "bf16": dict(dtype=torch.bfloat16, quant=None),
    "fp16": dict(dtype=torch.float16, quant=None),
    "nf4": dict(dtype=torch.float16, quant=dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16,
                                                 bnb_4bit_quant_type="nf4")),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["7b", "tiny"], default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dir", default=None, help="checkpoint folder (default /tmp/llava_gpu_check_<shape>)")
    parser.add_argument("--stages", default="bf16,fp16,nf4")
    parser.add_argument("--time-cap", type=float, default=420.0, help="hard wall-clock cap in seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def on_alarm(signum, frame):
        raise TimeCap(f"time cap of {args.time_cap:.0f} s reached")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, int(args.time_cap)))
    import transformers

    versions = dict(torch=torch.__version__, transformers=transformers.__version__, python=sys.version.split()[0])
    try:
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        versions["bitsandbytes"] = None
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    emit("start", shape=args.shape, device=args.device, device_name=device_name, versions=versions,
         time_cap_s=args.time_cap)
    folder = Path(args.dir or f"/tmp/llava_gpu_check_{args.shape}")
    results = {}
    try:
        build_checkpoint(args.shape, args.device, folder, args.seed)
        inputs, n_image = make_inputs(args.device)
        emit("inputs", image_tokens=n_image, prompt_tokens=int(inputs["input_ids"].shape[1]),
             image_hw=list(IMAGE_HW), new_tokens=NEW_TOKENS)
        for stage in [s for s in args.stages.split(",") if s]:
            spec = STAGES[stage]
            if spec["quant"] and versions["bitsandbytes"] is None:
                emit(stage, skipped="bitsandbytes is not installed (pip install the carried wheel)")
                continue
            device_map = ("auto" if args.device.startswith("cuda") else args.device) if spec["quant"] else args.device
            try:
                ours = run_one("ours", folder, spec["dtype"], args.device, device_map, spec["quant"], inputs)
                theirs = run_one("transformers", folder, spec["dtype"], args.device, device_map, spec["quant"], inputs)
                results[stage] = compare(stage, ours, theirs, dict(dtype=str(spec["dtype"]).split(".")[1],
                                                                   device_map=device_map, quant=spec["quant"]))
            except TimeCap:
                raise
            except Exception as exc:  # noqa: BLE001 -- report and go on to the next stage
                free()
                emit(stage, error=f"{type(exc).__name__}: {exc}"[:2000])
                results[stage] = {"error": True}
    except TimeCap as exc:
        emit("abort", reason=str(exc), finished=sorted(results))
    finally:
        signal.alarm(0)
    emit("summary", **{s: ({"error": True} if r.get("error") else
                           dict(tokens_equal=r["tokens_equal"], first_logits_max_abs_diff=r["first_logits_max_abs_diff"],
                                ours_peak_gib=[r["ours"]["load_peak_gib"], r["ours"]["generate_peak_gib"]],
                                transformers_peak_gib=[r["transformers"]["load_peak_gib"],
                                                       r["transformers"]["generate_peak_gib"]]))
                       for s, r in results.items()})
    return 0 if results and all(not r.get("error") and r["tokens_equal"] for r in results.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
