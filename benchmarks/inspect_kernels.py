"""Offline read of the Pallas Triton kernels' compiled output for Hopper (sm_90a), on a CPU-only machine.

Answers "are the matrix instructions there (wgmma on Hopper), and do the loads vectorize?" without a GPU:
  1. trace + lower the jitted kernel wrapper for the cuda platform (`.lower(lowering_platforms=("cuda",))`);
     the Pallas Triton lowering (`jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module`) is wrapped to
     capture the Triton module (TTIR) it builds;
  2. compile that TTIR with the standalone `triton` package for GPUTarget("cuda", 90, 32) with the kernel's
     num_warps / num_stages, keeping the TTGIR and the PTX;
  3. count instructions in TTGIR/PTX and run the bundled `ptxas -v -arch=sm_90a` for registers and spills.

This is a PROXY: the standalone triton (pip `triton`, not a project dependency) is not the Triton that jaxlib
0.11.2 uses on the GPU machine, and jaxlib may pass other compile options. Needs `pip install triton==3.6.0`.

    python benchmarks/inspect_kernels.py            # writes benchmarks/results/inspect_kernels.json
    python benchmarks/inspect_kernels.py --keep DIR  # also keeps the .ttir / .ttgir / .ptx files in DIR
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src.pallas.triton import lowering as _tl  # noqa: E402
from jax._src.pallas.triton import pallas_call_registration as _reg  # noqa: E402

import importlib  # noqa: E402

IDX = importlib.import_module("pallas_kernels.indexer")
SMLA = importlib.import_module("pallas_kernels.sparse_mla")  # the package re-exports a function of that name

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "inspect_kernels.json")

# ---- 1. capture the Triton module of each pallas_call -------------------------------------------------------
_CAPTURED: list[str] = []
_orig_lower = _tl.lower_jaxpr_to_triton_module


def _capturing_lower(*args, **kwargs):
    res = _orig_lower(*args, **kwargs)
    _CAPTURED.append(res.module.operation.get_asm(enable_debug_info=False))
    return res


_tl.lower_jaxpr_to_triton_module = _capturing_lower
_reg.lowering.lower_jaxpr_to_triton_module = _capturing_lower


def lower_to_ttir(fn, *avals) -> str:
    """Lowers jit(fn) for cuda on this (CPU) host; returns the single Triton module it contains."""
    _CAPTURED.clear()
    jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",))
    if len(_CAPTURED) != 1:
        raise RuntimeError(f"expected one pallas_call, captured {len(_CAPTURED)}")
    return _CAPTURED[0]


# ---- 2. compile with standalone triton ----------------------------------------------------------------------
def compile_ttir(ttir: str, num_warps: int, num_stages: int, workdir: str, tag: str):
    import triton
    from triton.backends.compiler import GPUTarget

    path = os.path.join(workdir, f"{tag}.ttir")
    with open(path, "w") as f:
        f.write(ttir)
    k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
    for ext, text in (("ttgir", ttgir), ("ptx", ptx)):
        with open(os.path.join(workdir, f"{tag}.{ext}"), "w") as f:
            f.write(text)
    return k, ttgir, ptx


def ptxas_stats(ptx_path: str) -> dict:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    r = subprocess.run([ptxas, "-v", "-arch=sm_90a", ptx_path, "-o", os.devnull], capture_output=True, text=True)
    text = r.stdout + r.stderr
    out = {"returncode": r.returncode, "lines": [l.strip() for l in text.splitlines() if l.strip()]}
    m = re.search(r"Used (\d+) registers", text)
    out["registers"] = int(m.group(1)) if m else None
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if m:
        out["stack_frame_bytes"], out["spill_store_bytes"], out["spill_load_bytes"] = map(int, m.groups())
    return out


# ---- 3. count ------------------------------------------------------------------------------------------------
def _n(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text, flags=re.M))


def analyse(ttir: str, ttgir: str, ptx: str, kernel) -> dict:
    wgmma_variants = collections.Counter(re.findall(r"wgmma\.mma_async\.sync\.aligned\.[\w.]+", ptx))
    mma_variants = collections.Counter(re.findall(r"\bmma\.sync\.aligned\.[\w.]+", ptx))
    cp_re = r"cp\.async\.c[ag]\.shared\.global\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)"
    cp_async_sizes = collections.Counter(int(x, 0) for x in re.findall(cp_re, ptx))
    ld_global = re.findall(r"^\s*(?:@%p\d+\s+)?ld\.global[\w.]*", ptx, flags=re.M)
    ld_global_kinds = collections.Counter(re.sub(r"^\s*(?:@%p\d+\s+)?", "", s) for s in ld_global)
    st_global = re.findall(r"^\s*(?:@%p\d+\s+)?st\.global[\w.]*", ptx, flags=re.M)
    st_global_kinds = collections.Counter(re.sub(r"^\s*(?:@%p\d+\s+)?", "", s) for s in st_global)
    imprecise = sorted(set(re.findall(r"maxNumImpreciseAcc = (\d+)", ttir))) or ["0 (attribute absent: default 0)"]
    return {
        "ttir_lines": ttir.count("\n"),
        "ttgir_lines": ttgir.count("\n"),
        "ptx_lines": ptx.count("\n"),
        "ttir": {
            "tt.dot": _n(r"\btt\.dot\b", ttir),
            "tt.load": _n(r"\btt\.load\b", ttir),
            "tt.store": _n(r"\btt\.store\b", ttir),
            "maxNumImpreciseAcc": imprecise,
            "input_precision": sorted(set(re.findall(r"inputPrecision = (\w+)", ttir))),
        },
        "ttgir": {
            "mma_layout": sorted(set(re.findall(r"#ttg\.nvidia_mma<\{versionMajor = (\d+)", ttgir))),
            "warp_group_dot": _n(r"\bttng\.warp_group_dot\b", ttgir),
            "warp_group_dot_wait": _n(r"\bttng\.warp_group_dot_wait\b", ttgir),
            "tt.dot (not converted to wgmma)": _n(r"\btt\.dot\b", ttgir),
            "async_copy_global_to_local": _n(r"\bttg\.async_copy_global_to_local\b", ttgir),
            "tma_copy": _n(r"\bttng\.async_tma_copy", ttgir),
            "local_alloc": _n(r"\bttg\.local_alloc\b", ttgir),
            "convert_layout": _n(r"\bttg\.convert_layout\b", ttgir),
            "tt.load (register loads)": _n(r"\btt\.load\b", ttgir),
        },
        "ptx": {
            "wgmma.mma_async": sum(wgmma_variants.values()),
            "wgmma_variants": dict(wgmma_variants),
            "wgmma.fence": _n(r"\bwgmma\.fence", ptx),
            "wgmma.commit_group": _n(r"\bwgmma\.commit_group", ptx),
            "wgmma.wait_group": _n(r"\bwgmma\.wait_group", ptx),
            "mma.sync": sum(mma_variants.values()),
            "mma_sync_variants": dict(mma_variants),
            "cp.async (global->shared)": sum(cp_async_sizes.values()),
            "cp.async_bytes_per_instr": dict(cp_async_sizes),
            "cp.async.bulk.tensor (TMA)": _n(r"\bcp\.async\.bulk\.tensor", ptx),
            "ld.global": len(ld_global),
            "ld.global_kinds": dict(ld_global_kinds),
            "ld.global.v4": sum(v for k, v in ld_global_kinds.items() if ".v4" in k),
            "st.global": len(st_global),
            "st.global_kinds": dict(st_global_kinds),
            "st.global.v4": sum(v for k, v in st_global_kinds.items() if ".v4" in k),
            "ldmatrix": _n(r"\bldmatrix\.", ptx),
            "stmatrix": _n(r"\bstmatrix\.", ptx),
            "ld.shared": _n(r"\bld\.shared", ptx),
            "st.shared": _n(r"\bst\.shared", ptx),
            "ld.local": _n(r"\bld\.local", ptx),
            "st.local": _n(r"\bst\.local", ptx),
            "bar.sync": _n(r"\bbar\.sync\b", ptx),
            "cvt from e4m3 (fp8 upcast)": _n(r"\bcvt\.[\w.]*e4m3", ptx),
            "add.f32 (incl. .rn)": _n(r"\badd(?:\.rn)?\.f32\b", ptx),
            "fma.rn.f32": _n(r"\bfma\.rn\.f32\b", ptx),
        },
        "shared_mem_bytes": int(kernel.metadata.shared),
        "num_warps": int(kernel.metadata.num_warps),
        "num_stages": int(kernel.metadata.num_stages),
    }


# ---- the kernels --------------------------------------------------------------------------------------------
def indexer_case(dtype_name: str, h: int, b=1, t=4096, s=131072, d=128, config=None):
    dt = {"bf16": jnp.bfloat16, "fp8": jnp.float8_e4m3fn}[dtype_name]
    f32 = jnp.float32
    q = jax.ShapeDtypeStruct((b, t, h, d), dt)
    k = jax.ShapeDtypeStruct((b, s, d), dt)
    w = jax.ShapeDtypeStruct((b, t, h), f32)
    cfg = IDX._default_config(config)
    if dtype_name == "fp8":
        qs = jax.ShapeDtypeStruct((b, t, h), f32)
        ks = jax.ShapeDtypeStruct((b, s), f32)
        fn = lambda q, k, w, qs, ks: IDX._indexer_logits_impl(  # noqa: E731
            q, k, w, None, None, qs, ks, num_keys=s, interpret=False, config=config)
        ttir = lower_to_ttir(fn, q, k, w, qs, ks)
    else:
        fn = lambda q, k, w: IDX._indexer_logits_impl(q, k, w, None, None, None, None, num_keys=s,  # noqa: E731
                                                      interpret=False, config=config)
        ttir = lower_to_ttir(fn, q, k, w)
    g = IDX._geometry(t, s, h, d, cfg)
    meta = {"kernel": "indexer_logits", "dtype": dtype_name, "h": h, "shape_b_t_s_h_d": [b, t, s, h, d],
            "default_config": config is None,
            "config": dataclasses.asdict(cfg),
            "tile": {"queries_per_program": g.bq, "head_rows": g.bq * g.hp, "block_k": g.bk, "inner": g.inner,
                     "mma": f"[{g.bk} keys, {g.dp}] x [{g.dp}, {g.bq * g.hp}]" if cfg.kv_major else None}}
    return meta, ttir, cfg.num_warps, cfg.num_stages


def sparse_mla_case(h: int = 64, b=1, t=256, s=65536, topk=2048):
    cfg = SMLA.SparseMLAConfig()
    q = jax.ShapeDtypeStruct((b, t, h, 576), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, s, 576), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((b, t, topk), jnp.int32)
    fn = lambda q, kv, i: SMLA.sparse_mla_with_config(q, kv, i, sm_scale=0.04, v_dim=512, interpret=False,  # noqa: E731
                                                      config=cfg)
    ttir = lower_to_ttir(fn, q, kv, idx)
    meta = {"kernel": "sparse_mla", "dtype": "bf16", "h": h, "shape_b_t_s_h_dqk_k": [b, t, s, h, 576, topk],
            "config": dataclasses.asdict(cfg)}
    return meta, ttir, cfg.num_warps, cfg.num_stages


def environment() -> dict:
    import jaxlib
    import triton

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": "CPU only (no GPU): lowered with lowering_platforms=('cuda',), compiled offline",
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "triton_standalone": triton.__version__,
        "python": platform.python_version(),
        "target": "GPUTarget('cuda', 90, 32) -> PTX for sm_90a; ptxas -v -arch=sm_90a (triton's bundled ptxas)",
        "proxy_note": ("standalone pip triton compiles the TTIR that jax's Pallas Triton lowering emits; this is "
                       "not the Triton inside jaxlib 0.11.2 used on the H100 runs, so instruction selection may "
                       "differ there"),
    }


def markdown_table(path: str = RESULTS) -> str:
    """The BENCHMARKS.md table, built only from the JSON."""
    d = json.load(open(path))
    rows = ["| kernel | config (warps/stages) | MMA in PTX | wgmma / mma.sync | global->shared loads | "
            "other global loads | TMA | ptxas regs | spills (st/ld bytes) | shared mem | PTX lines |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for tag, k in d["kernels"].items():
        if "error" in k:
            rows.append(f"| {tag} | error: {k['error'][:80]} |" + " |" * 9)
            continue
        pt, pa = k["ptx"], k["ptxas"]
        mma = ", ".join(f"{v}x `{n.split('.aligned.')[1]}`"
                        for n, v in {**pt["wgmma_variants"], **pt["mma_sync_variants"]}.items())
        cp = ", ".join(f"{v}x cp.async {b} B" for b, v in pt["cp.async_bytes_per_instr"].items())
        lg = ", ".join(f"{v}x {n.replace('ld.global.', '')}" for n, v in pt["ld.global_kinds"].items())
        rows.append(f"| {tag} | {k['num_warps']}/{k['num_stages']} | {mma} | {pt['wgmma.mma_async']} / "
                    f"{pt['mma.sync']} | {cp} | {lg} | {pt['cp.async.bulk.tensor (TMA)']} | {pa['registers']} | "
                    f"{pa.get('spill_store_bytes')}/{pa.get('spill_load_bytes')} | {k['shared_mem_bytes']} | "
                    f"{k['ptx_lines']} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", default=None, help="directory to keep the .ttir/.ttgir/.ptx files in")
    p.add_argument("--no-sparse-mla", action="store_true")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--markdown", action="store_true", help="only print the BENCHMARKS.md table from --out")
    args = p.parse_args()
    if args.markdown:
        print(markdown_table(args.out))
        return

    cases = [("indexer_bf16_h32", lambda: indexer_case("bf16", 32)),
             ("indexer_bf16_h64", lambda: indexer_case("bf16", 64)),
             ("indexer_fp8_h32", lambda: indexer_case("fp8", 32)),
             ("indexer_fp8_h64", lambda: indexer_case("fp8", 64)),
             # the FP8 alternative the benchmark also times: e4m3 tiles upcast to bf16 for the bf16 MMA
             ("variant_indexer_fp8_h64_upcast_bf16",
              lambda: indexer_case("fp8", 64, config=IDX.LogitsConfig(num_warps=4, fp8_mma=False)))]
    if not args.no_sparse_mla:
        cases.append(("sparse_mla_bf16_h64", lambda: sparse_mla_case(64)))

    workdir = args.keep or tempfile.mkdtemp(prefix="inspect_kernels_")
    os.makedirs(workdir, exist_ok=True)
    kernels = {}
    for tag, make in cases:
        try:
            meta, ttir, nw, ns = make()
            k, ttgir, ptx = compile_ttir(ttir, nw, ns, workdir, tag)
            row = {**meta, **analyse(ttir, ttgir, ptx, k),
                   "ptxas": ptxas_stats(os.path.join(workdir, f"{tag}.ptx"))}
        except Exception as e:  # record the failure, keep going
            row = {"error": f"{type(e).__name__}: {e}"[:2000]}
        kernels[tag] = row
        pt = row.get("ptx", {})
        print(f"{tag}: wgmma={pt.get('wgmma.mma_async')} mma.sync={pt.get('mma.sync')} "
              f"cp.async={pt.get('cp.async (global->shared)')} ld.global.v4={pt.get('ld.global.v4')} "
              f"local={pt.get('ld.local')}/{pt.get('st.local')} smem={row.get('shared_mem_bytes')} "
              f"regs={row.get('ptxas', {}).get('registers')} err={row.get('error')}", flush=True)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"environment": environment(), "kernels": kernels}, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
