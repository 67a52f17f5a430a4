"""FP8 (e4m3) block dequantization as DeepSeek-V3.2 and GLM-5-FP8 checkpoints store it, and casts to our dtypes.

A quantized Linear weight `W [out, in]` (F8_E4M3) comes with `W_scale_inv [ceil(out/bm), ceil(in/bn)]` (F32), where
`(bm, bn)` is `quantization_config.weight_block_size` (128 x 128 in every released checkpoint). Despite the name,
the scale multiplies: `W_deq[i, j] = float(W[i, j]) * W_scale_inv[i // bm, j // bn]`; the last row/column block
may be partial (`kv_a_proj_with_mqa` has 576 rows). Without a block size the scale is one per-tensor value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from checkpoints_convert.safetensors_io import CheckpointError

SCALE_SUFFIX = "_scale_inv"
# float8_e4m3fn code -> float32 value, for a fast table lookup instead of ml_dtypes' element-wise cast.
_E4M3_TO_F32 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


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


def dequantize(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] | None, dtype: Any) -> np.ndarray:
    """float8_e4m3fn `weight [out, in]` times its block scales -> `dtype [out, in]`.

    The product is formed in float32, one block row at a time, so temporaries stay at `bm x in` floats.
    """
    codes = weight.view(np.uint8)
    scale = np.asarray(scale_inv, np.float32)
    out = np.empty(weight.shape, dtype)
    if block is None:
        out[...] = _E4M3_TO_F32[codes] * scale.reshape(())
        return out
    bm, bn = block
    n_in = weight.shape[1]
    for rb in range(scale.shape[0]):
        rows = slice(rb * bm, (rb + 1) * bm)
        vals = _E4M3_TO_F32[codes[rows]]
        vals *= np.repeat(scale[rb], bn)[:n_in]
        out[rows] = vals
    return out


def cast(x: np.ndarray, dtype: Any) -> np.ndarray:
    """An unquantized BF16/F16/F32 tensor in `dtype` (no copy when it already is)."""
    return x if x.dtype == np.dtype(dtype) else x.astype(dtype)
