"""Training-aware IndexCache: multi-layer distillation of the F layers' indexers (paper §3.2).

For an F layer l serving the S layers l+1..l+m under `pattern`:

    L_l = sum_{j=0..m} 1/(m+1) sum_t KL( p_t^(l+j) || softmax(I_t^(l)) )

p^(i) is layer i's causal attention distribution averaged over heads (detached), I^(l) the F layer's indexer
logits. The total loss sums L_l over the F layers and divides by the number of query positions (B * T).
Stage "dense" (warm-up) takes the KL over all causal keys of a dense-attention forward; stage "sparse" runs the
DSA forward under `pattern` and restricts both distributions to the F layer's selected top-k set (renormalised).
Only the F layers' indexer params (wq_b, wk, k_norm, weights_proj) are trained; everything else is frozen and comes
back bit-identical. `own_layer_only=True` drops the served layers (m = 0): the GLM-5.2 / Megatron recipe and the
paper's "w/o cross-layer loss" ablation. With an all-F pattern this is DeepSeek's own indexer training.

The KL is evaluated in query chunks (`lax.map(..., batch_size=query_chunk)`) under `jax.checkpoint`, so no
`[T, T]` array is ever materialised, not even for the backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from indexcache_jax.model import schedule
from indexcache_jax.model.config import DSAConfig
from indexcache_jax.model.layers import MLA, Indexer, RMSNorm, feed_forward
from indexcache_jax.model.model import check_tokens
from indexcache_jax.methods.layer_runner import LayerRunner

Array = jax.Array
STAGES = ("dense", "sparse")


# ------------------------------------------------------------------------------------------------ dense attention
def map_queries(fn: Callable, xs: Any, chunk: int) -> Any:
    """`fn` applied to every query: xs is a pytree of `[B, T, ...]` arrays (T = the query axis), `fn` sees one
    query's `[B, ...]` slices and returns `[B, ...]` leaves; returns them stacked back as `[B, T, ...]`.

    Runs `chunk` queries at a time (`lax.map` with `batch_size`: a scan over vmapped chunks plus one remainder
    chunk), so per-query temporaries such as `[B, H, S]` scores exist for at most `chunk` queries at once."""
    t = jax.tree_util.tree_leaves(xs)[0].shape[1]
    out = jax.lax.map(fn, jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, 1, 0), xs), batch_size=min(chunk, t))
    return jax.tree_util.tree_map(lambda y: jnp.moveaxis(y, 0, 1), out)


def attention_probs(q: Array, kv: Array, q_pos: Array, scale: float) -> Array:
    """Causal absorbed-MLA attention of one query per row: float32 `[B, H, S]` softmax over keys `s <= q_pos`.

    q `[B, H, C]`, kv `[B, S, C]`, q_pos int32 scalar (key s is position s)."""
    s = jnp.einsum("bhc,bsc->bhs", q.astype(jnp.float32), kv.astype(jnp.float32)) * scale
    return jax.nn.softmax(jnp.where(jnp.arange(kv.shape[1]) <= q_pos, s, -jnp.inf), axis=-1)


def dense_attention(q: Array, kv: Array, scale: float, v_dim: int, chunk: int) -> Array:
    """Causal dense MLA in absorbed form, in query chunks: q `[B, T, H, C]`, kv `[B, T, C]` -> `[B, T, H, v_dim]`."""
    values = kv[..., :v_dim].astype(jnp.float32)

    def one(xs):
        q_t, pos = xs
        return jnp.einsum("bhs,bsv->bhv", attention_probs(q_t, kv, pos[0], scale), values)

    positions = jnp.arange(q.shape[1], dtype=jnp.int32)[None]  # [1, T]
    return map_queries(one, (q, positions), chunk).astype(q.dtype)


class DenseBlock(nn.Module):
    """`layers.Block` with dense causal attention over all earlier keys (the indexer is not run): the dense
    warm-up forward. Same param names and scan-body signature; the carried indices pass through."""

    cfg: DSAConfig
    mlp_kind: str
    moe_impl: str = "ragged"
    query_chunk: int = 256

    @nn.compact
    def __call__(self, carry, ctx, cache):
        c = self.cfg
        h, indices = carry
        x = RMSNorm(c.hidden_size, c.rms_norm_eps, name="attn_norm")(h)  # as layers.Block names it
        mla = MLA(c, name="mla")
        _, q = mla.project_q(x, ctx["cos"], ctx["sin"])
        kv = mla.project_kv(x, ctx["cos"], ctx["sin"])
        o = dense_attention(q, kv, c.softmax_scale, c.kv_lora_rank, self.query_chunk)
        h = h + mla.output(o).astype(h.dtype)
        return (feed_forward(c, self.mlp_kind, self.moe_impl, h), indices), cache


# ------------------------------------------------------------------------------------------------ trainable split
def _indexer_layers(cfg: DSAConfig, pattern: str) -> list[int]:
    """F layers of `pattern`; raises if the params (laid out for `cfg.pattern`) hold no indexer for one of them."""
    schedule.validate_pattern(pattern, cfg.num_layers)
    missing = [i for i, c in enumerate(pattern) if c == "F" and cfg.pattern[i] == "S"]
    if missing:
        raise ValueError(f"pattern {pattern!r} makes layers {missing} F, but the params (laid out for "
                         f"{cfg.pattern!r}) have no indexer weights for them")
    return [i for i, c in enumerate(pattern) if c == "F"]


def trainable_indexers(params: dict, cfg: DSAConfig, pattern: str) -> dict[str, dict]:
    """`{"layer_<l>": indexer subtree}` for every F layer l of `pattern`: the leaves distillation trains."""
    from indexcache_jax.model.params import layer_location

    out = {}
    for layer in _indexer_layers(cfg, pattern):
        seg, part, index = layer_location(cfg, layer)
        out[f"layer_{layer}"] = jax.tree_util.tree_map(lambda x, index=index: x[index], params[seg][part]["indexer"])
    return out


def merge_indexers(params: dict, cfg: DSAConfig, indexers: dict[str, dict]) -> dict:
    """params with the given `{"layer_<l>": indexer}` subtrees written back; every other leaf is the same array."""
    from indexcache_jax.model.params import layer_location

    out = jax.tree_util.tree_map(lambda x: x, params)  # fresh containers, same leaves
    for name, tree in indexers.items():
        seg, part, index = layer_location(cfg, int(name.split("_")[1]))
        node = out[seg][part]
        node["indexer"] = jax.tree_util.tree_map(lambda s, v: s.at[index].set(v.astype(s.dtype)), node["indexer"], tree)
    return out


def _served(pattern: str, own_layer_only: bool) -> dict[int, list[int]]:
    """F layer -> the layers whose attention it is distilled toward (itself first, then its S layers)."""
    out: dict[int, list[int]] = {}
    for layer, src in enumerate(schedule.source_layers(pattern)):
        if src == layer or not own_layer_only:
            out.setdefault(src, []).append(layer)
    return out


# ------------------------------------------------------------------------------------------------ the loss
@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static choices of a distillation (hashable: a jit static argument)."""

    cfg: DSAConfig
    pattern: str
    own_layer_only: bool
    query_chunk: int
    moe_impl: str


