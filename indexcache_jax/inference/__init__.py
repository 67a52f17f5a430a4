"""Inference around the model: `kernels` (Pallas or XLA dispatch), `cache` (decode caches), `sharding` (meshes and
placements) and `engine` (prefill, decode, generate, score)."""
