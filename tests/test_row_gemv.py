"""The one-row projection kernel (`pallas_kernels.row_gemv`): interpret mode against numpy float64, every split of
K, bf16 rounding, bad input, and the Triton lowering for CUDA at the 30B model's decode projections."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.row_gemv import head_gemv, row_gemv, row_gemvs


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


class RowGemvTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_equals_float64_product(self):
        rng = np.random.default_rng(0)
        for m, k, n, block, splits in [(1, 64, 48, 64, None), (3, 128, 80, 32, 2), (2, 96, 16, 16, 2),
                                       (1, 256, 576, 64, 4), (1, 64, 32, 16, 1)]:
            x = rng.standard_normal((m, k)).astype(np.float32)
            w = rng.standard_normal((k, n)).astype(np.float32)
            fn = self.variant(lambda a, b, block=block, splits=splits: row_gemv(a, b, block=block, splits=splits))
            got = fn(x, w)
            chex.assert_shape(got, (m, n))
            chex.assert_type(got, jnp.float32)
            chex.assert_tree_all_finite(got)
            assert _rel_err(got, x.astype(np.float64) @ w.astype(np.float64)) < 1e-5, (m, k, n, block, splits)


def test_every_split_of_k_sums_to_the_product():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 128)).astype(np.float32), rng.standard_normal((128, 64)).astype(np.float32)
    want = x.astype(np.float64) @ w.astype(np.float64)
    for splits in (1, 2, 4, 8):  # 16-wide tiles: 8 of K
        assert _rel_err(row_gemv(x, w, block=16, splits=splits), want) < 1e-5, splits


def test_several_weights_in_one_launch_equal_their_products():
    """`row_gemvs`: weights of different widths (and tile sizes) side by side in one kernel, each product equal to
    float64, for every split of K; one `pallas_call` and one reduction of the splits in the program."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    ws = [rng.standard_normal((128, n)).astype(np.float32) for n in (48, 16, 96, 32)]
    for splits in (1, 2, 8):
        got = row_gemvs(x, ws, block=16, splits=splits)
        assert len(got) == len(ws)
        for g, w in zip(got, ws):
            chex.assert_shape(g, (2, w.shape[1]))
            assert _rel_err(g, x.astype(np.float64) @ w.astype(np.float64)) < 1e-5, (splits, w.shape)
    closed = jax.make_jaxpr(lambda a, *b: row_gemvs(a, b))(x, *ws)
    assert str(closed).count("pallas_call") == 1
    (call,) = [e for e in closed.jaxpr.eqns if e.primitive.name in ("pjit", "jit")]  # the jitted `_row_gemvs`
    outside_kernel = [e.primitive.name for e in call.params["jaxpr"].jaxpr.eqns]
    assert outside_kernel.count("reduce_sum") == 1  # the splits of every product added at once


class StackedLayerTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_a_layer_of_the_stacks_equals_its_product(self):
        """With `layer`, the weights are [L, K, N] stacks of different depths and widths, and every layer (a traced
        index under jit) gives that layer's float64 products; a wider result dtype reads bf16 weights exactly."""
        rng = np.random.default_rng(5)
        x = rng.standard_normal((1, 64)).astype(np.float32)
        stacks = [rng.standard_normal((depth, 64, n)).astype(np.float32) for depth, n in ((3, 32), (5, 48))]
        fn = self.variant(lambda a, i, *b: row_gemvs(a, b, layer=i, block=16, splits=2))
        for layer in range(3):
            got = fn(x, jnp.int32(layer), *stacks)
            for g, w in zip(got, stacks):
                chex.assert_shape(g, (1, w.shape[2]))
                chex.assert_tree_all_finite(g)
                assert _rel_err(g, x.astype(np.float64) @ w[layer].astype(np.float64)) < 1e-5, layer
        xb = jnp.asarray(x, jnp.bfloat16)
        wb = jnp.asarray(stacks[1], jnp.bfloat16)
        (got,) = self.variant(lambda a, b: row_gemvs(a, (b,), layer=4, dtypes=(jnp.float32,)))(xb, wb)
        chex.assert_type(got, jnp.float32)
        want = np.asarray(xb, np.float64) @ np.asarray(wb[4], np.float64)
        assert _rel_err(got, want) < 1e-6


class HeadGemvTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_each_head_times_its_matrix(self):
        """`head_gemv`: row h times matrix h (`[H, K, N]`, or `[H, N, K]` transposed), equal to float64, for several
        splits of K; from a [L, H, ...] stack every layer (traced under jit) gives that layer's products."""
        rng = np.random.default_rng(7)
        for h, k, n, splits in [(3, 64, 32, None), (5, 96, 48, 2), (2, 128, 16, 8)]:
            x = rng.standard_normal((h, k)).astype(np.float32)
            for transposed in (False, True):
                w = rng.standard_normal((h, n, k) if transposed else (h, k, n)).astype(np.float32)
                spec = "hk,hnk->hn" if transposed else "hk,hkn->hn"
                want = np.einsum(spec, x.astype(np.float64), w.astype(np.float64))
                fn = self.variant(lambda a, b, t=transposed, s=splits: head_gemv(a, b, transposed=t, block=16,
                                                                                 splits=s))
                got = fn(x, w)
                chex.assert_shape(got, (h, n))
                chex.assert_type(got, jnp.float32)
                chex.assert_tree_all_finite(got)
                assert _rel_err(got, want) < 1e-5, (h, k, n, splits, transposed)
        x = rng.standard_normal((4, 64)).astype(np.float32)
        stack = rng.standard_normal((3, 4, 32, 64)).astype(np.float32)  # [L, H, N, K]
        fn = self.variant(lambda a, b, i: head_gemv(a, b, transposed=True, layer=i))
        for layer in range(3):
            want = np.einsum("hk,hnk->hn", x.astype(np.float64), stack[layer].astype(np.float64))
            assert _rel_err(fn(x, stack, jnp.int32(layer)), want) < 1e-5, layer

    def test_bfloat16_heads(self):
        rng = np.random.default_rng(8)
        x = jnp.asarray(rng.standard_normal((6, 192)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((6, 192, 64)) * 0.05, jnp.bfloat16)
        got = head_gemv(x, w)
        chex.assert_type(got, jnp.bfloat16)
        exact = np.einsum("hk,hkn->hn", np.asarray(x, np.float64), np.asarray(w, np.float64))
        np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=2 ** -8, atol=1e-6)

    def test_bad_input_is_a_value_error(self):
        x = jnp.ones((4, 32))
        with pytest.raises(ValueError, match=r"x \[H, K\] and w \[H, K, N\]"):
            head_gemv(x, jnp.ones((3, 32, 16)))
        with pytest.raises(ValueError, match=r"x \[H, K\] and w \[H, N, K\]"):
            head_gemv(x, jnp.ones((4, 32, 16)), transposed=True)
        with pytest.raises(ValueError, match=r"w \[L, H, K, N\]"):
            head_gemv(x, jnp.ones((4, 32, 16)), layer=0)
        with pytest.raises(ValueError, match="layer 3 outside the stacks of 3 layers"):
            head_gemv(x, jnp.ones((3, 4, 32, 16)), layer=3)
        with pytest.raises(ValueError, match="multiples of 16"):
            head_gemv(x, jnp.ones((4, 32, 24)))


