"""Tensor parallelism for the decoder, gpt-fast style: rewrite a built decoder so each rank holds its heads.

`TensorParallel` is one rank's view of a process group (rank, world size, device). `shard_decoder(decoder, tp)`
rewrites a built `model.decoder.Decoder` in place, on the meta device (before loading.py streams the slices
in) or on real weights (it then slices them):

- q/k/v and gate/up are column-parallel: plain `nn.Linear`s holding this rank's output rows (the fused
  `qkv_proj` / `gate_up_proj` are sliced part by part when present); their biases are sliced with them.
- o_proj and down_proj are row-parallel (`RowParallelLinear`): this rank's input columns, one all_reduce of the
  partial output, then the (replicated) bias added once, after the sum.
- `Attention.heads` / `.kv_heads` and `MLP.intermediate` become per-rank counts. KV heads are split when
  they divide (num_kv_heads % world == 0); with fewer KV heads than ranks (world % num_kv_heads == 0)
  each rank keeps the one KV head its query heads read (vLLM's replication); anything else is refused.
- Embeddings, final norm, lm_head, vision tower and projector stay replicated: every rank computes the same
  logits bit for bit (the all_reduce gives every rank the same sum), so greedy tokens agree with no extra
  communication; `sync_rng` copies rank 0's RNG state to the others at the start of each generate(), so
  sampled tokens agree too.

`from_env(tp_plan, tp_size)` is transformers' `tp_plan="auto"` convention under torch.distributed.run: the
process group from the environment (init_process_group if needed: nccl on CUDA, gloo on CPU), device
cuda:LOCAL_RANK or cpu; `tp_size` smaller than the world makes groups of consecutive ranks.

Leaves out: vocab-parallel embeddings/lm_head (replicated; README "Tensor parallel" gives the cost), sequence
parallelism, pipeline parallelism, quantized shards, tensor-parallel vision tower.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llava_next.model.layers import linear_of

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


class TensorParallel:
    """One rank of a tensor-parallel group: `rank`, `world`, `group` (None = the default group), `device`."""

    def __init__(self, rank: int, world: int, group=None, device: torch.device | str = "cpu"):
        self.rank, self.world, self.group, self.device = rank, world, group, torch.device(device)

    def __repr__(self):
        return f"TensorParallel(rank={self.rank}, world={self.world}, device={self.device})"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def sync_rng(self, generator: torch.Generator | None = None):
        """Give every rank rank 0's RNG state (the `generator`, or the default one of the device), so sampling
        draws the same numbers on identical logits. One small broadcast per generate() call."""
        if self.world == 1:
            return
        if generator is not None:
            state = [generator.get_state()]
        elif self.device.type == "cuda":
            state = [torch.cuda.get_rng_state(self.device)]
        else:
            state = [torch.get_rng_state()]
        dist.broadcast_object_list(state, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                                   group=self.group)
        if generator is not None:
            generator.set_state(state[0])
        elif self.device.type == "cuda":
            torch.cuda.set_rng_state(state[0], self.device)
        else:
            torch.set_rng_state(state[0])


def from_env(tp_plan="auto", tp_size: int | None = None) -> TensorParallel:
    """The rank's TensorParallel from torch.distributed.run's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT), initialising the default process group if nobody has."""
    if tp_plan not in (None, "auto"):
        raise ValueError(f"tp_plan={tp_plan!r}: only 'auto' is supported (the plan of parallel/tensor_parallel.py: "
                         "q/k/v, gate/up column-parallel, o_proj, down_proj row-parallel)")
    if not dist.is_available():
        raise RuntimeError("tensor parallelism needs torch.distributed, which this PyTorch build lacks")
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError(
                "tp_plan='auto' / tp_size needs a process group: launch with `python -m torch.distributed.run "
                "--nproc-per-node N script.py` (or torchrun), or call torch.distributed.init_process_group first")
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    size = world if tp_size is None else int(tp_size)
    if size < 1 or world % size:
        raise ValueError(f"tp_size={tp_size} does not divide the world size {world}")
    group = None
    if size != world:  # groups of consecutive ranks; every rank must create every group
        groups = [dist.new_group(list(range(start, start + size))) for start in range(0, world, size)]
        group = groups[rank // size]
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return TensorParallel(rank % size, size, group, device)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b: this rank's input columns of a Linear; the bias (the full one,
    replicated) is added once, after the sum. Parameter names stay `weight` / `bias` (checkpoint keys)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x):
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features} (rank {self.tp.rank} of {self.tp.world}), out_features={self.out_features}"


def kv_layout(num_heads: int, num_kv_heads: int, world: int, rank: int) -> tuple[int, int]:
    """(first KV head, KV heads) this rank holds; raises ValueError for head counts that cannot be sharded."""
    if num_heads % world:
        raise ValueError(f"{num_heads} attention heads cannot be split over {world} ranks (tensor parallel size "
                         "must divide num_attention_heads)")
    if num_kv_heads % world == 0:
        local = num_kv_heads // world
        return rank * local, local
    if world % num_kv_heads == 0:  # fewer KV heads than ranks: each rank keeps the one its query heads use
        return rank // (world // num_kv_heads), 1
    raise ValueError(f"{num_kv_heads} KV heads over {world} ranks: one must divide the other to shard grouped "
                     "KV heads (split or replicate)")


def shard_specs(cfg, tp: TensorParallel) -> dict[str, tuple[int, int, int] | None]:
    """{projection name: (dim, start, length)} of this rank's slice of `<proj>.weight`; biases of column
    projections take the same (start, length) on dim 0, row projections keep their full bias."""
    H, Hkv, Hd, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    if inter % tp.world:
        raise ValueError(f"intermediate_size {inter} cannot be split over {tp.world} ranks")
    first_kv, kv = kv_layout(H, Hkv, tp.world, tp.rank)
    h, m = H // tp.world, inter // tp.world
    return {"q_proj": (0, tp.rank * h * Hd, h * Hd), "k_proj": (0, first_kv * Hd, kv * Hd),
            "v_proj": (0, first_kv * Hd, kv * Hd), "gate_proj": (0, tp.rank * m, m), "up_proj": (0, tp.rank * m, m),
            "o_proj": (1, tp.rank * h * Hd, h * Hd), "down_proj": (1, tp.rank * m, m)}


def param_spec(specs: dict, proj: str, leaf: str) -> tuple[int, int, int] | None:
    """The slice of `<proj>.<leaf>` (leaf "weight" or "bias"), None when the rank holds it whole."""
    spec = specs.get(proj)
    if spec is None or (leaf == "bias" and spec[0] == 1):
        return None
    return spec if leaf == "weight" else (0, spec[1], spec[2])


def _narrow(t: torch.Tensor, spec: tuple[int, int, int]) -> torch.Tensor:
    """t's (dim, start, length) slice, copied (a view would keep the whole tensor alive) unless on meta."""
    part = t.narrow(*spec)
    return part if t.is_meta else part.clone()


