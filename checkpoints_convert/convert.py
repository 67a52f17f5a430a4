"""HF checkpoint directory -> our stacked params, streamed one destination leaf at a time.

`plan_conversion` validates the whole checkpoint before anything is written: every shard header (offsets, dtypes),
every tensor the config needs (present, shape, dtype, FP8 scale), no unexpected keys. `Plan.leaves()` then builds
each stacked leaf in turn: one numpy buffer of the leaf's shape, filled from its source tensors (each read by offset
from its shard, FP8 blocks dequantized, cast, transformed to our orientation), handed on, and dropped. Host memory
therefore peaks near two stacked leaves (the leaf, plus one source tensor's temporaries or the writer's copy of the
leaf), whatever the checkpoint's total size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from checkpoints_convert import fp8
from checkpoints_convert.atomic import atomic_directory
from checkpoints_convert.safetensors_io import NUMPY_DTYPE, CheckpointError, HFCheckpoint, TensorInfo
from indexcache_jax.checkpoint import LeafPath, check_destination, leaf_paths, write_checkpoint
from indexcache_jax.model.config import DSAConfig
from indexcache_jax.text import HF_CONFIG_COPY, copy_tokenizer_files
from indexcache_jax.model.params import TensorSpec, all_specs, is_ignorable_key, is_mtp_key, layer_location

log = logging.getLogger("checkpoints_convert")
Progress = Callable[[int], None]
_INDEXER = ".self_attn.indexer."


@dataclasses.dataclass(frozen=True)
class Source:
    """One HF tensor feeding `slot` (leading indices) of a stacked leaf; `scale` is its FP8 scale, if quantized."""

    spec: TensorSpec
    weight: TensorInfo
    scale: TensorInfo | None
    slot: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (self.scale.nbytes if self.scale else 0)


@dataclasses.dataclass
class Plan:
    """A validated conversion: `cfg` (pattern and dtype resolved) and, per stacked leaf, its shape and sources."""

    checkpoint: HFCheckpoint
    cfg: DSAConfig
    block: tuple[int, int] | None
    shapes: dict[LeafPath, tuple[int, ...]]
    sources: dict[LeafPath, list[Source]]

    @property
    def total_bytes(self) -> int:
        """Bytes read from the shards over the whole conversion (kv_b_proj feeds two leaves and is read twice)."""
        return sum(s.nbytes for srcs in self.sources.values() for s in srcs)

    @property
    def largest_leaf_bytes(self) -> int:
        itemsize = np.dtype(jnp.dtype(self.cfg.dtype)).itemsize
        return max(math.prod(s) for s in self.shapes.values()) * itemsize

    def leaves(self, progress: Progress | None = None) -> Iterator[tuple[LeafPath, np.ndarray]]:
        """Yields `(path, array)` for every stacked leaf, in `cfg.dtype`; `progress(n)` after each n bytes read.

        Dequantization, casts and the transposes of the transforms run as XLA computations on the host CPU, so
        they use every core; besides the leaf buffer, memory holds one source tensor's temporaries.
        """
        dtype = np.dtype(jnp.dtype(self.cfg.dtype))
        with self.checkpoint:
            for path, sources in self.sources.items():
                shape = self.shapes[path]
                if len(sources) == 1:  # the whole leaf (its leading stack dims are 1): no second buffer
                    src = sources[0]
                    value = self._read(src, dtype, shape[len(src.slot):], progress).reshape(shape)
                else:
                    value = np.empty(shape, dtype)
                    for src in sources:
                        value[src.slot] = self._read(src, dtype, shape[len(src.slot):], progress)
                yield path, value
                del value

    def _read(self, src: Source, dtype: np.dtype, want: tuple[int, ...], progress: Progress | None) -> np.ndarray:
        raw = self.checkpoint.read(src.weight.name)
        if src.scale is not None:
            x = fp8.dequantize(raw, self.checkpoint.read(src.scale.name), self.block, dtype)
        else:
            x = fp8.cast(raw, dtype)
        del raw
        # The transforms are layout changes written with numpy calls; on a jax.Array their transposes run in XLA.
        x = np.asarray(src.spec.transform(x))
        if tuple(x.shape) != want:
            raise CheckpointError(f"tensor {src.weight.name!r} maps to shape {tuple(x.shape)}, the params need {want}")
        if progress:
            progress(src.nbytes)
        return x


def _one_line(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def params_dtype(dtype: Any) -> str:
    """"float32" | "bfloat16" from a name or a jnp / numpy dtype; ValueError for anything else."""
    try:
        name = np.dtype(jnp.dtype(dtype)).name
    except TypeError:
        name = None
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16' (or jnp.float32 / jnp.bfloat16), got {dtype!r}")
    return name


def plan_conversion(src: str | os.PathLike, *, dtype: Any = "bfloat16", pattern: str | None = None) -> Plan:
    """Opens and validates the HF checkpoint directory `src`; raises CheckpointError/ValueError with one line.

    `pattern` overrides the pattern resolved from config.json (`indexer_types`, `index_topk_pattern`,
    `index_topk_freq`). Indexer weights of S layers and the MTP layer are skipped; an F layer without indexer
    weights raises naming the layer.
    """
    dtype = params_dtype(dtype)
    ckpt = HFCheckpoint(src)
    cfg = DSAConfig.from_hf(ckpt.config, dtype=dtype)
    if pattern is not None:
        cfg = cfg.with_pattern(pattern)
    tensors = ckpt.tensors
    specs = all_specs(cfg)

    missing = sorted({s.hf_name for s in specs} - set(tensors))
    no_indexer = sorted({int(m.split(".")[2]) for m in missing if _INDEXER in m})
    if no_indexer:
        raise CheckpointError(f"layer {no_indexer[0]} is F in pattern {cfg.pattern!r} but the checkpoint has no "
                              f"indexer weights for it (F layers without indexer: {no_indexer})")
    if missing:
        raise CheckpointError(f"checkpoint lacks tensor(s) {_one_line(missing)}")

    needed_block = False
    consumed: set[str] = set()
    shapes = {p: tuple(x.shape) for p, x in leaf_paths(cfg).items()}
    sources: dict[LeafPath, list[Source]] = {p: [] for p in shapes}
    for spec in specs:
        info = tensors[spec.hf_name]
        if info.shape != spec.hf_shape:
            raise CheckpointError(f"tensor {spec.hf_name!r} has shape {list(info.shape)}, the config expects "
                                  f"{list(spec.hf_shape)}")
        if info.dtype not in NUMPY_DTYPE:
            raise CheckpointError(f"tensor {spec.hf_name!r} has dtype {info.dtype}; supported: {sorted(NUMPY_DTYPE)}")
        scale = tensors.get(spec.hf_name + fp8.SCALE_SUFFIX)
        if info.dtype == "F8_E4M3":
            if scale is None:
                raise CheckpointError(f"FP8 tensor {spec.hf_name!r} has no {spec.hf_name + fp8.SCALE_SUFFIX!r}")
            if len(info.shape) != 2:
                raise CheckpointError(f"FP8 tensor {spec.hf_name!r} has {len(info.shape)} dims; only 2-D weights "
                                      "can be block-dequantized")
            needed_block = True
        elif scale is not None:
            raise CheckpointError(f"tensor {spec.hf_name!r} is {info.dtype} but has a {fp8.SCALE_SUFFIX} scale; "
                                  "only F8_E4M3 weights are dequantized")
        consumed.add(spec.hf_name)
        if scale is not None:
            consumed.add(scale.name)
        if spec.layer is None:
            path, slot = spec.path, ()
        else:
            seg, part, index = layer_location(cfg, spec.layer)
            path, slot = (seg, part) + spec.path, index + (() if spec.expert is None else (spec.expert,))
        sources[path].append(Source(spec, info, scale, slot))

    block = None
    if needed_block:
        block = fp8.block_size(ckpt.config.get("quantization_config"))
        for srcs in sources.values():
            for s in srcs:
                if s.scale is None:
                    continue
                if s.scale.dtype not in ("F32", "BF16", "F16"):
                    raise CheckpointError(f"scale {s.scale.name!r} has dtype {s.scale.dtype}; expected F32")
                if s.scale.shape not in fp8.scale_shape(s.weight.shape, block):
                    raise CheckpointError(f"scale {s.scale.name!r} has shape {list(s.scale.shape)}; weight "
                                          f"{list(s.weight.shape)} with blocks {block} needs "
                                          f"{list(fp8.scale_shape(s.weight.shape, block)[0])}")

    leftover = [k for k in tensors if k not in consumed]
    unexpected = sorted(k for k in leftover if not is_ignorable_key(cfg, k.removesuffix(fp8.SCALE_SUFFIX)))
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) {_one_line(unexpected)} for config {cfg.architecture} with "
                              f"{cfg.num_layers} layers")
    mtp = sorted(k for k in leftover if is_mtp_key(cfg, k))
    if mtp:
        layers = sorted({int(k.split(".")[2]) for k in mtp})
        log.info("skipping MTP layer %s (%d tensors)", ", ".join(map(str, layers)), len(mtp))

    for path, srcs in sources.items():
        slots = {s.slot for s in srcs}
        if not srcs or len(slots) != len(srcs) or len(srcs) != math.prod(shapes[path][:len(srcs[0].slot)]):
            raise RuntimeError(f"internal: leaf {'/'.join(path)} {shapes[path]} is not covered once by its "
                               f"{len(srcs)} source tensors")
    return Plan(ckpt, cfg, block, shapes, sources)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: Any = "bfloat16", pattern: str | None = None,
            overwrite: bool = False, progress: Progress | None = None) -> DSAConfig:
    """Converts the HF checkpoint directory `src` into the converted directory `dst`; returns the config.

    Validates everything first (no file is written for bad input), then streams leaf by leaf into a temporary
    directory renamed to `dst` at the end (removed on errors, Ctrl-C and SIGTERM; see `atomic.atomic_directory`).
    The tokenizer files and the source config.json (as `hf_config.json`) go along. An existing `dst` needs
    `overwrite=True`.
    """
    check_destination(dst, overwrite)
    plan = plan_conversion(src, dtype=dtype, pattern=pattern)
    write_converted(plan, dst, overwrite=overwrite, progress=progress)
    return plan.cfg


def write_converted(plan: Plan, dst: str | os.PathLike, *, overwrite: bool = False,
                    progress: Progress | None = None) -> None:
    """Writes a validated `plan` as the converted directory `dst` (see `convert`)."""
    src = plan.checkpoint.directory
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        staged = os.path.join(tmp, "checkpoint")
        write_checkpoint(staged, plan.cfg, plan.leaves(progress))
        for entry in os.listdir(staged):
            os.rename(os.path.join(staged, entry), os.path.join(tmp, entry))
        os.rmdir(staged)
        copy_tokenizer_files(src, tmp)
        shutil.copyfile(os.path.join(src, "config.json"), os.path.join(tmp, HF_CONFIG_COPY))
