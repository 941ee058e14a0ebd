"""Continuous batching: paged KV cache, token-budget scheduler, encoder and prefix caches, vLLM's offline API."""
