"""GPU check of the kernels against their references on the shapes the model feeds them.

The kernel benchmarks check the benchmark shapes (H = 32/64/128, K = 2048). The model also calls them with the
30B model's 20 attention heads, top-k below 2048 with -1 padding on early rows, float32 inputs, and decode shapes.
Each case draws fresh random inputs, prints max errors, and exits non-zero on a mismatch.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from indexcache_jax.profiling import write_result_json  # noqa: E402

import indexcache_jax as ic  # noqa: E402
import pallas_kernels as pk  # noqa: E402
pk_sparse_mla = importlib.import_module("pallas_kernels.sparse_mla")  # the module (the package exports the function)


def causal_indices(rng, b: int, t: int, k: int, s: int) -> np.ndarray:
    """Top-k-like rows: distinct earlier positions in random order, -1 where a query has fewer than k keys."""
    out = np.full((b, t, k), -1, np.int32)
    for bi in range(b):
        for ti in range(t):
            pos = s - t + ti
            n = min(k, pos + 1)
            out[bi, ti, :n] = rng.choice(pos + 1, n, replace=False)
    return out


def check_sparse_mla(rng, b, t, h, s, k, dtype, d=576, v=512) -> dict:
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
    kv = jnp.asarray(rng.standard_normal((b, s, d)), dtype)
    idx = jnp.asarray(causal_indices(rng, b, t, k, s))
    case = {"kernel": "sparse_mla", "b": b, "t": t, "h": h, "s": s, "k": k, "dtype": str(jnp.dtype(dtype))}
    try:
        out, lse = pk.sparse_mla(q, kv, idx, sm_scale=0.05, v_dim=v)
    except Exception as e:  # a launch the kernel cannot compile is a finding to record, not a crash
        return {**case, "error": str(e).splitlines()[0][:200], "ok": False}
    ref, ref_lse = pk.sparse_mla_reference(q.astype(jnp.float32), kv.astype(jnp.float32), idx, sm_scale=0.05,
                                           v_dim=v)
    err = float(jnp.abs(out.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
    lse_err = float(jnp.abs(lse - ref_lse).max())
    return {**case, "rel_err": err, "lse_err": lse_err, "ok": bool(err < (2e-2 if dtype == jnp.bfloat16 else 1e-2))}


def check_indexer_topk(rng, b, t, h, s, k, dtype) -> dict:
    q = jnp.asarray(rng.standard_normal((b, t, h, 128)), dtype)
    keys = jnp.asarray(rng.standard_normal((b, s, 128)), dtype)
    w = jnp.asarray(rng.standard_normal((b, t, h)), jnp.float32)
    qp = jnp.broadcast_to(s - t + jnp.arange(t, dtype=jnp.int32), (b, t))
    kl = jnp.full((b,), s, jnp.int32)
    ours = np.asarray(pk.indexer_topk(q, keys, w, k, q_positions=qp, k_lengths=kl))
    ref = np.asarray(pk.indexer_topk_reference(q, keys, w, k, q_positions=qp, k_lengths=kl))
    same = np.mean([set(ours[bi, ti]) == set(ref[bi, ti]) for bi in range(b) for ti in range(t)])
    return {"kernel": "indexer_topk", "b": b, "t": t, "h": h, "s": s, "k": k, "dtype": str(jnp.dtype(dtype)),
            "identical_rows": float(same), "ok": bool(same > 0.99)}


def check_model_backends(seq: int, topk: int, heads: int | None = None) -> list[dict]:
    """`forward` of a 2-layer 30B-dims model ('FS'; `heads` attention heads instead of 20 where given: 64 or more
    run the Hopper sparse MLA kernel in bf16) per (dtype, backend) against float32 XLA at highest precision,
    and Pallas against XLA at the same dtype: the issue's bar is identical top-k sets in float32 (ties aside) and
    logits within bf16 tolerance."""
    base = ic.glm47_flash_dsa_30b(num_layers=2, mlp_layer_types=("dense", "sparse"), pattern="FS", index_topk=topk,
                                  vocab_size=4096, n_routed_experts=8, num_experts_per_tok=2,
                                  **({"num_heads": heads} if heads else {}))
    params = ic.init_params(base, seed=3)
    tokens = np.random.default_rng(7).integers(0, base.vocab_size, (1, seq))
    with jax.default_matmul_precision("highest"):
        truth_logits, truth_idx = ic.forward(params, base.replace(backend="xla"), tokens, return_indices=True)
    truth_logits, truth_idx = np.asarray(truth_logits), np.asarray(truth_idx[0])

    def same_rows(a, b):
        return float(np.mean([set(a[0, t]) == set(b[0, t]) for t in range(seq)]))

    def rel_err(a, b):  # per token, relative to the token's largest logit
        return np.abs(a - b).max(-1) / np.abs(b).max(-1)

    rows = []
    for dtype in ("float32", "bfloat16"):
        got = {}
        p = jax.tree.map(lambda x: x.astype(dtype), params)
        for backend in ("xla", "pallas"):
            logits, idx = ic.forward(p, base.replace(dtype=dtype, backend=backend), tokens, return_indices=True)
            got[backend] = (np.asarray(logits, np.float32), np.asarray(idx[0]))
            err = rel_err(got[backend][0], truth_logits)
            rows.append({"kernel": "forward", "dtype": dtype, "backend": backend, "seq": seq, "index_topk": topk,
                         "heads": base.num_heads,
                         "identical_topk_rows_vs_f32_highest": same_rows(got[backend][1], truth_idx),
                         "logits_rel_err_median_token": float(np.median(err)),
                         "logits_rel_err_worst_token": float(err.max()),
                         "argmax_agreement": float(np.mean(got[backend][0].argmax(-1) == truth_logits.argmax(-1))),
                         "ok": True})
        same = same_rows(got["pallas"][1], got["xla"][1])
        err = rel_err(got["pallas"][0], got["xla"][0])
        bar = {"float32": (0.99, 1e-3), "bfloat16": (0.0, 5e-2)}[dtype]  # bf16 top-k sets may differ at near-ties
        rows.append({"kernel": "forward pallas vs xla", "dtype": dtype, "seq": seq, "index_topk": topk,
                     "heads": base.num_heads,
                     "identical_topk_rows": same, "logits_rel_err_median_token": float(np.median(err)),
                     "logits_rel_err_worst_token": float(err.max()),
                     "ok": bool(same >= bar[0] and np.median(err) < bar[1])})
    return rows


def check_generate_backends(heads: int, n_new: int = 12, prompt_lens=(300, 517, 64, 1000),
                            reference: str = "xla") -> list[dict]:
    """`Engine.generate` (chunked prefill, then decode steps of T=1) of a 2-layer 30B-dims model with `heads`
    attention heads in bf16, Pallas against `reference`: greedy logits compared step by step while both have
    emitted the same tokens (after a near-tie flips a token the inputs differ, so later steps are not compared).

    reference "xla" is the XLA backend (its bf16 indexer top-k may differ from the kernel's at near-ties);
    "pallas_triton_mla" is the Pallas backend with the Triton sparse MLA kernel forced, so the two runs share
    every top-k set and differ only in the sparse MLA kernel."""
    cfg = ic.glm47_flash_dsa_30b(num_layers=2, mlp_layer_types=("dense", "sparse"), pattern="FS", index_topk=128,
                                 vocab_size=4096, n_routed_experts=8, num_experts_per_tok=2, num_heads=heads,
                                 dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), ic.init_params(cfg, seed=5))
    rng = np.random.default_rng(11)
    prompts = [[int(x) for x in rng.integers(0, cfg.vocab_size, n)] for n in prompt_lens]
    got = {}
    for name in (reference, "pallas"):
        backend = "xla" if name == "xla" else "pallas"
        engine = ic.Engine(params, cfg.replace(backend=backend), max_len=max(prompt_lens) + n_new, max_batch=4,
                           chunk=256)
        chooser = pk_sparse_mla.choose_kernel
        if name == "pallas_triton_mla":
            pk_sparse_mla.choose_kernel = lambda *a, **k: "triton"
        try:
            got[name] = engine.generate(prompts, n_new, return_logits=True)
        finally:
            pk_sparse_mla.choose_kernel = chooser
            jax.clear_caches()  # the next engine must trace again, not reuse the forced kernel's executables
    (ref_tokens, ref_logits), (our_tokens, our_logits) = got[reference], got["pallas"]
    errs, same_tokens, worst_at = [], 0, None
    for r in range(len(prompts)):
        same_tokens += sum(a == b for a, b in zip(ref_tokens[r], our_tokens[r]))
        for step in range(n_new):
            want, have = np.asarray(ref_logits[r][step]), np.asarray(our_logits[r][step])
            errs.append(float(np.abs(have - want).max() / np.abs(want).max()))
            differ = bool(ref_tokens[r][step] != our_tokens[r][step])
            if errs[-1] == max(errs):
                worst_at = {"row": r, "step": step, "tokens_differ_here": differ}
            if differ:
                break
    return [{"kernel": f"generate pallas vs {reference}", "dtype": "bfloat16", "heads": heads, "worst_at": worst_at,
             "prompts": [len(p) for p in prompts], "new_tokens": n_new, "index_topk": 128,
             "steps_compared": len(errs), "identical_tokens": same_tokens / (len(prompts) * n_new),
             "logits_rel_err_median_step": float(np.median(errs)), "logits_rel_err_worst_step": float(max(errs)),
             "ok": bool(np.median(errs) < 5e-2)}]


def main() -> None:
    if "--generate-only" in sys.argv:
        model_rows = (check_generate_backends(64) + check_generate_backends(64, reference="pallas_triton_mla")
                      + check_generate_backends(20))
        for c in model_rows:
            print(json.dumps(c), flush=True)
        write_result_json("kernel_shapes_check_generate", {"cases": model_rows})
        sys.exit(0 if all(c["ok"] for c in model_rows) else 1)
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    cases = []
    for h in (20, 64):
        for dtype in (jnp.bfloat16, jnp.float32):
            cases.append(check_sparse_mla(rng, 1, 2048, h, 2048, 1024, dtype))
    cases.append(check_sparse_mla(rng, 1, 512, 20, 8192, 2048, jnp.bfloat16))
    cases.append(check_sparse_mla(rng, 8, 1, 20, 8192, 2048, jnp.bfloat16))
    cases.append(check_sparse_mla(rng, 2, 3, 16, 300, 37, jnp.float32, d=40, v=32))
    cases.append(check_sparse_mla(rng, 1, 512, 128, 8192, 2048, jnp.bfloat16))  # the Hopper kernel from here on
    cases.append(check_sparse_mla(rng, 8, 2, 128, 8192, 2048, jnp.bfloat16))
    cases.append(check_sparse_mla(rng, 3, 1, 72, 1000, 300, jnp.bfloat16))
    for dtype in (jnp.bfloat16, jnp.float32):
        cases.append(check_indexer_topk(rng, 1, 1024, 32, 4096, 1024, dtype))
    for c in cases:
        print(json.dumps(c), flush=True)
    model_rows = check_model_backends(2048, 512) + check_model_backends(2048, 512, heads=64)
    cases += model_rows
    for c in model_rows:
        print(json.dumps(c), flush=True)
    write_result_json("kernel_shapes_check", {"cases": cases})
    if not all(c["ok"] for c in cases):
        sys.exit(1)


if __name__ == "__main__":
    main()
