"""Training-free IndexCache: the paper's greedy F/S search (Algorithm 1), its block variant, and the similarity DP.

The search needs an all-F model (indexer weights on every layer). It scores candidate patterns with one compiled
function, `LayerRunner`, that scans over the layers with the pattern as a *traced* boolean array: an F layer
computes fresh top-k indices, an S layer reuses the carried ones (`lax.switch`), so no candidate recompiles.

Prefix reuse: flipping layer l to S leaves layers 0..l-1 unchanged, so the search keeps the hidden state and the
carried indices entering every layer (the "boundary states" of the current pattern) and runs a candidate from
boundary l only; the layers before the traced start index are skipped by the same switch. Every evaluation runs
the same executable, so the prefix-reuse search returns bit-for-bit the losses of a search that runs each candidate
from layer 0 (`method="naive"`).

Cost is counted in full-forward equivalents: a run from layer l costs `(N - l) / N`. The paper's search costs
`N (N - 1) / 2` full forwards.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from indexcache_jax.methods.layer_runner import LayerRunner, layer_runner
from indexcache_jax.model import schedule
from indexcache_jax.model.config import DSAConfig, read_json
from indexcache_jax.model.layers import MLA
from indexcache_jax.model.model import check_tokens
from indexcache_jax.model.params import unstack_layers

Array = jax.Array


# ------------------------------------------------------------------------------------------------ input checking
def require_all_full(cfg: DSAConfig, what: str) -> None:
    """Raises unless `cfg.pattern` is all-F, i.e. the params hold an indexer on every layer."""
    if "S" in cfg.pattern:
        missing = [i for i, c in enumerate(cfg.pattern) if c == "S"]
        raise ValueError(f"{what} needs indexer weights on every layer (params laid out for an all-F pattern), but "
                         f"cfg.pattern {cfg.pattern!r} has S layers {missing} without indexers; load the all-F "
                         "checkpoint (e.g. DSAConfig.with_pattern('F' * N)) instead")


def as_batches(cfg: DSAConfig, tokens: Any, batch_size: int | None = None, *, what: str = "calibration") -> list[Array]:
    """Calibration tokens -> a list of int32 `[B, T]` batches.

    `tokens` is one int array `[R, T]` (split into batches of `batch_size` rows, default all rows) or a sequence of
    `[B, T]` arrays. Every batch needs `T > index_topk`, else no position has more valid keys than the indexer
    keeps and the F/S choice has nothing to change.
    """
    if isinstance(tokens, (list, tuple)):
        batches = [np.asarray(b) for b in tokens]
    else:
        arr = np.asarray(tokens)
        if arr.ndim != 2:
            raise ValueError(f"{what} tokens must be int [R, T] or a list of [B, T] arrays, got shape {arr.shape}")
        if arr.shape[0] == 0:
            raise ValueError(f"the {what} set has no rows (tokens of shape {arr.shape})")
        bs = arr.shape[0] if batch_size is None else int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batches = [arr[i:i + bs] for i in range(0, arr.shape[0], bs)]
    if not batches or any(b.size == 0 for b in batches):
        raise ValueError(f"{what} tokens are empty")
    for b in batches:
        check_tokens(cfg, b)
        if b.shape[1] <= cfg.index_topk:
            raise ValueError(f"{what} sequences have {b.shape[1]} tokens but index_topk is {cfg.index_topk}: every "
                             f"query would keep all its keys, so sparse selection (and the F/S pattern) has no "
                             f"effect; use sequences longer than index_topk")
    return [jnp.asarray(b, jnp.int32) for b in batches]


def resolve_n_full(num_layers: int, n_full: int | None, keep: Fraction | float | str | None, minimum: int = 1) -> int:
    """`n_full`, or `ceil(N / r)` for `keep = 1/r`; must lie in `[minimum, N]`."""
    if (n_full is None) == (keep is None):
        raise ValueError("pass exactly one of n_full and keep")
    if keep is not None:
        n_full = schedule.n_full_for_keep(num_layers, keep)
    if not isinstance(n_full, (int, np.integer)) or not minimum <= n_full <= num_layers:
        raise ValueError(f"n_full must be an int in [{minimum}, {num_layers}] (layer 0"
                         f"{' and each block start stay' if minimum > 1 else ' stays'} F), got {n_full!r}")
    return int(n_full)


# ------------------------------------------------------------------------------------------------ greedy search
@dataclasses.dataclass
class SearchResult:
    """The outcome of `greedy_search`.

    One entry per committed flip in `removed`, `step_losses`, `candidate_losses` and `steps` (the outer step a flip
    belongs to; with `blocks=1` every step commits one flip). Losses are mean next-token NLL (nats) on the
    calibration tokens. `forward_passes` counts full-forward equivalents, baseline included; `compiles` how often
    the evaluator was traced during this search (once per new batch shape, 0 when an earlier search compiled it).
    """

    pattern: str
    removed: list[int]
    step_losses: list[float]
    candidate_losses: list[dict[int, float]]
    baseline_loss: float
    forward_passes: float
    n_full: int
    blocks: list[tuple[int, int]]
    steps: list[int]
    method: str
    compiles: int
    seconds: float

    def to_hf_fields(self) -> dict[str, Any]:
        """HF config fields carrying the pattern: `indexer_types`, `index_topk_pattern`, `use_index_cache`."""
        return schedule.pattern_to_hf(self.pattern)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["candidate_losses"] = [{str(k): v for k, v in c.items()} for c in self.candidate_losses]
        d["blocks"] = [list(b) for b in self.blocks]
        d["hf_config_fields"] = self.to_hf_fields()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchResult":
        d = {k: v for k, v in d.items() if k != "hf_config_fields"}
        d["candidate_losses"] = [{int(k): float(v) for k, v in c.items()} for c in d["candidate_losses"]]
        d["blocks"] = [tuple(b) for b in d["blocks"]]
        return cls(**d)

    def save(self, path: str) -> None:
        """Writes `to_dict()` as JSON (to a temporary sibling first, then renamed: no half-written file)."""
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str) -> "SearchResult":
        """Reads a result written by `save`."""
        return cls.from_dict(read_json(path, "search result"))


def block_ranges(num_layers: int, blocks: int) -> list[tuple[int, int]]:
    """`blocks` contiguous, near-equal `[first, last]` layer ranges (as pipeline stages split them)."""
    if not isinstance(blocks, (int, np.integer)) or not 1 <= blocks <= num_layers:
        raise ValueError(f"blocks must be an int in [1, {num_layers}], got {blocks!r}")
    parts = np.array_split(np.arange(num_layers), blocks)
    return [(int(p[0]), int(p[-1])) for p in parts]


def greedy_search(params: dict, cfg: DSAConfig, calib_tokens: Any, *, n_full: int | None = None,
                  keep: Fraction | float | str | None = None, blocks: int = 1, batch_size: int | None = None,
                  progress: bool = True, method: str = "prefix", moe_impl: str = "ragged") -> SearchResult:
    """Algorithm 1: backward elimination of indexers, one flip (per block) per step, by calibration loss.

    params: an all-F model's params (laid out for `cfg`, `cfg.pattern == 'F' * N`). calib_tokens: int `[R, T]` (split
    into `batch_size`-row batches) or a list of `[B, T]` batches, `T > index_topk`. Exactly one of `n_full` (F
    layers to keep) and `keep` (`1/r` -> `n_full = ceil(N / r)`).

    `blocks=P` splits the layers into P contiguous blocks whose first layers stay F; each step visits the blocks in
    order and commits the best flip of each (stopping as soon as `n_full` F layers remain). Every step tries all
    remaining F layers of a block on the same batches and commits the lowest mean NLL; equal losses go to the
    lowest layer. `method="prefix"` runs each candidate from the flipped layer on cached boundary states;
    `method="naive"` runs it from layer 0 (same executable, same losses, more compute).
    """
    require_all_full(cfg, "greedy_search")
    if method not in ("prefix", "naive"):
        raise ValueError(f"method must be 'prefix' or 'naive', got {method!r}")
    ranges = block_ranges(cfg.num_layers, blocks)
    n_full = resolve_n_full(cfg.num_layers, n_full, keep, minimum=len(ranges))
    batches = as_batches(cfg, calib_tokens, batch_size)
    n = cfg.num_layers
    n_tokens = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    t0 = time.perf_counter()
    runner = layer_runner(cfg, moe_impl)
    traces_before = runner.traces
    top, stacks = runner.restack(params)

    def evaluate(pattern: list[str], start: int, states: list) -> tuple[float, list]:
        is_full = jnp.asarray([c == "F" for c in pattern])
        total, new_states = 0.0, []
        for b, (hs, idxs) in zip(batches, states):
            nll, hs, idxs = runner.run(top, stacks, is_full, jnp.int32(start), hs, idxs, b)
            total += float(nll)
            new_states.append((hs, idxs))
        return total / n_tokens, new_states

    pattern = ["F"] * n
    fixed = {first for first, _ in ranges}
    baseline, states = evaluate(pattern, 0, [runner.initial_states(b) for b in batches])
    forward_passes = 1.0
    removed, step_losses, candidate_losses, steps = [], [], [], []
    total_candidates = _count_candidates(ranges, n, n_full)
    bar = _progress(total_candidates, progress)
    step = 0
    while pattern.count("F") > n_full:
        step += 1
        for first, last in ranges:
            if pattern.count("F") == n_full:
                break
            candidates = [l for l in range(first, last + 1) if pattern[l] == "F" and l not in fixed]
            if not candidates:
                continue
            losses, best, best_states = {}, None, None
            for layer in candidates:
                trial = list(pattern)
                trial[layer] = "S"
                start = layer if method == "prefix" else 0
                loss, trial_states = evaluate(trial, start, states)
                forward_passes += (n - start) / n
                losses[layer] = loss
                if best is None or loss < losses[best]:
                    best, best_states = layer, trial_states
                bar.update(1)
                bar.set_postfix(step=step, layer=layer, loss=f"{loss:.4f}")
            pattern[best] = "S"
            states = best_states
            removed.append(best)
            step_losses.append(losses[best])
            candidate_losses.append(losses)
            steps.append(step)
    bar.close()
    return SearchResult(pattern="".join(pattern), removed=removed, step_losses=step_losses,
                        candidate_losses=candidate_losses, baseline_loss=baseline, forward_passes=forward_passes,
                        n_full=n_full, blocks=ranges, steps=steps, method=method,
                        compiles=runner.traces - traces_before, seconds=time.perf_counter() - t0)


def _count_candidates(ranges: list[tuple[int, int]], n: int, n_full: int) -> int:
    """How many candidate evaluations the (block) greedy search will run."""
    remaining = [last - first for first, last in ranges]  # removable layers per block
    f, total = n, 0
    while f > n_full:
        for b, r in enumerate(remaining):
            if f == n_full:
                break
            if r:
                total += r
                remaining[b] -= 1
                f -= 1
    return total


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="greedy search", unit="cand", disable=not enabled)


def naive_search_cost(num_layers: int, n_full: int) -> int:
    """Full forwards of the paper's search (each candidate a full forward), baseline excluded."""
    return sum(num_layers - 1 - s for s in range(num_layers - n_full))


