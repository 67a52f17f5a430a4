"""Converted checkpoints: `load` (converted or HF directories) and `save`.

HF directories are read by a plug-in reader, found through the `indexcache_jax.hf_readers` entry point group (the
`checkpoints_convert` package registers `plan_conversion` there), so the core never imports the converter.

A converted directory holds `dsa_config.json` (our `DSAConfig`, the resolved pattern and the params dtype included)
and `params/`, an orbax checkpoint of the stacked params pytree (see `indexcache_jax.model.params`). It is written one leaf
at a time (orbax partial saves, finalized at the end) into a temporary sibling directory that is renamed into place
only when complete, so host memory holds one leaf at a time and a failure leaves no destination behind.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, SingleDeviceSharding

from indexcache_jax.model.config import DSAConfig, dtype_name, read_json
from indexcache_jax.model.model import param_shapes
from indexcache_jax.model.params import layer_location
from indexcache_jax.inference.sharding import param_shardings

CONFIG_FILE = "dsa_config.json"
PARAMS_DIR = "params"
LeafPath = tuple[str, ...]


def _orbax():
    import orbax.checkpoint.experimental.v1 as ocp

    return ocp


def is_converted(path: str | os.PathLike) -> bool:
    """True when `path` is a directory written by `save` or the converter."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


@functools.lru_cache(maxsize=16)
def leaf_paths(cfg: DSAConfig) -> dict[LeafPath, jax.ShapeDtypeStruct]:
    """Every stacked leaf of `cfg`'s params, keyed by its path of dict keys, with its float32 shape (cached: do not
    mutate the result)."""
    return traverse_util.flatten_dict(param_shapes(cfg))


def check_destination(dst: str | os.PathLike, overwrite: bool) -> None:
    """Raises FileExistsError when `dst` exists and `overwrite` is False."""
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"destination {os.fspath(dst)} already exists (pass --overwrite / overwrite=True)")


