"""Each param's logical axes, declared where the layers create it, and their mapping onto a mesh."""

import chex
import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

import indexcache_jax as ic
from indexcache_jax.inference import sharding
from indexcache_jax.model.model import logical_axes, param_shapes


def _mesh(data: int, model: int) -> AbstractMesh:
    try:
        return AbstractMesh((data, model), ("data", "model"))
    except TypeError:  # older signature: ((name, size), ...)
        return AbstractMesh((("data", data), ("model", model)))


def test_every_param_names_each_of_its_axes():
    cfg = ic.tiny(pattern="FSFSSF")
    axes = jax.tree_util.tree_leaves_with_path(logical_axes(cfg), is_leaf=lambda x: isinstance(x, PartitionSpec))
    shapes = jax.tree_util.tree_leaves_with_path(param_shapes(cfg))
    assert [p for p, _ in axes] == [p for p, _ in shapes]
    for (path, spec), (_, x) in zip(axes, shapes):
        assert len(spec) == x.ndim and all(isinstance(n, str) for n in spec), jax.tree_util.keystr(path)
    by_name = {jax.tree_util.keystr(p): s for p, s in axes}
    assert by_name["['segment_0']['full']['mla']['wq_b']"] == PartitionSpec("groups", "q_lora", "heads", "qk_head")
    assert by_name["['segment_1']['shared_0']['mlp']['experts_down']"] == PartitionSpec(
        "groups", "layers", "experts", "expert_mlp", "embed")
    assert by_name["['embed']"] == PartitionSpec("vocab", "embed")


def test_mesh_specs_split_heads_experts_mlp_and_vocab_only():
    cfg = ic.tiny(pattern="FSFSSF", num_heads=4, n_routed_experts=8)
    mesh = _mesh(2, 4)
    axes = jax.tree_util.tree_leaves_with_path(logical_axes(cfg), is_leaf=lambda x: isinstance(x, PartitionSpec))
    shapes = jax.tree_util.tree_leaves(param_shapes(cfg))
    for (path, spec), x in zip(axes, shapes):
        got = sharding.mesh_spec(spec, x.shape, mesh, jax.tree_util.keystr(path))
        want = [sharding.LOGICAL_RULES.get(n) for n in spec]
        chex.assert_equal(tuple(got), tuple(want))
        assert sum(a == "model" for a in got) <= 1
    assert sharding.mesh_spec(PartitionSpec("index_heads", "embed"), (8, 16), mesh) == PartitionSpec(None, None)


def test_a_dim_that_does_not_divide_warns_naming_the_param():
    mesh = _mesh(1, 4)
    with pytest.warns(UserWarning, match=r"segment_0/mla/wq_b .*'heads' dim \(6\) does not divide over the 4-device"):
        spec = sharding.mesh_spec(PartitionSpec("q_lora", "heads", "qk_head"), (8, 6, 16), mesh, "segment_0/mla/wq_b")
    assert spec == PartitionSpec(None, None, None)
