"""Decode caches: the MLA latent cache on every layer, the indexer key cache on F layers only.

Layout: one buffer per kind, batch-major, every layer in it, layer l at rows `[l * S, (l + 1) * S)`
(`model.layers.Block` writes a layer's rows in place, and the kernels read its window where it lies):
`{"kv": [B, L * S, kv_lora + rope], "index_k": [B, F * S, index_head_dim]}`, with L the layers, F the F layers of
`cfg.pattern` (in order), B batch rows and S = max_len key slots. One flat row axis, rather than `[B, L, S, ...]`,
keeps XLA from keeping a second (reshaped) copy of the buffer for the reads. S layers reuse their F layer's top-k indices, so
they keep no indexer keys: a 1/4 pattern drops 3/4 of the indexer cache. With `indexer_quant="fp8"` the indexer keys
are float8_e4m3fn and the cache also holds their float32 scales, `"index_k_scale": [B, F * S, 1]` (132 bytes per
token per F layer at d_I = 128, as vLLM and SGLang store it).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from indexcache_jax.inference.sharding import DATA_AXIS
from indexcache_jax.model.config import DSAConfig


def cache_shapes(cfg: DSAConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16) -> dict:
    """The cache pytree as `jax.ShapeDtypeStruct`s (see the module docstring for the layout)."""
    row = cfg.latent_row_dim
    dt = jnp.dtype(dtype)
    n_full = len(cfg.full_layers)
    fp8 = cfg.indexer_quant == "fp8"
    out = {"kv": jax.ShapeDtypeStruct((batch, cfg.num_layers * max_len, row), dt),
           "index_k": jax.ShapeDtypeStruct((batch, n_full * max_len, cfg.index_head_dim),
                                           jnp.float8_e4m3fn if fp8 else dt)}
    if fp8:
        out["index_k_scale"] = jax.ShapeDtypeStruct((batch, n_full * max_len, 1), jnp.float32)
    return out


def cache_shardings(caches: Any, mesh: Mesh) -> Any:
    """NamedShardings for a cache pytree (arrays or ShapeDtypeStructs): batch rows split over the mesh's `data` axis.

    Every leaf is `[B, layers * S, C]`. The MLA cache holds one latent row per token shared by all heads (MQA
    form), so there is no head axis to split: the other dims stay replicated.
    """
    data = DATA_AXIS if mesh.shape.get(DATA_AXIS, 1) > 1 else None
    return jax.tree.map(lambda leaf: NamedSharding(mesh, PartitionSpec(data, *([None] * (leaf.ndim - 1)))), caches)


def init_cache(cfg: DSAConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16, *,
               mesh: Mesh | None = None) -> dict:
    """A zeroed cache for `batch` rows of up to `max_len` tokens (bfloat16 by default), placed on `mesh` if given."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
    shapes = cache_shapes(cfg, batch, max_len, dtype)
    shardings = None if mesh is None else cache_shardings(shapes, mesh)
    make = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), out_shardings=shardings)
    return make()


def cache_bytes_breakdown(cfg: DSAConfig, dtype: Any = jnp.bfloat16) -> dict[str, int]:
    """Bytes of cache per token summed over layers: `{"mla", "indexer", "total"}`.

    `mla` = every layer's latent + RoPE key (`kv_lora_rank + qk_rope_head_dim` values); `indexer` = one
    `index_head_dim` key per F layer (FP8 values plus a float32 scale with `indexer_quant="fp8"`).
    """
    size = np.dtype(jnp.dtype(dtype)).itemsize
    mla = cfg.num_layers * cfg.latent_row_dim * size
    key_bytes = cfg.index_head_dim + 4 if cfg.indexer_quant == "fp8" else cfg.index_head_dim * size
    indexer = len(cfg.full_layers) * key_bytes
    return {"mla": mla, "indexer": indexer, "total": mla + indexer}


def cache_bytes_per_token(cfg: DSAConfig, dtype: Any = jnp.bfloat16) -> int:
    """Total decode-cache bytes one token costs across all layers under `cfg.pattern` (bfloat16 by default)."""
    return cache_bytes_breakdown(cfg, dtype)["total"]
