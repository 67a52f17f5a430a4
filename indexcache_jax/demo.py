"""The main job (`python -m indexcache_jax`, also `indexcache-demo`): IndexCache on the embedded trained DSA model.

1. Loads the embedded model (16 DSA layers trained here on the Python standard library; `load_default`).
2. Runs the greedy layer search (the paper's Algorithm 1) on a calibration slice of the train split, to keep 1/4 of
   the indexers, with a progress bar.
3. Prints, for full DSA, uniform 1/4 and the searched 1/4 pattern: the pattern, the share of indexer FLOPs saved,
   held-out bits per byte (lower is better) on validation files the model never trained on, retrieval accuracy on
   fresh key/value cases (exact match), and the prefill time of one sequence at the model's longest context (2048
   tokens on a CPU, to stay within minutes), with the speedup over full DSA.
4. Completes a Python prompt with the searched pattern.

On a 2-core CPU the defaults take about three minutes; on a GPU the Pallas kernels run and larger sizes are cheap.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import indexcache_jax as ic
from indexcache_jax import pretrained
from indexcache_jax.data import corpus, quality, retrieval, tokenizer

PROMPT = 'def read_lines(path):\n    """Return the lines of the file at path."""\n'


def _prefill_seconds(params: dict, cfg, tokens: np.ndarray, repeats: int) -> float:
    """Best wall time of a compiled full forward over `tokens` (after one untimed call that compiles)."""
    jax.block_until_ready(ic.forward(params, cfg, tokens))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(ic.forward(params, cfg, tokens))
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", default="1/4", help="share of indexers to keep, 1/r")
    parser.add_argument("--calib-tokens", type=int, default=512, help="length of the calibration sequence")
    parser.add_argument("--eval-tokens", type=int, default=512, help="length of held-out windows and cases")
    parser.add_argument("--windows", type=int, default=4, help="held-out windows for bits per byte")
    parser.add_argument("--cases", type=int, default=4, help="retrieval cases")
    parser.add_argument("--prefill-tokens", type=int, default=None,
                        help="prefill length (default: the model's context on a GPU, 2048 on a CPU)")
    parser.add_argument("--prefill-repeats", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    t_start = time.perf_counter()

    cfg, params, tok = pretrained.load_default()
    n, context = cfg.num_layers, cfg.max_position_embeddings
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"jax {jax.__version__} on {jax.default_backend()}. Embedded DSA model: {n} layers, "
          f"{n_params / 1e6:.1f}M params, context {context}, each indexer keeps {cfg.index_topk} keys per query.")
    data = corpus.load_corpus()
    eos, newline = tokenizer.eos_id(tok), retrieval.newline_token_ids(tok)

    # Calibration: one LM window of the train split.
    rng = np.random.default_rng(0)
    calib_files = [data.train[i] for i in rng.choice(len(data.train), 40, replace=False)]
    stream = corpus.token_stream(calib_files, tok, eos)
    start = int(rng.integers(len(stream) - args.calib_tokens))
    calib = stream[None, start:start + args.calib_tokens]
    print(f"\nGreedy search for {args.keep} of the indexers on {calib.shape[0]} x {calib.shape[1]} calibration "
          f"tokens (train split): each step flips the F layer whose loss rises least to S.")
    search = ic.search.greedy_search(params, cfg, calib, keep=args.keep, batch_size=1)
    print(f"calibration loss: all-F {search.baseline_loss:.4f} -> {search.step_losses[-1]:.4f} nats/token after "
          f"{len(search.removed)} flips ({search.seconds:.0f} s)")

    # Held-out evaluation (validation split).
    windows = corpus.lm_windows(corpus.token_stream(data.validation, tok, eos), args.eval_tokens, args.windows)
    nbytes = quality.window_bytes(windows, tokenizer.token_bytes(tok))
    cases = retrieval.make_cases(retrieval.FillerPool(data.validation), tok, seed=2026, count=args.cases,
                                 context_tokens=args.eval_tokens)
    evaluator = quality.PatternEvaluator(params, cfg)
    prefill_len = args.prefill_tokens or (context if jax.default_backend() == "gpu" else 2048)
    prefill_tokens = np.asarray(
        corpus.lm_windows(corpus.token_stream(data.validation, tok, eos), prefill_len, 1), np.int32)
    rows = []
    settings = [("full DSA", "F" * n), (f"uniform {args.keep}", ic.uniform_pattern(n, args.keep)),
                (f"searched {args.keep}", search.pattern)]
    print(f"\nEvaluating on Python {data.python_version}'s validation files ({len(data.validation)} files never "
          f"trained on): {len(windows)} windows x {args.eval_tokens} tokens, {args.cases} retrieval cases of "
          f"{args.eval_tokens} tokens; prefill of one {prefill_len}-token sequence.")
    for name, pattern in settings:
        nll = evaluator.window_nll(pattern, windows, batch_size=2)
        hits = evaluator.retrieval_hits(pattern, cases, args.eval_tokens, eos, newline, batch_size=4)
        run_cfg = cfg.with_pattern(pattern)
        seconds = _prefill_seconds(ic.relayout(params, cfg, run_cfg), run_cfg, prefill_tokens, args.prefill_repeats)
        rows.append((name, pattern, 1 - pattern.count("F") / n, quality.bits_per_byte(nll, nbytes),
                     quality.bpb_interval(nll, nbytes), int(hits.sum()), seconds))

    full_seconds = rows[0][-1]
    print(f"\n{'setting':14s} {'pattern':{n}s}  {'indexer FLOPs saved':>19s}  {'bits/byte (95% CI)':>22s}  "
          f"{'retrieval':>9s}  {'prefill ' + str(prefill_len):>13s}  speedup")
    for name, pattern, saved, bpb, ci, hits, seconds in rows:
        print(f"{name:14s} {pattern}  {saved:19.0%}  {bpb:8.4f} ({ci[0]:.3f}-{ci[1]:.3f})  "
              f"{hits:4d}/{args.cases:<4d}  {seconds:11.3f} s  {full_seconds / seconds:6.2f}x")
    print("bits/byte: held-out next-token loss per UTF-8 byte (lower is better; CI by bootstrap over windows). "
          "retrieval: exact-match completions of a value assigned far back in the code. Indexer FLOPs saved: "
          "share of layers that reuse the indices of the F layer before them (S layers).")

    run_cfg = cfg.with_pattern(search.pattern)
    ids = ic.generate(ic.relayout(params, cfg, run_cfg), run_cfg, [tok.encode(PROMPT).ids], args.new_tokens,
                      eos_id=eos)[0]
    print(f"\nGreedy completion with the searched pattern ({args.new_tokens} tokens):\n{PROMPT}"
          f"{tok.decode([i for i in ids if i != eos])}")
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
