"""Layer 2, preprocessing: image loading and checks, the anyres image processors, tokenizer, chat templates, processor."""
