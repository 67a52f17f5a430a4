"""IndexCache for DeepSeek-Sparse-Attention models in JAX.

Core: `DSAConfig` (with presets), `params_from_hf`, `forward`. The F/S schedule lives in `cfg.pattern`.
"""

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

__all__ = [
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
