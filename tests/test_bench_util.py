"""The GPU-time helpers the kernel benchmarks judge their targets on, and the kernel categoriser
(`indexcache_jax.profiling`)."""

import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from indexcache_jax import profiling
from indexcache_jax.profiling import (COARSE_CATEGORIES, COARSE_CATEGORY, CATEGORIES, categorize,
                                      coarse_categories, device_time_ms, gpu_kernel_launches, gpu_kernel_scopes,
                                      gpu_kernel_times, indexer_share, top_kernels, write_json_atomic)


def _event(name, start, duration):
    return SimpleNamespace(name=name, start_ns=float(start), duration_ns=float(duration))


def test_gpu_kernel_times_sums_stream_events_only():
    """Per-name totals and the span over random events, against a brute-force count of the stream lines alone."""
    rng = np.random.default_rng(91)
    names = ["body_mosaic_gpu_kernel", "loop_reduce_fusion", "gemm"]
    streams, planes = [], []
    for gpu in range(2):
        lines = []
        for s in range(2):
            starts = np.sort(rng.uniform(0, 1e6, 20))
            events = [_event(names[rng.integers(3)], t, rng.uniform(1e3, 5e4)) for t in starts]
            streams.append(events)
            lines.append(SimpleNamespace(name=f"Stream #{s}(Compute)", events=events))
        # Summary lines repeat the same work and must not be counted again.
        lines.append(SimpleNamespace(name="XLA Ops", events=[_event("gemm", 0.0, 9e9)]))
        planes.append(SimpleNamespace(name=f"/device:GPU:{gpu}", lines=lines))
    host = SimpleNamespace(name="/host:CPU", lines=[SimpleNamespace(name="Stream #0", events=[_event("gemm", 0, 1e9)])])
    per_kernel, span = gpu_kernel_times(SimpleNamespace(planes=[host, *planes]))

    all_events = [e for events in streams for e in events]
    for name in names:
        expected = sum(e.duration_ns for e in all_events if e.name == name)
        assert per_kernel.get(name, 0.0) == pytest.approx(expected)
    assert set(per_kernel) <= set(names)
    first = min(e.start_ns for e in all_events)
    last = max(e.start_ns + e.duration_ns for e in all_events)
    assert span == pytest.approx(last - first)
    launches = gpu_kernel_launches(SimpleNamespace(planes=[host, *planes]))
    assert dict(launches) == {name: sum(e.name == name for e in all_events) for name in names if
                              any(e.name == name for e in all_events)}


def test_gpu_kernel_times_of_a_trace_without_gpu():
    assert gpu_kernel_times(SimpleNamespace(planes=[SimpleNamespace(name="/host:CPU", lines=[])])) == ({}, 0.0)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error a GPU-less backend gives")
def test_device_time_ms_refuses_a_backend_without_gpu_streams():
    """On CPU the profiler records no GPU kernels: a clear error, not a time of zero."""
    fn = jax.jit(lambda x: x @ x)
    x = jax.random.normal(jax.random.key(0), (64, 64))
    with pytest.raises(RuntimeError, match="no GPU stream events"):
        device_time_ms(fn, [(x,)], iters=2, reps=1)


def test_gpu_kernel_scopes_keeps_each_kernels_first_string_stats():
    """The first stream event of each kernel name gives its string stats (the name stack); numbers are dropped and
    host planes and summary lines are ignored."""
    def ev(name, stats):
        return SimpleNamespace(name=name, start_ns=0.0, duration_ns=1.0, stats=stats)

    lines = [SimpleNamespace(name="Stream #7(Compute)", events=[
        ev("input_reduce_fusion_12", [("tf_op", "jit(step)/while/body/full/mlp_norm/reduce_sum"), ("flops", 7)]),
        ev("input_reduce_fusion_12", [("tf_op", "a later, different scope")]),
        ev("_split_count_kernel", [("tf_op", "jit(step)/topk"), ("hlo_op", "custom-call.3")])]),
        SimpleNamespace(name="XLA Ops", events=[ev("gemm", [("tf_op", "summary")])])]
    host = SimpleNamespace(name="/host:CPU", lines=[SimpleNamespace(name="Stream #0", events=[ev("h", [("x", "y")])])])
    scopes = gpu_kernel_scopes(SimpleNamespace(planes=[host, SimpleNamespace(name="/device:GPU:0", lines=lines)]))
    assert scopes == {"input_reduce_fusion_12": "tf_op=jit(step)/while/body/full/mlp_norm/reduce_sum",
                      "_split_count_kernel": "tf_op=jit(step)/topk | hlo_op=custom-call.3"}


