"""Layer 5, compat: the transformers-shaped surface (model classes with checks and outputs, GenerationConfig,
streamers, Auto classes, the image-text-to-text pipeline) over model/ and generation/."""
