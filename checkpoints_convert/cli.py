"""Command line: `indexcache-convert SRC_HF_DIR DST_DIR [--dtype bfloat16|float32] [--pattern P] [--overwrite]`.

Shows a progress bar over the bytes read from the shards. Bad input prints one line `error: ...` to stderr and
exits with status 2, leaving no DST_DIR behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import jax
from tqdm import tqdm

from checkpoints_convert.convert import plan_conversion
from indexcache_jax.checkpoint import check_destination, write_checkpoint


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="indexcache-convert",
        description="Convert a Hugging Face DeepSeek-V3.2 / GLM-5(.1/.2) checkpoint (BF16 or FP8) into an "
                    "indexcache_jax checkpoint: an orbax checkpoint of the stacked params plus dsa_config.json.")
    p.add_argument("src", metavar="SRC_HF_DIR", help="HF directory: config.json, model.safetensors.index.json, shards")
    p.add_argument("dst", metavar="DST_DIR", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="params and compute dtype of the output (default: bfloat16)")
    p.add_argument("--pattern", default=None,
                   help="F/S pattern, one char per layer (default: from config.json: indexer_types, "
                        "index_topk_pattern or index_topk_freq; else all F)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST_DIR")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if argv is None and not os.environ.get("JAX_PLATFORMS"):
        # Run as a program: conversion is host work, so leave accelerators (and their memory) alone.
        jax.config.update("jax_platforms", "cpu")
    log = logging.getLogger("checkpoints_convert")
    log.setLevel(logging.INFO)
    for old in [h for h in log.handlers if getattr(h, "_indexcache_cli", False)]:
        log.removeHandler(old)  # a previous call's handler may hold a stale sys.stderr
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._indexcache_cli = True
    log.addHandler(handler)
    try:
        check_destination(args.dst, args.overwrite)
        plan = plan_conversion(args.src, dtype=args.dtype, pattern=args.pattern)
        with tqdm(total=plan.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
                  file=sys.stderr) as bar:
            write_checkpoint(args.dst, plan.cfg, plan.leaves(bar.update), overwrite=args.overwrite)
    except (ValueError, OSError, KeyError, TypeError) as e:
        msg = " ".join((f"missing key {e}" if isinstance(e, KeyError) else str(e)).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    cfg = plan.cfg
    print(f"wrote {args.dst}: {cfg.architecture}, {cfg.num_layers} layers, pattern {cfg.pattern}, {cfg.dtype}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
