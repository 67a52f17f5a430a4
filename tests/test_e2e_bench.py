"""The end-to-end sweep (`indexcache_jax.e2e_bench`, issue 20): on-device bf16 weights, model FLOPs, the batch
search, the resumable JSON, the table beside the paper's, argument errors, and one tiny sweep on CPU."""

import json
import math
import os
import subprocess
import sys

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import indexcache_jax as ic
from indexcache_jax import e2e_bench as eb
from indexcache_jax.model.model import param_shapes
from indexcache_jax.model.params import layer_specs, top_specs

# The 30B preset cut to a few layers with tiny dims: the same architecture and layout, CPU-sized.
TINY = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_heads": 2, "q_lora_rank": 32,
        "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "index_n_heads": 4, "index_head_dim": 16, "index_topk": 64, "vocab_size": 512}
TINY_ARGS = ["--layers", "4", "--preset-overrides", json.dumps(TINY), "--backend", "xla", "--chunk", "128",
             "--decode-steps", "4", "--ceiling-n", "128", "--decode-reps", "1"]


def tiny_cfg(pattern="FSFS", layers=4):
    return ic.glm47_flash_dsa_30b(num_layers=layers, mlp_layer_types=("dense",) + ("sparse",) * (layers - 1),
                                  dtype="bfloat16", pattern=pattern, **TINY)


def settings(**kw):
    base = dict(layers=4, preset_overrides=tuple(sorted(TINY.items())), backend="xla", chunk=128, decode_steps=4,
                moe_impl="ragged", seed=0)
    base.update(kw)
    return eb.SweepSettings(**base)


# ------------------------------------------------------------------------------------------------ random weights
def test_random_params_cover_param_shapes_in_bf16_with_init_params_scales():
    cfg = tiny_cfg("FSSF")
    ours = eb.random_params(cfg, seed=3, block_bytes=4096)
    shapes = param_shapes(cfg)
    assert jax.tree.structure(ours) == jax.tree.structure(shapes)
    reference = ic.init_params(cfg, seed=3)
    for (path, x), s, ref in zip(jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(shapes),
                                 jax.tree.leaves(reference)):
        chex.assert_shape(x, s.shape)
        chex.assert_type(x, jnp.bfloat16)
        chex.assert_tree_all_finite(x)
        ref = np.asarray(ref, np.float32)
        if np.all(ref == ref.flat[0]):  # a constant leaf of init_params (norm scales 1, biases 0): the same value
            np.testing.assert_array_equal(np.asarray(x, np.float32), ref)
        else:  # a normal(0.02) leaf
            assert np.std(np.asarray(x, np.float32)) == pytest.approx(0.02, rel=0.2), jax.tree_util.keystr(path)


def test_random_params_of_a_pattern_equal_the_relayout_of_full_dsa():
    """Each layer's weights depend on the layer, not the layout: making a pattern's params directly gives what
    `ic.relayout` of the full-DSA params gives."""
    full = tiny_cfg("FFFF")
    params = eb.random_params(full, seed=1, block_bytes=2048)
    for pattern in ("FSFS", "FSSF"):
        direct = eb.random_params(full.with_pattern(pattern), seed=1, block_bytes=2048)
        moved = ic.relayout(params, full, full.with_pattern(pattern))
        chex.assert_trees_all_equal(direct, moved)


