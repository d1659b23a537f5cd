"""One GGUF file (llama.cpp's format): its metadata and its tensors, dequantised to float32.

Parsing is the ``gguf`` package's ``GGUFReader`` (a memory map; no torch); dequantisation is
``gguf_quants``. Tensors come out in HF orientation: GGUF lists dimensions fastest-first
(``ne[0]`` is a row's length), so a file's ``[in, out]`` is a PyTorch ``[out, in]`` weight.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxpaged.gguf_quants import SUPPORTED_TYPES, dequantize
from jaxpaged.safetensors_file import CheckpointError

_MISSING = object()


def is_gguf_path(path: str | None) -> bool:
    return bool(path) and str(path).lower().endswith(".gguf")


class GGUFFile:
    """Metadata by key (``get``), tensor names, types and shapes, and ``tensor(name)`` as float32."""

    def __init__(self, path: str):
        from gguf import GGUFReader

        if not os.path.isfile(path):
            raise CheckpointError(f"GGUF file {path!r} does not exist")
        try:
            reader = GGUFReader(path)
        except (ValueError, OSError, KeyError) as e:
            raise CheckpointError(f"{path!r} is not a readable GGUF file: {e}") from e
        if reader.byte_order != "I":
            raise CheckpointError(f"{path!r} is a big-endian GGUF file; only little-endian files are supported")
        self.path = path
        self._fields = reader.fields
        self._tensors = {t.name: t for t in reader.tensors}
        self._cache: dict[str, Any] = {}

    # ---- metadata ----------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value (str, int, float, bool, or a list of them); ``default`` when absent."""
        if key not in self._cache:
            field = self._fields.get(key)
            self._cache[key] = _MISSING if field is None else field.contents()
        value = self._cache[key]
        return default if value is _MISSING else value

    def require(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise CheckpointError(f"GGUF file {os.path.basename(self.path)!r} lacks the metadata key {key!r}")
        return value

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    # ---- tensors -----------------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """HF (row-major) shape: the reverse of GGUF's fastest-first dimension list."""
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

    def check_tensor_types(self) -> None:
        """Refuses the file when any tensor has a type that cannot be dequantised, naming them."""
        bad = sorted({(t.tensor_type.name, name) for name, t in self._tensors.items()
                      if t.tensor_type.name not in SUPPORTED_TYPES})
        if bad:
            kinds = sorted({k for k, _ in bad})
            raise CheckpointError(
                f"GGUF file {os.path.basename(self.path)!r} holds tensors of type {', '.join(kinds)} (e.g. "
                f"{bad[0][1]!r}), which jaxpaged cannot dequantize; supported types: {', '.join(SUPPORTED_TYPES)}")

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as float32 in HF shape."""
        t = self._tensors[name]
        shape = self.shape(name)
        try:
            values = dequantize(t.data, t.tensor_type.name, int(np.prod(shape)))
        except ValueError as e:
            raise CheckpointError(f"tensor {name!r} in {os.path.basename(self.path)!r}: {e}") from e
        return values.reshape(shape)
