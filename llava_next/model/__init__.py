"""Layer 1, the model: pure nn.Module math (geometry, layers, attention, CLIP tower, decoder, LLaVA-NeXT packing).

No hub, no generation, no validation beyond shape asserts; imports only `config`, `errors` and `model/*`.
"""
