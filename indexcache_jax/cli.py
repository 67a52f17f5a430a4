"""Console scripts: `indexcache-search` (greedy F/S search), `indexcache-distill` (multi-layer distillation),
`indexcache-generate` (text completion) and `indexcache-eval` (perplexity and bits per byte per pattern).

Token files (`--calib`, `--data`) hold int token ids `[R, T]`: `.npy`, `.npz` (array `tokens`, else the only one) or
`.json` (a list of equal-length lists). Text commands read the checkpoint's `tokenizer.json` (or `--tokenizer`).
A model laid out for one pattern runs under another (`--pattern`) when it holds the indexer weights of every F layer
of that pattern; otherwise the error names the first F layer without them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
from fractions import Fraction

import numpy as np

from indexcache_jax.model.config import read_json


class HelpWithDefaults(argparse.HelpFormatter):
    """Help lines end with `(default: X)` where an option has a default its help text does not already state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


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
        rows = read_json(path, "token file")
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
        keep = Fraction(text)
    except (ValueError, ZeroDivisionError):
        keep = None
    if keep is None or not 0 < keep <= 1 or keep.numerator != 1:
        raise argparse.ArgumentTypeError(f"--keep must be 1/r for an integer r >= 1 (e.g. 1/4), got {text!r}")
    return keep


