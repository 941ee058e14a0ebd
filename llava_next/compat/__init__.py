"""Layer 5, compat: the transformers-shaped surface (model classes with checks and outputs, GenerationConfig,
streamers, Auto classes, the image-text-to-text pipeline, generate() on the engine's runner) over model/ and
engine/."""
