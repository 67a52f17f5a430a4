"""Tensor / expert / data parallel inference on 8 forced CPU devices equals the single-device results.

The check runs this file's `__main__` block in a process of its own (`forced_devices`).
"""

import re

from forced_devices import run_on_8_cpu_devices


def test_mesh_engine_equals_single_device():
    run_on_8_cpu_devices(__file__, "SHARDING OK")


def _main():
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec

    import indexcache_jax as ic
    from indexcache_jax.inference import engine as engine_lib
    from test_engine import random_params, random_prompts, rel_err

    assert jax.device_count() == 8, jax.devices()
    cfg = ic.tiny(pattern="FSFSSF", index_topk=4)
    params = random_params(cfg, seed=31)
    rng = np.random.default_rng(32)
    prompts = random_prompts(rng, cfg.vocab_size, (3, 14, 8, 11))
    lengths = np.array([20, 9, 15, 20])
    tokens = rng.integers(0, cfg.vocab_size, (4, 20))
    mask = np.arange(20)[None] < lengths[:, None]

    single = ic.Engine(params, cfg, max_len=32, max_batch=4, chunk=8)
    ref_tokens, ref_logits = single.generate(prompts, 6, return_logits=True)
    ref_score = single.score(tokens, mask=mask)

    mesh = ic.sharding.make_mesh(data=2, model=4)
    eng = ic.Engine(params, cfg, max_len=32, max_batch=4, mesh=mesh, chunk=8)
    assert eng.moe_impl == "expert_parallel"
    # Heads and experts are split over `model`, batch rows of the cache over `data`.
    seg = eng.params["segment_1"]["full"]
    assert seg["mla"]["wq_b"].sharding.spec == PartitionSpec(None, None, "model", None)
    assert seg["mlp"]["experts_gate"].sharding.spec == PartitionSpec(None, "model", None, None)
    assert seg["mlp"]["experts_gate"].addressable_shards[0].data.shape[1] == cfg.n_routed_experts // 4

    got_tokens, got_logits = eng.generate(prompts, 6, return_logits=True)
    assert got_tokens == ref_tokens, (got_tokens, ref_tokens)
    calls = []  # streaming from the device loop on the mesh hands over the same tokens
    assert eng.generate(prompts, 6, stream=calls.append, stream_every=2) == ref_tokens
    assert len(calls) == 4 and [sum((c.get(i, []) for c in calls), []) for i in range(4)] == ref_tokens
    for a, b in zip(got_logits, ref_logits):
        assert rel_err(a, b) <= 1e-5
    np.testing.assert_allclose(eng.score(tokens, mask=mask), ref_score, atol=1e-5)
    assert eng.generate(prompts, 6) == ref_tokens  # the on-device decode loop, sharded
    for leaf in jax.tree.leaves(eng._cache):
        assert leaf.sharding.spec[0] == "data", leaf.sharding  # [B, layers * S, C]: batch rows over `data`
        assert leaf.addressable_shards[0].data.shape[0] == 2

    # The compiled decode step keeps weights split: tokens travel to their experts' devices (all-to-all), head
    # partial sums are all-reduced, and no device gathers all experts.
    lowered = engine_lib._decode_step.lower(
        eng.params, eng._cache, eng._put_batch(np.zeros(4, np.int32)), eng._put_batch(np.ones(4, np.int32)),
        jax.random.key(0), np.float32(0), np.float32(1), np.int32(0), cfg=cfg, moe_impl=eng.moe_impl, mesh=mesh)
    hlo = lowered.compile().as_text()
    assert "all-reduce" in hlo and "all-to-all" in hlo
    e, d, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    full_experts = rf"f32\[(\d+,)?{e},({d},{i}|{i},{d})\]\{{[0-9,]*\}} all-gather"
    assert not re.search(full_experts, hlo)
    print("SHARDING OK")


if __name__ == "__main__":
    _main()