def write_checkpoint(dst: str | os.PathLike, cfg: DSAConfig, leaves: Iterable[tuple[LeafPath, Any]], *,
                     overwrite: bool = False, batch_bytes: int = 64 * 2 ** 20) -> None:
    """Writes a converted directory from `(path, array)` pairs, as orbax partial saves of a few leaves each.

    `leaves` is consumed lazily: leaves are gathered until they reach `batch_bytes` (a larger leaf goes alone), then
    written and dropped before more are drawn, so host memory holds at most max(one leaf, `batch_bytes`) of them.
    Everything goes to a temporary sibling of `dst`, renamed to `dst` at the end; on any error the temporary
    directory is removed and `dst` (or its previous content, with `overwrite`) is left untouched. The leaves must
    cover `cfg`'s params.
    """
    ocp = _orbax()
    dst = os.path.abspath(os.fspath(dst))
    check_destination(dst, overwrite)
    parent, name = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        expected = leaf_paths(cfg)
        params_dir = os.path.join(tmp, PARAMS_DIR)
        ctx = ocp.Context()
        # Uncompressed: zstd saves ~20% on bf16 weights but makes saving 4x slower and needs a copy of each leaf.
        ctx.array.saving.use_compression = False
        # Saves are synchronous and the leaves are never modified afterwards: no defensive copy of host arrays.
        ctx.memory.deepcopy_host_arrays = False
        written: set[LeafPath] = set()
        batch: dict[LeafPath, Any] = {}
        batch_size = 0

        def flush() -> None:
            nonlocal batch, batch_size
            with ctx:
                ocp.partial.save(params_dir, traverse_util.unflatten_dict(batch))
            batch, batch_size = {}, 0

        for path, value in leaves:
            want = expected.get(path)
            if want is None or tuple(value.shape) != tuple(want.shape):
                raise ValueError(f"leaf {'/'.join(path)} of shape {tuple(value.shape)} does not fit the params of "
                                 f"this config ({None if want is None else tuple(want.shape)})")
            if batch and batch_size + value.nbytes > batch_bytes:
                flush()
            batch[path] = value
            batch_size += value.nbytes
            del value
            written.add(path)
            if batch_size >= batch_bytes:
                flush()
        if batch:
            flush()
        missing = sorted(set(expected) - written)
        if missing:
            raise ValueError(f"params lack leaves {['/'.join(p) for p in missing[:3]]}")
        ocp.partial.finalize(params_dir)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(cfg.to_json())
        old = None
        if os.path.lexists(dst):
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(dst, old)
        os.rename(tmp, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(dst: str | os.PathLike, cfg: DSAConfig, params: dict, *, overwrite: bool = False) -> None:
    """Writes `params` (laid out for `cfg.pattern`; jax or numpy leaves, any sharding) as a converted directory."""
    write_checkpoint(dst, cfg, traverse_util.flatten_dict(params).items(), overwrite=overwrite)


def _read_config(path: str) -> DSAConfig:
    return DSAConfig.from_dict(read_json(os.path.join(path, CONFIG_FILE), "converted config"))


def _target_shardings(cfg: DSAConfig, mesh: Mesh | None) -> dict[LeafPath, Any]:
    shapes = leaf_paths(cfg)
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return {p: device for p in shapes}
    return traverse_util.flatten_dict(param_shardings(cfg, mesh))


def _load_stored(params_dir: str, wanted: dict[LeafPath, Any], stored: dict[LeafPath, Any]) -> dict:
    """Restores the leaves in `wanted` ({path: abstract leaf}) and nothing else; returns {path: array}."""
    ocp = _orbax()
    tree = traverse_util.unflatten_dict({p: wanted.get(p, ocp.PLACEHOLDER) for p in stored})
    out = traverse_util.flatten_dict(ocp.load(params_dir, tree))
    return {p: out[p] for p in wanted}


def _relayout_leaves(params_dir: str, src: DSAConfig, dst: DSAConfig, dtype: np.dtype
                     ) -> Iterator[tuple[LeafPath, np.ndarray]]:
    """Leaves of `dst`'s layout re-stacked from a checkpoint stored for `src.pattern`, one per-layer leaf name at a
    time (all segments' copies of e.g. `mla/wq_b` are in host memory together, nothing else)."""
    src_leaves, dst_leaves = leaf_paths(src), leaf_paths(dst)
    by_name: dict[LeafPath, list[LeafPath]] = {}
    for p in dst_leaves:
        by_name.setdefault(p[2:] if p[0].startswith("segment_") else p, []).append(p)
    for name, outs in by_name.items():
        if not outs[0][0].startswith("segment_"):
            got = _load_stored(params_dir, {name: np.empty(src_leaves[name].shape, dtype)}, src_leaves)
            yield name, np.asarray(got[name], dtype)
            continue
        sources = {p: np.empty(x.shape, dtype) for p, x in src_leaves.items()
                   if p[0].startswith("segment_") and p[2:] == name}
        stored = _load_stored(params_dir, sources, src_leaves)
        for out in outs:
            buf = np.empty(dst_leaves[out].shape, dtype)
            for layer in range(dst.num_layers):
                seg, part, index = layer_location(dst, layer)
                if (seg, part) != out[:2]:
                    continue
                s_seg, s_part, s_index = layer_location(src, layer)
                value = stored.get((s_seg, s_part) + name)
                if value is None:
                    raise ValueError(f"layer {layer} is F in pattern {dst.pattern!r}, but the checkpoint (pattern "
                                     f"{src.pattern!r}) has no indexer weights for it")
                buf[index] = value[s_index]
            yield out, buf
        del stored


HF_READERS_GROUP = "indexcache_jax.hf_readers"


def hf_reader():
    """The installed HF checkpoint reader: `reader(path, *, dtype, pattern)` -> a plan with `.cfg` and `.leaves()`
    yielding `(leaf path, array)` pairs (see `checkpoints_convert.plan_conversion`)."""
    found = importlib.metadata.entry_points(group=HF_READERS_GROUP)
    if not found:
        raise ValueError(f"no HF checkpoint reader is installed (entry point group {HF_READERS_GROUP!r}); install "
                         "the checkpoints_convert package (pip install -e .) to load HF directories")
    return next(iter(found)).load()


def load(path: str | os.PathLike, *, dtype: Any = None, pattern: str | None = None,
         mesh: Mesh | None = None) -> tuple[DSAConfig, dict]:
    """Loads `(cfg, params)` from a converted directory or an HF checkpoint directory (converted on the fly).

    `dtype` ("float32" | "bfloat16", or `jnp.float32` / `jnp.bfloat16` / a numpy dtype) sets the params dtype and `cfg.dtype`; default: the stored dtype of a converted
    directory, bfloat16 for an HF one. `pattern` overrides the F/S pattern: S layers drop their indexer, and an F
    layer whose indexer weights the checkpoint lacks raises a ValueError naming it. With `mesh`, each leaf is placed
    with its `sharding.param_shardings` NamedSharding as soon as it is read (heads and experts on the `model` axis);
    without, on the default device. HF directories stream: host memory holds one stacked leaf at a time.
    """
    path = os.path.abspath(os.fspath(path))  # orbax accepts absolute paths only
    dtype = None if dtype is None else dtype_name(dtype)
    if is_converted(path):
        stored_cfg = _read_config(path)
        cfg = stored_cfg.replace(dtype=dtype or stored_cfg.dtype)
        if pattern is not None:
            cfg = cfg.with_pattern(pattern)
        params_dir = os.path.join(path, PARAMS_DIR)
        shardings = _target_shardings(cfg, mesh)
        np_dtype = np.dtype(jax.numpy.dtype(cfg.dtype))
        if cfg.pattern == stored_cfg.pattern:
            wanted = {p: jax.ShapeDtypeStruct(x.shape, np_dtype, sharding=shardings[p])
                      for p, x in leaf_paths(cfg).items()}
            flat = _load_stored(params_dir, wanted, wanted)
            leaves: Iterable = flat.items()
        else:
            leaves = ((p, jax.device_put(x, shardings[p]))
                      for p, x in _relayout_leaves(params_dir, stored_cfg, cfg, np_dtype))
    else:
        plan = hf_reader()(path, dtype=dtype or "bfloat16", pattern=pattern)
        cfg = plan.cfg
        shardings = _target_shardings(cfg, mesh)
        leaves = ((p, jax.device_put(x, shardings[p])) for p, x in plan.leaves())
    return cfg, traverse_util.unflatten_dict(dict(leaves))


__all__ = ["CONFIG_FILE", "PARAMS_DIR", "check_destination", "is_converted", "leaf_paths", "load", "save",
           "write_checkpoint"]
