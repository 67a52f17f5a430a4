"""The IndexCache methods: `layer_runner` (per-layer execution under a traced pattern), `search` (greedy layer
search, similarity DP), `distill` (multi-layer indexer distillation) and `analysis` (top-k overlap, plots)."""
