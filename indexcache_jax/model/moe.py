"""The feed-forward halves of DSA layers: the dense SwiGLU MLP, sigmoid `noaux_tc` routing and the routed MoE.

Shapes: N tokens, D hidden, E routed experts, I expert width, k experts per token.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from indexcache_jax.model.config import DSAConfig

Array = jax.Array


def _init(std: float = 0.02):
    return nn.initializers.normal(stddev=std)


class DenseMLP(nn.Module):
    """SwiGLU: `down(silu(gate x) * up x)`."""

    hidden: int
    inter: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dt = x.dtype
        gate = self.param("gate", _init(), (self.hidden, self.inter), jnp.float32).astype(dt)
        up = self.param("up", _init(), (self.hidden, self.inter), jnp.float32).astype(dt)
        down = self.param("down", _init(), (self.inter, self.hidden), jnp.float32).astype(dt)
        return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def route(cfg: DSAConfig, x: Array, router: Array, bias: Array) -> tuple[Array, Array]:
    """Sigmoid routing with `noaux_tc` selection. x `[N, D]` -> (expert ids `[N, k]`, weights `[N, k]` float32).

    The correction bias only steers the choice; the weights are the unbiased sigmoid scores, normalised when
    `norm_topk_prob` and multiplied by `routed_scaling_factor`. With `n_group > 1` only the `topk_group` groups
    with the largest sum of their two best biased scores stay eligible.
    """
    scores = jax.nn.sigmoid(x.astype(jnp.float32) @ router.astype(jnp.float32))
    choice = scores + bias.astype(jnp.float32)
    n, e = choice.shape
    if cfg.n_group > 1:
        grouped = choice.reshape(n, cfg.n_group, e // cfg.n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
        _, keep = jax.lax.top_k(group_scores, cfg.topk_group)
        group_mask = jnp.zeros((n, cfg.n_group), bool).at[jnp.arange(n)[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(group_mask, e // cfg.n_group, axis=1), choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, ids, axis=1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return ids, weights * cfg.routed_scaling_factor


class MoE(nn.Module):
    """Routed SwiGLU experts plus the shared expert(s).

    `impl="ragged"` sorts the (token, expert) pairs by expert and runs grouped matmuls (`lax.ragged_dot`): compute
    scales with `num_experts_per_tok`. `impl="dense"` evaluates every expert on every token and weights the
    results: wasteful, but it partitions over an expert mesh axis with no all-to-all.
    """

    cfg: DSAConfig
    impl: str = "ragged"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c, dt = self.cfg, x.dtype
        e, d, i = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
        router = self.param("router", _init(), (d, e), jnp.float32)
        bias = self.param("router_bias", nn.initializers.zeros, (e,), jnp.float32)
        gate = self.param("experts_gate", _init(), (e, d, i), jnp.float32).astype(dt)
        up = self.param("experts_up", _init(), (e, d, i), jnp.float32).astype(dt)
        down = self.param("experts_down", _init(), (e, i, d), jnp.float32).astype(dt)
        shape = x.shape
        flat = x.reshape(-1, d)
        ids, weights = route(c, flat, router, bias)
        if self.impl == "dense":
            combine = jnp.zeros((flat.shape[0], e), jnp.float32).at[jnp.arange(flat.shape[0])[:, None], ids].add(weights)
            h = jax.nn.silu(jnp.einsum("nd,edi->nei", flat, gate)) * jnp.einsum("nd,edi->nei", flat, up)
            y = jnp.einsum("nei,eid,ne->nd", h, down, combine.astype(dt))
        elif self.impl == "ragged":
            k = c.num_experts_per_tok
            flat_ids = ids.reshape(-1)
            order = jnp.argsort(flat_ids, stable=True)
            token_of = order // k
            group_sizes = jnp.bincount(flat_ids, length=e).astype(jnp.int32)
            xs = flat[token_of]
            h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, group_sizes)) * jax.lax.ragged_dot(xs, up, group_sizes)
            ys = jax.lax.ragged_dot(h, down, group_sizes) * weights.reshape(-1)[order][:, None].astype(dt)
            y = jnp.zeros_like(flat).at[token_of].add(ys)
        else:
            raise ValueError(f"MoE impl must be 'ragged' or 'dense', got {self.impl!r}")
        y = y.reshape(shape)
        if c.n_shared_experts:
            y = y + DenseMLP(d, i * c.n_shared_experts, name="shared")(x)
        return y
