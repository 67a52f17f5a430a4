"""Our params -> a Hugging Face checkpoint that transformers, vLLM and SGLang load unchanged.

The output directory holds sharded safetensors in the hub names and per-expert layout (`model-0000i-of-0000n`), the
index `model.safetensors.index.json`, a `config.json` carrying the F/S pattern (`indexer_types`,
`index_topk_pattern`, `use_index_cache`; see `DSAConfig.to_hf_fields`), and the tokenizer files of the source.
S layers carry no indexer weights, as GLM-5.2 ships them.

Layout: every hub tensor is the inverse of its `model.params.layer_specs` transform applied to one layer's slice of a
stacked leaf (`kv_b_proj` joins `w_uk` and `w_uv`). Dtypes: "float32", "bfloat16", or "float8": the 128x128
block-quantized e4m3 format of the official FP8 checkpoints (`fp8.quantize_blocks`), every Linear weight except the
router, the indexer's `weights_proj` and the LM head stored as `float8_e4m3fn` with an F32 `weight_scale_inv`
`[ceil(out/128), ceil(in/128)]`, the rest in BF16, and `quantization_config` in config.json. The router's
`e_score_correction_bias` stays F32 whatever the dtype (as the released checkpoints store it).

Streaming: the shard headers are planned from the config alone, so the files are created at their final size up
front and each tensor is written at its offset as soon as its stacked leaf arrives, in whatever order the leaves come.
Host memory holds the leaf being split (two for `kv_b_proj`) and one hub tensor. Atomic: everything goes to a
temporary sibling renamed into place at the end, removed on errors, Ctrl-C and SIGTERM (`atomic.atomic_directory`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from checkpoints_convert import fp8
from checkpoints_convert.atomic import atomic_directory
from checkpoints_convert.convert import plan_conversion
from checkpoints_convert.safetensors_io import INDEX_FILE
from indexcache_jax import checkpoint
from indexcache_jax.checkpoint import LeafPath, check_destination, leaf_paths
from indexcache_jax.model.config import SUPPORTED_ARCHITECTURES, DSAConfig, read_json
from indexcache_jax.model.params import TensorSpec, layer_specs, layer_location, top_specs
from indexcache_jax.text import HF_CONFIG_COPY, copy_tokenizer_files

EXPORT_DTYPES = ("bfloat16", "float32", "float8")
FP8_BLOCK = (128, 128)
# Linear weights stored in FP8 by the official checkpoints (suffixes of hub names); routers, the indexer's
# weights_proj, embeddings, the LM head, norms and biases stay unquantized.
FP8_WEIGHTS = ("q_a_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight",
               "o_proj.weight", "indexer.wq_b.weight", "indexer.wk.weight", "gate_proj.weight", "up_proj.weight",
               "down_proj.weight")
# transformers' FineGrainedFP8 quantizer would otherwise expect scales for these Linear modules (GLM-5-FP8's list).
FP8_NOT_CONVERTED = ["lm_head", "mlp.gate", "indexer.weights_proj"]
DEFAULT_MAX_SHARD_BYTES = 5 * 2 ** 30
_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3"}
_NUMPY = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16),
          "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn)}
Progress = Callable[[int], None]


def export_dtype(dtype: Any) -> str:
    """"float32" | "bfloat16" | "float8" from a name or a jnp / numpy dtype (`jnp.float8_e4m3fn` is "float8")."""
    if isinstance(dtype, str) and dtype in EXPORT_DTYPES:
        return dtype
    try:
        name = np.dtype(jnp.dtype(dtype)).name
    except TypeError:
        name = None
    if name in ("float32", "bfloat16"):
        return name
    if name == "float8_e4m3fn":
        return "float8"
    raise ValueError(f"export dtype must be one of {list(EXPORT_DTYPES)} (or jnp.float32 / jnp.bfloat16 / "
                     f"jnp.float8_e4m3fn), got {dtype!r}")


# --------------------------------------------------------------------------------------------------- hub config
def _rope_fields(cfg: DSAConfig) -> dict[str, Any]:
    r = cfg.rope
    params: dict[str, Any] = {"rope_theta": r.theta, "rope_type": r.rope_type}
    if r.rope_type == "yarn":
        params.update(factor=r.factor, original_max_position_embeddings=r.original_max_position_embeddings,
                      beta_fast=r.beta_fast, beta_slow=r.beta_slow)
        for name in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(r, name) is not None:
                params[name] = getattr(r, name)
        if not r.truncate:
            params["truncate"] = False
    out: dict[str, Any] = {"rope_parameters": params, "rope_theta": r.theta}
    if r.rope_type == "yarn":
        # The released configs (and engines reading them) use `rope_scaling`; transformers prefers it when present,
        # so it carries the same values.
        out["rope_scaling"] = {"type": "yarn", **{k: v for k, v in params.items() if k != "rope_theta"}}
    return out


def hf_config(cfg: DSAConfig, dtype: Any = "bfloat16", base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `config.json` of an export of `cfg` in `dtype`: `base` (the source's HF config, for fields such as
    `bos_token_id`) overridden by every field `cfg` determines, the pattern, and the quantization config."""
    dtype = export_dtype(dtype)
    out = dict(base or {})
    # Fields that would contradict the exported pattern, weights or dtype. MTP weights are not exported.
    for stale in ("index_topk_freq", "index_skip_topk_offset", "quantization_config", "rope_scaling", "torch_dtype",
                  "dtype", "first_k_dense_replace", "moe_layer_freq", "layer_types"):
        out.pop(stale, None)
    if "num_nextn_predict_layers" in out:
        out["num_nextn_predict_layers"] = 0
    arch_class = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[cfg.architecture]
    n_dense = next((i for i, t in enumerate(cfg.mlp_layer_types) if t != "dense"), cfg.num_layers)
    out.update(
        architectures=[arch_class], model_type=cfg.architecture, vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads, q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group,
        routed_scaling_factor=cfg.routed_scaling_factor, norm_topk_prob=cfg.norm_topk_prob,
        mlp_layer_types=list(cfg.mlp_layer_types), index_n_heads=cfg.index_n_heads,
        index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk,
        indexer_rope_interleave=cfg.indexer_rope_interleave, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu", scoring_func="sigmoid", topk_method="noaux_tc", attention_bias=False,
        **_rope_fields(cfg), **cfg.to_hf_fields(),
    )
    if "dense" not in cfg.mlp_layer_types[n_dense:]:
        out.update(first_k_dense_replace=n_dense, moe_layer_freq=1)  # what engines without mlp_layer_types read
    if cfg.eos_token_id:
        out["eos_token_id"] = cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else list(cfg.eos_token_id)
    torch_dtype = "float32" if dtype == "float32" else "bfloat16"
    out.update(dtype=torch_dtype, torch_dtype=torch_dtype)
    if dtype == "float8":
        out["quantization_config"] = {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(FP8_BLOCK), "modules_to_not_convert": list(FP8_NOT_CONVERTED),
            **({"scale_fmt": "ue8m0"} if cfg.architecture == "deepseek_v32" else {}),
        }
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------------- tensor layout
@dataclasses.dataclass(frozen=True)
class HubTensor:
    """One tensor of the output: hub name, safetensors dtype string, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _NUMPY[self.dtype].itemsize


@dataclasses.dataclass(frozen=True)
class _Job:
    """One hub weight: the (leaf path, slot) slices it is made of, its spec, and what it is written as."""

    spec: TensorSpec
    inputs: tuple[tuple[LeafPath, tuple[int, ...]], ...]
    outputs: tuple[HubTensor, ...]  # the weight, then its FP8 scale if quantized


def _input(cfg: DSAConfig, spec: TensorSpec) -> tuple[LeafPath, tuple[int, ...]]:
    if spec.layer is None:
        return spec.path, ()
    seg, part, index = layer_location(cfg, spec.layer)
    return (seg, part) + spec.path, index + (() if spec.expert is None else (spec.expert,))


def plan_tensors(cfg: DSAConfig, dtype: Any = "bfloat16") -> list[_Job]:
    """Every hub tensor of the export, in file order: embeddings, layers 0..N-1, final norm, LM head."""
    dtype = export_dtype(dtype)
    top = {s.hf_name: s for s in top_specs(cfg)}
    ordered = [[top.pop("model.embed_tokens.weight")]]
    for layer in range(cfg.num_layers):
        groups: dict[str, list[TensorSpec]] = {}
        for s in layer_specs(cfg, layer):
            groups.setdefault(s.hf_name, []).append(s)  # kv_b_proj feeds w_uk and w_uv
        ordered += groups.values()
    ordered += [[s] for s in top.values()]
    jobs = []
    for specs in ordered:
        spec = specs[0]
        if spec.path[-1] == "router_bias" or dtype == "float32":
            stored = "F32"
        elif dtype == "float8" and spec.hf_name.endswith(FP8_WEIGHTS):
            stored = "F8_E4M3"
        else:
            stored = "BF16"
        outputs = [HubTensor(spec.hf_name, stored, spec.hf_shape)]
        if stored == "F8_E4M3":
            outputs.append(HubTensor(spec.hf_name + fp8.SCALE_SUFFIX, "F32",
                                     fp8.scale_shape(spec.hf_shape, FP8_BLOCK)[0]))
        jobs.append(_Job(spec, tuple(_input(cfg, s) for s in specs), tuple(outputs)))
    return jobs


def to_hub(cfg: DSAConfig, spec: TensorSpec, parts: list[np.ndarray]) -> np.ndarray:
    """One layer's slices in our orientation -> the hub tensor `[out, in]` (inverse of `spec.transform`)."""
    if len(parts) == 2:  # kv_b_proj: w_uk [H, nope, kv_lora] and w_uv [H, v, kv_lora] -> [H * (nope + v), kv_lora]
        return np.concatenate(parts, axis=1).reshape(spec.hf_shape)
    (x,) = parts
    if spec.path[-1] == "wq_b":  # [q_lora, H, d] -> [H * d, q_lora]
        return x.reshape(x.shape[0], -1).T
    if spec.path == ("mla", "wo"):  # [H, v, D] -> [D, H * v]
        return x.reshape(-1, x.shape[-1]).T
    if x.ndim == 1 or spec.path == ("embed",):
        return x
    return x.T


