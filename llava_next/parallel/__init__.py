"""Tensor parallelism: tensor_parallel.py shards a built decoder over a process group; loading.py reads each
rank's slices of a safetensors checkpoint."""
