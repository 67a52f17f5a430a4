"""Quality of IndexCache patterns on the embedded model: the paper's Tables 2 and 3 in miniature.

Settings: full DSA; uniform 1/2, 1/4, 1/8; greedy-searched 1/2, 1/4, 1/8 (one greedy run to 1/8: its first flips
are the 1/2 and 1/4 patterns); similarity-DP 1/2, 1/4; distilled uniform 1/2 and 1/4 (multi-layer loss) and 1/2
own-layer only. Measures: held-out bits per byte on LM windows of the validation files, and retrieval exact-match
accuracy at the full context and at half of it (fresh cases from the validation files), each with a 95% bootstrap
interval and a paired interval of its difference to full DSA. Search and distillation read the train split only.

    python benchmarks/quality.py [--model DIR] [--cases 500] [--windows 32] [--out-name quality]
    python benchmarks/quality.py --table benchmarks/results/quality.json   # the BENCHMARKS.md table

Writes benchmarks/results/<out-name>.json (after every stage, so a cut-off run keeps what it measured), and the
overlap heatmap and search loss curve PNGs (default: next to the embedded model's weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import indexcache_jax as ic  # noqa: E402
from indexcache_jax.profiling import write_result_json  # noqa: E402
from indexcache_jax import pretrained  # noqa: E402
from indexcache_jax.data import corpus, quality, retrieval, tokenizer  # noqa: E402
from indexcache_jax.model import schedule  # noqa: E402

KEEPS = ("1/2", "1/4", "1/8")
SEEDS = {"retrieval_full": 2026, "retrieval_half": 2027, "calibration": 7, "distill": 11, "bootstrap": 0}


def calibration_batches(data: corpus.Corpus, tok, length: int, count: int, seed: int, batch_size: int,
                        n_keys: int = 8) -> list[np.ndarray]:
    """`count` train-split sequences of `length` tokens, half LM windows and half retrieval cases with every key
    queried (the training mix), in batches of `batch_size`."""
    eos = tokenizer.eos_id(tok)
    rng = np.random.default_rng(seed)
    files = [data.train[i] for i in sorted(rng.choice(len(data.train), min(len(data.train), 200), replace=False))]
    stream = corpus.token_stream(files, tok, eos)
    pool = retrieval.FillerPool(data.train)
    rows = []
    for i in range(count):
        if i % 2 == 0:
            start = int(rng.integers(len(stream) - length))
            rows.append(stream[start:start + length])
        else:
            case = retrieval.make_case(pool, tok, seed=seed, index=i, context_tokens=length, n_keys=n_keys,
                                       n_queries=n_keys)
            row = np.full(length, eos, np.int32)
            row[:len(case.text_ids)] = case.text_ids
            rows.append(row)
    arr = np.stack(rows).astype(np.int32)
    return [arr[i:i + batch_size] for i in range(0, count, batch_size)]


def markdown_table(result: dict) -> str:
    """The settings of a quality JSON as a BENCHMARKS.md table (intervals: 95% bootstrap; "vs full": paired)."""
    ctx = result["context"]
    lines = [f"| setting | pattern | indexer FLOPs saved | bits/byte (95% CI) | bpb vs full (95% CI) | "
             f"retrieval @{ctx} (95% CI) | retrieval @{ctx // 2} (95% CI) |", "|---|---|---:|---:|---:|---:|---:|"]
    for e in result["settings"]:
        diff = e.get("bits_per_byte_minus_full_ci95")
        diff = "-" if diff is None else f"[{diff[0]:+.4f}, {diff[1]:+.4f}]"
        lo, hi = e["bits_per_byte_ci95"]
        ret = [f"{e[f'retrieval_{k}']:.1%} ({e[f'retrieval_{k}_ci95'][0]:.0%}-{e[f'retrieval_{k}_ci95'][1]:.0%})"
               for k in ("full", "half")]
        lines.append(f"| {e['name']} | `{e['pattern']}` | {e['indexer_flops_saved']:.0%} | "
                     f"{e['bits_per_byte']:.4f} ({lo:.4f}-{hi:.4f}) | {diff} | {ret[0]} | {ret[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--table":
        with open(sys.argv[2]) as f:
            print(markdown_table(json.load(f)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=pretrained.DEFAULT_MODEL_DIR)
    parser.add_argument("--cases", type=int, default=500, help="retrieval cases per context length")
    parser.add_argument("--windows", type=int, default=32, help="held-out LM windows for bits per byte")
    parser.add_argument("--calib", type=int, default=8, help="calibration sequences (search, similarity)")
    parser.add_argument("--distill-steps", type=int, default=40)
    parser.add_argument("--distill-dense-steps", type=int, default=20)
    parser.add_argument("--distill-lr", type=float, default=5e-4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-files", type=int, default=None, help="use only the first files (quick runs)")
    parser.add_argument("--length", type=int, default=None, help="context (default: the model's)")
    parser.add_argument("--plots-dir", default=None, help="default: the --model directory")
    parser.add_argument("--backend", default=None, choices=("auto", "pallas", "xla"),
                        help="kernels (default: the model config's, i.e. Pallas on a GPU)")
    parser.add_argument("--out-name", default="quality")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()

    cfg, params = pretrained.load_model_dir(args.model)
    if args.backend is not None:
        cfg = cfg.replace(backend=args.backend)
    tok = tokenizer.load_tokenizer(os.path.join(args.model, "tokenizer.json")
                                   if os.path.isfile(os.path.join(args.model, "tokenizer.json"))
                                   else os.path.join(pretrained.DEFAULT_MODEL_DIR, "tokenizer.json"))
    n, length = cfg.num_layers, args.length or cfg.max_position_embeddings
    half = length // 2
    data = corpus.load_corpus(max_files=args.max_files)
    eos, newline, token_bytes = tokenizer.eos_id(tok), retrieval.newline_token_ids(tok), tokenizer.token_bytes(tok)
    windows = corpus.lm_windows(corpus.token_stream(data.validation, tok, eos), length, args.windows)
    nbytes = quality.window_bytes(windows, token_bytes)
    pool = retrieval.FillerPool(data.validation)
    cases = {"full": retrieval.make_cases(pool, tok, seed=SEEDS["retrieval_full"], count=args.cases,
                                          context_tokens=length),
             "half": retrieval.make_cases(pool, tok, seed=SEEDS["retrieval_half"], count=args.cases,
                                          context_tokens=half)}
    calib = calibration_batches(data, tok, length, args.calib, SEEDS["calibration"], args.batch)
    result = {"model": os.path.relpath(args.model), "config": cfg.to_dict(), "context": length, "seeds": SEEDS,
              "data": {"python_version": data.python_version, "validation_files": len(data.validation),
                       "validation_bytes": int(sum(f.num_bytes for f in data.validation)),
                       "bpb_windows": int(len(windows)), "bpb_tokens_scored": int(windows[:, 1:].size),
                       "bpb_bytes_scored": int(nbytes.sum()), "retrieval_cases_per_length": args.cases,
                       "calibration_sequences": args.calib},
              "settings": [], "timings_s": {}}
    print(f"jax {jax.__version__} on {jax.devices()[0]}; {len(windows)} windows x {length} tokens, "
          f"{args.cases} retrieval cases at {length} and {half}", flush=True)

    def save():
        result["timings_s"]["total"] = round(time.perf_counter() - t_start, 1)
        return write_result_json(args.out_name, result)

    def stage(name, t0):
        result["timings_s"][name] = round(time.perf_counter() - t0, 1)
        print(f"[{time.perf_counter() - t_start:6.1f} s] {name} done", flush=True)

    # ---- patterns: uniform, greedy search, similarity DP
    t0 = time.perf_counter()
    search = ic.search.greedy_search(params, cfg, calib, keep="1/8", progress=False)
    searched = {}
    for keep in KEEPS:
        n_full = schedule.n_full_for_keep(n, keep)
        pattern = ["F"] * n
        for layer in search.removed[: n - n_full]:
            pattern[layer] = "S"
        searched[keep] = "".join(pattern)
    result["search"] = {"removed_order": search.removed, "step_losses": search.step_losses,
                        "baseline_loss": search.baseline_loss, "forward_passes": search.forward_passes,
                        "seconds": search.seconds, "patterns": searched}
    stage("greedy_search", t0)
    t0 = time.perf_counter()
    similarity = ic.search.attention_similarity(params, cfg, calib)
    dp = {keep: ic.search.similarity_dp(params, cfg, n_full=schedule.n_full_for_keep(n, keep),
                                        similarity=similarity).pattern for keep in KEEPS[:2]}
    result["similarity_dp"] = {"patterns": dp, "similarity": similarity.tolist()}
    stage("similarity_dp", t0)
    save()

    settings = [("full DSA", "full", "F" * n, None)]  # the paper's headline comparison (1/4) first
    for k in ("1/4", "1/2", "1/8"):
        settings += [(f"uniform {k}", "uniform", ic.uniform_pattern(n, k), None),
                     (f"searched {k}", "searched", searched[k], None)]
    settings += [(f"similarity-DP {k}", "similarity_dp", dp[k], None) for k in KEEPS[:2]]
    settings += [("distilled uniform 1/2", "distilled", ic.uniform_pattern(n, "1/2"), False),
                 ("distilled uniform 1/4", "distilled", ic.uniform_pattern(n, "1/4"), False),
                 ("distilled uniform 1/2, own layer only", "distilled", ic.uniform_pattern(n, "1/2"), True)]

    # ---- plots
    t0 = time.perf_counter()
    plots_dir = args.plots_dir or args.model
    overlap = ic.analysis.topk_overlap(params, cfg, windows[:1])
    result["overlap"] = overlap.tolist()
    result["plots"] = {
        "overlap": ic.analysis.plot_overlap(overlap, os.path.join(plots_dir, "overlap.png"), pattern=searched["1/4"],
                                            title="embedded model: top-k overlap, searched 1/4 groups outlined"),
        "search": ic.analysis.plot_search(search, os.path.join(plots_dir, "search_loss.png"),
                                          title="embedded model: greedy search, calibration loss per flip")}
    stage("overlap_and_plots", t0)

    # ---- evaluation
    evaluator = quality.PatternEvaluator(params, cfg)
    distill_rng = np.random.default_rng(SEEDS["distill"])
    distill_data = calibration_batches(data, tok, length, 2 * args.batch, int(distill_rng.integers(1 << 30)),
                                       max(1, args.batch // 4))
    reference = None
    for name, family, pattern, own_layer_only in settings:
        t0 = time.perf_counter()
        entry = {"name": name, "family": family, "pattern": pattern, "n_full": pattern.count("F"),
                 "indexer_flops_saved": 1 - pattern.count("F") / n}
        if own_layer_only is not None:
            trained, history = ic.distill.train_indexers(
                params, cfg, distill_data, pattern=pattern, steps=args.distill_steps,
                dense_steps=args.distill_dense_steps, warmup_steps=max(1, args.distill_steps // 10),
                learning_rate=args.distill_lr, own_layer_only=own_layer_only, progress=False)
            evaluator.set_params(trained)
            entry["distill"] = {"steps": args.distill_steps, "dense_steps": args.distill_dense_steps,
                                "learning_rate": args.distill_lr, "own_layer_only": own_layer_only,
                                "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"]}
        nll = evaluator.window_nll(pattern, windows, args.batch)
        hits = {k: evaluator.retrieval_hits(pattern, cases[k], length if k == "full" else half, eos, newline,
                                            args.batch) for k in ("full", "half")}
        if own_layer_only is not None:
            evaluator.set_params(params)
        b = SEEDS["bootstrap"]
        entry["bits_per_byte"] = quality.bits_per_byte(nll, nbytes)
        entry["bits_per_byte_ci95"] = quality.bpb_interval(nll, nbytes, seed=b)
        for k in ("full", "half"):
            entry[f"retrieval_{k}"] = float(hits[k].mean())
            entry[f"retrieval_{k}_ci95"] = quality.mean_interval(hits[k], seed=b)
        if reference is None:
            reference = (nll, hits)
        else:
            entry["bits_per_byte_minus_full_ci95"] = quality.paired_bpb_interval(nll, reference[0], nbytes, seed=b)
            for k in ("full", "half"):
                entry[f"retrieval_{k}_minus_full_ci95"] = quality.paired_mean_interval(hits[k], reference[1][k],
                                                                                       seed=b)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        result["settings"].append(entry)
        print(f"{name:40s} {pattern}  bpb {entry['bits_per_byte']:.4f}  retrieval {entry['retrieval_full']:.3f} "
              f"(full) {entry['retrieval_half']:.3f} (half)  [{entry['seconds']} s]", flush=True)
        save()
    print(f"wrote {save()}\n\n{markdown_table(result)}")


if __name__ == "__main__":
    main()
