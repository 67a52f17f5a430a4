"""FP8 (e4m3) block quantization and dequantization as DeepSeek-V3.2 and GLM-5-FP8 checkpoints store it, and casts to our dtypes.

A quantized Linear weight `W [out, in]` (F8_E4M3) comes with `W_scale_inv [ceil(out/bm), ceil(in/bn)]` (F32), where
`(bm, bn)` is `quantization_config.weight_block_size` (128 x 128 in every released checkpoint). Despite the name,
the scale multiplies: `W_deq[i, j] = float(W[i, j]) * W_scale_inv[i // bm, j // bn]`; the last row/column block
may be partial (`kv_a_proj_with_mqa` has 576 rows). Without a block size the scale is one per-tensor value.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from checkpoints_convert.safetensors_io import CheckpointError

SCALE_SUFFIX = "_scale_inv"


def block_size(quantization_config: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """`(bm, bn)` from an HF `quantization_config` (fp8, e4m3); None means per-tensor scales.

    Raises CheckpointError for quantization methods or formats this converter cannot dequantize.
    """
    if quantization_config is None:
        raise CheckpointError("checkpoint holds FP8 weights with scales, but config.json has no quantization_config")
    method = quantization_config.get("quant_method")
    if method != "fp8":
        raise CheckpointError(f"quantization_config.quant_method {method!r} is not supported (only 'fp8')")
    fmt = quantization_config.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointError(f"quantization_config.fmt {fmt!r} is not supported (only 'e4m3')")
    block = quantization_config.get("weight_block_size")
    if block is None:
        return None
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"quantization_config.weight_block_size must be two positive ints, got {block!r}")
    return int(block[0]), int(block[1])


def scale_shape(weight_shape: tuple[int, ...], block: tuple[int, int] | None) -> tuple[tuple[int, ...], ...]:
    """The scale shapes accepted for `weight_shape [out, in]`: `[ceil(out/bm), ceil(in/bn)]`, or `[]`/`[1]`."""
    if block is None:
        return ((), (1,))
    out, inp = weight_shape
    return ((-(-out // block[0]), -(-inp // block[1])),)


def host_device() -> jax.Device:
    """The CPU device the converter computes on, whatever the default backend is (the default device when
    `JAX_PLATFORMS` leaves the CPU backend out)."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return jax.devices()[0]


@functools.partial(jax.jit, static_argnames=("block", "dtype"))
def _dequantize(codes: jax.Array, scale: jax.Array, block: tuple[int, int] | None, dtype: np.dtype) -> jax.Array:
    w = jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn).astype(jnp.float32)
    if block is None:
        return (w * scale.reshape(())).astype(dtype)
    out, inp = codes.shape
    s = jnp.repeat(jnp.repeat(scale, block[0], axis=0)[:out], block[1], axis=1)[:, :inp]
    return (w * s).astype(dtype)


def dequantize(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] | None, dtype: Any) -> jax.Array:
    """float8_e4m3fn `weight [out, in]` times its block scales -> `dtype [out, in]`, a jax.Array on the host CPU.

    One fused XLA pass (the product in float32, then the cast); partial last blocks use the scale of their block.
    """
    cpu = host_device()
    codes = jax.device_put(np.asarray(weight).view(np.uint8), cpu)
    scale = jax.device_put(np.asarray(scale_inv, np.float32), cpu)
    return _dequantize(codes, scale, block, np.dtype(dtype))


def cast(x: np.ndarray, dtype: Any) -> jax.Array:
    """An unquantized BF16/F16/F32 tensor in `dtype`, as a jax.Array on the host CPU."""
    return jax.device_put(x, host_device()).astype(dtype)


E4M3_MAX = 448.0


def quantize_blocks(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """float32 `w [out, in]` -> (`float8_e4m3fn [out, in]` codes, float32 `scale_inv [ceil(out/bm), ceil(in/bn)]`),
    the inverse of `dequantize`: each block's scale is its largest magnitude / 448 (1 for an all-zero block), and
    the codes are `w / scale` rounded to nearest-even e4m3. Partial last blocks get the scale of their own values.
    """
    w = np.asarray(w, np.float32)
    out, inp = w.shape
    bm, bn = block
    nb0, nb1 = -(-out // bm), -(-inp // bn)
    padded = np.zeros((nb0 * bm, nb1 * bn), np.float32)
    padded[:out, :inp] = np.abs(w)
    amax = padded.reshape(nb0, bm, nb1, bn).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1.0)).astype(np.float32)
    full = np.repeat(np.repeat(scale, bm, axis=0)[:out], bn, axis=1)[:, :inp]
    codes = np.clip(w / full, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return codes, scale
