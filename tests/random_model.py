"""Random params for tests, laid out for a config's pattern, without compiling an init."""

import jax
import jax.numpy as jnp
import numpy as np

from indexcache_jax.model.model import param_shapes


def random_params(cfg, seed: int, std: float = 0.15) -> dict:
    """Weights N(0, std) (large enough that the top-k choice moves the outputs), norm scales 1 + N(0, 0.1),
    biases N(0, 0.05)."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if name.endswith("scale"):
            return jnp.asarray(1 + 0.1 * rng.standard_normal(x.shape), jnp.float32)
        return jnp.asarray((0.05 if name.endswith("bias") else std) * rng.standard_normal(x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg))
