"""The decode MoE kernels (`pallas_kernels.routed_gemv`): interpret mode against the numpy float64 oracle, ids that
name no expert, bf16, bad input, and the Triton lowering for CUDA at the 30B and GLM-5 shapes (numerics on the GPU
come from `benchmarks/moe.py`)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_oracle import experts_f64, rel_err, swiglu_f64
from pallas_kernels import grouped_matmul as gm
from pallas_kernels.routed_gemv import default_splits, routed_experts_gemv


def _case(rng, n, k, e, d, i, dtype=np.float32):
    x = rng.standard_normal((n, d)).astype(dtype)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
    w = rng.random((n, k)).astype(np.float32)
    gate, up, down = (rng.standard_normal(s).astype(dtype) * 0.3 for s in [(e, d, i), (e, d, i), (e, i, d)])
    return x, ids, w, gate, up, down


class RoutedGemvTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_equals_float64_oracle(self):
        rng = np.random.default_rng(0)
        for n, k, e, d, i, block in [(1, 4, 8, 64, 32, 64), (3, 2, 5, 48, 80, 64), (5, 3, 7, 128, 64, 32),
                                     (2, 1, 4, 32, 16, 16)]:
            x, ids, w, gate, up, down = _case(rng, n, k, e, d, i)
            fn = self.variant(lambda *a, block=block: routed_experts_gemv(*a, block=block))
            got = fn(x, ids, w, gate, up, down)
            chex.assert_shape(got, (n, d))
            chex.assert_type(got, jnp.float32)
            chex.assert_tree_all_finite(got)
            assert rel_err(got, experts_f64(x, ids, w, gate, up, down)) < 1e-5, (n, k, e, d, i, block)


class StackedLayerTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_a_layer_of_the_stacks_equals_its_experts(self):
        """With `layer`, gate, up and down are [L, E, ...] stacks and every layer (traced under jit) gives the
        oracle on that layer's experts; an id equal to E adds nothing and reads no other layer's expert."""
        rng = np.random.default_rng(6)
        n, k, e, d, i, depth = 3, 2, 5, 32, 48, 3
        x, ids, w, _, _, _ = _case(rng, n, k, e, d, i)
        ids[1, 0] = e  # names no expert
        gate, up = (rng.standard_normal((depth, e, d, i)).astype(np.float32) * 0.3 for _ in range(2))
        down = rng.standard_normal((depth, e, i, d)).astype(np.float32) * 0.3
        fn = self.variant(lambda layer, *a: routed_experts_gemv(*a, layer=layer, block=16))
        for layer in range(depth):
            got = fn(jnp.int32(layer), x, ids, w, gate, up, down)
            chex.assert_shape(got, (n, d))
            chex.assert_tree_all_finite(got)
            live = ids < e  # the oracle takes real experts: a dropped pair is expert 0 at weight 0
            want = experts_f64(x, np.where(live, ids, 0), np.where(live, w, 0), gate[layer], up[layer], down[layer])
            assert rel_err(got, want) < 1e-5, layer


class SharedExpertTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_the_shared_expert_joins_the_pairs(self):
        """`shared`: the shared expert runs as one more pair per token and adds to the routed sum: equal to the
        oracle's routed experts plus its float64 SwiGLU, plain and from [L, ...] stacks at every layer (traced),
        with an id that names no expert."""
        rng = np.random.default_rng(9)
        n, k, e, d, i, depth = 3, 2, 5, 32, 48, 2
        x, ids, w, gate, up, down = _case(rng, n, k, e, d, i)
        ids[2, 1] = e
        live = ids < e
        shared = [rng.standard_normal(shape).astype(np.float32) * 0.3 for shape in [(d, i), (d, i), (i, d)]]
        want = experts_f64(x, np.where(live, ids, 0), np.where(live, w, 0), gate, up, down) + swiglu_f64(x, *shared)
        got = self.variant(lambda *a: routed_experts_gemv(*a[:6], shared=a[6:], block=16))(x, ids, w, gate, up,
                                                                                            down, *shared)
        chex.assert_shape(got, (n, d))
        chex.assert_tree_all_finite(got)
        assert rel_err(got, want) < 1e-5
        stacks = [np.stack([a, a * 0.5 + 0.1]) for a in (gate, up, down)]
        shared_stacks = [np.stack([a, -a]) for a in shared]
        fn = self.variant(lambda layer, *a: routed_experts_gemv(*a[:6], shared=a[6:], layer=layer, block=16,
                                                                splits=(2, 1)))
        for layer in range(depth):
            got = fn(jnp.int32(layer), x, ids, w, *stacks, *shared_stacks)
            want = (experts_f64(x, np.where(live, ids, 0), np.where(live, w, 0), *(s[layer] for s in stacks))
                    + swiglu_f64(x, *(s[layer] for s in shared_stacks)))
            assert rel_err(got, want) < 1e-5, layer

    def test_a_shared_expert_of_another_width_is_a_value_error(self):
        x, ids, w = jnp.ones((2, 32)), jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 2))
        g, dn = jnp.ones((3, 32, 16)), jnp.ones((3, 16, 32))
        with pytest.raises(ValueError, match="shared expert must be gate, up"):
            routed_experts_gemv(x, ids, w, g, g, dn, shared=(jnp.ones((32, 32)), jnp.ones((32, 32)),
                                                             jnp.ones((32, 32))))


def test_split_reductions_equal_the_oracle():
    """Every split of the two reductions (programs sharing D for gate/up, I for down) sums to the same products."""
    rng = np.random.default_rng(3)
    x, ids, w, gate, up, down = _case(rng, 2, 3, 5, 64, 32)
    want = experts_f64(x, ids, w, gate, up, down)
    for splits in [(1, 1), (2, 1), (1, 2), (4, 2)]:  # 16-wide tiles: 4 of D, 2 of I
        got = routed_experts_gemv(x, ids, w, gate, up, down, block=16, splits=splits)
        chex.assert_shape(got, (2, 64))
        assert rel_err(got, want) < 1e-5, splits


def test_default_splits_fill_the_gpu_and_divide_the_tiles():
    """Twice as many programs as SMs where the tiles allow it, >= 2 tiles a split, a power of two dividing them."""
    assert default_splits(96, 32, sms=132) == 4  # 30B gate/up at one token: 4 pairs x 24 column blocks
    assert default_splits(128, 24, sms=132) == 4  # 30B down: 4 pairs x 32 column blocks, 24 tiles of I
    assert default_splits(1024, 32, sms=132) == 1  # already two waves
    assert default_splits(4, 3, sms=132) == 1  # no power of two divides 3 tiles
    assert default_splits(4, 8, sms=132) == 4  # stops at 2 tiles a split
    for programs in (1, 7, 96, 300):
        for blocks in (2, 6, 24, 32, 96):
            s = default_splits(programs, blocks, sms=132)
            assert s & (s - 1) == 0 and blocks % s == 0 and (s == 1 or blocks // s >= 2)


def test_an_id_equal_to_the_expert_count_adds_nothing():
    rng = np.random.default_rng(1)
    x, ids, w, gate, up, down = _case(rng, 4, 3, 6, 32, 48)
    ids[0, 1] = ids[2, 0] = ids[2, 2] = 6
    kept = np.where(ids < 6, w, 0.0).astype(np.float32)
    want = experts_f64(x, np.minimum(ids, 5), kept, gate, up, down)
    assert rel_err(routed_experts_gemv(x, ids, w, gate, up, down), want) < 1e-5


def test_bfloat16_matches_the_grouped_path():
    """In bf16 each expert's output is rounded as `moe_experts` rounds it: both sit as close to float64."""
    rng = np.random.default_rng(2)
    x, ids, w, gate, up, down = _case(rng, 2, 4, 16, 64, 96)
    args = [jnp.asarray(a, jnp.bfloat16) for a in (x,)] + [ids, w] + [jnp.asarray(a, jnp.bfloat16) for a in (gate, up, down)]
    got = routed_experts_gemv(*args)
    chex.assert_type(got, jnp.bfloat16)
    want = experts_f64(*(np.asarray(a, np.float32) if a.dtype == jnp.bfloat16 else np.asarray(a) for a in map(jnp.asarray, args)))
    grouped = gm.moe_experts(*args, impl="xla_gather", block_m=8)
    assert rel_err(got, want) < 1e-2 and rel_err(got, want) < 2 * rel_err(grouped, want) + 1e-3


