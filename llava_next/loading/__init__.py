"""Layer 2, loading: hub resolution, safetensors streaming, placement, bitsandbytes quantization, from_pretrained."""
