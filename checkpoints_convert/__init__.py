"""HF checkpoint -> indexcache_jax converter: streaming safetensors reader, FP8 block dequantization, orbax output.

`convert(src, dst, dtype=..., pattern=...)` writes a converted directory that `indexcache_jax.load` reads;
`plan_conversion` validates an HF directory and streams its stacked leaves (what `load` uses for HF directories).
The CLI is `python -m checkpoints_convert SRC DST` (or `indexcache-convert`).
`export(params, cfg, dst, dtype=...)` and `export_checkpoint(src, dst, ...)` write the other way, an HF checkpoint that
transformers, vLLM and SGLang load (CLI `indexcache-export`).
"""

from checkpoints_convert.convert import Plan, convert, plan_conversion
from checkpoints_convert.export import export, export_checkpoint, hf_config, plan_export
from checkpoints_convert.safetensors_io import CheckpointError, HFCheckpoint, read_header

__all__ = ["CheckpointError", "HFCheckpoint", "Plan", "convert", "export", "export_checkpoint", "hf_config",
           "plan_conversion", "plan_export", "read_header"]
