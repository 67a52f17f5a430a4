"""Console scripts: `indexcache-search` (greedy F/S search) and `indexcache-distill` (multi-layer distillation).

Token files (`--calib`, `--data`) hold int token ids `[R, T]`: `.npy`, `.npz` (array `tokens`, else the only one) or
`.json` (a list of equal-length lists).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from fractions import Fraction

import numpy as np


def read_tokens(path: str) -> np.ndarray:
    """int32 `[R, T]` token ids from a .npy, .npz or .json file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no token file at {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        arr = np.load(path)
    elif ext == ".npz":
        with np.load(path) as z:
            if "tokens" in z:
                arr = z["tokens"]
            elif len(z.files) == 1:
                arr = z[z.files[0]]
            else:
                raise ValueError(f"{path} holds {z.files}; name the token array 'tokens'")
    elif ext == ".json":
        with open(path) as f:
            rows = json.load(f)
        if not rows or len({len(r) for r in rows}) != 1:
            raise ValueError(f"{path} must hold a non-empty list of equal-length token lists")
        arr = np.asarray(rows)
    else:
        raise ValueError(f"unsupported token file {path!r}: use .npy, .npz or .json")
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path} must hold int token ids [R, T], got {arr.dtype} {arr.shape}")
    return arr.astype(np.int32)


def _keep(text: str) -> Fraction:
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"--keep must look like 1/4, got {text!r}") from None


