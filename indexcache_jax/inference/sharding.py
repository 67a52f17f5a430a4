"""How params and activations split over a device mesh.

Mesh axes: `data` splits the batch; `model` splits attention heads (tensor parallel) and routed experts (expert
parallel), the dense MLPs' hidden units and the vocabulary. Each layer declares its params' logical axes where it
creates them (`model.logical_axes`); `LOGICAL_RULES` maps those names to the mesh. The indexer stays replicated: splitting its heads would
need an all-reduce of the `[B, T, S]` logits, far more traffic than its small weights. Any axis missing from the
mesh (or of size 1) simply leaves that dimension whole.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from indexcache_jax.model.axes import DATA_AXIS, MODEL_AXIS
from indexcache_jax.model.config import DSAConfig
from indexcache_jax.model.model import logical_axes, param_shapes


# Logical axis (as the layers declare them, `model.logical_axes`) -> mesh axis. Names not listed stay whole: the
# indexer's heads ("index_heads"), the router's expert scores ("router_experts"), each expert's own width
# ("expert_mlp", its experts are already split) and every feature dim.
LOGICAL_RULES = {
    "heads": MODEL_AXIS,
    "experts": MODEL_AXIS,
    "mlp": MODEL_AXIS,
    "vocab": MODEL_AXIS,
}


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


def mesh_spec(logical: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, name: str = "param") -> PartitionSpec:
    """The mesh PartitionSpec of a param with logical axes `logical` and `shape`, by `LOGICAL_RULES`.

    A dim whose size does not divide its mesh axis stays whole, with a warning naming the param, so that an
    unexpected replication (memory, traffic) is never silent.
    """
    spec = []
    for dim, axis_name in enumerate(logical):
        axis = LOGICAL_RULES.get(axis_name)
        size = _axis_size(mesh, axis) if axis else 1
        if size > 1 and shape[dim] % size:
            warnings.warn(f"param {name} {tuple(shape)}: its {axis_name!r} dim ({shape[dim]}) does not divide over "
                          f"the {size}-device {axis!r} mesh axis; it is replicated on every device", stacklevel=3)
            size = 1
        spec.append(axis if size > 1 else None)
    return PartitionSpec(*spec)


def logical_shardings(logical: Any, shapes: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of params (arrays or ShapeDtypeStructs) given the matching tree of logical
    PartitionSpecs (e.g. `model.logical_axes(cfg)`, or `flax.linen.get_partition_spec` of a module's init)."""
    specs = jax.tree_util.tree_leaves_with_path(logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    if len(specs) != len(leaves):
        raise ValueError(f"{len(specs)} logical specs for {len(leaves)} params: the trees differ")
    out = [NamedSharding(mesh, mesh_spec(spec, tuple(x.shape), mesh, jax.tree_util.keystr(path)))
           for (path, spec), x in zip(specs, leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


def param_shardings(cfg: DSAConfig, mesh: Mesh) -> Any:
    """NamedShardings of the params tree of `cfg.pattern` (heads, experts, MLP units and vocabulary on `model`)."""
    return logical_shardings(logical_axes(cfg), param_shapes(cfg), mesh)


def shard_params(params: Mapping, cfg: DSAConfig, mesh: Mesh) -> Any:
    """Places every leaf of `params` (laid out for `cfg.pattern`) with its NamedSharding."""
    return jax.device_put(params, param_shardings(cfg, mesh))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Splits the leading (batch) dim of an `ndim`-array over `data` when the mesh has that axis."""
    lead = DATA_AXIS if _axis_size(mesh, DATA_AXIS) > 1 else None
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))
