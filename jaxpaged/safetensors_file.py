"""A minimal, strict reader of the safetensors format over ``mmap``.

Tensors are returned as zero-copy NumPy views of the mapped file (bfloat16 through ml_dtypes), so
the loader can convert and ship one tensor at a time to the device without ever holding a second
full copy of the weights in host memory. Malformed files raise :class:`CheckpointError` naming the
file and what is wrong.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, malformed, or does not fit the model."""


_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """One ``.safetensors`` file: ``keys()``, ``shape(name)``, ``get(name)`` → NumPy view."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._fh = open(path, "rb")
        except OSError as e:
            raise CheckpointError(f"cannot open weights file {path}: {e}") from e
        size = os.fstat(self._fh.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", self._fh.read(8))
        if header_len <= 0 or 8 + header_len > size:
            raise CheckpointError(f"{path}: corrupt safetensors header (length {header_len}, file {size} bytes)")
        try:
            header = json.loads(self._fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        data_len = size - self._data_start
        for name, info in header.items():
            try:
                dtype = np.dtype(_DTYPES[info["dtype"]])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: bad header entry for tensor {name!r}: {info!r}") from e
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != n or begin < 0 or end > data_len:
                raise CheckpointError(
                    f"{path}: tensor {name!r} spans bytes [{begin}, {end}) but needs {n} bytes "
                    f"within a {data_len}-byte data section (truncated or corrupt file)"
                )
            self._entries[name] = (dtype, shape, begin, end)
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def get(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        buf = memoryview(self._mm)[self._data_start + begin : self._data_start + end]
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self._entries:
            yield name, self.get(name)

    def close(self) -> None:
        # Views handed out keep the map alive; closing it under them would crash, so let GC do it.
        self._fh.close()


def save_safetensors(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    """Writes NumPy arrays (bfloat16 included) as a safetensors file."""
    inv = {np.dtype(v): k for k, v in _DTYPES.items()}
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        header[name] = {"dtype": inv[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(arr.tobytes())
