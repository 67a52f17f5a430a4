"""Reading HF safetensors checkpoints without the safetensors library: header parsing, validation, lazy reads.

A safetensors file is an 8-byte little-endian u64 header length `N`, `N` bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the raw little-endian data;
offsets are relative to the end of the header. `HFCheckpoint` opens a checkpoint directory (`config.json` plus
`model.safetensors.index.json` and its shards, or a single `model.safetensors`), validates every header against its
file, and reads one tensor at a time by offset, so memory holds only the tensor being read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import threading

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Every dtype string of the safetensors format -> bytes per element. Anything else is rejected as unknown.
ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
# The dtypes a checkpoint's consumed tensors may have, as numpy dtypes for a zero-copy view of the raw bytes.
NUMPY_DTYPE = {
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
}
_MAX_HEADER = 100 * 2 ** 20  # the safetensors library's own limit on the header size


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message is one line naming the file or tensor at fault."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: `file`, absolute byte `offset`, `nbytes`, and its `dtype` string / `shape`."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parses and validates the header of the safetensors file `path`: {tensor name: TensorInfo}.

    Raises CheckpointError when the header length runs past the end of the file, the header is not a JSON object
    of well-formed entries, a dtype is unknown, or data offsets disagree with the shape or leave the data section.
    """
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"corrupt safetensors file {name}: {size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > _MAX_HEADER:
                raise CheckpointError(f"corrupt safetensors file {name}: header length {n} runs past the end of "
                                      f"the file ({size} bytes); the file is truncated or not safetensors")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt safetensors file {name}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt safetensors file {name}: header is not a JSON object")
    data_start, data_len = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        out[key] = _entry(name, path, key, entry, data_start, data_len)
    return out


def _entry(fname: str, path: str, key: str, entry, data_start: int, data_len: int) -> TensorInfo:
    where = f"tensor {key!r} in {fname}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(f"corrupt safetensors file {fname}: entry {key!r} lacks dtype/shape/data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ITEMSIZE:
        raise CheckpointError(f"{where} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(f"corrupt safetensors file {fname}: {key!r} has malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise CheckpointError(f"corrupt safetensors file {fname}: {key!r} has malformed data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(f"corrupt safetensors file {fname}: {key!r} data_offsets [{begin}, {end}] out of "
                              f"range of the {data_len}-byte data section (truncated file?)")
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != nbytes:
        raise CheckpointError(f"corrupt safetensors file {fname}: {key!r} spans {end - begin} bytes, but "
                              f"{dtype}{shape} needs {nbytes}")
    return TensorInfo(key, path, dtype, tuple(shape), data_start + begin, nbytes)


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"missing {what} {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return value


class HFCheckpoint:
    """An HF checkpoint directory, with every shard header parsed and checked against the index.

    `config` is the parsed `config.json`; `tensors` maps every tensor name to its `TensorInfo`. `read(name)` returns
    one tensor as a numpy array of its stored dtype (F8_E4M3 as `ml_dtypes.float8_e4m3fn`, BF16 as
    `ml_dtypes.bfloat16`), read by offset from its shard. Use as a context manager to close the shard files.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory} is not a directory")
        self.config = _read_json(os.path.join(self.directory, "config.json"), "HF config")
        self.tensors: dict[str, TensorInfo] = {}
        index_path = os.path.join(self.directory, INDEX_FILE)
        if os.path.exists(index_path):
            weight_map = _read_json(index_path, "index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{INDEX_FILE} has no weight_map of tensor name -> shard file")
            by_shard: dict[str, list[str]] = {}
            for key, shard in weight_map.items():
                by_shard.setdefault(shard, []).append(key)
            for shard, keys in sorted(by_shard.items()):
                path = os.path.join(self.directory, shard)
                if not os.path.isfile(path):
                    raise CheckpointError(f"missing shard {shard} (listed in {INDEX_FILE} for {keys[0]!r})")
                header = read_header(path)
                absent = [k for k in keys if k not in header]
                if absent:
                    raise CheckpointError(f"{INDEX_FILE} puts {absent[0]!r} in {shard}, but that shard's header "
                                          "does not hold it")
                self.tensors.update((k, header[k]) for k in keys)
        elif os.path.exists(os.path.join(self.directory, SINGLE_FILE)):
            self.tensors = read_header(os.path.join(self.directory, SINGLE_FILE))
        else:
            raise CheckpointError(f"{self.directory} holds neither {INDEX_FILE} nor {SINGLE_FILE}")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` with its stored shape and dtype (see NUMPY_DTYPE), freshly read from disk.

        Reads are positional (`pread`), so they are safe from several threads.
        """
        info = self.tensors[name]
        if info.dtype not in NUMPY_DTYPE:
            raise CheckpointError(f"tensor {name!r} has dtype {info.dtype}; only {sorted(NUMPY_DTYPE)} are "
                                  "supported")
        buf = np.empty(info.nbytes, np.uint8)
        fd, view, done = self._fd(info.file), memoryview(buf), 0
        while done < info.nbytes:
            got = os.preadv(fd, [view[done:]], info.offset + done)
            if got <= 0:
                raise CheckpointError(f"short read of {name!r} from {os.path.basename(info.file)}: {done} of "
                                      f"{info.nbytes} bytes (file changed or truncated?)")
            done += got
        return buf.view(NUMPY_DTYPE[info.dtype]).reshape(info.shape)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