# ------------------------------------------------------------------------------------------------ similarity DP
@dataclasses.dataclass
class SimilarityResult:
    """The Appendix C baseline: `similarity[i, j]` (j < i) is the mean cosine similarity between layer i's
    attention output with its own indices and with layer j's; `pattern` maximises the summed similarity of the S
    layers to their source F layer with `n_full` F layers; `objective` is that sum."""

    pattern: str
    similarity: np.ndarray
    objective: float
    n_full: int

    def to_hf_fields(self) -> dict[str, Any]:
        return schedule.pattern_to_hf(self.pattern)

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "similarity": self.similarity.tolist(), "objective": self.objective,
                "n_full": self.n_full, "hf_config_fields": self.to_hf_fields()}


def attention_similarity(params: dict, cfg: DSAConfig, tokens: Any, *, batch_size: int | None = None,
                         moe_impl: str = "ragged") -> np.ndarray:
    """float64 `[N, N]` lower-triangular matrix: `S[i, j]` for j < i is the cosine similarity of layer i's
    attention output (all-F hidden states) computed with its own top-k indices vs with layer j's, averaged over
    positions with more than k valid keys (where the two can differ). Needs an all-F model; one forward per batch
    plus the attention of every layer with every earlier layer's indices, all in one compiled function."""
    require_all_full(cfg, "attention_similarity")
    batches = as_batches(cfg, tokens, batch_size)
    runner = LayerRunner(cfg, moe_impl=moe_impl)
    top, stacks = runner.restack(params)
    _, layers = unstack_layers(params, cfg)
    attn = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                  *[{"attn_norm": lp["attn_norm"], "mla": lp["mla"]} for lp in layers])
    fn = jax.jit(functools.partial(_similarity_batch, runner))
    sums, count = np.zeros((cfg.num_layers, cfg.num_layers)), 0
    for b in batches:
        s, c = fn(top, stacks, attn, b)
        sums += np.asarray(s, np.float64)
        count += int(c)
    return sums / count