class _Distiller:
    """`collect` runs the (no-grad) forward under the pattern, `loss` the chunked KL on the collected states."""

    def __init__(self, spec: _Spec):
        cfg = spec.cfg
        self.cfg, self.pattern = cfg, spec.pattern
        self.layers = _indexer_layers(cfg, spec.pattern)
        self.served = _served(spec.pattern, spec.own_layer_only)
        self.query_chunk = spec.query_chunk
        self.runner = LayerRunner(cfg, moe_impl=spec.moe_impl)
        self.dense_factory = lambda full, kind: DenseBlock(cfg, kind, spec.moe_impl, spec.query_chunk)
        self.is_full = np.asarray([c == "F" for c in spec.pattern])

    def collect(self, top: dict, stacks: dict, indexers: dict[str, dict], tokens: Array, stage: str):
        """Forward under `pattern` with the given indexers -> (h entering each layer `[N, B, T, D]`, indices each F
        layer selected `[N, B, T, K]` (row l valid for F layers l; unused in the dense stage))."""
        r = self.runner
        stacks = r.with_indexers(stacks, {int(k.split("_")[1]): v for k, v in indexers.items()})
        ctx = r.context(tokens)
        b, t = tokens.shape
        idx0 = jnp.full((b, t, min(self.cfg.index_topk, t)), -1, jnp.int32)
        factory = self.dense_factory if stage == "dense" else None
        (_, idx_last), (hs, idxs) = r.scan(stacks, jnp.asarray(self.is_full), jnp.int32(0), r.embed(top, tokens),
                                           idx0, ctx, block_factory=factory)
        chosen = jnp.concatenate([idxs[1:], idx_last[None]], axis=0)
        return jax.lax.stop_gradient(hs), chosen

    def loss(self, indexers: dict[str, dict], stacks: dict, hs: Array, chosen: Array, tokens: Array, stage: str,
             target: str = "multi") -> Array:
        """Sum over F layers of their (weighted) KL, divided by B * T. Differentiable in `indexers` only."""
        cfg, r = self.cfg, self.runner
        ctx = r.context(tokens)
        b, t = tokens.shape
        frozen = jax.lax.stop_gradient(stacks)
        total = jnp.float32(0)
        for f in self.layers:
            queries, kvs = [], []
            for layer in self.served[f]:
                x, qr, q, kv = r.attention_inputs(r.layer_params(frozen, layer), hs[layer], ctx)
                queries.append(q)
                kvs.append(kv)
                if layer == f:
                    x_f, qr_f = x, qr
            ip = {"params": indexers[f"layer_{f}"]}
            ik = Indexer(cfg).apply(ip, x_f, ctx["cos"], ctx["sin"], method=Indexer.keys)
            iq, iw = Indexer(cfg).apply(ip, qr_f, x_f, ctx["cos"], ctx["sin"], method=Indexer.queries)
            sel = chosen[f] if stage == "sparse" else None
            total = total + _chunked_kl(iq, iw, ik, queries, kvs, sel, cfg.softmax_scale, self.query_chunk, target)
        return total / (b * t)


