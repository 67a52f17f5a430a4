"""IndexCache for DeepSeek-Sparse-Attention models in JAX.

Core: `DSAConfig` (with presets), `params_from_hf`, `forward`. The F/S schedule lives in `cfg.pattern`.
Checkpoints: `load`. Inference: `generate`, `score`, `Engine`, `cache_bytes_per_token`. Algorithms: the
`search`, `distill` and `analysis` submodules. These load lazily, so importing the core stays light.
"""

import importlib

from indexcache_jax import config, schedule
from indexcache_jax.config import DSAConfig, RopeConfig, deepseek_v32, glm5, glm5_2, glm47_flash_dsa_30b, tiny
from indexcache_jax.model import forward, init_params
from indexcache_jax.params import params_from_hf, relayout
from indexcache_jax.schedule import (
    SEARCHED_PATTERNS,
    freq_pattern,
    pattern_to_hf,
    resolve_pattern,
    uniform_pattern,
    validate_pattern,
)

_LAZY_ATTRS = {
    "load": "indexcache_jax.checkpoint",
    "save": "indexcache_jax.checkpoint",
    "generate": "indexcache_jax.engine",
    "score": "indexcache_jax.engine",
    "Engine": "indexcache_jax.engine",
    "cache_bytes_per_token": "indexcache_jax.cache",
}
_LAZY_MODULES = ("search", "distill", "analysis", "engine", "cache", "checkpoint", "sharding")


def __getattr__(name):
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"indexcache_jax.{name}")
    raise AttributeError(f"module 'indexcache_jax' has no attribute {name!r}")


__all__ = [
    "Engine",
    "cache_bytes_per_token",
    "generate",
    "load",
    "save",
    "score",
    "DSAConfig",
    "RopeConfig",
    "SEARCHED_PATTERNS",
    "config",
    "deepseek_v32",
    "forward",
    "freq_pattern",
    "glm47_flash_dsa_30b",
    "glm5",
    "glm5_2",
    "init_params",
    "params_from_hf",
    "pattern_to_hf",
    "relayout",
    "resolve_pattern",
    "schedule",
    "tiny",
    "uniform_pattern",
    "validate_pattern",
]
