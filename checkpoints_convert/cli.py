"""Command lines: `indexcache-convert` (HF -> converted) and `indexcache-export` (any checkpoint -> HF).

`indexcache-convert SRC_HF_DIR DST_DIR [--dtype bfloat16|float32] [--pattern P] [--overwrite]`
`indexcache-export MODEL_DIR DST_DIR [--dtype bfloat16|float32|float8] [--pattern P] [--overwrite]`

Both show a progress bar over the bytes they handle. Bad input prints one line `error: ...` to stderr and exits with
status 2; Ctrl-C (status 130) and SIGTERM (status 143) remove the partial output. None of them leaves DST_DIR or a
temporary directory behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import jax
from tqdm import tqdm

from checkpoints_convert.convert import plan_conversion, write_converted
from checkpoints_convert.export import EXPORT_DTYPES, plan_export
from indexcache_jax.checkpoint import check_destination
from indexcache_jax.cli import HelpWithDefaults


def _setup(argv: list[str] | None) -> None:
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


def _run(work) -> int:
    """Runs `work()`; bad input is one `error:` line and status 2, Ctrl-C one line and status 130."""
    try:
        work()
    except (ValueError, OSError, KeyError, TypeError) as e:
        msg = " ".join((f"missing key {e}" if isinstance(e, KeyError) else str(e)).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the partial output was removed", file=sys.stderr)
        return 130
    return 0


def _convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="indexcache-convert",
        description="Convert a Hugging Face DeepSeek-V3.2 / GLM-5(.1/.2) checkpoint (BF16 or FP8) into an "
                    "indexcache_jax checkpoint: an orbax checkpoint of the stacked params plus dsa_config.json "
                    "(tokenizer files and the HF config.json go along).",
        formatter_class=HelpWithDefaults)
    p.add_argument("src", metavar="SRC_HF_DIR", help="HF directory: config.json, model.safetensors.index.json, shards")
    p.add_argument("dst", metavar="DST_DIR", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="params and compute dtype of the output")
    p.add_argument("--pattern", default=None,
                   help="F/S pattern, one char per layer (default: from config.json: indexer_types, "
                        "index_topk_pattern or index_topk_freq; else all F)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST_DIR")
    return p


def main(argv: list[str] | None = None) -> int:
    """`indexcache-convert` (also `python -m checkpoints_convert`)."""
    args = _convert_parser().parse_args(argv)
    _setup(argv)
    done = {}

    def work():
        check_destination(args.dst, args.overwrite)
        plan = plan_conversion(args.src, dtype=args.dtype, pattern=args.pattern)
        with tqdm(total=plan.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
                  file=sys.stderr) as bar:
            write_converted(plan, args.dst, overwrite=args.overwrite, progress=bar.update)
        done["cfg"] = plan.cfg

    rc = _run(work)
    if rc == 0:
        cfg = done["cfg"]
        print(f"wrote {args.dst}: {cfg.architecture}, {cfg.num_layers} layers, pattern {cfg.pattern}, {cfg.dtype}",
              file=sys.stderr)
    return rc


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="indexcache-export",
        description="Export a converted or HF checkpoint as a Hugging Face checkpoint that transformers, vLLM and "
                    "SGLang load unchanged: sharded safetensors in the hub names, config.json with the F/S pattern "
                    "(indexer_types, index_topk_pattern), no indexer weights on S layers, tokenizer files copied.",
        formatter_class=HelpWithDefaults)
    p.add_argument("src", metavar="MODEL_DIR", help="converted (indexcache-convert, indexcache-distill) or HF directory")
    p.add_argument("dst", metavar="DST_DIR", help="output HF directory (must not exist unless --overwrite)")
    p.add_argument("--pattern", default=None,
                   help="F/S pattern to export (default: the model's); S layers drop their indexer, and an F layer "
                        "needs indexer weights in MODEL_DIR")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, default="bfloat16",
                   help="weight dtype; float8 = 128x128 block-quantized e4m3 with weight_scale_inv, as the "
                        "official FP8 checkpoints")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, in GiB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST_DIR")
    return p


def export_main(argv: list[str] | None = None) -> int:
    """`indexcache-export`."""
    args = _export_parser().parse_args(argv)
    _setup(argv)
    done = {}

    def work():
        if not args.max_shard_gb > 0:
            raise ValueError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
        check_destination(args.dst, args.overwrite)
        plan = plan_export(args.src, dtype=args.dtype, pattern=args.pattern,
                           max_shard_bytes=int(args.max_shard_gb * 2 ** 30))
        with tqdm(total=plan.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="exporting",
                  file=sys.stderr) as bar:
            plan.write(args.dst, overwrite=args.overwrite, progress=bar.update)
        done["cfg"] = plan.cfg

    rc = _run(work)
    if rc == 0:
        cfg = done["cfg"]
        print(f"wrote {args.dst}: {cfg.architecture}, {cfg.num_layers} layers, pattern {cfg.pattern}, {args.dtype}",
              file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