def test_bad_input_is_a_value_error():
    x, ids, w = jnp.ones((2, 32)), jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 2))
    g, dn = jnp.ones((3, 32, 16)), jnp.ones((3, 16, 32))
    with pytest.raises(ValueError, match="disagree"):
        routed_experts_gemv(x, ids, w, g, g, jnp.ones((3, 32, 16)))
    with pytest.raises(ValueError, match=r"ids and weights \[N, k\]"):
        routed_experts_gemv(x, ids, jnp.ones((2, 3)), g, g, dn)
    with pytest.raises(ValueError, match="multiples of 16"):
        routed_experts_gemv(jnp.ones((2, 24)), ids, w, jnp.ones((3, 24, 16)), jnp.ones((3, 24, 16)), jnp.ones((3, 16, 24)))
    with pytest.raises(ValueError, match="power of two"):
        routed_experts_gemv(x, ids, w, g, g, dn, block=48)
    with pytest.raises(ValueError, match="splits must be two powers of two"):
        routed_experts_gemv(x, ids, w, g, g, dn, block=16, splits=(3, 1))
    with pytest.raises(ValueError, match="splits must be two powers of two"):
        routed_experts_gemv(x, ids, w, g, g, dn, block=16, splits=(1, 2))  # I = 16: one tile
    with pytest.raises(ValueError, match=r"\[L, E, D, I\] stacks"):
        routed_experts_gemv(x, ids, w, g, g, dn, layer=0)
    with pytest.raises(ValueError, match="layer 1 outside the stacks of 1 layers"):
        routed_experts_gemv(x, ids, w, g[None], g[None], dn[None], layer=1)
    with pytest.raises(ValueError, match="in x's dtype"):
        routed_experts_gemv(x.astype(jnp.bfloat16), ids, w, g[None], g[None], dn[None], layer=0)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("n, k, e, d, i", [(1, 4, 64, 2048, 1536), (8, 8, 256, 6144, 2048)])
def test_kernels_lower_for_cuda(n, k, e, d, i, stacked):
    """Both kernels build for CUDA (Triton) from this CPU host at the 30B and GLM-5 decode shapes, also from
    7-layer stacks at a traced layer, and with the shared expert's pairs."""
    lead = (7,) if stacked else ()
    args = [jax.ShapeDtypeStruct(s, t) for s, t in [((n, d), jnp.bfloat16), ((n, k), jnp.int32), ((n, k), jnp.float32),
                                                    ((*lead, e, d, i), jnp.bfloat16), ((*lead, e, d, i), jnp.bfloat16),
                                                    ((*lead, e, i, d), jnp.bfloat16), ((), jnp.int32)]]

    shared = [jax.ShapeDtypeStruct((*lead, *s), jnp.bfloat16) for s in [(d, i), (d, i), (i, d)]]

    def experts(*a):
        return routed_experts_gemv(*a[:6], layer=a[6] if stacked else None, shared=a[7:] or None, interpret=False)

    for extra in ([], shared):  # without and with the shared expert's pairs
        lowered = jax.jit(experts).trace(*args, *extra).lower(lowering_platforms=("cuda",))
        assert lowered.as_text().count("xla.gpu.triton") == 2
