"""Layer 6, dataset-scale entry points: `llava-next batch` on Ray Data (ray_job). Importing this package does
not import ray; ray_job imports it inside the functions that need it."""
