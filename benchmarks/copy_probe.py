"""In-context copying of the embedded model: held-out code windows shown twice in a row.

A model that can look back and copy (induction heads, the mechanism the retrieval task needs) predicts the second
copy of a window far better than the first. The probe takes `--windows` validation windows of `--length` tokens,
feeds each as `[w, w]`, and reports the mean next-token NLL (nats) and argmax accuracy over each copy, under the
model's DSA attention (its `index_topk`) and with `index_topk` raised to the whole row (dense attention), which
separates the indexer's selection from the model's own ability. Writes `copy_probe.json`.

Runs on CPU in well under a minute: `python benchmarks/copy_probe.py [--model DIR]`.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from indexcache_jax import pretrained  # noqa: E402
from indexcache_jax.data import corpus, tokenizer  # noqa: E402
from indexcache_jax.model.model import forward  # noqa: E402
from indexcache_jax.profiling import write_result_json  # noqa: E402


def copy_scores(cfg, params, rows: np.ndarray) -> dict:
    """rows int `[B, 2n]` = each window twice -> NLL and accuracy of the predictions inside each copy."""
    n = rows.shape[1] // 2
    logits = np.asarray(jax.jit(lambda p, t: forward(p, cfg, t))(params, jnp.asarray(rows, jnp.int32)))
    logp = np.asarray(jax.nn.log_softmax(logits[:, :-1], axis=-1))
    targets = rows[:, 1:]
    nll = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    hit = logits[:, :-1].argmax(-1) == targets
    first, second = slice(0, n - 1), slice(n, 2 * n - 1)  # predictions of tokens 1..n-1 of each copy
    return {"first_copy_nll": float(nll[:, first].mean()), "second_copy_nll": float(nll[:, second].mean()),
            "first_copy_accuracy": float(hit[:, first].mean()), "second_copy_accuracy": float(hit[:, second].mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=pretrained.DEFAULT_MODEL_DIR)
    ap.add_argument("--length", type=int, default=1024, help="tokens per window (the row holds it twice)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--name", default="copy_probe")
    args = ap.parse_args()

    cfg, params = pretrained.load_model_dir(args.model)
    if 2 * args.length > cfg.max_position_embeddings:
        raise SystemExit(f"--length {args.length}: twice it exceeds the model's context {cfg.max_position_embeddings}")
    tok = tokenizer.load_tokenizer(os.path.join(args.model, "tokenizer.json"))
    data = corpus.load_corpus()
    stream = corpus.token_stream(data.validation, tok, tokenizer.eos_id(tok))
    windows = corpus.lm_windows(stream, args.length, args.windows)
    rows = np.concatenate([windows, windows], axis=1)
    out = {"model": args.model, "length": args.length, "windows": int(len(windows)), "results": {}}
    for name, topk in (("dsa", cfg.index_topk), ("dense", 2 * args.length)):
        scores = copy_scores(cfg.replace(index_topk=topk), params, rows)
        out["results"][name] = {"index_topk": topk, **scores}
        print(f"{name:5s} (index_topk {topk}): NLL first copy {scores['first_copy_nll']:.3f}, second copy "
              f"{scores['second_copy_nll']:.3f} nats; accuracy {scores['first_copy_accuracy']:.1%} -> "
              f"{scores['second_copy_accuracy']:.1%}")
    print(f"wrote {write_result_json(args.name, out)}")


if __name__ == "__main__":
    main()
