"""Flax linen building blocks of a DSA decoder layer: norms, MLA, the lightning indexer, and the block itself
(the MLPs are in `moe.py`).

Weights are stored `[in, out]` (torch's `[out, in]` transposed), with head axes split out so that tensor-parallel
sharding is a matter of naming one axis. Shapes below use B batch, T queries, S keys, D hidden, H heads.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from indexcache_jax.inference import kernels

from indexcache_jax.model import quant
from indexcache_jax.model.config import DSAConfig
from indexcache_jax.model.axes import logical, normal_init
from indexcache_jax.model.moe import DenseMLP, MoE
from indexcache_jax.model.rope import apply_rope
from indexcache_jax.model.stacks import StackedParams

Array = jax.Array


class RMSNorm(nn.Module):
    """`scale * x * rsqrt(mean(x^2) + eps)`, normalised in float32, cast back before the scale (as transformers)."""

    dim: int
    eps: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", logical(nn.initializers.ones, "norm"), (self.dim,), jnp.float32)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(x.dtype) * normed.astype(x.dtype)).astype(x.dtype)


def write_rows(cache: Array, start: Array, new: Array, offsets: Array) -> Array:
    """Writes `new [B, T, ...]` into `cache [B, R, ...]` at rows `start + offsets[b] .. start + offsets[b] + T` of
    each batch row: one scatter, in place on a carried or donated cache.

    The rows are promised in bounds (the engine never writes past its slots): a bounds-checked scatter becomes a
    select over the whole buffer, which XLA can neither do in place nor skip.
    """
    b, t = new.shape[:2]
    rows = start + offsets[:, None] + jnp.arange(t, dtype=offsets.dtype)[None, :]
    return cache.at[jnp.arange(b)[:, None], rows].set(new.astype(cache.dtype), mode="promise_in_bounds",
                                                      indices_are_sorted=True, unique_indices=True)


def _project_to_heads(x: Array, ws: list[Array], backend: str) -> list[Array]:
    """x `[B, T, R]` @ w `[R, H, K]` -> `[B, T, H, K]` for each w of `ws`, as products of the `[R, H K]` views (one
    kernel launch for all of them at one row: `kernels.project_many`)."""
    ys = kernels.project_many(x, [w.reshape(w.shape[0], -1) for w in ws], backend=backend)
    return [y.reshape(*x.shape[:-1], *w.shape[1:]) for y, w in zip(ys, ws)]


class MLA(StackedParams, nn.Module):
    """Multi-head latent attention in the absorbed (MQA) form over top-k selected latent rows."""

    cfg: DSAConfig

    def setup(self):
        c, dt = self.cfg, jnp.float32
        self.wq_a = self.param("wq_a", logical(normal_init(), "embed", "q_lora"), (c.hidden_size, c.q_lora_rank), dt)
        self.q_norm = RMSNorm(c.q_lora_rank, 1e-6)
        self.wq_b = self.param("wq_b", logical(normal_init(), "q_lora", "heads", "qk_head"),
                               (c.q_lora_rank, c.num_heads, c.qk_head_dim), dt)
        self.wkv_a = self.param("wkv_a", logical(normal_init(), "embed", "kv_row"),
                                (c.hidden_size, c.latent_row_dim), dt)
        self.kv_norm = RMSNorm(c.kv_lora_rank, 1e-6)
        # kv_b_proj split per head into its key part (absorbed into q) and value part (applied after attention).
        self.w_uk = self.param("w_uk", logical(normal_init(), "heads", "qk_nope", "kv_lora"),
                               (c.num_heads, c.qk_nope_head_dim, c.kv_lora_rank), dt)
        self.w_uv = self.param("w_uv", logical(normal_init(), "heads", "v_head", "kv_lora"),
                               (c.num_heads, c.v_head_dim, c.kv_lora_rank), dt)
        self.wo = self.param("wo", logical(normal_init(), "heads", "v_head", "embed"), (c.num_heads, c.v_head_dim, c.hidden_size),
                             dt)

    def project_q(self, x: Array, cos: Array, sin: Array) -> tuple[Array, Array]:
        """x `[B, T, D]` -> (qr `[B, T, q_lora]`, the normalised q latent the indexer reads; q `[B, T, H, kv_lora + rope]`
        in absorbed form: `q_nope @ W_uk` beside the rotated `q_pe`)."""
        dt = x.dtype
        qr = self.q_norm(kernels.project(x, self.weight("wq_a", dt), backend=self.cfg.backend))
        (q,) = _project_to_heads(qr, [self.weight("wq_b", dt)], self.cfg.backend)
        return qr, self.absorb_q(q, cos, sin)

    def absorb_q(self, q: Array, cos: Array, sin: Array) -> Array:
        """The heads' queries `qr @ wq_b` `[B, T, H, nope + rope]` -> absorbed form `[B, T, H, kv_lora + rope]`."""
        c = self.cfg
        q_nope, q_pe = q[..., : c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
        q_pe = apply_rope(q_pe, cos[:, :, None, :], sin[:, :, None, :], interleaved=True)
        q_abs = kernels.project_each_head(q_nope, self.weight("w_uk", q.dtype), backend=c.backend)
        return jnp.concatenate([q_abs, q_pe], axis=-1)

    def project_kv(self, x: Array, cos: Array, sin: Array) -> Array:
        """x `[B, T, D]` -> the cache row `[B, T, kv_lora + rope]`: normalised latent beside the rotated shared key."""
        return self.cache_row(kernels.project(x, self.weight("wkv_a", x.dtype), backend=self.cfg.backend), cos, sin)

    def cache_row(self, kv: Array, cos: Array, sin: Array) -> Array:
        """`x @ wkv_a` `[B, T, kv_lora + rope]` -> the cache row: normalised latent beside the rotated shared key."""
        c = self.cfg
        latent = self.kv_norm(kv[..., : c.kv_lora_rank])
        k_pe = apply_rope(kv[..., c.kv_lora_rank:], cos, sin, interleaved=True)
        return jnp.concatenate([latent, k_pe], axis=-1)

    def attend(self, q: Array, kv: Array, indices: Array, key_offset: Array | None = None) -> Array:
        """q `[B, T, H, kv_lora + rope]`, kv `[B, S, kv_lora + rope]`, indices `[B, T, K]` -> output `[B, T, D]`.

        With `key_offset` (int32 scalar), kv holds several layers' rows and the indices count from that row.
        """
        c, dt = self.cfg, q.dtype
        o_latent, _ = kernels.sparse_mla(q, kv.astype(dt), indices, sm_scale=c.softmax_scale, v_dim=c.kv_lora_rank,
                                         backend=c.backend, key_offset=key_offset)
        return self.output(o_latent.astype(dt))

    def output(self, o_latent: Array) -> Array:
        """Attention output in latent space `[B, T, H, kv_lora]` -> `[B, T, D]`: up through W_uv, then wo."""
        dt = o_latent.dtype
        o = kernels.project_each_head(o_latent, self.weight("w_uv", dt), transposed=True, backend=self.cfg.backend)
        b, t, h, v = o.shape
        # One contracting dim, as every other projection has: with two (heads, v) XLA gave the one-row decode
        # product a split-K GEMM and copied wo out of the layer stack first (21 MB a layer at 30B; H100 HLO).
        return kernels.project(o.reshape(b, t, h * v), self.weight("wo", dt).reshape(h * v, -1),
                               backend=self.cfg.backend)


class Indexer(StackedParams, nn.Module):
    """The lightning indexer: `I[t, s] = sum_j w[t, j] * relu(q[t, j] . k[s])`, top-k over earlier tokens."""

    cfg: DSAConfig

    def setup(self):
        c, dt = self.cfg, jnp.float32
        self.wq_b = self.param("wq_b", logical(normal_init(), "q_lora", "index_heads", "index_dim"),
                               (c.q_lora_rank, c.index_n_heads, c.index_head_dim), dt)
        self.wk = self.param("wk", logical(normal_init(), "embed", "index_dim"), (c.hidden_size, c.index_head_dim), dt)
        self.k_norm_scale = self.param("k_norm_scale", logical(nn.initializers.ones, "index_dim"), (c.index_head_dim,),
                                       dt)
        self.k_norm_bias = self.param("k_norm_bias", logical(nn.initializers.zeros, "index_dim"), (c.index_head_dim,), dt)
        self.weights_proj = self.param("weights_proj", logical(normal_init(), "embed", "index_heads"),
                                       (c.hidden_size, c.index_n_heads), dt)

    def _rope(self, x: Array, cos: Array, sin: Array) -> Array:
        r = self.cfg.qk_rope_head_dim
        rotated = apply_rope(x[..., :r], cos, sin, interleaved=self.cfg.indexer_rope_interleave)
        return jnp.concatenate([rotated, x[..., r:]], axis=-1)

    def keys(self, x: Array, cos: Array, sin: Array) -> Array:
        """x `[B, T, D]` -> keys `[B, T, d_I]`: LayerNorm (with bias, eps 1e-6, float32), RoPE on the first dims."""
        return self.normed_keys(kernels.project(x, self.weight("wk", x.dtype), backend=self.cfg.backend), cos, sin)

    def normed_keys(self, xk: Array, cos: Array, sin: Array) -> Array:
        """`x @ wk` `[B, T, d_I]` -> the keys (see `keys`), in xk's dtype."""
        k = xk.astype(jnp.float32)
        mean = jnp.mean(k, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(k - mean), axis=-1, keepdims=True)
        k = (k - mean) * jax.lax.rsqrt(var + 1e-6) * self.k_norm_scale + self.k_norm_bias
        return self._rope(k.astype(xk.dtype), cos, sin)

    def queries(self, qr: Array, x: Array, cos: Array, sin: Array) -> tuple[Array, Array]:
        """-> (q `[B, T, H_I, d_I]`, head weights `[B, T, H_I]` float32 with `H_I^-0.5 d_I^-0.5` folded in)."""
        (q,) = _project_to_heads(qr, [self.weight("wq_b", qr.dtype)], self.cfg.backend)
        w = kernels.project(x, self.weight("weights_proj", jnp.float32), backend=self.cfg.backend)
        return self.rotated_queries(q, cos, sin), self.scaled_head_weights(w)

    def rotated_queries(self, q: Array, cos: Array, sin: Array) -> Array:
        """`qr @ wq_b` `[B, T, H_I, d_I]` -> the queries, RoPE on the first dims."""
        return self._rope(q, cos[:, :, None, :], sin[:, :, None, :])

    def scaled_head_weights(self, w: Array) -> Array:
        """`x @ weights_proj` in float32 `[B, T, H_I]` -> the head weights with `H_I^-0.5 d_I^-0.5` folded in."""
        return w * self.cfg.indexer_weight_scale

    def select(self, q: Array, w: Array, keys: Array, q_positions: Array, k_lengths: Array,
               key_scales: Array | None = None, key_offset: Array | None = None,
               num_keys: int | None = None) -> Array:
        """Top `min(index_topk, num_keys)` keys per query, int32 `[B, T, k]`, -1 where fewer keys are valid.

        keys `[B, S, d_I]`; with `key_offset` (int32 scalar) and `num_keys` the candidates are the window
        `keys[:, key_offset : key_offset + num_keys]` (one layer of a multi-layer cache) and the indices count from
        its start. With `indexer_quant="fp8"`, keys are float8_e4m3fn with `key_scales` float32 `[B, S, 1]` (see
        `quantize_keys`) and the queries are rotated and quantised here.
        """
        c = self.cfg
        num_keys = keys.shape[1] if num_keys is None else num_keys
        topk = min(c.index_topk, num_keys)
        window = dict(q_positions=q_positions, k_lengths=k_lengths, key_offset=key_offset, num_keys=num_keys,
                      backend=c.backend)
        if c.indexer_quant == "fp8":
            q8, q_scale = quant.rotate_and_quantize(q)
            return kernels.indexer_topk(q8, keys, w, topk, q_scale=q_scale[..., 0], k_scale=key_scales[..., 0], **window)
        return kernels.indexer_topk(q, keys.astype(q.dtype), w, topk, **window)

    def quantize_keys(self, keys: Array) -> tuple[Array, Array | None]:
        """Keys as the indexer cache stores them: `(keys, None)`, or with `indexer_quant="fp8"` the rotated
        float8_e4m3fn keys `[B, T, d_I]` and their float32 scales `[B, T, 1]`."""
        if self.cfg.indexer_quant == "fp8":
            return quant.rotate_and_quantize(keys)
        return keys, None


class Block(nn.Module):
    """One decoder layer. F layers (`has_indexer`) select fresh top-k indices; S layers attend to the carried ones.

    Called as `((h, indices), ctx, cache) -> ((h, indices), cache)`.
    - h `[B, T, D]`, indices int32 `[B, T, K]` (-1 = no key);
    - ctx: `cos`, `sin` `[B, T, rope/2]`, `positions [B, T]` (query positions), `k_lengths [B]` (valid keys),
      `offsets [B]` (where this chunk's rows go in the cache);
    - cache: None (keys are this chunk's tokens), or the decode cache of `inference.cache` plus this layer's slots:
      `"kv"` `[B, L * S, kv_lora + rope]` (every layer, layer l at rows `[l S, (l + 1) S)`), `"index_k"`
      `[B, F * S, d_I]` (F layers; float8_e4m3fn with `"index_k_scale"` `[B, F * S, 1]` when
      `indexer_quant="fp8"`), `"layer"` (int32 scalar: this layer's slot in `kv`) and, on F layers, `"full"` (its
      slot in `index_k`). The layer writes its rows at `offsets` in place and the kernels read its window where it
      lies: nothing cache-sized is sliced, reshaped or copied.
    """

    cfg: DSAConfig
    has_indexer: bool
    mlp_kind: str
    moe_impl: str = "ragged"
    mesh: Any = None

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], ctx: dict[str, Array], cache: dict[str, Array] | None):
        c = self.cfg
        h, indices = carry
        x = RMSNorm(c.hidden_size, c.rms_norm_eps, name="attn_norm")(h)
        cos, sin, dt = ctx["cos"], ctx["sin"], x.dtype
        mla = MLA(c, name="mla")
        indexer = Indexer(c, name="indexer") if self.has_indexer else None
        # The products that share an input go to `kernels.project_many` together: one launch each at batch-1 decode.
        from_x = [mla.weight("wq_a", dt), mla.weight("wkv_a", dt)]
        if indexer is not None:
            from_x += [indexer.weight("wk", dt), indexer.weight("weights_proj", jnp.float32)]
        x_products = kernels.project_many(x, from_x, backend=c.backend)
        qr = mla.q_norm(x_products[0])
        q_heads = _project_to_heads(qr, [mla.weight("wq_b", dt)] + ([indexer.weight("wq_b", dt)] if indexer else []),
                                 c.backend)
        q = mla.absorb_q(q_heads[0], cos, sin)
        kv = mla.cache_row(x_products[1], cos, sin)
        kv_offset = num_keys = None
        if cache is not None:
            cache = dict(cache)
            num_keys = cache["kv"].shape[1] // c.num_layers
            kv_offset = cache["layer"] * num_keys
            cache["kv"] = kv = write_rows(cache["kv"], kv_offset, kv, ctx["offsets"])
        if indexer is not None:
            keys, key_scales = indexer.quantize_keys(indexer.normed_keys(x_products[2], cos, sin))
            key_offset = None
            if cache is not None:
                key_offset = cache["full"] * num_keys
                cache["index_k"] = keys = write_rows(cache["index_k"], key_offset, keys, ctx["offsets"])
                if key_scales is not None:
                    cache["index_k_scale"] = key_scales = write_rows(cache["index_k_scale"], key_offset, key_scales,
                                                                     ctx["offsets"])
            iq, iw = indexer.rotated_queries(q_heads[1], cos, sin), indexer.scaled_head_weights(x_products[3])
            indices = indexer.select(iq, iw, keys, ctx["positions"], ctx["k_lengths"], key_scales,
                                     key_offset=key_offset, num_keys=num_keys)
        h = h + mla.attend(q, kv, indices, kv_offset).astype(h.dtype)
        return (feed_forward(c, self.mlp_kind, self.moe_impl, h, self.mesh), indices), cache


