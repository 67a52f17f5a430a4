"""Converter benchmark: peak host RSS and throughput on a synthetic multi-GB FP8 checkpoint in the real layout.

The checkpoint has DeepSeek-V3.2's per-layer geometry (hidden 7168, q_lora 1536, kv_lora 512, 64x128 indexer, experts
2048 x 7168, 128x128 FP8 blocks, `kv_a_proj_with_mqa` 576 rows) with fewer heads, experts and layers so that it is a
few GB: F8_E4M3 Linear weights with F32 `weight_scale_inv`, BF16 embeddings / norms / router / indexer
`weights_proj`, F32 correction bias and indexer `k_norm`, an MTP layer, `model.safetensors.index.json` and shards.
Shards are written, synced and dropped from the page cache (posix_fadvise DONTNEED) so the conversion reads from
disk. The conversion runs in a fresh child process that reports its peak RSS (VmHWM) and timings.

    python benchmarks/convert.py [--gb 4] [--workdir /tmp] [--dtype bfloat16] [--keep]

Writes benchmarks/results/convert.json (or $BENCH_RESULTS_DIR).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time

import numpy as np

DSV32_LAYER = dict(
    architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32", hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
    first_k_dense_replace=1, index_n_heads=64, index_head_dim=128, index_topk=2048, rms_norm_eps=1e-6,
    max_position_embeddings=163840, vocab_size=16384, num_nextn_predict_layers=1, tie_word_embeddings=False,
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}, rope_theta=10000,
    quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                         "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
)
BLOCK = 128


def layer_tensors(cfg: dict, layer: int, mtp: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes of one decoder layer (MoE unless `layer < first_k_dense_replace`)."""
    d, h, p = cfg["hidden_size"], cfg["num_attention_heads"], f"model.layers.{layer}."
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    out = [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,)),
           (p + "self_attn.q_a_proj.weight", (cfg["q_lora_rank"], d)),
           (p + "self_attn.q_a_layernorm.weight", (cfg["q_lora_rank"],)),
           (p + "self_attn.q_b_proj.weight", (h * qk, cfg["q_lora_rank"])),
           (p + "self_attn.kv_a_proj_with_mqa.weight", (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], d)),
           (p + "self_attn.kv_a_layernorm.weight", (cfg["kv_lora_rank"],)),
           (p + "self_attn.kv_b_proj.weight", (h * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]),
                                               cfg["kv_lora_rank"])),
           (p + "self_attn.o_proj.weight", (d, h * cfg["v_head_dim"])),
           (p + "self_attn.indexer.wq_b.weight", (cfg["index_n_heads"] * cfg["index_head_dim"], cfg["q_lora_rank"])),
           (p + "self_attn.indexer.wk.weight", (cfg["index_head_dim"], d)),
           (p + "self_attn.indexer.k_norm.weight", (cfg["index_head_dim"],)),
           (p + "self_attn.indexer.k_norm.bias", (cfg["index_head_dim"],)),
           (p + "self_attn.indexer.weights_proj.weight", (cfg["index_n_heads"], d))]
    if layer < cfg["first_k_dense_replace"]:
        i = cfg["intermediate_size"]
        out += [(p + "mlp.gate_proj.weight", (i, d)), (p + "mlp.up_proj.weight", (i, d)),
                (p + "mlp.down_proj.weight", (d, i))]
    else:
        i, e = cfg["moe_intermediate_size"], cfg["n_routed_experts"]
        out += [(p + "mlp.gate.weight", (e, d)), (p + "mlp.gate.e_score_correction_bias", (e,))]
        for x in range(e):
            out += [(f"{p}mlp.experts.{x}.gate_proj.weight", (i, d)), (f"{p}mlp.experts.{x}.up_proj.weight", (i, d)),
                    (f"{p}mlp.experts.{x}.down_proj.weight", (d, i))]
        si = i * cfg["n_shared_experts"]
        sp = p + "mlp.shared_experts."
        out += [(sp + "gate_proj.weight", (si, d)), (sp + "up_proj.weight", (si, d)), (sp + "down_proj.weight", (d, si))]
    if mtp:
        out += [(p + "enorm.weight", (d,)), (p + "hnorm.weight", (d,)), (p + "eh_proj.weight", (d, 2 * d)),
                (p + "shared_head.norm.weight", (d,))]
    return out


