"""Expert-parallel MoE on 8 forced CPU devices equals one device (and the float64 oracle): 64 and 256 experts,
meshes 2x4 and 1x8 (`data` x `model`), a token count that does not divide the devices, and every token on one
device's experts (the all-to-all buffers' worst case).

The checks run this file's `__main__` block in a process of its own (`forced_devices`).
"""

from forced_devices import run_on_8_cpu_devices


def test_expert_parallel_equals_single_device():
    run_on_8_cpu_devices(__file__, "EXPERT PARALLEL OK")


def _main():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    import indexcache_jax as ic
    from indexcache_jax.model.moe import MoE
    from moe_oracle import experts_f64, rel_err, route_f64, swiglu_f64

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(61)
    for experts, top_k, n_group, topk_group in ((64, 4, 1, 1), (256, 8, 8, 4)):
        cfg = ic.tiny(n_routed_experts=experts, num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group,
                      hidden_size=32, moe_intermediate_size=16, routed_scaling_factor=1.5)
        x = jnp.asarray(rng.standard_normal((3, 7, cfg.hidden_size)), jnp.float32)  # 21 tokens: padded to 24
        boxed = MoE(cfg, impl="grouped").init(jax.random.key(int(rng.integers(1 << 30))), x)["params"]
        logical = nn.get_partition_spec(boxed)  # the axes MoE declares: experts on `model`
        params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.3, jnp.float32), nn.meta.unbox(boxed))
        single = MoE(cfg, impl="grouped").apply({"params": params}, x)
        flat = np.asarray(x).reshape(-1, cfg.hidden_size)
        ids, weights = route_f64(flat, params["router"], params["router_bias"], top_k=top_k, n_group=n_group,
                                 topk_group=topk_group, norm_topk_prob=True, routed_scaling_factor=1.5)
        want = experts_f64(flat, ids, weights, params["experts_gate"], params["experts_up"], params["experts_down"])
        shared = params["shared"]
        want = want + swiglu_f64(flat, shared["gate"], shared["up"], shared["down"])
        assert rel_err(np.asarray(single).reshape(want.shape), want) < 1e-5
        # A bias that sends every token to the first k experts: all pairs go to model-rank 0.
        hot = dict(params, router_bias=jnp.asarray(np.where(np.arange(experts) < top_k, 100.0, 0.0), jnp.float32))
        hot_single = MoE(cfg, impl="grouped").apply({"params": hot}, x)
        for data, model in ((2, 4), (1, 8)):
            mesh = ic.sharding.make_mesh(data=data, model=model)
            placed = jax.device_put(params, ic.sharding.logical_shardings(logical, params, mesh))
            assert placed["experts_gate"].addressable_shards[0].data.shape[0] == experts // model
            xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data" if 3 % data == 0 else None)))
            ep = jax.jit(lambda p, v, m=mesh: MoE(cfg, impl="expert_parallel", mesh=m).apply({"params": p}, v))
            compiled = ep.lower(placed, xs).compile()
            assert "all-to-all" in compiled.as_text()
            got = compiled(placed, xs)
            assert rel_err(got, single) < 1e-6, (experts, data, model, rel_err(got, single))
            hot_placed = jax.device_put(hot, ic.sharding.logical_shardings(logical, hot, mesh))
            assert rel_err(compiled(hot_placed, xs), hot_single) < 1e-6
            if (experts, data) == (64, 2):  # the mesh set by jax.set_mesh serves when the module names none
                with jax.set_mesh(mesh):
                    ambient = jax.jit(lambda p, v: MoE(cfg, impl="expert_parallel").apply({"params": p}, v))
                    compiled = ambient.lower(placed, xs).compile()
                    assert "all-to-all" in compiled.as_text()
                    assert rel_err(compiled(placed, xs), single) < 1e-6
    print("EXPERT PARALLEL OK")


if __name__ == "__main__":
    _main()
