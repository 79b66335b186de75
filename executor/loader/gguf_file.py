"""A GGUF file's scalar metadata and tensors, read without parsing the vocabulary.

`gguf.GGUFReader` turns every metadata value into numpy fields, the tokenizer's
~100,000 strings included: 8.5 s for SmolLM2-135M on a slow CPU, in every worker
that loads the model. The weights need only the scalars and the tensor table, so
this reader skips string arrays by their lengths (tens of milliseconds) and maps
the tensor data as `gguf.GGUFReader` does (same shapes and dtypes, so
`gguf.quants.dequantize` takes them). Format: github.com/ggml-org/ggml docs/gguf.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

_MAGIC = 0x46554747  # b"GGUF", little-endian
_DEFAULT_ALIGNMENT = 32
_STRING, _ARRAY = 8, 9
# value type -> struct format of a scalar
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
# tensor types stored as plain numpy items; every other type is bytes of quant blocks
_PLAIN = {
    gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.F64: np.float64,
    gguf.GGMLQuantizationType.I8: np.int8,
    gguf.GGMLQuantizationType.I16: np.int16,
    gguf.GGMLQuantizationType.I32: np.int32,
    gguf.GGMLQuantizationType.I64: np.int64,
}


@dataclass
class GGUFTensor:
    name: str
    tensor_type: gguf.GGMLQuantizationType
    data: np.ndarray  # a read-only view of the file, shaped as gguf.GGUFReader shapes it


class GGUFFile:
    """Scalar metadata (`fields`; arrays are left out) and tensors of a GGUF file."""

    def __init__(self, path: str | Path) -> None:
        # one read-only map of the file: the header is parsed from it, tensors view it
        self._map = np.memmap(path, mode="r")
        self._buf = self._map.data  # a memoryview of the map, for struct
        self._pos = 0
        magic, version = self._unpack("<II")
        if magic != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or later)")
        num_tensors, num_fields = self._unpack("<QQ")
        self.fields: dict[str, Any] = {}
        for _ in range(num_fields):
            key = self._string()
            value = self._value(self._unpack("<I")[0])
            if value is not None:
                self.fields[key] = value
        infos = [self._tensor_info() for _ in range(num_tensors)]
        alignment = int(self.fields.get("general.alignment", _DEFAULT_ALIGNMENT))
        start = -(-self._pos // alignment) * alignment
        self.tensors = [self._tensor(self._map, start, *info) for info in infos]

    # ---- the header ------------------------------------------------------------------
    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        text = bytes(self._buf[self._pos : self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return text

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            self._skip_array()
            return None
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self._unpack(_SCALARS[vtype])[0]

    def _skip_array(self) -> None:
        etype, count = self._unpack("<IQ")
        if etype == _STRING:
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", self._buf, self._pos)
                self._pos += 8 + n
        elif etype == _ARRAY:
            for _ in range(count):
                self._skip_array()
        elif etype in _SCALARS:
            self._pos += count * struct.calcsize(_SCALARS[etype])
        else:
            raise ValueError(f"unknown GGUF array element type {etype}")

    def _tensor_info(self) -> tuple[str, list[int], int, int]:
        name = self._string()
        (n_dims,) = self._unpack("<I")
        dims = list(self._unpack(f"<{n_dims}Q"))
        ttype, offset = self._unpack("<IQ")
        return name, dims, ttype, offset

    # ---- the data -------------------------------------------------------------------
    @staticmethod
    def _tensor(
        file_map: np.ndarray, start: int, name: str, dims: list[int], ttype: int, offset: int
    ) -> GGUFTensor:
        qtype = gguf.GGMLQuantizationType(ttype)
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        shape = tuple(reversed(dims))  # GGUF lists the innermost dimension first
        n_bytes = int(np.prod(dims)) * type_size // block_size
        raw = file_map[start + offset : start + offset + n_bytes]
        if qtype in _PLAIN:
            data = raw.view(_PLAIN[qtype]).reshape(shape)
        else:
            data = raw.reshape(gguf.quant_shape_to_byte_shape(shape, qtype))
        return GGUFTensor(name, qtype, data)
