"""Dispatch between the Pallas GPU kernels and their XLA references.

The model reaches `pallas_kernels` only through this module. `cfg.backend` decides: "pallas" forces the kernels,
"xla" the references, "auto" picks Pallas on GPU and XLA elsewhere.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


def use_pallas(backend: str) -> bool:
    if backend == "pallas":
        return True
    if backend == "xla":
        return False
    if backend == "auto":
        return jax.default_backend() == "gpu"
    raise ValueError(f"backend must be 'auto', 'pallas' or 'xla', got {backend!r}")


def indexer_topk(q, k, w, topk: int, *, q_positions, k_lengths, backend: str, q_scale=None, k_scale=None,
                 key_offset=None, num_keys: int | None = None) -> jnp.ndarray:
    """int32 `[B, T, topk]` indices of the largest `sum_h w * relu(q . k)` over valid keys, -1 padded.

    q `[B, T, H, D]`, k `[B, S, D]`, w `[B, T, H]` float32, q_positions `[B, T]`, k_lengths `[B]`; float8_e4m3fn q
    and k come with q_scale `[B, T, H]` and k_scale `[B, S]` float32 (the sum then reads
    `k_scale * sum_h w * q_scale * relu(q . k)`). With `key_offset` (int32 scalar, may be traced) and `num_keys`
    the candidates are the window `k[:, key_offset : key_offset + num_keys]`, read in place, and the indices count
    from its start. The kernels do no work past each query's last valid key.
    """
    import pallas_kernels

    kwargs = dict(q_positions=q_positions, k_lengths=k_lengths, q_scale=q_scale, k_scale=k_scale)
    if key_offset is not None:
        kwargs.update(key_offset=key_offset, num_keys=num_keys)
    if use_pallas(backend):
        return pallas_kernels.indexer_topk(q, k, w, topk, **kwargs)
    return pallas_kernels.indexer_topk_reference(q, k, w, topk, **kwargs)


# The XLA reference gathers [B, T, K, Dqk] rows; query chunks keep that under this many bytes.
_REFERENCE_GATHER_BYTES = 1 << 30


def sparse_mla(q, kv, indices, *, sm_scale: float, v_dim: int, backend: str, key_offset=None):
    """Absorbed-MLA attention over the gathered rows `kv[b, indices[b, t]]`: `(out [B, T, H, v_dim], lse [B, T, H])`.

    q `[B, T, H, Dqk]`, kv `[B, S, Dqk]`, indices int32 `[B, T, K]` (-1 = none). With `key_offset` (int32 scalar),
    kv holds several layers' rows and the indices count from row `key_offset`: only the `[B, T, K]` indices are
    shifted, kv is read where it lies. The XLA path runs in query chunks sized so each chunk's gathered rows stay
    under 1 GiB, so a long full forward never gathers `[T, K]` rows at once.
    """
    import pallas_kernels

    if key_offset is not None:
        indices = jnp.where(indices >= 0, indices + key_offset, -1)

    if use_pallas(backend):
        return pallas_kernels.sparse_mla(q, kv, indices, sm_scale=sm_scale, v_dim=v_dim)
    b, t, _, d = q.shape
    per_query = b * indices.shape[-1] * d * 4
    chunk = max(1, _REFERENCE_GATHER_BYTES // per_query)
    if t <= chunk:
        return pallas_kernels.sparse_mla_reference(q, kv, indices, sm_scale=sm_scale, v_dim=v_dim)

    def one(args):  # one query position of every row: q [B, H, Dqk], indices [B, K]
        q_t, idx_t = args
        out, lse = pallas_kernels.sparse_mla_reference(q_t[:, None], kv, idx_t[:, None], sm_scale=sm_scale,
                                                       v_dim=v_dim)
        return out[:, 0], lse[:, 0]

    out, lse = jax.lax.map(one, (q.swapaxes(0, 1), indices.swapaxes(0, 1)), batch_size=chunk)
    return out.swapaxes(0, 1), lse.swapaxes(0, 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedWeight:
    """A layer's weight beside the layer stack it was sliced from, for kernels that read it in place.

    `value` is the layer's weight as XLA's products take it (the slice, cast as the product wants it); `stack`
    `[L, *value.shape]` holds every layer's in its stored dtype and `index` (int32 scalar, may be traced) is this
    layer's. Inside the model's layer scan XLA copies a slice handed to a Pallas Triton kernel out of the stack
    first (a custom call takes buffers of its own): 5.8 ms of a batch-1 step of the 8-layer 30B model
    (BENCHMARKS.md). Given the stack and the index, the kernel reads the layer where it lies.
    """

    value: jax.Array
    stack: jax.Array
    index: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    @property
    def dtype(self):
        return self.value.dtype

    def reshape(self, *shape: int) -> StackedWeight:
        """Both views reshaped alike (the stack keeps its layer axis first): free for contiguous stacks."""
        return StackedWeight(self.value.reshape(*shape), self.stack.reshape(self.stack.shape[0], *shape), self.index)

    def astype(self, dtype) -> StackedWeight | jax.Array:
        """The weight as `dtype`. A kernel reads the stack as stored and computes in float32, so it can stand for
        the same or a wider dtype (bfloat16 weights in a float32 product); a narrower one leaves only the value."""
        cast = self.value.astype(dtype)
        if jnp.promote_types(self.stack.dtype, dtype) != jnp.dtype(dtype):
            return cast
        return StackedWeight(cast, self.stack, self.index)


def layer_value(w):
    """The layer's own weight: `w.value` for a `StackedWeight`, else `w`."""
    return w.value if isinstance(w, StackedWeight) else w