# ------------------------------------------------------------------------------------------------------- writing
def _header(tensors: list[HubTensor]) -> tuple[bytes, dict[str, int]]:
    """A safetensors header (padded to 8 bytes, as the library writes it) and each tensor's offset in the data."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets, at = {}, 0
    for t in tensors:
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [at, at + t.nbytes]}
        offsets[t.name] = at
        at += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


class _Shards:
    """The output shards, created at their final size; `write(name, array)` puts one tensor at its offset."""

    def __init__(self, directory: str, tensors: list[HubTensor], max_shard_bytes: int):
        groups: list[list[HubTensor]] = [[]]
        size = 0
        for t in tensors:
            if groups[-1] and size + t.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        n = len(groups)
        self.where: dict[str, tuple[int, int, HubTensor]] = {}
        self.weight_map: dict[str, str] = {}
        self.fds: list[int] = []
        try:
            for i, group in enumerate(groups):
                fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                header, offsets = _header(group)
                fd = os.open(os.path.join(directory, fname), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                self.fds.append(fd)
                _pwrite_all(fd, header, 0)
                os.ftruncate(fd, len(header) + sum(t.nbytes for t in group))
                for t in group:
                    self.where[t.name] = (fd, len(header) + offsets[t.name], t)
                    self.weight_map[t.name] = fname
        except BaseException:
            self.close()
            raise
        self.total_size = sum(t.nbytes for t in tensors)

    def write(self, name: str, value: np.ndarray) -> None:
        fd, offset, t = self.where[name]
        value = np.ascontiguousarray(value)
        if value.dtype != _NUMPY[t.dtype] or tuple(value.shape) != t.shape:
            raise RuntimeError(f"internal: {name} is {value.dtype}{list(value.shape)}, planned {t.dtype}{list(t.shape)}")
        _pwrite_all(fd, memoryview(value.reshape(-1).view(np.uint8)), offset)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_hf(directory: str, cfg: DSAConfig, leaves: Iterable[tuple[LeafPath, Any]], *, dtype: Any = "bfloat16",
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: Progress | None = None) -> None:
    """Writes the safetensors shards and their index for `cfg`'s params into the existing `directory`.

    `leaves` yields `(leaf path, array)` for every stacked leaf of `cfg`'s layout (jax or numpy, any float dtype), in
    any order; each is dropped once its hub tensors are written. `progress(n)` after each n bytes written.
    """
    dtype = export_dtype(dtype)
    jobs = plan_tensors(cfg, dtype)
    shapes = leaf_paths(cfg)
    users: dict[LeafPath, list[_Job]] = {}
    uses: dict[LeafPath, int] = {p: 0 for p in shapes}
    for job in jobs:
        for path, _ in job.inputs:
            users.setdefault(path, []).append(job)
            uses[path] += 1
    shards = _Shards(directory, [t for job in jobs for t in job.outputs], max_shard_bytes)
    try:
        available: dict[LeafPath, np.ndarray] = {}
        seen: set[LeafPath] = set()
        for path, value in leaves:
            path = tuple(path)
            want = shapes.get(path)
            if want is None or tuple(value.shape) != tuple(want.shape):
                raise ValueError(f"leaf {'/'.join(path)} of shape {tuple(value.shape)} does not fit the params of "
                                 f"pattern {cfg.pattern!r} ({None if want is None else tuple(want.shape)})")
            if path in seen:
                raise ValueError(f"leaf {'/'.join(path)} given twice")
            seen.add(path)
            available[path] = np.asarray(value)
            del value
            for job in users.get(path, []):
                if not all(p in available for p, _ in job.inputs):
                    continue
                _write_job(cfg, job, [available[p][slot] for p, slot in job.inputs], shards, progress)
                for p, _ in job.inputs:
                    uses[p] -= 1
                    if uses[p] == 0:
                        del available[p]
        missing = sorted(set(shapes) - seen)
        if missing:
            raise ValueError(f"params lack leaves {['/'.join(p) for p in missing[:3]]} of pattern {cfg.pattern!r}")
    finally:
        shards.close()
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": shards.total_size}, "weight_map": dict(sorted(shards.weight_map.items()))},
                  f, indent=2)


def _write_job(cfg: DSAConfig, job: _Job, parts: list[np.ndarray], shards: _Shards, progress: Progress | None):
    weight = job.outputs[0]
    hub = to_hub(cfg, job.spec, parts)
    if weight.dtype == "F8_E4M3":
        codes, scale = fp8.quantize_blocks(np.asarray(hub, np.float32), FP8_BLOCK)
        shards.write(weight.name, codes)
        shards.write(job.outputs[1].name, scale)
    else:
        shards.write(weight.name, np.asarray(hub).astype(_NUMPY[weight.dtype]))
    if progress:
        progress(sum(t.nbytes for t in job.outputs))


def _write_directory(tmp: str, cfg: DSAConfig, leaves: Iterable[tuple[LeafPath, Any]], dtype: str,
                     base_config: Mapping[str, Any] | None, side_files_from: str | None, max_shard_bytes: int,
                     progress: Progress | None) -> None:
    write_hf(tmp, cfg, leaves, dtype=dtype, max_shard_bytes=max_shard_bytes, progress=progress)
    if side_files_from is not None:
        copy_tokenizer_files(side_files_from, tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config(cfg, dtype, base_config), f, indent=2)


def _source_config(directory: str | os.PathLike | None) -> dict | None:
    """The HF config kept with a checkpoint: config.json of an HF directory, hf_config.json of a converted one."""
    if directory is None:
        return None
    path = os.path.join(directory, HF_CONFIG_COPY if checkpoint.is_converted(directory) else "config.json")
    return read_json(path, "HF config") if os.path.isfile(path) else None


def export(params: Mapping, cfg: DSAConfig, dst: str | os.PathLike, *, dtype: Any = "bfloat16",
           source: str | os.PathLike | None = None, overwrite: bool = False,
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: Progress | None = None) -> None:
    """Writes `params` (laid out for `cfg.pattern`) as the HF checkpoint directory `dst` (see the module docstring).

    `dtype`: "float32", "bfloat16" or "float8" (or jnp.float32 / jnp.bfloat16 / jnp.float8_e4m3fn). `source`: a
    checkpoint directory (HF or converted) whose tokenizer files are copied and whose HF config supplies the fields
    our config does not hold (bos_token_id, ...). An existing `dst` needs `overwrite=True`.
    """
    dtype = export_dtype(dtype)
    check_destination(dst, overwrite)
    if not max_shard_bytes > 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves = ((tuple(k.key for k in p), x) for p, x in flat)
    base = _source_config(source)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        _write_directory(tmp, cfg, leaves, dtype, base, None if source is None else os.fspath(source),
                         max_shard_bytes, progress)


@dataclasses.dataclass
class ExportPlan:
    """An export of a checkpoint directory, validated: `cfg` (pattern resolved), `total_bytes` to be written."""

    source: str
    cfg: DSAConfig
    dtype: str
    max_shard_bytes: int
    leaves: Callable[[], Iterator[tuple[LeafPath, np.ndarray]]]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for job in plan_tensors(self.cfg, self.dtype) for t in job.outputs)

    def write(self, dst: str | os.PathLike, *, overwrite: bool = False, progress: Progress | None = None) -> None:
        with atomic_directory(dst, overwrite=overwrite) as tmp:
            _write_directory(tmp, self.cfg, self.leaves(), self.dtype, _source_config(self.source), self.source,
                             self.max_shard_bytes, progress)


def plan_export(src: str | os.PathLike, *, dtype: Any = "bfloat16", pattern: str | None = None,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportPlan:
    """Validates an export of the checkpoint directory `src` (converted or HF) under `pattern` (default: its own).

    Leaves are read one at a time from disk when written: a converted directory in its stored dtype (re-stacked one
    leaf name at a time when the pattern changes), an HF directory through the converter's reader. An F layer whose
    indexer weights `src` lacks raises a ValueError naming it.
    """
    dtype = export_dtype(dtype)
    if not max_shard_bytes > 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    src = os.path.abspath(os.fspath(src))
    if checkpoint.is_converted(src):
        stored_cfg = checkpoint._read_config(src)
        cfg = stored_cfg.with_pattern(pattern) if pattern is not None else stored_cfg
        params_dir = os.path.join(src, checkpoint.PARAMS_DIR)
        read_dtype = np.dtype(jnp.dtype(stored_cfg.dtype))
        if cfg.pattern != stored_cfg.pattern:
            _check_indexers(stored_cfg, cfg)

            def leaves():
                return checkpoint._relayout_leaves(params_dir, stored_cfg, cfg, read_dtype)
        else:
            def leaves():
                stored = leaf_paths(stored_cfg)
                for p, x in stored.items():
                    got = checkpoint._load_stored(params_dir, {p: np.empty(x.shape, read_dtype)}, stored)
                    yield p, np.asarray(got[p])
        return ExportPlan(src, cfg, dtype, max_shard_bytes, leaves)
    if not os.path.isdir(src):
        raise ValueError(f"{src} is not a checkpoint directory")
    # Reading an HF directory dequantizes FP8 and casts: float32 keeps the values for a float32 or FP8 export.
    hf_plan = plan_conversion(src, dtype="bfloat16" if dtype == "bfloat16" else "float32", pattern=pattern)
    return ExportPlan(src, hf_plan.cfg, dtype, max_shard_bytes, hf_plan.leaves)


def _check_indexers(stored: DSAConfig, cfg: DSAConfig) -> None:
    missing = [i for i in cfg.full_layers if stored.pattern[i] != "F"]
    if missing:
        raise ValueError(f"layer {missing[0]} is F in pattern {cfg.pattern!r}, but the checkpoint (pattern "
                         f"{stored.pattern!r}) has no indexer weights for it (F layers without indexer: {missing})")


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: Any = "bfloat16",
                      pattern: str | None = None, overwrite: bool = False,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: Progress | None = None) -> DSAConfig:
    """Exports the checkpoint directory `src` (converted or HF) to the HF directory `dst`; returns the config."""
    check_destination(dst, overwrite)
    plan = plan_export(src, dtype=dtype, pattern=pattern, max_shard_bytes=max_shard_bytes)
    plan.write(dst, overwrite=overwrite, progress=progress)
    return plan.cfg
