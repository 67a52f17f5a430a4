"""Dispatch between the Pallas GPU kernels and their XLA references.

The model reaches `pallas_kernels` only through this module. `cfg.backend` decides: "pallas" forces the kernels,
"xla" the references, "auto" picks Pallas on GPU and XLA elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def use_pallas(backend: str) -> bool:
    if backend == "pallas":
        return True
    if backend == "xla":
        return False
    if backend == "auto":
        return jax.default_backend() == "gpu"
    raise ValueError(f"backend must be 'auto', 'pallas' or 'xla', got {backend!r}")


def indexer_topk(q, k, w, topk: int, *, q_positions, k_lengths, backend: str) -> jnp.ndarray:
    """int32 `[B, T, topk]` indices of the largest `sum_h w * relu(q . k)` over valid keys, -1 padded.

    q `[B, T, H, D]`, k `[B, S, D]`, w `[B, T, H]` float32, q_positions `[B, T]`, k_lengths `[B]`.
    """
    import pallas_kernels

    if use_pallas(backend):
        return pallas_kernels.indexer_topk(q, k, w, topk, q_positions=q_positions, k_lengths=k_lengths)
    return pallas_kernels.indexer_topk_reference(q, k, w, topk, q_positions=q_positions, k_lengths=k_lengths)


def sparse_mla(q, kv, indices, *, sm_scale: float, v_dim: int, backend: str):
    """Absorbed-MLA attention over the gathered rows `kv[b, indices[b, t]]`: `(out [B, T, H, v_dim], lse [B, T, H])`."""
    import pallas_kernels

    if use_pallas(backend):
        return pallas_kernels.sparse_mla(q, kv, indices, sm_scale=sm_scale, v_dim=v_dim)
    return pallas_kernels.sparse_mla_reference(q, kv, indices, sm_scale=sm_scale, v_dim=v_dim)