def _one_layer_of_stacks(ws) -> bool:
    """Whether every weight of `ws` is a `StackedWeight` of the same layer index (one kernel reads them all): the
    same traced index, or equal concrete ones."""
    def same(a, b):
        return a is b or not any(isinstance(v, jax.core.Tracer) for v in (a, b)) and int(a) == int(b)

    return all(isinstance(w, StackedWeight) and same(w.index, ws[0].index) for w in ws)


# The matrix-vector kernels below run only on `StackedWeight`s, which they read in place. A plain weight is either
# a layer's slice (a Triton kernel would make XLA copy it out of its stack) or a weight outside the model's layer
# loop, and stays with XLA; so do weights on a mesh of several devices, which the model does not stack for the
# kernels (a custom call would gather sharded weights).

# (token, expert) pairs up to which the routed experts run as matrix-vector kernels rather than the grouped GEMM:
# a decode step's few tokens (BENCHMARKS.md, "MoE").
ROUTED_GEMV_MAX_PAIRS = 32


def takes_routed_gemv(x, top_k: int, experts, *, backend: str) -> bool:
    """Whether `routed_experts` runs tokens x `[N, D]` with `top_k` experts each on the routed matrix-vector kernels:
    Pallas in use, at most `ROUTED_GEMV_MAX_PAIRS` pairs, and `StackedWeight` experts (gate, up, down) of one layer
    in x's dtype with widths the kernels take."""
    from pallas_kernels import routed_gemv

    return (use_pallas(backend) and x.shape[0] * top_k <= ROUTED_GEMV_MAX_PAIRS
            and routed_gemv.supports(*experts[0].shape[1:]) and _one_layer_of_stacks(experts)
            and all(w.stack.dtype == x.dtype for w in experts))