def test_block_generator_never_materialises_float32():
    """The jaxpr holds no float32 value, and the compiled temporaries are bounded by the block, not the leaf."""
    block_bytes = 1 << 14
    gen = eb.block_generator(4, (640, 2560), "bfloat16", "normal", 0.02, block_bytes)
    args = (jax.random.key(0), jnp.arange(4, dtype=jnp.int32))

    def avals(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (v.aval for v in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from avals(sub)

    found = [a for a in avals(jax.make_jaxpr(gen)(*args).jaxpr) if getattr(a, "dtype", None) == jnp.float32]
    assert not found, found
    memory = gen.lower(*args).compile().memory_analysis()
    leaf_bytes = 4 * 640 * 2560 * 2
    assert memory.output_size_in_bytes == leaf_bytes
    assert memory.temp_size_in_bytes < 32 * block_bytes < leaf_bytes


def test_block_split_tiles_every_shape_within_the_block():
    rng = np.random.default_rng(11)
    for _ in range(200):
        shape = tuple(int(x) for x in rng.integers(1, 300, rng.integers(1, 4)))
        itemsize = int(rng.choice([1, 2, 4]))
        block_bytes = int(rng.integers(16, 4096))
        n, block = eb.block_split(shape, itemsize, block_bytes)
        assert n * block == math.prod(shape)
        assert block * itemsize <= block_bytes or block == 1 or block <= shape[-1]


def test_random_cache_has_the_engine_layout():
    cfg = tiny_cfg("FSFS").replace(indexer_quant="fp8")
    cache = eb.random_cache(cfg, 2, 256, seed=0, block_bytes=4096)
    shapes = ic.cache.cache_shapes(cfg, 2, 256, jnp.bfloat16)
    assert set(cache) == set(shapes)
    for name, s in shapes.items():
        chex.assert_shape(cache[name], s.shape)
        chex.assert_type(cache[name], s.dtype)
        chex.assert_tree_all_finite(cache[name].astype(jnp.float32))
    assert float(jnp.min(cache["index_k_scale"])) > 0


# ----------------------------------------------------------------------------------------------------- model FLOPs
def brute_force_prefill_flops(cfg, tokens):
    """Per layer and per token, from the HF tensor shapes (2 FLOPs per weight per token for every projection;
    kv_b_proj once, the routed experts at top_k / E) and explicit loops over the causal keys."""
    total = 0.0
    for layer in range(cfg.num_layers):
        seen = set()
        for spec in layer_specs(cfg, layer):
            if len(spec.hf_shape) != 2 or spec.hf_name in seen:
                continue  # norms and biases; kv_b_proj appears twice (w_uk and w_uv)
            seen.add(spec.hf_name)
            flops = 2.0 * math.prod(spec.hf_shape) * tokens
            total += flops * (cfg.num_experts_per_tok / cfg.n_routed_experts if spec.expert is not None else 1)
        for t in range(tokens):
            keys = min(t + 1, cfg.index_topk)
            total += keys * (2 * cfg.num_heads * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
                             + 2 * cfg.num_heads * cfg.kv_lora_rank)
            if cfg.pattern[layer] == "F":
                total += (t + 1) * 2 * cfg.index_n_heads * cfg.index_head_dim
    head = next(s for s in top_specs(cfg) if s.hf_name == "lm_head.weight")
    return total + 2.0 * math.prod(head.hf_shape)


@pytest.mark.parametrize("pattern,tokens", [("FFFF", 50), ("FSSF", 200), ("FSFS", 64)])
def test_prefill_flops_match_a_brute_force_count(pattern, tokens):
    cfg = tiny_cfg(pattern)
    flops = eb.prefill_flops(cfg, tokens)
    assert flops["total"] == pytest.approx(brute_force_prefill_flops(cfg, tokens), rel=1e-12)
    assert flops["total"] == pytest.approx(sum(v for k, v in flops.items() if k != "total"))


def test_prefill_flops_of_the_30b_model_scale_with_the_schedule():
    """At 200K the indexer's causal logits dominate full DSA; a 1/4 pattern keeps a quarter-ish of them."""
    full = ic.glm47_flash_dsa_30b()
    quarter = full.with_pattern(eb.schedule_pattern("searched-1/4", 47))
    f, q = eb.prefill_flops(full, 200000), eb.prefill_flops(quarter, 200000)
    assert f["indexer_logits"] > f["sparse_attention"] > 0
    assert q["indexer_logits"] / f["indexer_logits"] == pytest.approx(quarter.pattern.count("F") / 47)
    assert q["moe_routed"] == f["moe_routed"]


# ---------------------------------------------------------------------------------------------- the batch search
def test_largest_batch_matches_a_brute_force_loop():
    rng = np.random.default_rng(7)
    for _ in range(300):
        per_row = int(rng.integers(1, 10**6))
        budget = int(rng.integers(0, 10**8))
        reserve = int(rng.integers(0, 10**6))
        upper = int(rng.integers(1, 400))

        def fits(b):
            return b * per_row + reserve <= budget

        brute = max([b for b in range(1, upper + 1) if fits(b)], default=0)
        assert eb.largest_batch(fits, upper) == brute


# ------------------------------------------------------------------------------------------------ the sweep file
def fake_measure(calls, fail_at=None, raise_at=None):
    def measure(task):
        calls.append(task.key)
        if task.key == raise_at:
            raise eb.Interrupted("SIGTERM")
        if task.key == fail_at:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        rng = np.random.default_rng(len(calls))
        return {"prefill_s": float(rng.uniform(1, 2)), "mfu": 0.3, "middle_chunk": {"indexer_share": 0.5},
                "batch": 1, "tok_s_host": float(rng.uniform(10, 20))}
    return measure


def test_sweep_appends_resumes_and_skips(tmp_path):
    path = str(tmp_path / "s.json")
    tasks = eb.plan_tasks(["full", "uniform-1/4"], ["fp8"], [1000, 2000], eb.MEASUREMENTS, full_kv_context=2000)
    assert [t.kind for t in tasks[:5]] == ["prefill", "decode", "prefill", "decode", "full_kv"]
    st = settings()
    calls = []
    with pytest.raises(eb.Interrupted):
        eb.run_sweep(path, st, tasks, fake_measure(calls, fail_at=tasks[1].key, raise_at=tasks[3].key),
                     part={"argv": []}, header={}, log=lambda m: None)
    sweep = json.load(open(path))  # whole after the interruption
    assert [e["key"] for e in sweep["measurements"]] == [t.key for t in tasks[:3]]
    assert "out of memory" in sweep["measurements"][1]["error"]
    assert sweep["parts"][0]["stopped"].startswith("interrupted")
    assert not [p for p in tmp_path.iterdir() if p.name != "s.json"]

    calls = []
    eb.run_sweep(path, st, tasks, fake_measure(calls), part={"argv": []}, header={}, log=lambda m: None)
    assert calls == [t.key for t in tasks[3:]]  # the failed one is kept, not retried
    calls = []
    sweep = eb.run_sweep(path, st, tasks, fake_measure(calls), part={"argv": []}, header={}, retry_failed=True,
                         log=lambda m: None)
    assert calls == [tasks[1].key]
    assert sorted(e["key"] for e in sweep["measurements"]) == sorted(t.key for t in tasks)
    assert len(sweep["parts"]) == 3 and all("error" not in e for e in sweep["measurements"])

    with pytest.raises(ValueError, match="another --name"):
        eb.run_sweep(path, settings(chunk=256), tasks, fake_measure([]), part={}, header={}, log=lambda m: None)
    with pytest.raises(ValueError, match="another --name"):  # compiler options are part of what was measured
        eb.run_sweep(path, settings(xla_options=(("xla_gpu_enable_triton_gemm", False),)), tasks,
                     fake_measure([]), part={}, header={}, log=lambda m: None)


def test_a_sweep_from_before_xla_options_resumes_only_without_them(tmp_path):
    path = tmp_path / "old.json"
    old = settings().to_dict()
    del old["xla_options"]
    path.write_text(json.dumps({"settings": old, "measurements": []}))
    assert eb.load_sweep(str(path), settings()) is not None
    with pytest.raises(ValueError, match="another --name"):
        eb.load_sweep(str(path), settings(xla_options=(("xla_gpu_enable_triton_gemm", False),)))
    args = eb.build_parser().parse_args(TINY_ARGS + ["--xla-option", "xla_gpu_enable_triton_gemm=false",
                                                     "--xla-option", "xla_gpu_gemm_rewrite_size_threshold=64"])
    st = eb.settings_from_args(args, "ragged")
    assert st.to_dict()["xla_options"] == {"xla_gpu_enable_triton_gemm": False,
                                           "xla_gpu_gemm_rewrite_size_threshold": 64}


def test_sweep_stops_before_a_measurement_that_would_overrun_the_budget(tmp_path):
    path = str(tmp_path / "s.json")
    tasks = eb.plan_tasks(["full"], ["none"], [1000, 4000], ["prefill"])
    calls = []
    sweep = eb.run_sweep(path, settings(), tasks, fake_measure(calls), part={}, header={}, time_budget_s=50,
                         first_estimate_s=10, log=lambda m: None)
    assert calls == [t.key for t in tasks]  # 10 s first, then 16x the first's (instant) wall time: both fit
    calls = []
    sweep = eb.run_sweep(str(tmp_path / "t.json"), settings(), tasks, fake_measure(calls), part={}, header={},
                         time_budget_s=5, first_estimate_s=10, log=lambda m: None)
    assert calls == [] and "time budget" in sweep["parts"][-1]["stopped"]


def test_estimate_scales_prefill_quadratically_and_decode_linearly():
    done = [{"kind": "prefill", "context": 10000, "wall_s": 4.0}, {"kind": "decode", "context": 10000, "wall_s": 3.0}]
    assert eb.estimate_s(eb.Task("prefill", "full", "fp8", 20000), done, 99) == pytest.approx(16.0)
    assert eb.estimate_s(eb.Task("decode", "full", "fp8", 20000), done, 99) == pytest.approx(6.0)
    assert eb.estimate_s(eb.Task("prefill", "full", "fp8", 10000), done, 99) == pytest.approx(4.0)
    assert eb.estimate_s(eb.Task("full_kv", "full", "fp8", 60000), done, 99) == 99
    # Making params and compiling do not grow with the context: only the rest of the wall is scaled.
    with_fixed = [{"kind": "prefill", "context": 10000, "wall_s": 30.0, "params_made_s": 20.0, "compile_s": 6.0}]
    assert eb.estimate_s(eb.Task("prefill", "full", "fp8", 30000), with_fixed, 99) == pytest.approx(26.0 + 4.0 * 9)


# ------------------------------------------------------------------------------------------------- the table
def test_markdown_rows_put_ours_beside_the_papers():
    rng = np.random.default_rng(3)
    measurements = []
    ours = {}
    for schedule in ("full", "searched-1/4", "uniform-1/2"):
        for c in (10000, 60000, 12345):
            pre, tok = float(rng.uniform(1, 20)), float(rng.uniform(10, 90))
            ours[schedule, c] = (pre, tok)
            measurements.append({"kind": "prefill", "schedule": schedule, "indexer_quant": "fp8", "context": c,
                                 "prefill_s": pre, "mfu": 0.2, "middle_chunk": {"indexer_share": 0.4}})
            measurements.append({"kind": "decode", "schedule": schedule, "indexer_quant": "fp8", "context": c,
                                 "batch": 1, "tok_s_per_row_gpu": tok, "tok_s_per_row_host": tok / 2,
                                 "tok_s_host": tok / 2, "tok_s_gpu": tok})
    sweep = {"settings": settings().to_dict(), "parts": [{"environment": {"device": "NVIDIA H200"}}],
             "measurements": measurements}
    rows = {(r["context"], r["schedule"]): r for r in eb.table_rows(sweep)}
    assert len(rows) == 9
    r = rows[60000, "searched-1/4"]
    assert r["paper_prefill_s"] == 2.59 and r["paper_decode_tok_s"] == 89.5
    assert r["prefill_speedup"] == pytest.approx(ours["full", 60000][0] / ours["searched-1/4", 60000][0])
    assert r["decode_speedup"] == pytest.approx(ours["searched-1/4", 60000][1] / ours["full", 60000][1])
    assert r["paper_prefill_speedup"] == pytest.approx(3.38 / 2.59)
    assert rows[10000, "full"]["paper_indexer_share"] == 0.27
    assert rows[12345, "full"]["paper_prefill_s"] is None and rows[10000, "uniform-1/2"]["paper_prefill_s"] is None
    table = eb.markdown_table(sweep)
    assert "NVIDIA H200" in table
    line = next(x for x in table.splitlines() if x.startswith("| 60000 | IndexCache 1/4 (searched)"))
    assert f"| {ours['searched-1/4', 60000][0]:.3f} | 2.59 |" in line and "| 89.5 |" in line
    assert len([x for x in table.splitlines() if x.startswith("| ") and x[2].isdigit()]) == 9


# -------------------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("args,problem", [
    (["--schedules", "full,searched-1/3"], "searched-1/3"),
    (["--indexer-quant", "int8"], "int8"),
    (["--contexts", "300,250000"], "250000"),
    (["--preset-overrides", "[1]"], "JSON object"),
    (["--xla-option", "xla_gpu_enable_triton_gemm"], "NAME=VALUE"),
])
def test_bad_arguments_name_the_problem_and_write_nothing(tmp_path, capsys, args, problem):
    with pytest.raises(SystemExit) as exit_info:
        eb.main(TINY_ARGS + ["--results-dir", str(tmp_path), "--name", "bad"] + args)
    assert exit_info.value.code == 2
    assert problem in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unknown_schedule_is_a_value_error():
    with pytest.raises(ValueError, match="unknown schedule 'dense'"):
        eb.schedule_pattern("dense", 47)
    assert eb.schedule_pattern("searched-1/4", 47) == ic.SEARCHED_PATTERNS["glm47_flash_dsa_30b/1/4"]


