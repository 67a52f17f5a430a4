"""The params pytree: HF hub names -> our layout, stacking per layer group, and relayout between patterns.

Our layout (see `model.DSAModel`): top-level `embed [V, D]`, `final_norm/scale [D]`, `lm_head [D, V]` (absent when
tied), and `segment_{s}` subtrees whose `full` leaves are stacked `[G, ...]` over the segment's groups and whose
`shared_{r}` leaves are stacked `[G, n_r, ...]`. A single layer's subtree (`layer_tree`) holds `attn_norm`, `mla`,
`indexer` (F layers only), `mlp_norm` and `mlp` (dense: gate/up/down; MoE: router, router_bias, experts_*, shared).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from indexcache_jax.model.config import DSAConfig

Transform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor and where it lands: `path` inside a layer tree (or the top level when `layer` is None),
    `expert` slot for per-expert keys, the HF shape it must have, and the transform into our orientation."""

    hf_name: str
    layer: int | None
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    transform: Transform
    expert: int | None = None


def _t(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _reshape_t(*shape: int) -> Transform:
    return lambda x: np.ascontiguousarray(x.T).reshape(shape)


def layer_specs(cfg: DSAConfig, layer: int) -> list[TensorSpec]:
    """Every HF tensor of decoder layer `layer` that our layout consumes under `cfg.pattern`."""
    c = cfg
    p = f"model.layers.{layer}."
    d, h = c.hidden_size, c.num_heads
    nope_v = c.qk_nope_head_dim + c.v_head_dim
    specs = [
        TensorSpec(p + "input_layernorm.weight", layer, ("attn_norm", "scale"), (d,), np.asarray),
        TensorSpec(p + "post_attention_layernorm.weight", layer, ("mlp_norm", "scale"), (d,), np.asarray),
        TensorSpec(p + "self_attn.q_a_proj.weight", layer, ("mla", "wq_a"), (c.q_lora_rank, d), _t),
        TensorSpec(p + "self_attn.q_a_layernorm.weight", layer, ("mla", "q_norm", "scale"), (c.q_lora_rank,),
                   np.asarray),
        TensorSpec(p + "self_attn.q_b_proj.weight", layer, ("mla", "wq_b"), (h * c.qk_head_dim, c.q_lora_rank),
                   _reshape_t(c.q_lora_rank, h, c.qk_head_dim)),
        TensorSpec(p + "self_attn.kv_a_proj_with_mqa.weight", layer, ("mla", "wkv_a"),
                   (c.latent_row_dim, d), _t),
        TensorSpec(p + "self_attn.kv_a_layernorm.weight", layer, ("mla", "kv_norm", "scale"), (c.kv_lora_rank,),
                   np.asarray),
        TensorSpec(p + "self_attn.kv_b_proj.weight", layer, ("mla", "w_uk"), (h * nope_v, c.kv_lora_rank),
                   lambda x: np.ascontiguousarray(x.reshape(h, nope_v, c.kv_lora_rank)[:, : c.qk_nope_head_dim])),
        TensorSpec(p + "self_attn.kv_b_proj.weight", layer, ("mla", "w_uv"), (h * nope_v, c.kv_lora_rank),
                   lambda x: np.ascontiguousarray(x.reshape(h, nope_v, c.kv_lora_rank)[:, c.qk_nope_head_dim:])),
        TensorSpec(p + "self_attn.o_proj.weight", layer, ("mla", "wo"), (d, h * c.v_head_dim),
                   _reshape_t(h, c.v_head_dim, d)),
    ]
    if cfg.pattern[layer] == "F":
        ip = p + "self_attn.indexer."
        hi, di = c.index_n_heads, c.index_head_dim
        specs += [
            TensorSpec(ip + "wq_b.weight", layer, ("indexer", "wq_b"), (hi * di, c.q_lora_rank),
                       _reshape_t(c.q_lora_rank, hi, di)),
            TensorSpec(ip + "wk.weight", layer, ("indexer", "wk"), (di, d), _t),
            TensorSpec(ip + "k_norm.weight", layer, ("indexer", "k_norm_scale"), (di,), np.asarray),
            TensorSpec(ip + "k_norm.bias", layer, ("indexer", "k_norm_bias"), (di,), np.asarray),
            TensorSpec(ip + "weights_proj.weight", layer, ("indexer", "weights_proj"), (hi, d), _t),
        ]
    if cfg.mlp_layer_types[layer] == "dense":
        i = c.intermediate_size
        specs += [
            TensorSpec(p + "mlp.gate_proj.weight", layer, ("mlp", "gate"), (i, d), _t),
            TensorSpec(p + "mlp.up_proj.weight", layer, ("mlp", "up"), (i, d), _t),
            TensorSpec(p + "mlp.down_proj.weight", layer, ("mlp", "down"), (d, i), _t),
        ]
    else:
        i, e = c.moe_intermediate_size, c.n_routed_experts
        specs += [
            TensorSpec(p + "mlp.gate.weight", layer, ("mlp", "router"), (e, d), _t),
            TensorSpec(p + "mlp.gate.e_score_correction_bias", layer, ("mlp", "router_bias"), (e,), np.asarray),
        ]
        for x in range(e):
            ep = f"{p}mlp.experts.{x}."
            specs += [
                TensorSpec(ep + "gate_proj.weight", layer, ("mlp", "experts_gate"), (i, d), _t, expert=x),
                TensorSpec(ep + "up_proj.weight", layer, ("mlp", "experts_up"), (i, d), _t, expert=x),
                TensorSpec(ep + "down_proj.weight", layer, ("mlp", "experts_down"), (d, i), _t, expert=x),
            ]
        if c.n_shared_experts:
            si = i * c.n_shared_experts
            sp = p + "mlp.shared_experts."
            specs += [
                TensorSpec(sp + "gate_proj.weight", layer, ("mlp", "shared", "gate"), (si, d), _t),
                TensorSpec(sp + "up_proj.weight", layer, ("mlp", "shared", "up"), (si, d), _t),
                TensorSpec(sp + "down_proj.weight", layer, ("mlp", "shared", "down"), (d, si), _t),
            ]
    return specs


def top_specs(cfg: DSAConfig) -> list[TensorSpec]:
    """The embedding, final norm and (untied) LM head."""
    specs = [
        TensorSpec("model.embed_tokens.weight", None, ("embed",), (cfg.vocab_size, cfg.hidden_size), np.asarray),
        TensorSpec("model.norm.weight", None, ("final_norm", "scale"), (cfg.hidden_size,), np.asarray),
    ]
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", None, ("lm_head",), (cfg.vocab_size, cfg.hidden_size), _t))
    return specs


def all_specs(cfg: DSAConfig) -> list[TensorSpec]:
    specs = top_specs(cfg)
    for layer in range(cfg.num_layers):
        specs += layer_specs(cfg, layer)
    return specs


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_INDEXER_KEY = re.compile(r"^model\.layers\.(\d+)\.self_attn\.indexer\.")
_FUSED_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def is_mtp_key(cfg: DSAConfig, name: str) -> bool:
    """Keys of the MTP (next-token-prediction) layers, indexed `num_hidden_layers` and beyond."""
    m = _LAYER_KEY.match(name)
    return bool(m) and int(m.group(1)) >= cfg.num_layers


def is_ignorable_key(cfg: DSAConfig, name: str) -> bool:
    """Keys a checkpoint may carry that our layout drops: MTP layers, RoPE buffers, indexers of S layers, and the
    LM head of a tied model (some writers store the tied copy)."""
    if is_mtp_key(cfg, name) or name.endswith("rotary_emb.inv_freq"):
        return True
    if cfg.tie_word_embeddings and name == "lm_head.weight":
        return True
    m = _INDEXER_KEY.match(name)
    return bool(m) and int(m.group(1)) < cfg.num_layers and cfg.pattern[int(m.group(1))] == "S"


def expand_fused_experts(cfg: DSAConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Splits transformers' in-memory fused expert tensors (`experts.gate_up_proj [E, 2I, D]`,
    `experts.down_proj [E, D, I]`) into the per-expert hub keys; other keys pass through."""
    out: dict[str, np.ndarray] = {}
    i = cfg.moe_intermediate_size
    for name, value in tensors.items():
        m = _FUSED_EXPERTS.match(name)
        if not m:
            out[name] = value
            continue
        prefix = f"model.layers.{m.group(1)}.mlp.experts."
        value = np.asarray(value)
        for e in range(value.shape[0]):
            if m.group(2) == "gate_up_proj":
                out[f"{prefix}{e}.gate_proj.weight"] = value[e, :i]
                out[f"{prefix}{e}.up_proj.weight"] = value[e, i:]
            else:
                out[f"{prefix}{e}.down_proj.weight"] = value[e]
    return out


# ------------------------------------------------------------------------------------------------ stacking by group
def layer_location(cfg: DSAConfig, layer: int) -> tuple[str, str, tuple[int, ...]]:
    """Where a layer's subtree lives in the stacked params: (segment key, "full" | "shared_r", stack index)."""
    for s, spec in enumerate(cfg.segments):
        if layer in spec.layers():
            g, j = divmod(layer - spec.first_layer, spec.group_size)
            if j == 0:
                return f"segment_{s}", "full", (g,)
            offset = 1
            for r, (_, count) in enumerate(spec.shared_runs):
                if j < offset + count:
                    return f"segment_{s}", f"shared_{r}", (g, j - offset)
                offset += count
    raise ValueError(f"layer {layer} out of range for {cfg.num_layers} layers")


def unstack_layers(params: Mapping, cfg: DSAConfig) -> tuple[dict, list[dict]]:
    """Stacked params -> (top-level leaves, one subtree per layer)."""
    top = {k: v for k, v in params.items() if not k.startswith("segment_")}
    layers = []
    for layer in range(cfg.num_layers):
        seg, part, index = layer_location(cfg, layer)
        layers.append(jax.tree_util.tree_map(lambda x, index=index: x[index], params[seg][part]))
    return top, layers


def stack_layers(top: Mapping, layers: list[Mapping], cfg: DSAConfig, xp=jnp) -> dict:
    """(top-level leaves, per-layer subtrees) -> params stacked for `cfg.pattern`. F layers must hold `indexer`."""
    params: dict = dict(top)
    for s, spec in enumerate(cfg.segments):
        groups = [spec.first_layer + g * spec.group_size for g in range(spec.num_groups)]
        for g0 in groups:
            if "indexer" not in layers[g0]:
                raise ValueError(f"layer {g0} is F in pattern {cfg.pattern!r} but has no indexer weights")
        full = [dict(layers[g0]) for g0 in groups]
        seg = {"full": jax.tree_util.tree_map(lambda *xs: xp.stack(xs), *full)}
        offset = 1
        for r, (_, count) in enumerate(spec.shared_runs):
            runs = []
            for g0 in groups:
                members = [{k: v for k, v in layers[g0 + offset + j].items() if k != "indexer"} for j in range(count)]
                runs.append(jax.tree_util.tree_map(lambda *xs: xp.stack(xs), *members))
            seg[f"shared_{r}"] = jax.tree_util.tree_map(lambda *xs: xp.stack(xs), *runs)
            offset += count
        params[f"segment_{s}"] = seg
    return params


def relayout(params: Mapping, src_cfg: DSAConfig, dst_cfg: DSAConfig) -> dict:
    """Re-stacks params laid out for `src_cfg.pattern` into `dst_cfg.pattern`'s layout.

    F -> S drops that layer's indexer; S -> F needs indexer weights the source does not have and raises.
    """
    same_layout = dict(pattern=dst_cfg.pattern, dtype=dst_cfg.dtype, backend=dst_cfg.backend,
                       indexer_quant=dst_cfg.indexer_quant)
    if dataclasses.replace(src_cfg, **same_layout) != dst_cfg:
        raise ValueError("relayout only changes the pattern; the two configs differ in model fields")
    top, layers = unstack_layers(params, src_cfg)
    return stack_layers(top, layers, dst_cfg)


# ------------------------------------------------------------------------------------------------ HF tensors -> ours
def params_from_hf(cfg: DSAConfig, tensors: Mapping[str, Any], *, dtype: Any = jnp.float32) -> dict:
    """Builds our params from HF hub-named arrays (`save_pretrained` layout: per-expert keys).

    Indexer weights of S layers may be absent (GLM-5.2 ships none) and are dropped if present; MTP-layer keys are
    skipped. Any other missing, unexpected or mis-shaped tensor raises a ValueError naming the key.
    """
    tensors = expand_fused_experts(cfg, tensors)
    specs = all_specs(cfg)
    expected = {s.hf_name for s in specs}
    missing = sorted(expected - set(tensors))
    if missing:
        f_without_indexer = sorted({int(_INDEXER_KEY.match(m).group(1)) for m in missing if _INDEXER_KEY.match(m)})
        if f_without_indexer:
            raise ValueError(f"pattern {cfg.pattern!r} makes layers {f_without_indexer} F, but the checkpoint has no "
                             f"indexer weights for them (e.g. {missing[0]!r})")
        raise ValueError(f"missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(k for k in tensors if k not in expected and not is_ignorable_key(cfg, k))
    if unexpected:
        raise ValueError(f"unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    np_dtype = np.dtype(jnp.dtype(dtype))
    top: dict = {}  # {path of keys: array}, nested by traverse_util.unflatten_dict below
    layers: list[dict] = [{} for _ in range(cfg.num_layers)]
    experts: dict[tuple[int, tuple[str, ...]], list] = {}
    for spec in specs:
        value = np.asarray(tensors[spec.hf_name])
        if tuple(value.shape) != spec.hf_shape:
            raise ValueError(f"tensor {spec.hf_name!r} has shape {tuple(value.shape)}, config expects {spec.hf_shape}")
        value = spec.transform(value.astype(np.float32)).astype(np_dtype)
        if spec.layer is None:
            top[spec.path] = value
        elif spec.expert is None:
            layers[spec.layer][spec.path] = value
        else:
            experts.setdefault((spec.layer, spec.path), []).append(value)
    for (layer, path), values in experts.items():
        layers[layer][path] = np.stack(values)
    stacked = stack_layers(traverse_util.unflatten_dict(top), [traverse_util.unflatten_dict(x) for x in layers], cfg,
                           xp=np)
    return jax.tree_util.tree_map(jnp.asarray, stacked)
