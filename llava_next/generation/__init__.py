"""Layer 4, generation: transformers-style generate() over one static batch (prefill, decode runner, beam search)."""
