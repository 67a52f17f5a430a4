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


H100_NUM_SMS = 132  # an H100 SXM's multiprocessors: the count assumed when lowering without a GPU (tests)


def num_sms() -> int:
    """The default device's multiprocessor count (its `core_count`), or `H100_NUM_SMS` when it reports none."""
    from jax.extend import backend

    return int(getattr(backend.get_default_device(), "core_count", None) or H100_NUM_SMS)
