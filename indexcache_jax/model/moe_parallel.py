"""Expert parallelism: routed experts split over the mesh's `model` axis, tokens sent to the device holding their
expert by an all-to-all and the expert outputs brought back by a second one (`shard_map`).

Layout (mesh axes `data` x `model`): the flattened tokens `[N, D]` are split over both axes (each device routes
`N / (data * model)` tokens; tokens replicated over `model` cost no traffic to split); the experts `[E, D, I]` are
split over `model` (`E / model` per device) and replicated over `data`; router, bias and the shared expert stay
as the caller placed them. Within each `data` group:
1. every device routes its tokens and orders its (token, expert) pairs by destination device;
2. `all_to_all` over `model` delivers to each device the pairs of its experts, from every source;
3. the device runs its experts on what it received (`pallas_kernels.grouped_matmul.moe_experts`: the grouped
   kernel on a GPU, `lax.ragged_dot` elsewhere);
4. a second `all_to_all` returns each output to the source, which sums its pairs with the routing weights.

No pair is dropped: each (source, destination) buffer holds the exact worst case, `tokens * min(k, E / model)`
pairs (a token's k distinct experts put at most `min(k, E / model)` on one device), so results equal one device's.
`lax.ragged_all_to_all` would send only the filled rows, but XLA:CPU does not implement it (jax 0.10.2), and the
tests run here; empty slots carry the expert id `E / model`, which `moe_experts` skips.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from indexcache_jax.model.axes import DATA_AXIS, MODEL_AXIS
from indexcache_jax.model.config import DSAConfig
from pallas_kernels.grouped_matmul import moe_experts

Array = jax.Array


def model_axis_size(mesh) -> int:
    """Size of the `model` axis of a Mesh or AbstractMesh (1 without one)."""
    if mesh is None or MODEL_AXIS not in mesh.axis_names:
        return 1
    return dict(zip(mesh.axis_names, mesh.axis_sizes))[MODEL_AXIS]


def _local_experts(cfg: DSAConfig, route_fn, expert_impl: str | None, x: Array, router: Array, bias: Array,
                   gate: Array, up: Array, down: Array) -> Array:
    """One device's part, inside shard_map: x `[n, D]` local tokens, gate/up/down this device's experts."""
    n, d = x.shape
    devices = jax.lax.axis_size(MODEL_AXIS)
    e_local = gate.shape[0]
    k = cfg.num_experts_per_tok
    ids, weights = route_fn(cfg, x, router, bias)
    dest = (ids // e_local).reshape(-1)
    local_id = (ids % e_local).reshape(-1)
    capacity = n * min(k, e_local)
    onehot = (dest[:, None] == jnp.arange(devices, dtype=dest.dtype)[None]).astype(jnp.int32)
    slot = (jnp.cumsum(onehot, axis=0) * onehot).sum(1) - 1  # rank among this device's pairs to `dest`
    token = jnp.arange(n * k, dtype=jnp.int32) // k
    send_x = jnp.zeros((devices, capacity, d), x.dtype).at[dest, slot].set(x[token])
    send_id = jnp.full((devices, capacity), e_local, jnp.int32).at[dest, slot].set(local_id.astype(jnp.int32))
    recv_x = jax.lax.all_to_all(send_x, MODEL_AXIS, 0, 0)
    recv_id = jax.lax.all_to_all(send_id, MODEL_AXIS, 0, 0)
    rows = devices * capacity
    out = moe_experts(recv_x.reshape(rows, d), recv_id.reshape(rows, 1), jnp.ones((rows, 1), jnp.float32),
                      gate, up, down, impl=expert_impl)
    back = jax.lax.all_to_all(out.reshape(devices, capacity, d), MODEL_AXIS, 0, 0)
    picked = back[dest, slot].reshape(n, k, d).astype(jnp.float32)
    return jnp.einsum("nkd,nk->nd", picked, weights.astype(jnp.float32)).astype(x.dtype)


def expert_parallel_moe(cfg: DSAConfig, route_fn, x: Array, router: Array, bias: Array, gate: Array, up: Array,
                        down: Array, mesh, *, expert_impl: str | None = None) -> Array:
    """Routed experts over `mesh` (a Mesh, or the AbstractMesh of `jax.set_mesh`). x `[N, D]` -> y `[N, D]` in x's
    dtype, equal to the single-device `moe_experts` result. `route_fn(cfg, x, router, bias) -> (ids, weights)`.
    Pads N to a multiple of the number of devices (padding tokens are routed, computed and dropped)."""
    devices = model_axis_size(mesh)
    e = gate.shape[0]
    if e % devices:
        raise ValueError(f"{e} routed experts do not split over a model axis of {devices} devices")
    token_axes = tuple(a for a in (DATA_AXIS, MODEL_AXIS) if a in mesh.axis_names)
    shards = 1
    for a in token_axes:
        shards *= dict(zip(mesh.axis_names, mesh.axis_sizes))[a]
    n = x.shape[0]
    padded = -(-n // shards) * shards
    xp = jnp.pad(x, ((0, padded - n), (0, 0)))
    experts = PartitionSpec(MODEL_AXIS, None, None)
    fn = jax.shard_map(
        functools.partial(_local_experts, cfg, route_fn, expert_impl),
        mesh=mesh,
        in_specs=(PartitionSpec(token_axes, None), PartitionSpec(), PartitionSpec(), experts, experts, experts),
        out_specs=PartitionSpec(token_axes, None),
        check_vma=False,
    )
    return fn(xp, router, bias, gate, up, down)[:n]