@functools.lru_cache(maxsize=16)
def _distiller(spec: _Spec) -> _Distiller:
    return _Distiller(spec)


def _chunked_kl(iq, iw, ik, queries, kvs, sel, scale: float, chunk: int, target: str) -> Array:
    """sum_t of the weighted KL between the served layers' head-averaged attention and the indexer softmax.

    iq `[B, T, H_I, d_I]`, iw `[B, T, H_I]`, ik `[B, T, d_I]`; queries[j] `[B, T, H, C]`, kvs[j] `[B, T, C]`;
    sel `[B, T, K]` (sparse stage: restrict to these keys, -1 = none) or None (dense: all causal keys).
    target "multi": sum_j w KL(p_j || q); "average": KL(sum_j w p_j || q) (Proposition 1: same gradient).
    """
    weight = 1.0 / len(queries)
    keys = ik.astype(jnp.float32)
    positions = jnp.arange(iq.shape[1], dtype=jnp.int32)[None]  # [1, T]

    @jax.checkpoint
    def one(xs):
        """KL of one query per row -> float32 `[B]`."""
        pos, iq_t, iw_t, q_ts, sel_t = xs
        pos = pos[0]
        dots = jax.nn.relu(jnp.einsum("bhd,bsd->bhs", iq_t.astype(jnp.float32), keys))
        logits = jnp.einsum("bhs,bh->bs", dots, iw_t)
        included = (jnp.arange(keys.shape[1]) <= pos)[None, :]  # [1, S]: the causal keys
        logits = jnp.where(included, logits, -jnp.inf)
        probs = [jax.lax.stop_gradient(attention_probs(q_t, kv, pos, scale).mean(1)) for q_t, kv in zip(q_ts, kvs)]
        if sel_t is not None:
            included = sel_t >= 0  # [B, K]
            safe = jnp.where(included, sel_t, 0)
            logits = jnp.where(included, jnp.take_along_axis(logits, safe, axis=-1), -jnp.inf)
            probs = [jnp.where(included, jnp.take_along_axis(p, safe, axis=-1), 0.0) for p in probs]
            probs = [p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30) for p in probs]
        logq = jax.nn.log_softmax(logits, axis=-1)

        def kl(p):
            return optax.losses.kl_divergence(logq, p, where=included)

        if target == "multi":
            return sum(weight * kl(p) for p in probs)
        return kl(sum(weight * p for p in probs))

    return jnp.sum(map_queries(one, (positions, iq, iw, queries, sel), chunk))


