"""Read and write safetensors files with numpy alone.

Our own reader because numpy has no bfloat16: bf16 tensors come back as raw uint16 bits
(dtype tag "BF16"), which the native engine takes as they are. Memory-mapped, so a
checkpoint is never copied just to be inspected.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# safetensors dtype tag -> numpy storage dtype (bf16 is carried as its uint16 bits)
_STORAGE = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file is missing, truncated or malformed."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str          # safetensors tag: "BF16", "F32", ...
    shape: tuple[int, ...]
    data: np.ndarray    # storage view (uint16 for BF16), memory-mapped

    def to_float32(self) -> np.ndarray:
        if self.dtype == "BF16":
            return bf16_bits_to_f32(self.data)
        return np.asarray(self.data, dtype=np.float32)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even), returned as uint16 bits; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.ascontiguousarray(x, dtype=np.float32))
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Return (header dict, byte offset of the data section)."""
    p = Path(path)
    if not p.is_file():
        raise SafetensorsError(f"{p}: no such safetensors file")
    size = p.stat().st_size
    if size < 8:
        raise SafetensorsError(f"{p}: truncated safetensors file ({size} bytes)")
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{p}: corrupt safetensors header (length {n}, file {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{p}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{p}: corrupt safetensors header: not a JSON object")
    return header, 8 + n


def load_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Map every tensor of one safetensors file; validates offsets against the file size."""
    p = Path(path)
    header, start = read_header(p)
    size = p.stat().st_size
    data_len = size - start
    mm = np.memmap(p, dtype=np.uint8, mode="r", offset=start, shape=(data_len,)) if data_len else np.zeros(0, np.uint8)
    out: dict[str, Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            b, e = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{p}: tensor '{name}' has a malformed header entry") from None
        if dtype not in _STORAGE:
            raise SafetensorsError(f"{p}: tensor '{name}' has unsupported dtype {dtype}")
        np_dtype = np.dtype(_STORAGE[dtype])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not (0 <= b <= e <= data_len) or e - b != count * np_dtype.itemsize:
            raise SafetensorsError(
                f"{p}: tensor '{name}' offsets [{b}, {e}) do not fit shape {list(shape)} {dtype} "
                f"within {data_len} data bytes (truncated or corrupt file?)")
        arr = mm[b:e].view(np_dtype).reshape(shape)
        out[name] = Tensor(name, dtype, shape, arr)
    return out


def save_file(path: str | os.PathLike, tensors: dict[str, tuple[str, np.ndarray]],
              metadata: dict[str, str] | None = None) -> None:
    """Write tensors given as name -> (dtype tag, storage array). BF16 arrays must be uint16 bits
    (see f32_to_bf16_bits). Written to a temporary name, then renamed, so no half file is left."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name, (dtype, arr) in tensors.items():
        if dtype not in _STORAGE:
            raise SafetensorsError(f"{path}: cannot write tensor '{name}' of dtype {dtype}")
        a = np.ascontiguousarray(arr, dtype=_STORAGE[dtype])
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)  # keep the data section 8-byte aligned
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.tobytes(order="C"))
    os.replace(tmp, path)