def _column(linear: nn.Linear, specs: list, sizes: list[int] | None = None) -> nn.Linear:
    """This rank's rows of a column-parallel Linear (weight and bias); a fused one (parts of `sizes` rows side by
    side) is sliced part by part."""
    weights, biases, offset = [], [], 0
    for size, (_, start, length) in zip(sizes or [linear.out_features], specs):
        weights.append(linear.weight.data.narrow(0, offset + start, length))
        if linear.bias is not None:
            biases.append(linear.bias.data.narrow(0, offset + start, length))
        offset += size
    return linear_of(torch.cat(weights), torch.cat(biases) if biases else None)


def shard_decoder(decoder: nn.Module, tp: TensorParallel) -> nn.Module:
    """Rewrite a built Decoder in place for rank `tp.rank` of `tp.world` (meta or real weights); returns it."""
    if sharding(decoder) is not None:
        raise RuntimeError(f"this decoder is already sharded ({sharding(decoder)})")
    cfg = decoder.config
    specs = shard_specs(cfg, tp)
    H, Hkv, Hd, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for owner in (attn, mlp):
            for name, child in list(owner.named_children()):
                if name in COLUMN and type(child) is not nn.Linear or name in ROW and type(child) is not nn.Linear:
                    raise TypeError(f"cannot shard {type(child).__name__} {name} (quantized layers are not supported "
                                    "with tensor parallelism)")
        for name in ("q_proj", "k_proj", "v_proj"):
            if hasattr(attn, name):
                setattr(attn, name, _column(getattr(attn, name), [specs[name]]))
        if attn.qkv_proj is not None:
            attn.qkv_proj = _column(attn.qkv_proj, [specs["q_proj"], specs["k_proj"], specs["v_proj"]],
                                    [H * Hd, Hkv * Hd, Hkv * Hd])
        for name in ("gate_proj", "up_proj"):
            if hasattr(mlp, name):
                setattr(mlp, name, _column(getattr(mlp, name), [specs[name]]))
        if mlp.gate_up_proj is not None:
            mlp.gate_up_proj = _column(mlp.gate_up_proj, [specs["gate_proj"], specs["up_proj"]], [inter, inter])
        for owner, name in ((attn, "o_proj"), (mlp, "down_proj")):
            old = getattr(owner, name)
            setattr(owner, name, RowParallelLinear(_narrow(old.weight.data, specs[name]),
                                                   None if old.bias is None else old.bias.data, tp))
        attn.heads = H // tp.world
        attn.kv_heads = specs["k_proj"][2] // Hd
        mlp.intermediate = inter // tp.world
    return decoder


def sharding(decoder: nn.Module) -> TensorParallel | None:
    """The TensorParallel a decoder is sharded for (its row-parallel layers hold it), None when it is whole."""
    o_proj = decoder.layers[0].self_attn.o_proj if len(decoder.layers) else None
    return o_proj.tp if isinstance(o_proj, RowParallelLinear) else None


def layer_slicer(tp: TensorParallel, text_config):
    """A function canonical checkpoint name -> (dim, start, length) of this rank's slice, or None (whole)."""
    import re

    specs = shard_specs(text_config, tp)
    pattern = re.compile(r"language_model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+)\.(weight|bias)$")

    def slicer(name: str):
        match = pattern.search(name)
        return None if match is None else param_spec(specs, match.group(1), match.group(2))

    return slicer
