"""One training step of the embedded model's `default` preset (8 x 4096 tokens, bf16 compute): the dense stage
with cuDNN's flash attention against the XLA attention, and the sparse stage, by GPU time.

Each stage's step is jitted as `indexcache_jax.train` runs it (donated params and optimizer state, lr 0, so the
params do not drift between samples). Printed and written to `train_step.json`: GPU ms per step from the profiler's
kernel records (`profiling.device_time_ms`) with the host clock beside it, the cuDNN / XLA ratio, tokens per second,
the top kernels, the first step's loss (cuDNN and XLA attention must agree on it), and the model FLOPs per step over
the same run's bf16 matmul ceiling (MFU). FLOPs: 6 x the active matmul parameters (MoE: the shared expert and top-k
routed experts) x tokens, plus causal attention in absorbed MLA form (fwd QK^T and PV over T^2/2 pairs, backward
twice the forward); the indexer KL and the LM head are counted, the router and norms are not.

Run on a GPU: `python benchmarks/train_step.py` (about 2 minutes on an H100). `--smoke` runs a 2-layer cut model
on 512-token rows on any backend (CPU: the XLA attention only, float32) to check the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from indexcache_jax import train  # noqa: E402
from indexcache_jax.data import corpus, tokenizer  # noqa: E402
from indexcache_jax.model.model import init_params  # noqa: E402
from indexcache_jax.profiling import (device_time_ms, matmul_ceiling_tflops, top_kernels,  # noqa: E402
                                      write_result_json)


def step_flops(tcfg: train.TrainConfig) -> float:
    """Model FLOPs of one training step (see the module docstring)."""
    c, b, t = tcfg.model, tcfg.batch_size, tcfg.seq_len
    tokens = b * t
    attn_proj = (c.hidden_size * c.q_lora_rank + c.q_lora_rank * c.num_heads * c.qk_head_dim
                 + c.hidden_size * c.latent_row_dim
                 + c.num_heads * c.qk_nope_head_dim * c.kv_lora_rank * 2
                 + c.num_heads * c.v_head_dim * c.hidden_size)
    indexer = (c.q_lora_rank * c.index_n_heads * c.index_head_dim + c.hidden_size * c.index_head_dim
               + c.hidden_size * c.index_n_heads)
    mlp = []
    for kind in c.mlp_layer_types:
        if kind == "dense":
            mlp.append(3 * c.hidden_size * c.intermediate_size)
        else:
            width = c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts)
            mlp.append(3 * c.hidden_size * width)
    params = c.num_layers * (attn_proj + indexer) + sum(mlp) + c.hidden_size * c.vocab_size
    qk = c.latent_row_dim
    attention = 3 * c.num_layers * 2 * b * c.num_heads * (t * t / 2) * (qk + c.kv_lora_rank)
    kl_queries = t // tcfg.kl_query_stride
    kl = 3 * c.num_layers * 2 * b * kl_queries * t * (c.num_heads * qk + c.index_n_heads * c.index_head_dim)
    return 6.0 * params * tokens + attention + kl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--name", default="train_step")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer cut model on 512-token rows (any backend)")
    args = ap.parse_args()

    tcfg = train.preset("default")
    if args.smoke:
        model = tcfg.model.replace(num_layers=2, mlp_layer_types=("dense", "sparse"), pattern="FF",
                                   max_position_embeddings=512, index_topk=64)
        tcfg = dataclasses.replace(tcfg, model=model, seq_len=512, batch_size=2,
                                   compute_dtype=tcfg.compute_dtype if jax.default_backend() == "gpu" else "float32")
    gpu = jax.default_backend() == "gpu"
    cfg = tcfg.model
    train_cfg = cfg.replace(dtype=tcfg.compute_dtype, backend="xla")
    tok = tokenizer.load_tokenizer(train.TOKENIZER_PATH)
    data = train.TrainData(tcfg, tok, corpus.load_corpus(max_files=200))
    params = train.split_params(init_params(cfg, seed=0), cfg)
    tokens, mask = (jnp.asarray(a) for a in data.batch(0))
    kl_pos = jnp.asarray(train.kl_positions(tcfg, 0))
    lr = jnp.float32(0.0)
    flops = step_flops(tcfg)
    ceiling = matmul_ceiling_tflops(jnp.bfloat16) if gpu else None
    n_tokens = tcfg.batch_size * tcfg.seq_len

    runs = [("dense", "cudnn"), ("dense", "xla"), ("sparse", "xla")] if gpu else [("dense", "xla"), ("sparse", "xla")]
    rows = []
    for phase, attention in runs:
        tc = dataclasses.replace(tcfg, attention_impl=attention)
        tx = train.make_optimizer(tc)
        step = train.make_train_step(train_cfg, tc, tx)
        state = {"p": jax.tree.map(jnp.copy, params), "o": tx.init(params)}

        def run():
            state["p"], state["o"], metrics = step(state["p"], state["o"], tokens, mask, kl_pos, lr, phase=phase)
            return metrics

        t0 = time.perf_counter()
        first = jax.block_until_ready(run())
        compile_s = time.perf_counter() - t0
        host = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            host.append((time.perf_counter() - t0) * 1e3)
        row = {"phase": phase, "attention": attention, "compile_s": compile_s, "first_step_loss": float(first["loss"]),
               "step_host_ms": float(np.median(host)), "tokens_per_s_host": n_tokens / np.median(host) * 1e3}
        if gpu:
            dev = device_time_ms(run, [()], iters=1, reps=args.reps)
            row.update(step_gpu_ms=dev["ms"], tokens_per_s_gpu=n_tokens / dev["ms"] * 1e3,
                       mfu=flops / (dev["ms"] / 1e3) / (ceiling * 1e12),
                       top_kernels_ms=top_kernels(dev["kernels_ms"], dev["kernel_scopes"], n=12))
        rows.append(row)
        gpu_txt = f", GPU {row['step_gpu_ms']:.1f} ms, MFU {row['mfu']:.1%}" if gpu else ""
        print(f"{phase:6s} {attention:5s}: host {row['step_host_ms']:.1f} ms{gpu_txt} (compile {compile_s:.1f} s)",
              flush=True)
        state.clear()

    summary = {}
    by = {(r["phase"], r["attention"]): r for r in rows}
    if ("dense", "cudnn") in by:
        key = "step_gpu_ms"
        summary["dense_xla_over_cudnn"] = by[("dense", "xla")][key] / by[("dense", "cudnn")][key]
        # Same params and batch (lr 0): the two attentions must give the same loss up to bf16 rounding.
        ref = by[("dense", "xla")]["first_step_loss"]
        summary["dense_loss_rel_diff_cudnn_vs_xla"] = abs(by[("dense", "cudnn")]["first_step_loss"] - ref) / abs(ref)
        print(f"dense step: XLA attention / cuDNN attention = {summary['dense_xla_over_cudnn']:.2f}x (GPU time); "
              f"first-step loss rel. diff {summary['dense_loss_rel_diff_cudnn_vs_xla']:.1e}")
    path = write_result_json(args.name, {"train_config": tcfg.to_dict(), "step_flops": flops,
                                         "matmul_ceiling_tflops": ceiling, "runs": rows, "summary": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
