"""Tensor-parallel loading: each rank reads only its slices of the decoder layers from the safetensors files.

`ShardedLoad(tp)` is the hook loading/pretrained.py's `load_pretrained(..., tensor_parallel=)` calls: after the
meta-device build it rewrites the decoder to this rank's shapes (tensor_parallel.shard_decoder, still on meta),
then streams the checkpoint through `read_sharded`, which opens each sharded tensor with safetensors'
`get_slice(name)[...]` so only the rank's rows (q/k/v, gate/up) or columns (o_proj, down_proj) are read from
disk; everything else (embeddings, norms, lm_head, vision tower, projector) is read whole. load_state
(loading/weights.py) then does its usual strict accounting against the sharded shapes.

Leaves out: pickle checkpoints (refused: they cannot be read in slices), quantization and device_map under
tensor parallelism (refused by load_pretrained's caller), vocab-parallel embeddings.
"""

from __future__ import annotations

from pathlib import Path

from llava_next.errors import CheckpointError
from llava_next.loading.weights import canonical_name
from llava_next.parallel.tensor_parallel import TensorParallel, layer_slicer, shard_decoder


def read_sharded(files: list[Path], slicer):
    """Yield (name, tensor) like weights.iter_checkpoint, with each tensor `slicer(canonical name)` names read
    as its (dim, start, length) slice only."""
    from safetensors import safe_open

    for path in files:
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path.name}: tensor-parallel loading reads safetensors slices; convert pickle "
                                  "checkpoints to safetensors first")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    spec = slicer(canonical_name(key))
                    if spec is None:
                        yield key, f.get_tensor(key)
                        continue
                    part = f.get_slice(key)
                    shape = part.get_shape()
                    dim, start, length = spec
                    if dim >= len(shape) or start + length > shape[dim]:
                        raise CheckpointError(f"{key}: checkpoint shape {tuple(shape)} has no rows {start}:"
                                              f"{start + length} on dim {dim} for this rank's shard")
                    index = [slice(None)] * len(shape)
                    index[dim] = slice(start, start + length)
                    yield key, part[tuple(index)]
        except Exception as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"cannot read {path.name}: it is truncated or not a safetensors file ({exc})") from exc


class ShardedLoad:
    """The tensor_parallel= hook of load_pretrained: where the rank's weights go, its shapes, its slices."""

    def __init__(self, tp: TensorParallel):
        self.tp = tp
        self.device = tp.device
        self._slicer = None

    def prepare(self, model):
        """Rewrite the meta-built model's decoder to this rank's shapes."""
        core = model.model if hasattr(model, "lm_head") else model
        shard_decoder(core.language_model, self.tp)
        self._slicer = layer_slicer(self.tp, core.language_model.config)

    def tensors(self, files: list[Path]):
        return read_sharded(files, self._slicer)
