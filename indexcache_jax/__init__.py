"""IndexCache for DeepSeek-Sparse-Attention models in JAX.

The package reads as the architecture:
- `model/`: the DSA model definition (config, schedule, rope, layers, moe, model, params, quant);
- `inference/`: kernel dispatch, decode caches, the engine, sharding;
- `methods/`: the IndexCache algorithms (layer runner, greedy search, distillation, overlap analysis);
- `checkpoint.py` and `text.py` (I/O: checkpoints, tokenizers), `cli.py` and `demo.py` (apps).

Core names import eagerly: `DSAConfig` (with presets), `params_from_hf`, `relayout`, `forward`. The rest load lazily
on first use, so importing the core stays light: `load`, `save`, `generate`, `score`, `Engine`,
`cache_bytes_per_token`, `load_tokenizer`, `load_default` (the embedded trained model), and the submodules `search`, `distill`, `analysis`, `engine`, `cache`,
`checkpoint`, `sharding`, `text`.
"""

import importlib

from indexcache_jax.model import config, schedule
from indexcache_jax.model.config import DSAConfig, RopeConfig, deepseek_v32, glm5, glm5_2, glm47_flash_dsa_30b, tiny
from indexcache_jax.model.model import forward, init_params
from indexcache_jax.model.params import params_from_hf, relayout
from indexcache_jax.model.schedule import (
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
    "generate": "indexcache_jax.inference.engine",
    "score": "indexcache_jax.inference.engine",
    "Engine": "indexcache_jax.inference.engine",
    "cache_bytes_per_token": "indexcache_jax.inference.cache",
    "load_tokenizer": "indexcache_jax.text",
    "load_default": "indexcache_jax.pretrained",
}
_LAZY_MODULES = {
    "search": "indexcache_jax.methods.search",
    "distill": "indexcache_jax.methods.distill",
    "analysis": "indexcache_jax.methods.analysis",
    "engine": "indexcache_jax.inference.engine",
    "cache": "indexcache_jax.inference.cache",
    "sharding": "indexcache_jax.inference.sharding",
    "checkpoint": "indexcache_jax.checkpoint",
    "text": "indexcache_jax.text",
}


def __getattr__(name):
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(_LAZY_MODULES[name])
    raise AttributeError(f"module 'indexcache_jax' has no attribute {name!r}")


__all__ = [
    "Engine",
    "cache_bytes_per_token",
    "generate",
    "load",
    "load_default",
    "load_tokenizer",
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