def routed_experts(x, ids, weights, gate, up, down, *, backend: str, shared=None):
    """The routed experts of a MoE layer: x `[N, D]`, ids int32 `[N, k]`, weights float32 `[N, k]`, gate and up
    `[E, D, I]`, down `[E, I, D]` (arrays or `StackedWeight`s) -> `[N, D]` in x's dtype (each expert's output rounded
    to it, the weighted sum in float32; an id equal to E adds nothing).

    Where `takes_routed_gemv`, the routed matrix-vector kernels run, which read only the routed experts' weights,
    in place, and plan no row tiles; the rest take the grouped GEMM (`moe_experts`: the Hopper kernel on a GPU).
    The XLA backend runs `lax.ragged_dot` over the grouped plan. `shared`: a shared expert's (gate [D, I], up, down
    [I, D]) `StackedWeight`s of the same layer and width, run as one more pair per token in the same launches and
    added to the result; only where `takes_routed_gemv` (else a ValueError).
    """
    from pallas_kernels import routed_gemv
    from pallas_kernels.grouped_matmul import moe_experts

    experts = (gate, up, down)
    gemv = takes_routed_gemv(x, ids.shape[1], experts, backend=backend)
    if shared is not None:
        shared = tuple(shared)
        # The same conditions over the shared expert's weights too (one layer, x's dtype), and the routed width.
        joins = takes_routed_gemv(x, ids.shape[1], experts + shared, backend=backend)
        if not joins or shared[0].shape != gate.shape[1:]:
            raise ValueError("routed_experts: a shared expert joins the routed GEMV's pairs only, as StackedWeights "
                             "of the experts' layer and width")
    if gemv:
        return routed_gemv.routed_experts_gemv(x, ids, weights, *(w.stack for w in experts), layer=gate.index,
                                               shared=None if shared is None else [w.stack for w in shared])
    return moe_experts(x, ids, weights, *map(layer_value, experts), impl="xla_ragged" if backend == "xla" else None)


def project_many(x, ws, *, backend: str) -> tuple:
    """`x [..., K] @ w [K, N_j] -> [..., N_j]` for each w of `ws` (arrays or `StackedWeight`s), each in the pair's
    result dtype (x is cast up to a float32 weight's type first).

    One row (a batch-1 decode step's token) times `StackedWeight`s of one layer goes through the Pallas row GEMV
    kernel when Pallas is in use, all of `ws` in one launch, read in place: XLA's GPU compiler rewrites a one-row
    product into multiply + reduce, which runs far below the weight-read rate at these sizes, one kernel per
    product (BENCHMARKS.md, "Decode step against its memory floor"). Every other product is XLA's.
    """
    from pallas_kernels import row_gemv

    ws = tuple(ws)
    lead = x.shape[:-1]
    dtypes = tuple(jnp.result_type(x.dtype, w.dtype) for w in ws)
    if (math.prod(lead) == 1 and use_pallas(backend) and _one_layer_of_stacks(ws)
            and all(row_gemv.supports(*w.shape) for w in ws)):
        ys = row_gemv.row_gemvs(x.reshape(1, -1), [w.stack for w in ws], layer=ws[0].index, dtypes=dtypes)
        return tuple(y.reshape(*lead, -1) for y in ys)
    return tuple(x.astype(dt) @ layer_value(w) for w, dt in zip(ws, dtypes))


def project(x, w, *, backend: str):
    """`project_many` of one weight: `x [..., K] @ w [K, N] -> [..., N]`."""
    return project_many(x, (w,), backend=backend)[0]


def project_each_head(x, w, *, backend: str, transposed: bool = False):
    """Each head's vector times that head's matrix: x `[..., H, K]`, w `[H, K, N]` (an array or `StackedWeight`)
    -> `[..., H, N]` in `result_type(x, w)`; with `transposed`, w is `[H, N, K]` and contracts on its last axis.

    One token (a batch-1 decode step) times a `StackedWeight` goes to the Pallas head GEMV when Pallas is in use,
    read in place: XLA's GPU compiler lowers these per-head matrix-vector products as it does one-row products
    (`project_many`). Everything else is XLA's einsum.
    """
    from pallas_kernels import row_gemv

    lead, (h, k) = x.shape[:-2], x.shape[-2:]
    n = w.shape[1] if transposed else w.shape[2]
    if math.prod(lead) == 1 and use_pallas(backend) and isinstance(w, StackedWeight) and row_gemv.supports(k, n):
        y = row_gemv.head_gemv(x.reshape(h, k), w.stack, transposed=transposed, layer=w.index)
        return y.astype(jnp.result_type(x.dtype, w.dtype)).reshape(*lead, h, n)
    return jnp.einsum("...hk,hnk->...hn" if transposed else "...hk,hkn->...hn", x, layer_value(w))