def with_slots(cache: dict | None, layer: Array, full: Array | None = None) -> dict | None:
    """The cache buffers plus one layer's slots (`Block`'s cache argument); None stays None."""
    if cache is None:
        return None
    return {**cache, "layer": layer} if full is None else {**cache, "layer": layer, "full": full}


def without_slots(cache: dict | None) -> dict | None:
    """The cache buffers alone (what a scan carries)."""
    if cache is None:
        return None
    return {k: v for k, v in cache.items() if k not in ("layer", "full")}


def feed_forward(cfg: DSAConfig, mlp_kind: str, moe_impl: str, h: Array, mesh: Any = None) -> Array:
    """The second half of a decoder layer, `h + MLP(RMSNorm(h))` with the dense MLP or the MoE (`mesh`: the one
    an expert-parallel MoE runs over). Call it inside a compact module's `__call__`: it creates that module's
    `mlp_norm` and `mlp` submodules."""
    x = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, name="mlp_norm")(h)
    if mlp_kind == "dense":
        y = DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.backend, name="mlp")(x)
    else:
        y = MoE(cfg, impl=moe_impl, mesh=mesh, name="mlp")(x)
    return h + y.astype(h.dtype)


def scan_blocks(cfg: DSAConfig, length: int, has_indexer: bool, mlp_kind: str, moe_impl: str, name: str,
                mesh: Any = None) -> Any:
    """`length` equal layers with stacked params (leading axis), scanned over `(h, indices)` with no cache.

    Returns `run((h, indices), ctx)`. Call it inside a compact module: the stacked params live under `name`. It
    declares a run's params at init (`model.Group`); `model.apply_segment` applies them, with the cache.
    """
    block = Block(cfg, has_indexer, mlp_kind, moe_impl, mesh, name=name)

    def body(module, hidden, ctx):
        return module(hidden, ctx, None)[0], None

    scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast,
                      length=length, metadata_params={nn.PARTITION_NAME: "layers"})
    return lambda hidden, ctx: scanned(block, hidden, ctx)[0]
