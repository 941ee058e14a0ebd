"""Layer 6, entry points: the `llava-next` command line and the offline demo checkpoint builder."""
