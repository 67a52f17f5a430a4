"""One compiled scan over every layer of an all-F model with the F/S pattern as a traced array.

`LayerRunner` is what the greedy search scores candidates with and what distillation trains through: an F layer
computes fresh top-k indices, an S layer reuses the carried ones (`lax.switch`), so no candidate pattern recompiles.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from indexcache_jax.model.config import DSAConfig
from indexcache_jax.model.layers import MLA, Block, RMSNorm
from indexcache_jax.model.model import make_context
from indexcache_jax.model.params import unstack_layers

Array = jax.Array
KINDS = ("dense", "sparse")


def _placeholder_indexer(cfg: DSAConfig, dtype) -> dict:
    """Zero indexer weights shaped like an F layer's (`layers.Indexer`)."""
    d, r, h, di = cfg.hidden_size, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim
    shapes = {"wq_b": (r, h, di), "wk": (d, di), "k_norm_scale": (di,), "k_norm_bias": (di,), "weights_proj": (d, h)}
    return {name: jnp.zeros(shape, dtype) for name, shape in shapes.items()}


class LayerRunner:
    """Per-layer params of an all-F model, restacked by MLP kind, and one jitted scan over the layers.

    `restack(params)` gives `top` (embedding, final norm, head) and `stacks[kind]`, the layers of that MLP kind
    stacked on a leading axis (indexers included). Every jitted function takes them as arguments, never as constants.

    `run(top, stacks, is_full, start, h_states, idx_states, tokens)` (all traced: one compile per batch shape):
      - is_full bool `[N]`: the pattern; start int32: the first layer to run;
      - h_states `[N, B, T, D]`, idx_states int32 `[N, B, T, K]`: the state entering each layer of the current
        pattern (ignored when start == 0, which embeds `tokens` instead);
      - tokens int32 `[B, T]`.
    Returns (nll_sum float32: summed next-token NLL, h_states, idx_states) with layers >= start updated.
    `traces` counts how often `run` has been traced (compiles).
    """

    def __init__(self, cfg: DSAConfig, *, moe_impl: str = "ragged"):
        self.cfg = cfg
        self.moe_impl = moe_impl
        kinds = cfg.mlp_layer_types
        slots = np.zeros(cfg.num_layers, np.int32)
        for kind in KINDS:
            members = [i for i in range(cfg.num_layers) if kinds[i] == kind]
            slots[members] = np.arange(len(members))
        self.slots = slots
        self.kind_ids = np.asarray([KINDS.index(k) for k in kinds], np.int32)
        self.traces = 0
        self._run_jit = jax.jit(self._run)

    def restack(self, params: dict) -> tuple[dict, dict]:
        """Params laid out for `cfg` -> (top, stacks).

        Layers without indexer weights (S in `cfg.pattern`) get zero placeholders so that every layer of a kind
        stacks alike; a traced pattern must never mark them F (callers check that against `cfg.pattern`).
        """
        top, layers = unstack_layers(params, self.cfg)
        missing = [i for i, layer in enumerate(layers) if "indexer" not in layer]
        if missing:
            dtype = jax.tree_util.tree_leaves(layers[0]["mla"])[0].dtype
            layers = [layer if "indexer" in layer else {**layer, "indexer": _placeholder_indexer(self.cfg, dtype)}
                      for layer in layers]
        stacks = {}
        for kind in KINDS:
            members = [layers[i] for i in range(self.cfg.num_layers) if self.cfg.mlp_layer_types[i] == kind]
            if members:
                stacks[kind] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *members)
        return top, stacks

    def run(self, top, stacks, is_full, start, h_states, idx_states, tokens):
        return self._run_jit(top, stacks, is_full, start, h_states, idx_states, tokens)

    def layer_params(self, stacks: dict, layer: int) -> dict:
        """One layer's subtree (with its indexer) out of `stacks`."""
        slot = int(self.slots[layer])
        return jax.tree_util.tree_map(lambda x: x[slot], stacks[self.cfg.mlp_layer_types[layer]])

    def with_indexers(self, stacks: dict, indexers: dict[int, dict]) -> dict:
        """`stacks` with the indexer subtrees of the layers in `indexers` replaced (jittable)."""
        out = {kind: dict(stack) for kind, stack in stacks.items()}
        for layer, tree in indexers.items():
            kind, slot = self.cfg.mlp_layer_types[layer], int(self.slots[layer])
            out[kind]["indexer"] = jax.tree_util.tree_map(lambda s, v: s.at[slot].set(v), out[kind]["indexer"], tree)
        return out

    def scan(self, stacks, is_full, start, h0, idx0, ctx, block_factory=None):
        """Runs layers `start..N-1` (traced `start`, traced bool `is_full [N]`) on the carry `(h0, idx0)`.

        Returns (final carry, (h `[N, B, T, D]`, indices `[N, B, T, K]`) entering each layer). `block_factory
        (has_indexer, kind) -> module` replaces `layers.Block` (same param names, same call signature).
        """
        factory = block_factory or (lambda full, kind: Block(self.cfg, full, kind, self.moe_impl))
        branches = [lambda carry, slot: carry]
        table = np.zeros((len(KINDS), 2), np.int32)  # [kind, is_full] -> branch
        for k, kind in enumerate(KINDS):
            if kind not in stacks:
                continue
            for full in (True, False):
                table[k, int(full)] = len(branches)
                branches.append(self._branch(factory(full, kind), stacks[kind], full, ctx))
        table = jnp.asarray(table)

        def body(carry, xs):
            layer, kind_id, slot, full = xs
            branch = jnp.where(layer >= start, table[kind_id, full.astype(jnp.int32)], 0)
            return jax.lax.switch(branch, branches, carry, slot), carry

        xs = (jnp.arange(self.cfg.num_layers, dtype=jnp.int32), jnp.asarray(self.kind_ids), jnp.asarray(self.slots),
              is_full)
        return jax.lax.scan(body, (h0, idx0), xs)

    @staticmethod
    def _branch(block: nn.Module, stack: dict, full: bool, ctx):
        def apply(carry, slot):
            lp = jax.tree_util.tree_map(lambda x: x[slot], stack)
            if not full:
                lp = {k: v for k, v in lp.items() if k != "indexer"}
            return block.apply({"params": lp}, carry, ctx, None)[0]
        return apply

    def attention_inputs(self, lp: dict, h: Array, ctx: dict) -> tuple[Array, Array, Array, Array]:
        """The attention prelude of one layer (params `lp` as `layer_params` gives them) on h `[B, T, D]`:
        (x = attn_norm(h) `[B, T, D]`, q latent `[B, T, q_lora]`, absorbed query `[B, T, H, kv_lora + rope]`,
        cached row `[latent, k_pe]` `[B, T, kv_lora + rope]`)."""
        c = self.cfg
        x = RMSNorm(c.hidden_size, c.rms_norm_eps).apply({"params": lp["attn_norm"]}, h)
        mla = MLA(c)
        q_latent, q = mla.apply({"params": lp["mla"]}, x, ctx["cos"], ctx["sin"], method=MLA.project_q)
        kv = mla.apply({"params": lp["mla"]}, x, ctx["cos"], ctx["sin"], method=MLA.project_kv)
        return x, q_latent, q, kv

    def embed(self, top, tokens):
        return top["embed"][tokens].astype(jnp.dtype(self.cfg.dtype))

    def log_probs(self, top, h, tokens):
        """Final norm + LM head on h `[B, T, D]` -> float32 `[B, T-1]` log-probabilities of tokens[:, 1:]."""
        c = self.cfg
        hn = RMSNorm(c.hidden_size, c.rms_norm_eps).apply({"params": top["final_norm"]}, h)
        head = top["embed"].T if c.tie_word_embeddings else top["lm_head"]
        logits = (hn @ head.astype(hn.dtype)).astype(jnp.float32)[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

    def context(self, tokens):
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return make_context(self.cfg, positions, jnp.full((b,), t, jnp.int32), jnp.zeros((b,), jnp.int32))

    def initial_states(self, tokens) -> tuple[Array, Array]:
        """Placeholder boundary states for a first run from layer 0 (their values are never read)."""
        b, t = tokens.shape
        k = min(self.cfg.index_topk, t)
        n, d = self.cfg.num_layers, self.cfg.hidden_size
        return jnp.zeros((n, b, t, d), jnp.dtype(self.cfg.dtype)), jnp.full((n, b, t, k), -1, jnp.int32)

    def _run(self, top, stacks, is_full, start, h_states, idx_states, tokens):
        self.traces += 1
        ctx = self.context(tokens)
        h0 = jnp.where(start == 0, self.embed(top, tokens), h_states[start])
        idx0 = jnp.where(start == 0, -1, idx_states[start])
        (h, _), (hs, idxs) = self.scan(stacks, is_full, start, h0, idx0, ctx)
        before = (jnp.arange(self.cfg.num_layers) < start)[:, None, None, None]
        nll = -jnp.sum(self.log_probs(top, h, tokens))
        return nll, jnp.where(before, h_states, hs), jnp.where(before, idx_states, idxs)


@functools.lru_cache(maxsize=8)
def layer_runner(cfg: DSAConfig, moe_impl: str = "ragged") -> LayerRunner:
    """A shared `LayerRunner` per (cfg, moe_impl), so repeated searches reuse its compiled code."""
    return LayerRunner(cfg, moe_impl=moe_impl)
