"""The DSA model definition: `config` (DSAConfig, presets), `schedule` (F/S patterns, segments), `rope`, `quant`
(FP8 indexer), `layers` (norms, MLA, indexer, decoder block), `moe` (routing, experts), `model` (the segment scans,
`forward`, `init_params`, the abstract param shapes) and `params` (HF names -> our layout, relayout).

Dependencies point one way: config <- schedule, rope, quant <- moe <- layers <- model <- params.
"""
