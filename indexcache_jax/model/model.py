"""The DSA model with the IndexCache schedule as a static scan over layer groups, and its public `forward`.

A group is an F layer followed by its S layers. Consecutive groups of identical shape form a segment, scanned with
params stacked on a leading group axis; inside a group each run of equal S layers is scanned too (unrolled in a
segment of several groups, `apply_segment` says why). The scan carries
`(hidden, topk_indices, cache)`: the F layer overwrites the indices, the S layers read them. Compile time grows with
the number of distinct segments, not with depth.

The decode cache rides in the carry as whole buffers (`inference.cache`: every layer's rows in one
`[B, L * S, C]` array, layer l at rows `[l S, (l + 1) S)`), and each layer writes its new rows in place at its own
rows, so a scan step never slices out, copies or restacks a cache-sized buffer.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from indexcache_jax.inference import kernels
from indexcache_jax.model.config import DSAConfig
from indexcache_jax.model.layers import Block, RMSNorm, scan_blocks, with_slots, without_slots
from indexcache_jax.model.axes import logical
from indexcache_jax.model.moe import resolve_moe_impl
from indexcache_jax.model.rope import rope_cos_sin
from indexcache_jax.model.schedule import SegmentSpec
from indexcache_jax.model.stacks import LAYER_STACKS, stacked_weights

Array = jax.Array


class Group(nn.Module):
    """The params of one group, an F layer and its runs of S layers: called once at init, under `nn.scan` over the
    segment's groups, as `((h, indices), ctx) -> ((h, indices), indices)` with no cache, which declares the
    segment's stacked params. `apply_segment` applies them."""

    cfg: DSAConfig
    spec: SegmentSpec
    moe_impl: str = "ragged"
    mesh: Any = None

    @nn.compact
    def __call__(self, hidden, ctx):
        hidden, _ = Block(self.cfg, True, self.spec.kinds[0], self.moe_impl, self.mesh, name="full")(hidden, ctx, None)
        selected = hidden[1]
        for r, (kind, count) in enumerate(self.spec.shared_runs):
            hidden = scan_blocks(self.cfg, count, False, kind, self.moe_impl, name=f"shared_{r}", mesh=self.mesh)(
                hidden, ctx)
        return hidden, selected


def take_layer(stack: Array, index: tuple[Array | int, ...]) -> Array:
    """`stack[index]` (leading axes) as one dynamic slice, so that its offset is affine in the loop counter."""
    n = len(index)
    start = tuple(index) + (0,) * (stack.ndim - n)
    return jax.lax.dynamic_slice(stack, start, (1,) * n + stack.shape[n:]).reshape(stack.shape[n:])


def apply_segment(cfg: DSAConfig, spec: SegmentSpec, first_full: int, moe_impl: str, mesh: Any, params: Mapping,
                  carry, ctx: dict[str, Array]):
    """One segment of `Group`s, applied to `params` (its `[groups, ...]` / `[groups, count, ...]` stacks as `Group`
    declares them): `(((h, indices), cache), ...) -> (((h, indices), cache), indices [groups, B, T, K])`.

    The F layers' weights and a one-group segment's runs are scanned over, as `nn.scan` would. A segment of several
    groups is different: there `nn.scan` inside `nn.scan` slices the group's `[count, ...]` run weights out of the
    stack, and the run loop can only take that slice as a buffer, so XLA copied every run weight every group
    (1.2 GB a MoE layer at 30B: 2.8 ms of a 47-layer decode step, and a run out of memory on an H100). Unrolling
    the run under the group scan still copied the group's slice. So the runs of such a segment are unrolled and
    each S layer takes its weights from the whole stack with `take_layer` at (group, layer): one slice whose
    offset is affine in the group counter, the form XLA hands a kernel in place, as it does for the F layers.
    The price is in the backward pass: those stacks' gradients accumulate whole in the group loop (one add of the
    stack's size per group), negligible for the models trained here.

    With Pallas kernels in use on one device, each layer also gets its weights' whole stacks and its index in them
    (the `LAYER_STACKS` collection, `model.stacks`), which the one-row, per-head and routed-expert kernels read in
    place: a slice handed to a Triton kernel would be copied out of the stack first. The loops then carry each
    stack once, as a constant, and every layer takes its slices with `take_layer`: a stack both scanned over and
    carried whole would be two loop inputs sharing one buffer.
    """
    full = Block(cfg, True, spec.kinds[0], moe_impl, mesh, parent=None)
    runs = [(Block(cfg, False, kind, moe_impl, mesh, parent=None), count) for kind, count in spec.shared_runs]
    # On a mesh of several devices (given, or set with `jax.set_mesh`) the weights are sharded, and a custom call
    # would gather them: XLA's products.
    devices = (mesh if mesh is not None else jax.sharding.get_abstract_mesh()).size
    in_place = kernels.use_pallas(cfg.backend) and devices <= 1

    def layer(block, weights, stacks, index, hidden, cache, at, full_at=None):
        variables = {"params": weights}
        if in_place:
            variables[LAYER_STACKS] = stacked_weights(weights, stacks, index)
        hidden, cache = block.apply(variables, hidden, ctx, with_slots(cache, at, full_at))
        return hidden, without_slots(cache)

    def own_slices(stack, at, scanned):
        """A layer's weights: the scan's slices, or (in place, where the scan carries no weights) `take_layer`."""
        return scanned if scanned is not None else jax.tree.map(lambda a: take_layer(a, at), stack)

    def group(carry, xs):
        g, scanned = xs
        full_weights = own_slices(params["full"], (g,), scanned)
        hidden, cache = carry
        first = spec.first_layer + g * spec.group_size
        with jax.named_scope("full"):
            hidden, cache = layer(full, full_weights, params["full"], g, hidden, cache, first, first_full + g)
        selected = hidden[1]
        offset = 1
        for r, (block, count) in enumerate(runs):
            stack = params[f"shared_{r}"]
            with jax.named_scope(f"shared_{r}"):
                if spec.num_groups > 1:
                    layers = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), stack)  # [groups count, ...]
                    for j in range(count):
                        weights = jax.tree.map(lambda a, j=j: take_layer(a, (g, j)), stack)
                        hidden, cache = layer(block, weights, layers, g * count + j, hidden, cache,
                                              first + offset + j)
                else:
                    run_weights = jax.tree.map(lambda a: a.reshape(a.shape[1:]), stack)  # [count, ...]

                    def shared(carry, xs, block=block, at=first + offset, layers=run_weights):
                        j, scanned = xs
                        weights = own_slices(layers, (j,), scanned)
                        return layer(block, weights, layers, j, *carry, at + j), None

                    hidden, cache = jax.lax.scan(shared, (hidden, cache), (jnp.arange(count, dtype=jnp.int32),
                                                                           None if in_place else run_weights))[0]
            offset += count
        return (hidden, cache), selected

    return jax.lax.scan(group, carry, (jnp.arange(spec.num_groups, dtype=jnp.int32),
                                       None if in_place else params["full"]))