def _similarity_batch(runner: LayerRunner, top: dict, stacks: dict, attn: dict, tokens: Array) -> tuple[Array, Array]:
    """Summed per-position cosine similarities `[N, N]` and the number of positions counted.

    attn: every layer's `attn_norm` and `mla` params stacked `[N, ...]`.
    """
    cfg = runner.cfg
    n = cfg.num_layers
    b, t = tokens.shape
    k = min(cfg.index_topk, t)
    ctx = runner.context(tokens)
    (_, idx_last), (hs, idxs) = runner.scan(stacks, jnp.ones((n,), bool), jnp.int32(0), runner.embed(top, tokens),
                                            jnp.full((b, t, k), -1, jnp.int32), ctx)
    # indices chosen by layer j = carried into layer j + 1 (the last layer's come out of the scan).
    chosen = jnp.concatenate([idxs[1:], idx_last[None]], axis=0)
    valid = (jnp.arange(t) + 1 > k)[None, :]  # [1, T]: positions with more than k causal keys
    mla = MLA(cfg)

    def row(_, xs):
        i, lp, h = xs
        _, _, q, kv = runner.attention_inputs(lp, h, ctx)

        def out(idx):
            return mla.apply({"params": lp["mla"]}, q, kv, idx, method=MLA.attend).astype(jnp.float32)

        own = out(chosen[i])
        other = jax.lax.map(out, chosen)  # [N, B, T, D]
        cos = jnp.sum(own * other, -1) / (jnp.linalg.norm(own, axis=-1) * jnp.linalg.norm(other, axis=-1) + 1e-30)
        sums = jnp.sum(jnp.where(valid, cos, 0.0), axis=(1, 2))
        return None, jnp.where(jnp.arange(n) < i, sums, 0.0)

    _, rows = jax.lax.scan(row, None, (jnp.arange(n), attn, hs))
    return rows, jnp.sum(valid) * b