@pytest.mark.parametrize("heads", [20, 64])
def test_head_products_lower_for_cuda(heads):
    """The absorbed-MLA head products at the 30B model's (20 heads) and GLM-5's (64) dims build for CUDA from a
    layer stack: `q_nope @ W_uk` ([H, 192, 512]) and `o_latent @ W_uv^T` ([H, 256, 512], transposed)."""
    for x_dim, w_shape, transposed in [(192, (heads, 192, 512), False), (512, (heads, 256, 512), True)]:
        args = [jax.ShapeDtypeStruct((heads, x_dim), jnp.bfloat16), jax.ShapeDtypeStruct((5, *w_shape), jnp.bfloat16),
                jax.ShapeDtypeStruct((), jnp.int32)]
        lowered = jax.jit(lambda a, b, i, t=transposed: head_gemv(a, b, transposed=t, layer=i, interpret=False)).trace(
            *args).lower(lowering_platforms=("cuda",))
        assert lowered.as_text().count("xla.gpu.triton") == 1


def test_bfloat16_is_one_rounding_of_the_float32_sum():
    """bf16 in, bf16 out: the float32 accumulation rounded once, as XLA's bf16 product with float32 accumulation."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((1, 512)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((512, 96)) * 0.05, jnp.bfloat16)
    got = row_gemv(x, w)
    chex.assert_type(got, jnp.bfloat16)
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=2 ** -8, atol=1e-6)
    mixed = row_gemv(x, w.astype(jnp.float32))  # float32 weights (the indexer's head weights) give float32
    chex.assert_type(mixed, jnp.float32)
    assert _rel_err(mixed, exact) < 1e-6


def test_bad_input_is_a_value_error():
    x, w = jnp.ones((1, 32)), jnp.ones((32, 16))
    with pytest.raises(ValueError, match=r"x \[M, K\] and weights \[K, N\]"):
        row_gemv(x, jnp.ones((16, 16)))
    with pytest.raises(ValueError, match="multiples of 16"):
        row_gemv(jnp.ones((1, 24)), jnp.ones((24, 16)))
    with pytest.raises(ValueError, match="power of two >= 16"):
        row_gemv(x, w, block=48)
    with pytest.raises(ValueError, match=r"\[L, K, N\] stacks"):
        row_gemv(x, w, layer=0)
    with pytest.raises(ValueError, match="layer 2 outside the stacks of 2 layers"):
        row_gemv(x, jnp.ones((2, 32, 16)), layer=2)
    with pytest.raises(ValueError, match="1 dtypes for 2 weights"):
        row_gemvs(x, (w, w), dtypes=(jnp.float32,))
    with pytest.raises(ValueError, match="splits must be a power of two"):
        row_gemv(x, w, block=16, splits=4)  # K = 32: two tiles


@pytest.mark.parametrize("k, n", [(2048, 576), (2048, 32), (768, 3840), (5120, 2048)])
def test_kernel_lowers_for_cuda(k, n):
    """The kernel builds for CUDA (Triton) from this CPU host at the 30B model's one-row decode projections."""
    args = [jax.ShapeDtypeStruct((1, k), jnp.bfloat16), jax.ShapeDtypeStruct((k, n), jnp.bfloat16)]
    lowered = jax.jit(lambda a, b: row_gemv(a, b, interpret=False)).trace(*args).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 1


@pytest.mark.parametrize("stacked", [False, True])
def test_several_weights_lower_for_cuda_as_one_kernel(stacked):
    """The attention input's four products of a 30B-model layer (q_a, kv_a, the indexer's keys and its float32 head
    weights) build for CUDA as one Triton kernel; also from [6, K, N] bf16 stacks at a traced layer, the head weights
    read as float32."""
    x = jax.ShapeDtypeStruct((1, 2048), jnp.bfloat16)
    dtypes = [jnp.bfloat16] * 3 + [jnp.float32]
    lead = (6,) if stacked else ()
    ws = [jax.ShapeDtypeStruct((*lead, 2048, n), jnp.bfloat16 if stacked else dt)
          for n, dt in zip((768, 576, 128, 32), dtypes)]

    def products(a, layer, *b):
        return row_gemvs(a, b, layer=layer if stacked else None, dtypes=dtypes, interpret=False)

    lowered = jax.jit(products).trace(x, jax.ShapeDtypeStruct((), jnp.int32), *ws).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 1
    assert [o.dtype for o in lowered.out_info] == dtypes