class DSAModel(nn.Module):
    """Embedding, the segment scans, final norm and LM head.

    `__call__(tokens [B, T], ctx, cache, num_keys, head_rows=None)` -> (logits float32, indices
    `[n_full, B, T, K]` in F-layer order, the updated cache). `cache` is None for a cache-free forward (keys are
    the T tokens themselves, `num_keys == T`), else the `inference.cache` dict with `num_keys` slots per layer.
    Logits are `[B, T, V]`, or `[B, R, V]` for only the rows `head_rows` int32 `[B, R]` (e.g. each prompt's last
    token), which spares the LM head on the rest.
    """

    cfg: DSAConfig
    moe_impl: str = "ragged"
    mesh: Any = None

    @nn.compact
    def __call__(self, tokens: Array, ctx: dict[str, Array], cache: dict | None, num_keys: int,
                 head_rows: Array | None = None):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        embed = self.param("embed", logical(nn.initializers.normal(0.02), "vocab", "embed"),
                           (c.vocab_size, c.hidden_size), jnp.float32)
        h = embed[tokens].astype(dt)
        b, t = tokens.shape
        topk = min(c.index_topk, num_keys)
        carry = ((h, jnp.full((b, t, topk), -1, jnp.int32)), cache)
        selected, first_full = [], 0
        for s, spec in enumerate(c.segments):
            name = f"segment_{s}"
            if self.is_initializing():  # declares the stacked params (shapes, logical axes)
                seg = nn.scan(Group, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=nn.broadcast, out_axes=0, length=spec.num_groups,
                              metadata_params={nn.PARTITION_NAME: "groups"})
                hidden, seg_indices = seg(c, spec, self.moe_impl, self.mesh, name=name)(carry[0], ctx)
                carry = (hidden, carry[1])
            else:
                with jax.named_scope(name):
                    carry, seg_indices = apply_segment(c, spec, first_full, self.moe_impl, self.mesh,
                                                       self.variables["params"][name], carry, ctx)
            selected.append(seg_indices)
            first_full += spec.num_groups
        (h, _), cache = carry
        if head_rows is not None:
            h = jnp.take_along_axis(h, head_rows[..., None], axis=1)
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, name="final_norm")(h)
        if c.tie_word_embeddings:
            logits = h @ embed.T.astype(dt)
        else:
            head = self.param("lm_head", logical(nn.initializers.normal(0.02), "embed", "vocab"),
                              (c.hidden_size, c.vocab_size), jnp.float32)
            logits = h @ head.astype(dt)
        return logits.astype(jnp.float32), jnp.concatenate(selected, axis=0), cache


def make_context(cfg: DSAConfig, positions: Array, k_lengths: Array, offsets: Array) -> dict[str, Array]:
    """The per-call inputs every layer shares: RoPE tables for `positions [B, T]`, valid key counts, cache offsets."""
    cos, sin = rope_cos_sin(cfg, positions)
    return {"cos": cos, "sin": sin, "positions": positions.astype(jnp.int32),
            "k_lengths": k_lengths.astype(jnp.int32), "offsets": offsets.astype(jnp.int32)}


