"""Backend resolution shared by the kernels: Pallas on GPU, interpret mode elsewhere."""

from __future__ import annotations

import jax


def on_gpu() -> bool:
    """True when JAX's default backend is a GPU."""
    return jax.default_backend() == "gpu"


def resolve_interpret(interpret: bool | None) -> bool:
    """`None` means: compile for the GPU when there is one, interpret on CPU."""
    if interpret is None:
        return not on_gpu()
    return bool(interpret)


def compute_capability() -> str | None:
    """The first device's CUDA compute capability ("9.0" on Hopper), or None off NVIDIA GPUs."""
    if not on_gpu():
        return None
    return getattr(jax.devices()[0], "compute_capability", None)
