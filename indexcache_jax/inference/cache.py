"""Decode caches: the MLA latent cache on every layer, the indexer key cache on F layers only.

Layout (one entry per segment of `cfg.segments`, matching `model.DSAModel`):
`{"full": {"kv": [G, B, S, kv_lora + rope], "index_k": [G, B, S, index_head_dim]},
  "shared": [{"kv": [G, n_r, B, S, kv_lora + rope]} for each run of S layers]}`,
with G the segment's groups, n_r the length of an S run, B batch rows and S = max_len key slots. S layers reuse
their F layer's top-k indices, so they keep no indexer keys: a 1/4 pattern drops 3/4 of the indexer cache.
With `indexer_quant="fp8"` the indexer keys are float8_e4m3fn and `"full"` also holds their float32 scales,
`"index_k_scale": [G, B, S, 1]` (132 bytes per token per F layer at d_I = 128, as vLLM and SGLang store it).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from indexcache_jax.model.config import DSAConfig
from indexcache_jax.inference.sharding import DATA_AXIS

def cache_shapes(cfg: DSAConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16) -> list:
    """The cache pytree as `jax.ShapeDtypeStruct`s (see the module docstring for the layout)."""
    row = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    dt = jnp.dtype(dtype)
    out = []
    for spec in cfg.segments:
        g = spec.num_groups
        fp8 = cfg.indexer_quant == "fp8"
        full = {"kv": jax.ShapeDtypeStruct((g, batch, max_len, row), dt),
                "index_k": jax.ShapeDtypeStruct((g, batch, max_len, cfg.index_head_dim),
                                                jnp.float8_e4m3fn if fp8 else dt)}
        if fp8:
            full["index_k_scale"] = jax.ShapeDtypeStruct((g, batch, max_len, 1), jnp.float32)
        out.append({
            "full": full,
            "shared": [{"kv": jax.ShapeDtypeStruct((g, n, batch, max_len, row), dt)} for _, n in spec.shared_runs],
        })
    return out


def cache_shardings(caches: Any, mesh: Mesh) -> Any:
    """NamedShardings for a cache pytree (arrays or ShapeDtypeStructs): batch rows split over the mesh's `data` axis.

    Every leaf is `[..., B, S, C]`. The MLA cache holds one latent row per token shared by all heads (MQA form),
    so there is no head axis to split: the other dims stay replicated.
    """
    data = DATA_AXIS if mesh.shape.get(DATA_AXIS, 1) > 1 else None

    def one(leaf) -> NamedSharding:
        parts = [None] * leaf.ndim
        parts[leaf.ndim - 3] = data
        return NamedSharding(mesh, PartitionSpec(*parts))

    return jax.tree.map(one, caches)


def init_cache(cfg: DSAConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16, *, mesh: Mesh | None = None) -> list:
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
    mla = cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * size
    key_bytes = cfg.index_head_dim + 4 if cfg.indexer_quant == "fp8" else cfg.index_head_dim * size
    indexer = len(cfg.full_layers) * key_bytes
    return {"mla": mla, "indexer": indexer, "total": mla + indexer}


def cache_bytes_per_token(cfg: DSAConfig, dtype: Any = jnp.bfloat16) -> int:
    """Total decode-cache bytes one token costs across all layers under `cfg.pattern` (bfloat16 by default)."""
    return cache_bytes_breakdown(cfg, dtype)["total"]