def distill_loss(params: dict, cfg: DSAConfig, tokens: Any, *, pattern: str | None = None, stage: str = "dense",
                 own_layer_only: bool = False, target: str = "multi", indexers: dict[str, dict] | None = None,
                 query_chunk: int = 256, moe_impl: str = "ragged") -> Array:
    """The distillation loss (float32 scalar) of `params` on int tokens `[B, T]`.

    `indexers` (`{"layer_<l>": subtree}`, default: taken from params) is the differentiable input: take
    `jax.grad` with respect to it. The forward and the KL run in one compiled function per (shapes, choices).
    """
    pattern = cfg.pattern if pattern is None else pattern
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if target not in ("multi", "average"):
        raise ValueError(f"target must be 'multi' or 'average', got {target!r}")
    check_tokens(cfg, tokens)
    spec = _Spec(cfg, pattern, own_layer_only, query_chunk, moe_impl)
    if indexers is None:
        indexers = trainable_indexers(params, cfg, pattern)
    top, stacks = _distiller(spec).runner.restack(params)
    return _loss(indexers, top, stacks, jnp.asarray(tokens, jnp.int32), spec=spec, stage=stage, target=target)


@functools.partial(jax.jit, static_argnames=("spec", "stage", "target"))
def _loss(indexers, top, stacks, tokens, *, spec: _Spec, stage: str, target: str) -> Array:
    d = _distiller(spec)
    hs, chosen = d.collect(top, stacks, jax.lax.stop_gradient(indexers), tokens, stage)
    return d.loss(indexers, stacks, hs, chosen, tokens, stage, target)


# ------------------------------------------------------------------------------------------------ training
def train_indexers(params: dict, cfg: DSAConfig, batches: Sequence[Any] | Callable[[int], Any], *,
                   pattern: str | None = None, steps: int, warmup_steps: int = 0, learning_rate: float = 1e-3,
                   dense_steps: int | None = None, own_layer_only: bool = False, weight_decay: float = 0.0,
                   end_lr_ratio: float = 0.1, checkpoint_dir: str | None = None, checkpoint_every: int = 100,
                   query_chunk: int = 256, callback: Callable[[int, dict], None] | None = None,
                   progress: bool = True, moe_impl: str = "ragged") -> tuple[dict, list[dict]]:
    """Distills the F layers' indexers of `pattern` (default `cfg.pattern`); returns (params, history).

    params: laid out for `cfg`, with indexer weights on every F layer of `pattern`. batches: a sequence of int
    `[B, T]` arrays (step i uses `batches[i % len(batches)]`) or a callable `step -> [B, T]`.
    Steps `0 .. dense_steps - 1` (default `warmup_steps`) are the dense warm-up stage, the rest the sparse stage.
    AdamW (`weight_decay`) follows a linear warm-up over `warmup_steps` to `learning_rate`, then a cosine decay to
    `end_lr_ratio * learning_rate` at `steps`.

    With `checkpoint_dir`, an orbax checkpoint (indexers and optimizer state, with the run's settings and the
    history so far as its JSON metadata; the latest two are kept) is written every `checkpoint_every` steps and at
    the end; a later call with the same directory and settings resumes from the latest one, so a killed run
    continues where it stopped (same result as an uninterrupted run); other settings raise a ValueError.
    history: one dict per step, `{"step", "stage", "loss", "lr"}`, from step 0 (a resumed run's earlier steps come
    from the checkpoint); `callback(step, record)` sees each step run by this call as it happens.
    """
    pattern = cfg.pattern if pattern is None else pattern
    dense_steps = warmup_steps if dense_steps is None else dense_steps
    if steps < 1 or not 0 <= warmup_steps <= steps or not 0 <= dense_steps <= steps:
        raise ValueError(f"need steps >= 1 and 0 <= warmup_steps, dense_steps <= steps; got steps={steps}, "
                         f"warmup_steps={warmup_steps}, dense_steps={dense_steps}")
    get_batch = batches if callable(batches) else _cycle(batches)
    spec = _Spec(cfg, pattern, own_layer_only, query_chunk, moe_impl)
    opt = _OptSpec(learning_rate, warmup_steps, steps, end_lr_ratio, weight_decay)
    schedule_fn, optimizer = opt.build()
    indexers = trainable_indexers(params, cfg, pattern)
    top, stacks = _distiller(spec).runner.restack(params)
    opt_state = optimizer.init(indexers)
    history: list[dict] = []
    checkpointer = None
    if checkpoint_dir is not None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        # Everything that changes the result (the optimizer spec holds steps, warm-up, LR schedule, decay).
        run = {"pattern": pattern, "own_layer_only": own_layer_only, "dense_steps": dense_steps,
               **dataclasses.asdict(opt)}
        checkpointer, history, indexers, opt_state = _open_checkpoint(checkpoint_dir, run, indexers, opt_state)
    start = len(history)

    from tqdm.auto import tqdm

    try:
        for step in tqdm(range(start, steps), desc="distill", initial=start, total=steps, disable=not progress):
            tokens = np.asarray(get_batch(step))
            check_tokens(cfg, tokens)
            stage = "dense" if step < dense_steps else "sparse"
            lr = float(schedule_fn(step))
            indexers, opt_state, loss = _train_step(indexers, opt_state, top, stacks, jnp.asarray(tokens, jnp.int32),
                                                    spec=spec, opt=opt, stage=stage)
            record = {"step": step, "stage": stage, "loss": float(loss), "lr": lr}
            history.append(record)
            if checkpointer is not None:
                done = step + 1
                if done % checkpoint_every == 0 or done == steps:
                    checkpointer.save(done, {"indexers": indexers, "opt_state": opt_state}, force=True,
                                      custom_metadata={"run": run, "history": history})
            if callback is not None:
                callback(step, record)
    finally:
        if checkpointer is not None:
            checkpointer.close()
    return merge_indexers(params, cfg, indexers), history


