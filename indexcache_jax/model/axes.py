"""Axis names: the device mesh's (`data`, `model`) and the logical axes the layers give their params.

Each layer declares its params' logical axes where it creates them (`logical`); `inference.sharding` maps the
logical names to mesh axes. The expert-parallel MoE runs over the `model` axis.
"""

from __future__ import annotations

import flax.linen as nn

DATA_AXIS = "data"
MODEL_AXIS = "model"


def normal_init(std: float = 0.02):
    """The weights' initializer (normal, std 0.02) for random params."""
    return nn.initializers.normal(stddev=std)


def logical(init, *axes: str):
    """`init` with the logical axis names of each dim of its param (`init_params` returns plain arrays; the names
    are read back by `model.logical_axes`)."""
    return nn.with_logical_partitioning(init, axes)