def checkpoint_tensors(cfg: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every tensor, in the real dtypes, scales right after their weights."""
    d, v, n = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    named = [("model.embed_tokens.weight", (v, d))]
    for layer in range(n + 1):
        named += layer_tensors(cfg, layer, mtp=layer == n)
    named += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    out = []
    for name, shape in named:
        bf16_2d = any(k in name for k in ("embed_tokens", "lm_head", "mlp.gate.weight", "weights_proj", "eh_proj"))
        if len(shape) == 2 and not bf16_2d:
            out += [(name, "F8_E4M3", shape),
                    (name + "_scale_inv", "F32", (math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK)))]
        elif "e_score_correction_bias" in name or "k_norm" in name:
            out.append((name, "F32", shape))
        else:
            out.append((name, "BF16", shape))
    return out


def _data(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> bytes:
    n = math.prod(shape)
    if dtype == "F8_E4M3":
        return (rng.integers(0, 256, n, dtype=np.uint8) & 0xFE).tobytes()  # clear the mantissa LSB: no NaN codes
    if dtype == "F32":
        return rng.uniform(1e-4, 1e-3, n).astype(np.float32).tobytes()
    return (rng.normal(0, 0.02, n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()  # BF16


def write_checkpoint(directory: str, cfg: dict, shard_bytes: int, seed: int = 0) -> int:
    """Writes the synthetic checkpoint; returns its size in bytes. Shards are synced and evicted from page cache."""
    itemsize = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    os.makedirs(directory)
    tensors = checkpoint_tensors(cfg)
    shards, current, size = [], [], 0
    for t in tensors:
        nbytes = math.prod(t[2]) * itemsize[t[1]]
        if current and size + nbytes > shard_bytes and not t[0].endswith("_scale_inv"):
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    shards.append(current)
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for s, shard in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in shard:
            nbytes = math.prod(shape) * itemsize[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(directory, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, dtype, shape in shard:
                f.write(_data(dtype, shape, rng))
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        total += 8 + len(raw) + offset
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return total


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(src: str, dst: str, dtype: str) -> None:
    """Runs one conversion in this (fresh) process and prints its measurements as JSON."""
    from checkpoints_convert.convert import plan_conversion
    from indexcache_jax.checkpoint import write_checkpoint as write_converted

    t0 = time.perf_counter()
    plan = plan_conversion(src, dtype=dtype)
    t1 = time.perf_counter()
    baseline = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    write_converted(dst, plan.cfg, plan.leaves())
    t2 = time.perf_counter()
    out_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs)
    print(json.dumps({
        "plan_s": t1 - t0, "stream_s": t2 - t1, "bytes_read": plan.total_bytes, "output_bytes_on_disk": out_bytes,
        "largest_leaf_bytes": plan.largest_leaf_bytes, "n_leaves": len(plan.shapes),
        "baseline_rss_bytes": baseline, "peak_rss_bytes": _status("VmHWM"),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=4.0, help="approximate checkpoint size")
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--shard-gb", type=float, default=0.5)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the output")
    ap.add_argument("--child", nargs=3, metavar=("SRC", "DST", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    cfg = dict(DSV32_LAYER)
    itemsize = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    per_moe_layer = sum(math.prod(shape) * itemsize[dtype]
                        for name, dtype, shape in checkpoint_tensors({**cfg, "num_hidden_layers": 2})
                        if name.startswith("model.layers.1."))
    cfg["num_hidden_layers"] = max(2, round(args.gb * 1e9 / per_moe_layer) - 1)  # minus the MTP layer's share
    root = os.path.join(args.workdir, f"indexcache_convert_bench_{os.getpid()}")
    src, dst = os.path.join(root, "hf"), os.path.join(root, "out")
    try:
        t = time.perf_counter()
        size = write_checkpoint(src, cfg, int(args.shard_gb * 1e9))
        print(f"wrote {size / 1e9:.2f} GB synthetic FP8 checkpoint ({cfg['num_hidden_layers']} layers + MTP) "
              f"in {time.perf_counter() - t:.0f} s", flush=True)
        load_before = os.getloadavg()
        proc = subprocess.run([sys.executable, __file__, "--child", src, dst, args.dtype], capture_output=True,
                              text=True, check=False)
        load_after = os.getloadavg()
        if proc.returncode:
            raise SystemExit(proc.stderr[-4000:])
        m = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    peak_over_base = m["peak_rss_bytes"] - m["baseline_rss_bytes"]
    result = {
        "checkpoint": {"bytes": size, "num_hidden_layers": cfg["num_hidden_layers"], "mtp_layers": 1,
                       "n_routed_experts": cfg["n_routed_experts"], "hidden_size": cfg["hidden_size"],
                       "format": "F8_E4M3 + F32 128x128 weight_scale_inv, BF16/F32 unquantized"},
        "dtype": args.dtype, **m,
        "read_gb_per_s": m["bytes_read"] / m["stream_s"] / 1e9,
        "write_gb_per_s": m["output_bytes_on_disk"] / m["stream_s"] / 1e9,
        "peak_rss_over_baseline_bytes": peak_over_base,
        "peak_over_baseline_per_largest_leaf": peak_over_base / m["largest_leaf_bytes"],
        "host": {"cpu_count": os.cpu_count(), "cpu": _cpu_model(),
                 "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                 "loadavg_1min_before_after": [load_before[0], load_after[0]]},
        "versions": {"orbax_checkpoint": _version("orbax-checkpoint"), "ml_dtypes": _version("ml_dtypes")},
    }
    from indexcache_jax.profiling import write_result_json

    path = write_result_json("convert", result)
    print(json.dumps(result, indent=2))
    print(f"-> {path}")


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()
