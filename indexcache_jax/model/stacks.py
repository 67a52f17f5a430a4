"""A layer's weights beside the layer stacks they are sliced from, so that a kernel can read them in place.

`model.apply_segment` applies each layer with its weights under "params" and, when Pallas kernels are in use on one
device, the same tree of `kernels.StackedWeight`s (the weight, its whole stack and the layer's index in it) under
the `LAYER_STACKS` collection. A module asks `with_stack` for a weight it hands to a kernel: the stacked form where the
collection has it, else the param. Modules applied without the collection (init, the XLA backend, one-off calls)
see plain params.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from indexcache_jax.inference.kernels import StackedWeight

LAYER_STACKS = "layer_stacks"


def stacked_weights(weights: Any, stacks: Any, index: jax.Array) -> Any:
    """The tree of `StackedWeight(w, s, index)` for a layer's weights `w` and their stacks `s [L, *w.shape]`."""
    return jax.tree.map(lambda w, s: StackedWeight(w, s, index), weights, stacks)


def with_stack(module: nn.Module, name: str, value: jax.Array) -> jax.Array | StackedWeight:
    """`value`, the module's param `name`, as a `StackedWeight` when the layer was applied with its stacks."""
    if module.has_variable(LAYER_STACKS, name):
        return module.get_variable(LAYER_STACKS, name)
    return value


class StackedParams:
    """Mixin for a setup-style module whose params are attributes: `weight(name, dtype)`."""

    def weight(self, name: str, dtype: Any) -> jax.Array | StackedWeight:
        """The param `name` as `dtype`, beside its layer stack when the layer was applied with it (`with_stack`)."""
        return with_stack(self, name, getattr(self, name)).astype(dtype)