def test_categorize_sorts_kernels_by_name_then_scope_and_coarse_sums_them():
    """Each kernel lands in one fine category (its name first, then its name stack); the coarse categories of the
    issue sum the fine ones, and the totals are kept."""
    rng = np.random.default_rng(5)
    kernels = {"_logits_kernel_fp8": "tf_op=jit(p)/indexer/logits", "_split_count_kernel": "tf_op=jit(p)/topk",
               "sparse_mla_fwd": "", "body_mosaic_gpu_kernel": "", "memcpy32_post": "",
               "input_fusion_3": "tf_op=jit(p)/segment_1/full/indexer/wk/dot_general",
               "loop_fusion_9": "tf_op=jit(p)/segment_1/full/mla/wq_a", "nvjet_tst_128": "tf_op=jit(p)/lm_head/dot",
               "fusion_17": "tf_op=jit(p)/segment_0/full/attn_norm/reduce", "gemm_77": "tf_op=jit(p)/unknown",
               "mystery": "tf_op=jit(p)/unknown"}
    ms = {k: float(rng.uniform(0.1, 3.0)) for k in kernels}
    fine = categorize(ms, kernels)
    assert set(fine) == set(CATEGORIES)
    assert fine["indexer logits"] == pytest.approx(ms["_logits_kernel_fp8"])
    assert fine["top-k"] == pytest.approx(ms["_split_count_kernel"])
    assert fine["indexer (projections, rope, quant)"] == pytest.approx(ms["input_fusion_3"])
    assert fine["attention projections (MLA)"] == pytest.approx(ms["loop_fusion_9"])
    assert fine["dense matmuls"] == pytest.approx(ms["gemm_77"])
    assert fine["other"] == pytest.approx(ms["mystery"])
    assert sum(fine.values()) == pytest.approx(sum(ms.values()))
    coarse = coarse_categories(fine)
    assert tuple(coarse) == COARSE_CATEGORIES and set(COARSE_CATEGORY) == set(CATEGORIES)
    assert sum(coarse.values()) == pytest.approx(sum(ms.values()))
    assert coarse["copies"] == pytest.approx(ms["memcpy32_post"])
    indexer = ms["_logits_kernel_fp8"] + ms["_split_count_kernel"] + ms["input_fusion_3"]
    assert indexer_share(fine) == pytest.approx(indexer / sum(ms.values()))
    top = top_kernels(ms, kernels, n=3)
    assert [row[1] for row in top] == sorted(ms.values(), reverse=True)[:3]


def test_write_json_atomic_leaves_the_old_file_when_serialising_fails(tmp_path):
    """A payload that cannot be written leaves the previous file whole and no temporary file behind."""
    path = str(tmp_path / "r.json")
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert open(path).read().replace(" ", "").replace("\n", "") == '{"a":1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_hlo_kernel_scopes_of_a_handwritten_module():
    """Fusion kernels take their own op_name, or their fused computation's root's; dots become underscores; the
    instructions inside a fused computation are not kernels, and one without metadata is left out."""
    text = "\n".join([
        'HloModule jit_step',
        '%fused_computation.3 (param_0: f32[8]) -> f32[] {',
        '  %param_0 = f32[8]{0} parameter(0)',
        '  ROOT %reduce.1 = f32[] reduce(%param_0, %c), dimensions={0}, to_apply=%add, '
        'metadata={op_name="jit(step)/while/body/DSAModel/final_norm/reduce_sum" stack_frame_id=3}',
        '}',
        'ENTRY %main (x: f32[8]) -> f32[] {',
        '  %input_reduce_fusion.12 = f32[] fusion(%x), kind=kInput, calls=%fused_computation.3',
        '  %loop_multiply_fusion.4 = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_computation.9, '
        'metadata={op_name="jit(step)/while/body/DSAModel/full/indexer.queries/mul" stack_frame_id=5}',
        '  ROOT %copy.1 = f32[8]{0} copy(%x)',
        '}'])
    assert profiling.hlo_kernel_scopes(text) == {
        "input_reduce_fusion_12": "jit(step)/while/body/DSAModel/final_norm/reduce_sum",
        "loop_multiply_fusion_4": "jit(step)/while/body/DSAModel/full/indexer.queries/mul"}
    assert profiling.category("input_reduce_fusion_12", "jit(step)/DSAModel/final_norm/reduce_sum") == "norms"
    assert profiling.category("loop_multiply_fusion_4",
                              "jit(step)/full/indexer.queries/mul") == "indexer (projections, rope, quant)"