def check_tokens(cfg: DSAConfig, tokens: Any) -> None:
    """Rejects token ids outside `[0, vocab_size)` when they are concrete (a traced array cannot be checked)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if arr.ndim != 2:
        raise ValueError(f"tokens must be int [B, T], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.shape[1] < 1:
        raise ValueError("tokens must hold at least one position per row, got T = 0")
    if arr.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {arr.shape[1]} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
        bad = arr[(arr < 0) | (arr >= cfg.vocab_size)]
        raise ValueError(f"token ids out of range [0, {cfg.vocab_size}): e.g. {bad[:5].tolist()}")


@functools.partial(jax.jit, static_argnames=("cfg", "return_indices", "moe_impl"))
def _forward(params, tokens, cfg: DSAConfig, return_indices: bool, moe_impl: str):
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    ctx = make_context(cfg, positions, jnp.full((b,), t, jnp.int32), jnp.zeros((b,), jnp.int32))
    logits, selected, _ = DSAModel(cfg, moe_impl).apply({"params": params}, tokens.astype(jnp.int32), ctx, None, t)
    if not return_indices:
        return logits
    return logits, {layer: selected[i] for i, layer in enumerate(cfg.full_layers)}


def forward(params: dict, cfg: DSAConfig, tokens: Array, *, return_indices: bool = False, moe_impl: str | None = None):
    """int32 tokens `[B, T]` -> float32 logits `[B, T, V]` of a causal forward from position 0.

    With `return_indices=True` also returns `{layer: int32 [B, T, k]}` for every F layer: the top-k key positions
    each query attends to, `k = min(index_topk, T)`, padded with -1 where fewer than k keys are causally valid.
    Order within the k slots is unspecified. `cfg.pattern` decides the schedule; `params` must be laid out for it
    (see `params_from_hf`, `relayout`). `moe_impl` is one of `moe.MOE_IMPLS`; None picks the default for the
    platform (`moe.resolve_moe_impl`). Jittable: `cfg` is static.
    """
    check_tokens(cfg, tokens)
    check_layout(params, cfg)
    return _forward(params, jnp.asarray(tokens), cfg, return_indices, resolve_moe_impl(moe_impl))


def init_params(cfg: DSAConfig, seed: int = 0, *, moe_impl: str = "ragged") -> dict:
    """Random params (normal, std 0.02; norms 1) laid out for `cfg.pattern`: a plain tree of arrays (see
    `logical_axes` for how each one shards)."""
    return nn.meta.unbox(jax.jit(functools.partial(_boxed_init, cfg, moe_impl))(jax.random.PRNGKey(seed)))


def _boxed_init(cfg: DSAConfig, moe_impl: str, key) -> dict:
    """Params as flax initializes them: each leaf boxed with its logical axis names."""
    tokens = jnp.zeros((1, 2), jnp.int32)
    ctx = make_context(cfg, jnp.zeros((1, 2), jnp.int32), jnp.full((1,), 2), jnp.zeros((1,), jnp.int32))
    return DSAModel(cfg, moe_impl).init(key, tokens, ctx, None, 2)["params"]


def logical_axes(cfg: DSAConfig) -> dict:
    """The params tree of `cfg.pattern` with a `PartitionSpec` of logical axis names at each leaf, as each layer
    declares them next to its params ("heads", "experts", "mlp", "vocab", "embed", ...; the stacking axes are
    "groups" and "layers"). `inference.sharding` maps the names to mesh axes. Computed without allocating."""
    return nn.get_partition_spec(jax.eval_shape(functools.partial(_boxed_init, cfg, "ragged"), jax.random.PRNGKey(0)))


def param_shapes(cfg: DSAConfig) -> dict:
    """The stacked params' `jax.ShapeDtypeStruct`s (float32) for `cfg.pattern`, computed without allocating."""
    return jax.eval_shape(lambda: init_params(cfg))


def check_layout(params: Mapping, cfg: DSAConfig) -> None:
    """Raises a ValueError when `params` are not stacked for `cfg.pattern` (cheap: keys and leading dims only)."""
    expected = {f"segment_{s}" for s in range(len(cfg.segments))}
    found = {k for k in params if k.startswith("segment_")}
    hint = "; use indexcache_jax.relayout(params, cfg_of_params, cfg) to move params to another pattern"
    if found != expected:
        raise ValueError(f"params hold {len(found)} layer segments, pattern {cfg.pattern!r} needs {len(expected)}"
                         + hint)
    for s, spec in enumerate(cfg.segments):
        seg = params[f"segment_{s}"]
        parts = {"full": (spec.num_groups,)}
        parts.update({f"shared_{r}": (spec.num_groups, n) for r, (_, n) in enumerate(spec.shared_runs)})
        if set(seg) != set(parts) or "indexer" not in seg["full"]:
            raise ValueError(f"segment {s} of the params does not match pattern {cfg.pattern!r}" + hint)
        for part, lead in parts.items():
            got = tuple(seg[part]["attn_norm"]["scale"].shape[:len(lead)])
            if got != lead:
                raise ValueError(f"segment {s} {part} stacks {got} layers, pattern {cfg.pattern!r} needs {lead}"
                                 + hint)