def _write_json(path: str, payload: dict) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def _run(command, args: argparse.Namespace) -> int:
    """Runs a CLI command; bad input (a pattern, a file, a checkpoint, a count) is one `error:` line and exit 2."""
    try:
        return command(args)
    except (ValueError, OSError, KeyError) as e:
        msg = " ".join((f"missing key {e}" if isinstance(e, KeyError) else str(e)).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2


def search_main(argv: list[str] | None = None) -> int:
    """`indexcache-search MODEL_DIR --calib FILE --keep 1/4 --out result.json`."""
    ap = argparse.ArgumentParser(prog="indexcache-search",
                                 description="Greedy IndexCache F/S pattern search (Algorithm 1), all-F DSA model.")
    ap.add_argument("model_dir", help="converted or HF checkpoint directory of an all-F model")
    ap.add_argument("--calib", required=True, help="calibration token ids [R, T] (.npy/.npz/.json), T > index_topk")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--keep", type=_keep, help="fraction of indexers to keep, 1/r (n_full = ceil(N / r))")
    group.add_argument("--n-full", type=int, help="number of F layers to keep")
    ap.add_argument("--blocks", type=int, default=1,
                    help="block variant: P contiguous blocks, one flip per block per step")
    ap.add_argument("--batch-size", type=int, default=None, help="calibration rows per forward (default: all)")
    ap.add_argument("--method", choices=("prefix", "naive"), default="prefix",
                    help="prefix: run candidates from the flipped layer on cached states (default); "
                         "naive: from layer 0")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute/params dtype")
    ap.add_argument("--similarity-dp", action="store_true",
                    help="also run the Appendix C similarity-DP baseline and add its pattern to the output")
    ap.add_argument("--out", default="search_result.json", help="result JSON (pattern, losses, HF config fields)")
    ap.add_argument("--plot", default=None, help="optional PNG of the per-step loss curve")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return _run(_search, ap.parse_args(argv))


def _search(args: argparse.Namespace) -> int:
    import indexcache_jax
    from indexcache_jax.methods import analysis
    from indexcache_jax.methods import search

    cfg, params = indexcache_jax.load(args.model_dir, dtype=args.dtype)
    tokens = read_tokens(args.calib)
    result = search.greedy_search(params, cfg, tokens, n_full=args.n_full, keep=args.keep, blocks=args.blocks,
                                  batch_size=args.batch_size, progress=not args.no_progress, method=args.method)
    payload = {"model_dir": os.path.abspath(args.model_dir), "calib": os.path.abspath(args.calib), **result.to_dict()}
    if args.similarity_dp:
        dp = search.similarity_dp(params, cfg, tokens, n_full=result.n_full, batch_size=args.batch_size)
        payload["similarity_dp"] = dp.to_dict()
    _write_json(args.out, payload)
    if args.plot:
        analysis.plot_search(result, args.plot)
    print(f"pattern {result.pattern} ({result.n_full} F of {cfg.num_layers}); loss {result.baseline_loss:.4g} -> "
          f"{result.step_losses[-1] if result.step_losses else result.baseline_loss:.4g}; "
          f"{result.forward_passes:.1f} forward equivalents; wrote {args.out}")
    return 0


def distill_main(argv: list[str] | None = None) -> int:
    """`indexcache-distill MODEL_DIR --data FILE --pattern P --steps N --out OUT_DIR`."""
    ap = argparse.ArgumentParser(prog="indexcache-distill",
                                 description="Multi-layer distillation of the F layers' indexers (IndexCache §3.2).")
    ap.add_argument("model_dir", help="converted or HF checkpoint directory (indexers on every F layer of the pattern)")
    ap.add_argument("--data", required=True, help="training token ids [R, T] (.npy/.npz/.json)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--pattern", help="F/S pattern to train for (default: the model's)")
    group.add_argument("--keep", type=_keep, help="uniform pattern keeping 1/r of the indexers")
    group.add_argument("--search-result", help="take the pattern from an indexcache-search result JSON")
    ap.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    ap.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up steps")
    ap.add_argument("--dense-steps", type=int, default=None, help="dense-stage steps (default: --warmup-steps)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=1, help="rows of --data per step (cycled)")
    ap.add_argument("--own-layer-only", action="store_true",
                    help="distill each F indexer toward its own layer only (GLM-5.2 / Megatron; 'w/o cross-layer')")
    ap.add_argument("--query-chunk", type=int, default=256, help="queries per KL chunk (bounds memory)")
    ap.add_argument("--checkpoint-dir", default=None, help="orbax checkpoints here; rerun to resume after a kill")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--out", required=True,
                    help="output model directory, laid out for the pattern (S indexers dropped)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ap.add_argument("--history", default=None, help="optional JSON of the per-step loss history")
    ap.add_argument("--no-progress", action="store_true")
    return _run(_distill, ap.parse_args(argv))


def _distill(args: argparse.Namespace) -> int:
    import indexcache_jax
    from indexcache_jax.methods import distill
    from indexcache_jax.model import schedule

    from indexcache_jax.checkpoint import check_destination

    check_destination(args.out, args.overwrite)
    cfg, params = indexcache_jax.load(args.model_dir, dtype=args.dtype)
    if args.keep is not None:
        pattern = schedule.uniform_pattern(cfg.num_layers, args.keep)
    elif args.search_result is not None:
        with open(args.search_result) as f:
            pattern = json.load(f)["pattern"]
    else:
        pattern = args.pattern or cfg.pattern
    tokens = read_tokens(args.data)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    batches = [tokens[i:i + args.batch_size] for i in range(0, len(tokens), args.batch_size)]
    params, history = distill.train_indexers(
        params, cfg, batches, pattern=pattern, steps=args.steps, warmup_steps=args.warmup_steps,
        dense_steps=args.dense_steps, learning_rate=args.lr, weight_decay=args.weight_decay,
        own_layer_only=args.own_layer_only, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, query_chunk=args.query_chunk, progress=not args.no_progress)
    out_cfg = cfg.with_pattern(pattern)
    indexcache_jax.save(args.out, out_cfg, indexcache_jax.relayout(params, cfg, out_cfg), overwrite=args.overwrite)
    if args.history:
        _write_json(args.history, {"pattern": pattern, "history": history})
    if history:
        print(f"pattern {pattern}: loss {history[0]['loss']:.4g} -> {history[-1]['loss']:.4g} over steps "
              f"{history[0]['step']}..{history[-1]['step']}; wrote {args.out}")
    return 0