def test_materialised_slices_counts_loop_fusions_not_kernel_fusions():
    """Modelled on the 47-layer decode loop's GPU HLO: a loop-indexed slice that an async loop fusion writes out is
    a copy (its bytes from the shape by hand: 2 x 64 x 2048 x 1536 bf16 = 805306368); the same slice inside a
    kernel's custom fusion is an address; a slice without `dynamic_slice_config` is not indexed by a loop."""
    config = 'backend_config={"dynamic_slice_config":{"byte_offset":"0","byte_stride":"805306368","loop_index":"0"}}'
    text = "\n".join([
        'HloModule jit__decode_loop',
        '%fused_dynamic_slice.1 (param_0: bf16[2,2,64,2048,1536], param_1: s32[]) -> bf16[1,2,64,2048,1536] {',
        '  %param_0 = bf16[2,2,64,2048,1536]{4,3,2,1,0} parameter(0)',
        '  ROOT %dynamic_slice.13 = bf16[1,2,64,2048,1536]{4,3,2,1,0} dynamic-slice(%param_0, %param_1, %c, %c, %c, '
        f'%c), dynamic_slice_sizes={{1,2,64,2048,1536}}, {config}',
        '}',
        '%dynamic-slice-fusion (p0: bf16[46,64,2048,1536], p1: s32[]) -> bf16[256,1536] {',
        f'  ROOT %dynamic_slice.9 = bf16[1,64,2048,1536]{{3,2,1,0}} dynamic-slice(%p0, %p1, %c, %c, %c), {config}',
        '}',
        '%fused_slice (param_0: f32[8,4]) -> f32[1,4] {',
        '  ROOT %dynamic-slice.2 = f32[1,4]{1,0} dynamic-slice(%param_0, %i, %c), dynamic_slice_sizes={1,4}',
        '}',
        'ENTRY %main (w: bf16[2,2,64,2048,1536]) -> bf16[1,2,64,2048,1536] {',
        '  %fusion-start = ((bf16[2,2,64,2048,1536]{4,3,2,1,0}, s32[]), bf16[1,2,64,2048,1536]{4,3,2,1,0}, u32[]) '
        'fusion-start(%w, %g), kind=kLoop, calls=%fused_dynamic_slice.1',
        '  %dynamic_slice_fusion = bf16[256,1536]{1,0} fusion(%v, %g), kind=kCustom, calls=%dynamic-slice-fusion',
        '  %loop_dynamic_slice_fusion = f32[1,4]{1,0} fusion(%x, %i), kind=kLoop, calls=%fused_slice',
        '  ROOT %fusion-done = bf16[1,2,64,2048,1536]{4,3,2,1,0} fusion-done(%fusion-start)',
        '}'])
    assert profiling.materialised_slices(text) == {
        "count": 1, "bytes": 805306368, "largest": [["bf16[1,2,64,2048,1536]", 805306368]]}


def test_hlo_kernel_scopes_of_a_compiled_function():
    """On a real compiled module (this backend's fusions): every fusion of the named scope maps into it."""
    def f(x, w):
        with jax.named_scope("mlp_norm"):
            y = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True))
        return jnp.argmax(y @ w, -1)

    rng = np.random.default_rng(5)
    x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((4, 64), (64, 32)))
    text = jax.jit(f).lower(x, w).compile().as_text()
    scopes = profiling.hlo_kernel_scopes(text)
    fusions = {k: v for k, v in scopes.items() if "fusion" in k}
    assert fusions and any("/mlp_norm/" in v for v in fusions.values())
    assert all(v.startswith("jit(f)/") for v in scopes.values())


def test_xla_options_parse_to_the_types_xla_wants():
    got = profiling.parse_xla_options(["xla_gpu_enable_triton_gemm=false", "xla_gpu_enable_dynamic_slice_fusion=True",
                                       "xla_gpu_gemm_rewrite_size_threshold=128", "xla_some_ratio=0.5",
                                       "xla_disable_hlo_passes=a,b=c"])
    assert got == {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_dynamic_slice_fusion": True,
                   "xla_gpu_gemm_rewrite_size_threshold": 128, "xla_some_ratio": 0.5,
                   "xla_disable_hlo_passes": "a,b=c"}
    assert [type(v) for v in got.values()] == [bool, bool, int, float, str]
    for bad in ("xla_gpu_enable_triton_gemm", "=1"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            profiling.parse_xla_options([bad])
