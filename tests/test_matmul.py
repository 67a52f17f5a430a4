"""`model.matmul.project` against numpy float64 einsum, for one-row (decode) and many-row activations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from indexcache_jax.model.matmul import project

SPECS = [  # (spec, x shape, w shape): every product form the decoder layers use
    ("btd,dr->btr", (1, 1, 24), (24, 16)),
    ("btr,rhk->bthk", (1, 1, 16), (16, 3, 8)),
    ("bthd,hdc->bthc", (1, 1, 3, 8), (3, 8, 12)),
    ("bthv,hvd->btd", (1, 1, 3, 8), (3, 8, 24)),
    ("nd,de->ne", (1, 24), (24, 10)),
]


class ProjectTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @pytest.mark.filterwarnings("ignore")
    def test_equals_float64_einsum_for_one_and_many_rows(self):
        rng = np.random.default_rng(41)
        for spec, xs, ws in SPECS:
            for rows in (1, 3):
                shape = (rows,) + xs[1:] if spec.startswith("n") else (rows, 2 * rows - 1) + xs[2:]
                x = rng.standard_normal(shape).astype(np.float32)
                w = rng.standard_normal(ws).astype(np.float32)
                got = self.variant(lambda a, b, s=spec: project(s, a, b, precision=jax.lax.Precision.HIGHEST))(x, w)
                want = np.einsum(spec, x.astype(np.float64), w.astype(np.float64))
                chex.assert_shape(got, want.shape)
                chex.assert_type(got, jnp.float32)
                chex.assert_tree_all_finite(got)
                np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_one_row_product_runs_on_two_rows():
    """The one-row case reaches XLA as a two-row product (what keeps it a GEMM on a GPU); many rows are unpadded."""
    x, w = jnp.ones((1, 1, 24), jnp.bfloat16), jnp.ones((24, 16), jnp.bfloat16)
    one = jax.jit(lambda a, b: project("btd,dr->btr", a, b)).lower(x, w).as_text()
    assert "tensor<2x1x24xbf16>" in one and "optimization_barrier" in one
    many = jax.jit(lambda a, b: project("btd,dr->btr", a, b)).lower(jnp.ones((1, 4, 24), jnp.bfloat16), w).as_text()
    assert "optimization_barrier" not in many
    grad = jax.grad(lambda a: project("btd,dr->btr", a, w.astype(jnp.float32)).sum())(x.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(grad), np.full((1, 1, 24), 16.0))
