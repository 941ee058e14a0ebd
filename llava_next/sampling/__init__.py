"""Layer 3, sampling: logits processors, token choice, stopping and the screened lm_head, shared by generate()
(compat/) and the engine."""