@dataclasses.dataclass(frozen=True)
class _OptSpec:
    """AdamW with linear warm-up then cosine decay (hashable: a jit static argument)."""

    learning_rate: float
    warmup_steps: int
    steps: int
    end_lr_ratio: float
    weight_decay: float

    def build(self):
        fn = optax.warmup_cosine_decay_schedule(0.0, self.learning_rate, self.warmup_steps,
                                                max(self.steps, self.warmup_steps + 1),
                                                end_value=self.learning_rate * self.end_lr_ratio)
        return fn, optax.adamw(fn, weight_decay=self.weight_decay)


@functools.partial(jax.jit, static_argnames=("spec", "opt", "stage"))
def _train_step(indexers, opt_state, top, stacks, tokens, *, spec: _Spec, opt: _OptSpec, stage: str):
    """One AdamW step on the F-layer indexers; the forward runs without gradients."""
    d = _distiller(spec)
    hs, chosen = d.collect(top, stacks, indexers, tokens, stage)
    loss, grads = jax.value_and_grad(d.loss)(indexers, stacks, hs, chosen, tokens, stage)
    updates, opt_state = opt.build()[1].update(grads, opt_state, indexers)
    return optax.apply_updates(indexers, updates), opt_state, loss


def _cycle(batches: Sequence[Any]) -> Callable[[int], Any]:
    if len(batches) == 0:
        raise ValueError("batches is empty")
    return lambda step: batches[step % len(batches)]


def _open_checkpoint(directory: str, run: dict, indexers, opt_state):
    """Opens (or creates) the distillation checkpoints in `directory` (orbax's v1 training `Checkpointer`).

    Returns (checkpointer, history of the steps done, indexers, opt_state): the latest checkpoint's when there is
    one, written by a run with the settings `run`, else the given initial ones and an empty history."""
    import orbax.checkpoint.experimental.v1 as ocp

    checkpointer = ocp.training.Checkpointer(
        os.path.abspath(directory), preservation_policy=ocp.training.preservation_policies.LatestN(2),
        cleanup_tmp_directories=True)
    latest = checkpointer.latest
    if latest is None:
        return checkpointer, [], indexers, opt_state
    meta = checkpointer.metadata(latest).custom_metadata or {}
    if meta.get("run") != run:
        checkpointer.close()
        raise ValueError(f"checkpoint_dir {directory} holds a run with {meta.get('run')}, not {run}")
    restored = checkpointer.load(latest, {"indexers": indexers, "opt_state": opt_state})
    return checkpointer, list(meta["history"]), restored["indexers"], restored["opt_state"]
