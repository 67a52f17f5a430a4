"""The feed-forward halves of DSA layers: the dense SwiGLU MLP, sigmoid `noaux_tc` routing and the routed MoE.

Shapes: N tokens, D hidden, E routed experts, I expert width, k experts per token.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from indexcache_jax.inference import kernels
from indexcache_jax.model.config import DSAConfig
from indexcache_jax.model.axes import logical, normal_init
from indexcache_jax.model.moe_parallel import expert_parallel_moe, model_axis_size
from indexcache_jax.model.stacks import StackedParams, with_stack

Array = jax.Array

# "grouped": expert-sorted tiles through the grouped GEMM kernel on a GPU (`lax.ragged_dot` over the same tiles
# elsewhere); "expert_parallel": experts split over the mesh's `model` axis, tokens moved by all-to-all, each
# device running "grouped" on its experts; "ragged": sorted pairs through `lax.ragged_dot`; "dense": every
# expert on every token. "ragged" and "dense" are the references.
MOE_IMPLS = ("grouped", "expert_parallel", "ragged", "dense")


def resolve_moe_impl(moe_impl: str | None, mesh: Any = None) -> str:
    """`moe_impl`, checked; None picks the default: "expert_parallel" on a mesh whose `model` axis has more than
    one device, "grouped" on a GPU, "ragged" elsewhere."""
    if moe_impl is not None:
        if moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {moe_impl!r}")
        return moe_impl
    if model_axis_size(mesh) > 1:
        return "expert_parallel"
    return "grouped" if jax.default_backend() == "gpu" else "ragged"


class DenseMLP(StackedParams, nn.Module):
    """SwiGLU: `down(silu(gate x) * up x)`; `backend` as `DSAConfig.backend` (a one-row product's kernel)."""

    hidden: int
    inter: int
    backend: str = "auto"

    def setup(self):
        f32 = jnp.float32
        self.gate = self.param("gate", logical(normal_init(), "embed", "mlp"), (self.hidden, self.inter), f32)
        self.up = self.param("up", logical(normal_init(), "embed", "mlp"), (self.hidden, self.inter), f32)
        self.down = self.param("down", logical(normal_init(), "mlp", "embed"), (self.inter, self.hidden), f32)

    def __call__(self, x: Array) -> Array:
        dt = x.dtype
        g, u = kernels.project_many(x, [self.weight("gate", dt), self.weight("up", dt)], backend=self.backend)
        return self.down_from(g, u)

    def down_from(self, g: Array, u: Array) -> Array:
        """`x @ gate`, `x @ up` -> the output `down(silu(g) * u)`, in g's dtype."""
        return kernels.project(jax.nn.silu(g) * u, self.weight("down", g.dtype), backend=self.backend)


def route(cfg: DSAConfig, x: Array, router: Array, bias: Array) -> tuple[Array, Array]:
    """Sigmoid routing with `noaux_tc` selection. x `[N, D]` -> (expert ids `[N, k]`, weights `[N, k]` float32).

    The correction bias only steers the choice; the weights are the unbiased sigmoid scores, normalised when
    `norm_topk_prob` and multiplied by `routed_scaling_factor`. With `n_group > 1` only the `topk_group` groups
    with the largest sum of their two best biased scores stay eligible.
    """
    return route_from_logits(cfg, kernels.project(x, router.astype(jnp.float32), backend=cfg.backend), bias)


def route_from_logits(cfg: DSAConfig, logits: Array, bias: Array) -> tuple[Array, Array]:
    """`route` from the router's float32 logits `x @ router` `[N, E]`."""
    scores = jax.nn.sigmoid(logits)
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
    """Routed SwiGLU experts plus the shared expert(s). `impl` is one of `MOE_IMPLS` (see there).

    "expert_parallel" runs over `mesh`, else over the mesh set by `jax.set_mesh` (read while tracing); with
    neither, or a `model` axis of one device, it is "grouped". Every implementation computes the same function;
    "grouped" and "expert_parallel" round each expert's output to the compute dtype before the weighted sum
    (in float32), as "ragged" does, and with `cfg.backend == "xla"` run `lax.ragged_dot` instead of the kernel;
    a decode step's few tokens take the routed matrix-vector kernels (`kernels.routed_experts`).
    """

    cfg: DSAConfig
    impl: str = "ragged"
    mesh: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c, dt = self.cfg, x.dtype
        impl = resolve_moe_impl(self.impl)
        e, d, i = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
        router = self.param("router", logical(normal_init(), "embed", "router_experts"), (d, e), jnp.float32)
        bias = self.param("router_bias", logical(nn.initializers.zeros, "router_experts"), (e,), jnp.float32)
        gate = self.param("experts_gate", logical(normal_init(), "experts", "embed", "expert_mlp"), (e, d, i),
                          jnp.float32).astype(dt)
        up = self.param("experts_up", logical(normal_init(), "experts", "embed", "expert_mlp"), (e, d, i),
                        jnp.float32).astype(dt)
        down = self.param("experts_down", logical(normal_init(), "experts", "expert_mlp", "embed"), (e, i, d),
                          jnp.float32).astype(dt)
        shape = x.shape
        flat = x.reshape(-1, d)
        expert_impl = "xla_ragged" if c.backend == "xla" else None
        mesh = self.mesh if self.mesh is not None else jax.sharding.get_abstract_mesh()
        shared = DenseMLP(d, i * c.n_shared_experts, c.backend, name="shared") if c.n_shared_experts else None
        shared_out, shared_in_gemv = None, False
        if impl == "expert_parallel" and model_axis_size(mesh) > 1:
            y = expert_parallel_moe(c, route, flat, router, bias, gate, up, down, mesh, expert_impl=expert_impl)
        else:
            experts = [with_stack(self, f"experts_{name}", w).astype(dt)
                       for name, w in (("gate", gate), ("up", up), ("down", down))]
            grouped = impl in ("grouped", "expert_parallel")
            # A decode step's few tokens: the one shared expert (the routed width) runs as one more pair per token
            # inside the routed GEMV's launches.
            shared_in_gemv = (grouped and c.n_shared_experts == 1
                              and kernels.takes_routed_gemv(flat, c.num_experts_per_tok, experts, backend=c.backend))
            # Otherwise the router and the shared expert's gate and up read the same input: one launch at batch 1.
            from_x = [with_stack(self, "router", router).astype(jnp.float32)]
            if shared is not None and not shared_in_gemv:
                from_x += [shared.weight("gate", dt), shared.weight("up", dt)]
            logits, *shared_gu = kernels.project_many(flat, from_x, backend=c.backend)
            if shared_gu:
                shared_out = shared.down_from(*shared_gu).reshape(x.shape)
            ids, weights = route_from_logits(c, logits, bias)
            if shared_in_gemv:
                y = kernels.routed_experts(flat, ids, weights, *experts, backend=c.backend,
                                           shared=[shared.weight(name, dt) for name in ("gate", "up", "down")])
            elif grouped:
                y = kernels.routed_experts(flat, ids, weights, *experts, backend=c.backend)
            elif impl == "dense":
                combine = jnp.zeros((flat.shape[0], e), jnp.float32).at[jnp.arange(flat.shape[0])[:, None], ids].add(
                    weights)
                h = jax.nn.silu(jnp.einsum("nd,edi->nei", flat, gate)) * jnp.einsum("nd,edi->nei", flat, up)
                y = jnp.einsum("nei,eid,ne->nd", h, down, combine.astype(dt))
            else:
                k = c.num_experts_per_tok
                flat_ids = ids.reshape(-1)
                order = jnp.argsort(flat_ids, stable=True)
                token_of = order // k
                group_sizes = jnp.bincount(flat_ids, length=e).astype(jnp.int32)
                xs = flat[token_of]
                h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, group_sizes)) * jax.lax.ragged_dot(xs, up, group_sizes)
                ys = jax.lax.ragged_dot(h, down, group_sizes) * weights.reshape(-1)[order][:, None].astype(dt)
                y = jnp.zeros_like(flat).at[token_of].add(ys)
        y = y.reshape(shape)
        if shared is not None and not shared_in_gemv:  # else y holds it already
            y = y + (shared(x) if shared_out is None else shared_out)
        return y