def similarity_dp(params: dict, cfg: DSAConfig, calib_tokens: Any = None, *, n_full: int | None = None,
                  keep: Fraction | float | str | None = None, batch_size: int | None = None,
                  similarity: np.ndarray | None = None, moe_impl: str = "ragged") -> SimilarityResult:
    """Appendix C: `argmax_{|F| = n_full} sum_{S layers l} S[l, src(l)]`, solved exactly by dynamic programming.

    `dp[i][c]` = best sum over layers `< i` with layer i the c-th F layer:
    `dp[i][c] = max_{j < i} dp[j][c - 1] + sum_{m=j+1}^{i-1} S[m, j]`. Pass a precomputed `similarity` `[N, N]`
    to skip the forward passes (then params and calib_tokens are unused).
    """
    if similarity is None:
        similarity = attention_similarity(params, cfg, calib_tokens, batch_size=batch_size, moe_impl=moe_impl)
    sim = np.asarray(similarity, np.float64)
    n = sim.shape[0]
    if sim.shape != (n, n) or n != cfg.num_layers:
        raise ValueError(f"similarity must be [{cfg.num_layers}, {cfg.num_layers}], got {sim.shape}")
    m_full = resolve_n_full(n, n_full, keep)
    pattern, objective = _dp_solve(sim, m_full)
    return SimilarityResult(pattern=pattern, similarity=sim, objective=objective, n_full=m_full)


def _dp_solve(sim: np.ndarray, m_full: int) -> tuple[str, float]:
    n = sim.shape[0]
    # run[j][i] = sum_{m=j+1}^{i-1} sim[m, j]: the S layers between F layer j and the next F layer i.
    run = np.zeros((n, n + 1))
    for j in range(n):
        for i in range(j + 2, n + 1):
            run[j, i] = run[j, i - 1] + sim[i - 1, j]
    neg = -math.inf
    dp = np.full((n, m_full + 1), neg)
    back = np.full((n, m_full + 1), -1, np.int64)
    dp[0, 1] = 0.0
    for c in range(2, m_full + 1):
        for i in range(1, n):
            for j in range(i):
                if dp[j, c - 1] > neg:
                    v = dp[j, c - 1] + run[j, i]
                    if v > dp[i, c]:
                        dp[i, c], back[i, c] = v, j
    best, last = neg, -1
    for j in range(n):
        if dp[j, m_full] > neg and dp[j, m_full] + run[j, n] > best:
            best, last = dp[j, m_full] + run[j, n], j
    full, c = [], m_full
    while last >= 0:
        full.append(last)
        last, c = back[last, c], c - 1
    return "".join("F" if i in full else "S" for i in range(n)), float(best)