def _bench_in_a_new_process(args):
    """`python -m indexcache_jax.e2e_bench ARGS` in a fresh process, as `indexcache-bench` runs: the sweep's
    compiled prefill and decode programs stay out of this long test session (after them, a later XLA:CPU compile
    in the same process crashed). -> stdout."""
    done = subprocess.run([sys.executable, "-m", "indexcache_jax.e2e_bench", *args], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_tiny_sweep_runs_end_to_end_on_cpu(tmp_path):
    """Prefill, decode and the full-KV decode of a 4-layer tiny model: host-clock numbers, GPU fields null with
    the profiler's error, and a markdown table; a second run measures nothing new. `--xla-option` reaches every
    measured compile: XLA's own dump option writes each program's HLO."""
    args = TINY_ARGS + ["--results-dir", str(tmp_path), "--name", "cpu", "--contexts", "200",
                        "--schedules", "uniform-1/2", "--indexer-quant", "none", "--full-kv-context", "200",
                        "--kv-memory-gb", "0.0002", "--hlo-dir", str(tmp_path / "hlo"),
                        "--xla-option", f"xla_dump_to={tmp_path / 'xla'}"]
    out = _bench_in_a_new_process(args)
    sweep = json.load(open(tmp_path / "cpu.json"))
    by_kind = {e["kind"]: e for e in sweep["measurements"]}
    assert set(by_kind) == {"prefill", "decode", "full_kv"}
    assert all("error" not in e for e in by_kind.values()), by_kind
    pre = by_kind["prefill"]
    assert pre["prefill_s"] > 0 and 0 < pre["mfu"] and pre["pattern"] == "FSFS"
    assert pre["middle_chunk"]["gpu_ms"] is None and "no GPU stream events" in pre["middle_chunk"]["gpu_error"]
    assert by_kind["decode"]["tok_s_per_row_host"] > 0 and by_kind["decode"]["profile"]["gpu_ms"] is None
    kv = by_kind["full_kv"]
    assert kv["batch"] == int(0.0002 * 2**30 // kv["cache_bytes_per_row"]) and kv["batch"] > 1
    assert pre["peak_device_bytes"] is None and "memory_stats" in pre["peak_device_bytes_note"]
    assert "| 200 | IndexCache 1/2 (uniform) | bf16 |" in out
    dumps = sorted(os.listdir(tmp_path / "hlo"))  # the batch-1 decode loop and the full-KV batch's
    assert dumps == sorted(f"decode_FSFS_b{b}_{by_kind['decode']['slots']}.hlo.txt" for b in (1, kv["batch"]))
    assert all(open(tmp_path / "hlo" / d).read().startswith("HloModule") for d in dumps)
    xla_dumps = os.listdir(tmp_path / "xla")
    for program in ("_prefill", "_decode_loop", "step"):  # the whole prefill, the decode loops, the profiled chunk
        assert any(f".jit_{program}." in d and d.endswith("after_optimizations.txt") for d in xla_dumps), program
    assert sweep["settings"]["xla_options"] == {"xla_dump_to": str(tmp_path / "xla")}
    _bench_in_a_new_process(args)
    assert len(json.load(open(tmp_path / "cpu.json"))["measurements"]) == 3
