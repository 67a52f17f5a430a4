"""How params and activations split over a device mesh.

Mesh axes: `data` splits the batch; `model` splits attention heads (tensor parallel) and routed experts (expert
parallel), the dense MLPs' hidden units and the vocabulary. The indexer stays replicated: splitting its heads would
need an all-reduce of the `[B, T, S]` logits, far more traffic than its small weights. Any axis missing from the
mesh (or of size 1) simply leaves that dimension whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"

# Leaf name -> which trailing dim goes on the model axis (negative index, counted from the end), for per-layer leaves.
_MODEL_DIM_BY_LEAF = {
    ("mla", "wq_b"): -2,          # [q_lora, H, qk_head]
    ("mla", "w_uk"): -3,          # [H, nope, kv_lora]
    ("mla", "w_uv"): -3,          # [H, v, kv_lora]
    ("mla", "wo"): -3,            # [H, v, D]
    ("mlp", "gate"): -1,          # dense [D, I]
    ("mlp", "up"): -1,
    ("mlp", "down"): -2,          # dense [I, D]
    ("mlp", "experts_gate"): -3,  # [E, D, I]
    ("mlp", "experts_up"): -3,
    ("mlp", "experts_down"): -3,  # [E, I, D]
    ("shared", "gate"): -1,
    ("shared", "up"): -1,
    ("shared", "down"): -2,
}
_TOP_LEVEL = {"embed": -2, "lm_head": -1}  # [V, D], [D, V]


def make_mesh(data: int = 1, model: int | None = None, devices: Any = None) -> Mesh:
    """A `(data, model)` mesh over `devices` (default: all); `model` defaults to the devices left after `data`."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    if model is None:
        model = devices.size // data
    if data * model != devices.size:
        raise ValueError(f"mesh {data} x {model} does not cover {devices.size} devices")
    return Mesh(devices.reshape(data, model), (DATA_AXIS, MODEL_AXIS))


def _axis_size(mesh: Mesh, axis: str) -> int:
    return mesh.shape.get(axis, 1)


def partition_spec(path: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of the param at `path` (keys from the params root) with `shape`."""
    size = _axis_size(mesh, MODEL_AXIS)
    dim = None
    if len(path) == 1 and path[0] in _TOP_LEVEL:
        dim = _TOP_LEVEL[path[0]]
    elif len(path) >= 2:
        dim = _MODEL_DIM_BY_LEAF.get((path[-2], path[-1]))
    spec = [None] * len(shape)
    if dim is not None and size > 1 and shape[dim] % size == 0:
        spec[dim] = MODEL_AXIS
    return PartitionSpec(*spec)


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_shardings(params_or_shapes: Mapping, mesh: Mesh) -> Any:
    """A pytree of NamedSharding matching `params_or_shapes` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, partition_spec(_keys(path), tuple(x.shape), mesh)), params_or_shapes)


def shard_params(params: Mapping, mesh: Mesh) -> Any:
    """Places every leaf with its NamedSharding."""
    return jax.device_put(params, param_shardings(params, mesh))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Splits the leading (batch) dim of an `ndim`-array over `data` when the mesh has that axis."""
    lead = DATA_AXIS if _axis_size(mesh, DATA_AXIS) > 1 else None
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))