def _write_json(path: str, payload: dict) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _run(command, args: argparse.Namespace) -> int:
    """Runs a CLI command; bad input (a pattern, a file, a checkpoint, a count) is one `error:` line and exit 2.
    SIGTERM exits with status 143 through the clean-ups (a checkpoint being written is removed), as Ctrl-C does."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        return command(args)
    except (ValueError, OSError, KeyError) as e:
        msg = " ".join((f"missing key {e}" if isinstance(e, KeyError) else str(e)).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def search_main(argv: list[str] | None = None) -> int:
    """`indexcache-search MODEL_DIR --calib FILE --keep 1/4 --out result.json`."""
    ap = argparse.ArgumentParser(prog="indexcache-search",
                                 description="Greedy IndexCache F/S pattern search (Algorithm 1), all-F DSA model.",
                                 formatter_class=HelpWithDefaults)
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
                                 description="Multi-layer distillation of the F layers' indexers (IndexCache §3.2).",
                                 formatter_class=HelpWithDefaults)
    ap.add_argument("model_dir", help="converted or HF checkpoint directory (indexers on every F layer of the pattern)")
    ap.add_argument("--data", required=True, help="training token ids [R, T] (.npy/.npz/.json)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--pattern", help="F/S pattern to train for (default: the model's)")
    group.add_argument("--keep", type=_keep, help="uniform pattern keeping 1/r of the indexers")
    group.add_argument("--search-result", help="take the pattern from an indexcache-search result JSON")
    ap.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    ap.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up steps")
    ap.add_argument("--dense-steps", type=int, default=None, help="dense-stage steps (default: --warmup-steps)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--batch-size", type=int, default=1, help="rows of --data per step (cycled)")
    ap.add_argument("--own-layer-only", action="store_true",
                    help="distill each F indexer toward its own layer only (GLM-5.2 / Megatron; 'w/o cross-layer')")
    ap.add_argument("--query-chunk", type=int, default=256, help="queries per KL chunk (bounds memory)")
    ap.add_argument("--checkpoint-dir", default=None, help="orbax checkpoints here; rerun to resume after a kill")
    ap.add_argument("--checkpoint-every", type=int, default=100, help="steps between training checkpoints")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="params and compute dtype (default: the model's: the stored dtype of a converted "
                         "directory, bfloat16 for an HF one); --out is written in it")
    ap.add_argument("--out", required=True,
                    help="output model directory, laid out for the pattern (S indexers dropped)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ap.add_argument("--history", default=None, help="optional JSON of the per-step loss history")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return _run(_distill, ap.parse_args(argv))


def _distill(args: argparse.Namespace) -> int:
    import indexcache_jax
    from indexcache_jax.methods import distill, search
    from indexcache_jax.model import schedule

    from indexcache_jax.checkpoint import check_destination

    check_destination(args.out, args.overwrite)
    cfg, params = indexcache_jax.load(args.model_dir, dtype=args.dtype)
    if args.keep is not None:
        pattern = schedule.uniform_pattern(cfg.num_layers, args.keep)
    elif args.search_result is not None:
        pattern = search.SearchResult.load(args.search_result).pattern
    else:
        pattern = args.pattern or cfg.pattern
    tokens = read_tokens(args.data)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    batches = [tokens[i:i + args.batch_size] for i in range(0, len(tokens), args.batch_size)]
    ran: list[int] = []
    params, history = distill.train_indexers(
        params, cfg, batches, pattern=pattern, steps=args.steps, warmup_steps=args.warmup_steps,
        dense_steps=args.dense_steps, learning_rate=args.lr, weight_decay=args.weight_decay,
        own_layer_only=args.own_layer_only, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, query_chunk=args.query_chunk, progress=not args.no_progress,
        callback=lambda step, record: ran.append(step))
    out_cfg = cfg.with_pattern(pattern)
    indexcache_jax.save(args.out, out_cfg, indexcache_jax.relayout(params, cfg, out_cfg), overwrite=args.overwrite)
    carry_model_files(args.model_dir, args.out)
    if args.history:
        _write_json(args.history, {"pattern": pattern, "history": history})
    resumed = history[0]["step"] if not ran else ran[0]
    note = f"; resumed from {args.checkpoint_dir} at step {resumed}" if resumed > history[0]["step"] else ""
    print(f"pattern {pattern}: loss {history[0]['loss']:.4g} -> {history[-1]['loss']:.4g} over steps "
          f"{history[0]['step']}..{history[-1]['step']}{note}; wrote {args.out} ({out_cfg.dtype})")
    return 0


def carry_model_files(src: str, dst: str) -> None:
    """Copies what travels with the weights from the model directory `src` into `dst`: the tokenizer files, and the
    HF config as `hf_config.json` (a converted directory's copy, or an HF directory's config.json)."""
    from indexcache_jax import text

    text.copy_tokenizer_files(src, dst)
    for name in (text.HF_CONFIG_COPY, "config.json"):
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(dst, text.HF_CONFIG_COPY))
            return


# ------------------------------------------------------------------------------------------------------ text CLIs
def _load_text_model(args: argparse.Namespace):
    """(cfg, params, tokenizer) of `args.model_dir`, with `args.tokenizer` overriding where the tokenizer comes from."""
    import indexcache_jax
    from indexcache_jax import text

    source = args.tokenizer or args.model_dir
    tokenizer = text.load_tokenizer(source)
    if tokenizer is None:
        raise ValueError(f"no {text.TOKENIZER_FILE} at {source}; pass --tokenizer PATH")
    cfg, params = indexcache_jax.load(args.model_dir, dtype=args.dtype)
    return cfg, params, tokenizer


def _for_pattern(params: dict, cfg, pattern: str | None):
    """(cfg, params) laid out for `pattern` (None: the model's own); ValueError names an F layer without indexer."""
    import indexcache_jax

    if pattern is None or pattern == cfg.pattern:
        return cfg, params
    target = cfg.with_pattern(pattern)
    return target, indexcache_jax.relayout(params, cfg, target)


def _text_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("model_dir", help="converted or HF checkpoint directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json, or a directory holding it (default: MODEL_DIR)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="params and compute dtype (default: the model's)")


def generate_main(argv: list[str] | None = None) -> int:
    """`indexcache-generate MODEL_DIR --prompt TEXT [--prompt TEXT ...] [--pattern P] [--max-new-tokens N]`."""
    ap = argparse.ArgumentParser(prog="indexcache-generate",
                                 description="Complete text prompts with a DSA model; prints each completion.",
                                 formatter_class=HelpWithDefaults)
    _text_model_args(ap)
    ap.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    ap.add_argument("--pattern", default=None, help="F/S pattern to run under (default: the model's)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt at most")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    return _run(_generate, ap.parse_args(argv))


def _generate(args: argparse.Namespace) -> int:
    import indexcache_jax
    from indexcache_jax import text

    cfg, params, tokenizer = _load_text_model(args)
    cfg, params = _for_pattern(params, cfg, args.pattern)
    prompts = text.encode_batch(tokenizer, args.prompt)
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"prompt {empty[0]} encodes to no tokens")
    new = indexcache_jax.generate(params, cfg, prompts, args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                  eos_id=list(cfg.eos_token_id) or None)
    completions = text.decode_batch(tokenizer, new)
    print("\n---\n".join(completions))
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    """`indexcache-eval MODEL_DIR --text FILE [--pattern P ...]`."""
    ap = argparse.ArgumentParser(
        prog="indexcache-eval",
        description="Perplexity and bits per byte of a text file under one or more F/S patterns, side by side. "
                    "The text is tokenized whole and cut into rows of --seq-len tokens, each row starting at the "
                    "last token of the one before, so every token but the first is predicted once; bits per byte "
                    "divide the summed negative log-likelihood (bits) by the UTF-8 bytes of the predicted tokens.",
        formatter_class=HelpWithDefaults)
    _text_model_args(ap)
    ap.add_argument("--text", required=True, help="UTF-8 text file")
    ap.add_argument("--pattern", action="append", default=None,
                    help="F/S pattern to evaluate (repeat for several; default: the model's)")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per scored row")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per scoring call")
    return _run(_eval, ap.parse_args(argv))


def text_windows(ids: list[int], seq_len: int) -> list[list[int]]:
    """Rows of at most `seq_len` tokens, each starting at the last token of the previous one: every token but the
    first is a prediction target exactly once."""
    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
    return [ids[s:s + seq_len] for s in range(0, len(ids) - 1, seq_len - 1)]


def _eval(args: argparse.Namespace) -> int:
    import math

    import indexcache_jax
    from indexcache_jax import text

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    with open(args.text, encoding="utf-8") as f:
        body = f.read()
    cfg, params, tokenizer = _load_text_model(args)
    encoding = tokenizer.encode(body)
    ids = encoding.ids
    if len(ids) < 2:
        raise ValueError(f"{args.text} encodes to {len(ids)} token(s); at least 2 are needed to score")
    rows = text_windows(ids, min(args.seq_len, cfg.max_position_embeddings))
    start, end = encoding.offsets[0]
    n_bytes = len(body.encode()) - len(body[start:end].encode())  # the first token is context, never a target
    n_targets = len(ids) - 1
    patterns = args.pattern or [cfg.pattern]
    results = []
    for pattern in patterns:
        p_cfg, p_params = _for_pattern(params, cfg, pattern)
        nll = 0.0
        for g in range(0, len(rows), args.batch_size):
            tokens, mask = text.pad_batch(rows[g:g + args.batch_size])
            nll -= float(np.sum(indexcache_jax.score(p_params, p_cfg, tokens, mask=mask), dtype=np.float64))
        results.append((p_cfg, math.exp(nll / n_targets), nll / math.log(2) / max(n_bytes, 1)))
    print(f"{args.text}: {len(ids)} tokens ({n_targets} predicted, {n_bytes} bytes) in {len(rows)} rows of <= "
          f"{len(rows[0])} tokens")
    print(f"{'F layers':>9}  {'perplexity':>12}  {'bits/byte':>10}  pattern")
    for p_cfg, ppl, bpb in results:
        n_full = f"{len(p_cfg.full_layers)}/{p_cfg.num_layers}"
        print(f"{n_full:>9}  {ppl:>12.4f}  {bpb:>10.4f}  {p_cfg.pattern}")
    return 0
