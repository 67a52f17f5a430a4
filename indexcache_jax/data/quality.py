"""Quality of a model under F/S patterns: held-out bits per byte and retrieval accuracy, with bootstrap intervals.

`PatternEvaluator` runs an all-F model's params under any pattern through one compiled layer scan per batch shape
(`methods.layer_runner.LayerRunner`: the pattern is a traced array, so switching patterns or swapping in distilled
indexers never recompiles). Bits per byte = summed next-token NLL (nats) / ln 2 / the UTF-8 bytes of the predicted
tokens, over LM windows of held-out files. Retrieval accuracy = exact match of the greedy completion
(`data.retrieval`). Intervals are percentile bootstraps over windows or cases; `paired_*` resample the same windows
or cases for two settings, so the interval of a difference is a statement about that difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from indexcache_jax.data import retrieval
from indexcache_jax.methods.layer_runner import LayerRunner
from indexcache_jax.model.config import DSAConfig
from indexcache_jax.model.layers import RMSNorm

BOOTSTRAP_REPS = 2000


class PatternEvaluator:
    """Bits per byte and retrieval predictions of all-F `params` under traced patterns.

    `set_params(params)` swaps in other weights of the same layout (e.g. distilled indexers) without recompiling.
    """

    def __init__(self, params: dict, cfg: DSAConfig, *, moe_impl: str = "ragged"):
        if cfg.pattern != "F" * cfg.num_layers:
            raise ValueError("PatternEvaluator needs all-F params (an indexer on every layer)")
        self.cfg = cfg
        self.runner = LayerRunner(cfg, moe_impl=moe_impl)
        self.set_params(params)
        self._nll = jax.jit(self._window_nll)
        self._argmax = jax.jit(self._predict)

    def set_params(self, params: dict) -> None:
        self.top, self.stacks = self.runner.restack(params)

    def _final_hidden(self, top, stacks, is_full, tokens):
        b, t = tokens.shape
        k = min(self.cfg.index_topk, t)
        (h, _), _ = self.runner.scan(stacks, is_full, jnp.int32(0), self.runner.embed(top, tokens),
                                     jnp.full((b, t, k), -1, jnp.int32), self.runner.context(tokens))
        return h

    def _window_nll(self, top, stacks, is_full, tokens):
        h = self._final_hidden(top, stacks, is_full, tokens)
        return -jnp.sum(self.runner.log_probs(top, h, tokens), axis=1)

    def _predict(self, top, stacks, is_full, tokens, positions):
        c = self.cfg
        h = self._final_hidden(top, stacks, is_full, tokens)
        h = jnp.take_along_axis(h, positions[..., None], axis=1)
        hn = RMSNorm(c.hidden_size, c.rms_norm_eps).apply({"params": top["final_norm"]}, h)
        head = top["embed"].T if c.tie_word_embeddings else top["lm_head"]
        return jnp.argmax((hn @ head.astype(hn.dtype)).astype(jnp.float32), axis=-1)

    def _is_full(self, pattern: str):
        if len(pattern) != self.cfg.num_layers:
            raise ValueError(f"pattern {pattern!r} has {len(pattern)} layers, the model {self.cfg.num_layers}")
        return jnp.asarray([c == "F" for c in pattern])

    def window_nll(self, pattern: str, windows: np.ndarray, batch_size: int = 8) -> np.ndarray:
        """float64 `[W]`: summed NLL (nats) of tokens 1..T-1 of each window int `[W, T]` under `pattern`."""
        is_full = self._is_full(pattern)
        out = []
        for i in range(0, len(windows), batch_size):
            out.append(np.asarray(self._nll(self.top, self.stacks, is_full, jnp.asarray(windows[i:i + batch_size]))))
        return np.concatenate(out).astype(np.float64)

    def retrieval_hits(self, pattern: str, cases: Sequence[retrieval.RetrievalCase], length: int, pad_id: int,
                       newline_ids: np.ndarray, batch_size: int = 8) -> np.ndarray:
        """bool `[C]`: exact match per case, cases padded to `length` tokens."""
        is_full = self._is_full(pattern)
        hits = []
        for i in range(0, len(cases), batch_size):
            chunk = list(cases[i:i + batch_size])
            tokens, lengths = retrieval.eval_batch(chunk, length, pad_id)
            positions = retrieval.answer_positions(chunk, lengths)
            pred = np.asarray(self._argmax(self.top, self.stacks, is_full, jnp.asarray(tokens),
                                           jnp.asarray(positions, jnp.int32)))
            hits.append(retrieval.exact_match(chunk, pred, newline_ids))
        return np.concatenate(hits)


def window_bytes(windows: np.ndarray, token_bytes: np.ndarray) -> np.ndarray:
    """int64 `[W]`: UTF-8 bytes of tokens 1..T-1 of each window (the tokens whose NLL is counted)."""
    return token_bytes[np.asarray(windows)[:, 1:]].sum(axis=1)


def bits_per_byte(nll: np.ndarray, nbytes: np.ndarray) -> float:
    return float(np.sum(nll) / np.log(2) / np.sum(nbytes))


def _draws(n: int, seed: int, reps: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, (reps, n))


def _interval(samples: np.ndarray, level: float) -> list[float]:
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def bpb_interval(nll: np.ndarray, nbytes: np.ndarray, *, seed: int = 0, reps: int = BOOTSTRAP_REPS,
                 level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of bits per byte, resampling windows."""
    idx = _draws(len(nll), seed, reps)
    return _interval(nll[idx].sum(1) / np.log(2) / nbytes[idx].sum(1), level)


def paired_bpb_interval(nll: np.ndarray, ref_nll: np.ndarray, nbytes: np.ndarray, *, seed: int = 0,
                        reps: int = BOOTSTRAP_REPS, level: float = 0.95) -> list[float]:
    """Interval of bpb(nll) - bpb(ref_nll) over the same resampled windows."""
    idx = _draws(len(nll), seed, reps)
    den = np.log(2) * nbytes[idx].sum(1)
    return _interval((nll[idx].sum(1) - ref_nll[idx].sum(1)) / den, level)


def mean_interval(hits: np.ndarray, *, seed: int = 0, reps: int = BOOTSTRAP_REPS, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of a mean (e.g. accuracy over cases)."""
    x = np.asarray(hits, np.float64)
    return _interval(x[_draws(len(x), seed, reps)].mean(1), level)


def paired_mean_interval(hits: np.ndarray, ref_hits: np.ndarray, *, seed: int = 0, reps: int = BOOTSTRAP_REPS,
                         level: float = 0.95) -> list[float]:
    """Interval of mean(hits) - mean(ref_hits) over the same resampled cases."""
    d = np.asarray(hits, np.float64) - np.asarray(ref_hits, np.float64)
    return _interval(d[_draws(len(d), seed, reps)].mean(1), level)
