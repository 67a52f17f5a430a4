"""An FP8 matrix product for Pallas kernels that reaches Hopper's FP8 tensor-core instructions.

Pallas' Triton lowering emits every `dot_general` as a `tt.dot` without `maxNumImpreciseAcc`, i.e. 0. For FP8
operands Triton reads 0 as "promote every partial product into the fp32 accumulator on the CUDA cores" and, on
sm_90, falls back from FP8 `wgmma` to f16 `mma.sync` with the operands converted in registers
(benchmarks/inspect_kernels.py shows both compiles). Triton's own Python frontend gives FP8 dots a large
`maxNumImpreciseAcc` instead.

`fp8_dot_nt` is a primitive whose Triton lowering is `tt.dot` with `maxNumImpreciseAcc` = the contraction length:
the tensor core accumulates one full dot product of D = 128 e4m3 products in its own FP8-path accumulator and the
result is then added to fp32 once, which is the promotion interval DeepSeek-V3 and DeepGEMM use (one promotion per
128 products). Everywhere else (interpret mode, CPU, XLA) it is an ordinary dot with float32 products.

The Triton rule is registered in `jax._src.pallas.triton.lowering.triton_lowering_rules`, a private table. If a
JAX release moves it, `FAST_FP8_ACCUMULATION` is False and the kernels use `lax.dot_general` (correct, slower).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.interpreters import mlir

try:  # jax >= 0.4.36 spells it jax.extend.core.Primitive
    from jax.extend.core import Primitive
except ImportError:  # pragma: no cover - older jax
    from jax.core import Primitive

_NT = (((1,), (1,)), ((), ()))


def _reference(a, b):
    return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)


fp8_dot_nt_p = Primitive("fp8_dot_nt")
fp8_dot_nt_p.def_impl(_reference)


@fp8_dot_nt_p.def_abstract_eval
def _abstract_eval(a, b):
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_dot_nt needs a [M, K] and b [N, K], got {a.shape} and {b.shape}")
    if a.dtype != b.dtype or a.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"fp8_dot_nt needs float8_e4m3fn operands, got {a.dtype} and {b.dtype}")
    return jax.core.ShapedArray((a.shape[0], b.shape[0]), jnp.float32)


mlir.register_lowering(fp8_dot_nt_p, mlir.lower_fun(_reference, multiple_results=False))


def _install_triton_rule() -> bool:
    try:
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith as arith_dialect
        from jax._src.lib.triton import dialect as tt_dialect
        from jax._src.pallas.triton import lowering as triton_lowering
    except ImportError:  # pragma: no cover - a jaxlib without the Triton dialect
        return False
    rules = getattr(triton_lowering, "triton_lowering_rules", None)
    if not isinstance(rules, dict):  # pragma: no cover - the private table moved
        return False

    def rule(ctx, a, b):
        (out_aval,) = ctx.avals_out
        contraction = ctx.avals_in[0].shape[1]
        f32 = ir.F32Type.get()
        acc = tt_dialect.splat(ir.RankedTensorType.get(list(out_aval.shape), f32), arith_dialect.constant(f32, 0.0))
        b_kn = tt_dialect.trans(b, (1, 0))
        return tt_dialect.dot(a, b_kn, acc, max_num_imprecise_acc=int(contraction))

    rules[fp8_dot_nt_p] = rule
    return True


FAST_FP8_ACCUMULATION = _install_triton_rule()


def fp8_dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, K] @ b[N, K].T -> float32 [M, N] for float8_e4m3fn a and b, inside a Pallas kernel or anywhere.

    On the Triton GPU lowering it is one FP8 tensor-core product accumulated over all K before the fp32 add;
    elsewhere the products and sums are float32 (exact products of e4m3 values).
    """
    if not FAST_FP8_ACCUMULATION:  # pragma: no cover - see the module docstring
        return _reference(a, b)
    return fp8_dot_nt_p.bind(a, b)


__all__ = ["FAST_FP8_ACCUMULATION", "fp8_dot_nt", "fp8_dot_nt_p"]
