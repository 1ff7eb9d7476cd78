"""safetensors files as numpy arrays, framework-free (bf16 through ``ml_dtypes``).

Reading goes through :func:`lycoris_core.files.read_safetensors_header` first, so a damaged file is
a :class:`~lycoris_core.errors.CheckpointError` naming it, never a crash; writing is crash-safe
(:func:`lycoris_core._io.atomic_write`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from lycoris_core._io import atomic_write
from lycoris_core.errors import CheckpointError
from lycoris_core.files import FLOAT_DTYPES, read_safetensors_header

__all__ = ["NUMPY_DTYPES", "SAFETENSORS_DTYPES", "dump_safetensors", "load_safetensors", "save_safetensors"]

#: safetensors dtype -> numpy dtype, for the float dtypes a factor may have.
NUMPY_DTYPES = {
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}
#: numpy dtype -> safetensors dtype.
SAFETENSORS_DTYPES = {v: k for k, v in NUMPY_DTYPES.items()}


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``({key: array}, metadata)``; only float tensors (``FLOAT_DTYPES``) are accepted."""
    path = os.fspath(path)
    infos, metadata = read_safetensors_header(path)
    bad = {k: v.dtype for k, v in infos.items() if v.dtype not in FLOAT_DTYPES}
    if bad:
        raise CheckpointError(path, f"tensors must be floating point {list(FLOAT_DTYPES)}, got {bad}")
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        data = fh.read()
    arrays = {}
    for key, info in infos.items():
        begin, end = header[key]["data_offsets"]
        arrays[key] = np.frombuffer(data[begin:end], NUMPY_DTYPES[info.dtype].newbyteorder("<")).reshape(info.shape)
    return arrays, metadata


def dump_safetensors(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding ``arrays`` (C order, little-endian)."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    chunks, offset = [], 0
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        native = array.dtype.newbyteorder("=")
        if native not in SAFETENSORS_DTYPES:
            raise TypeError(
                f"{key}: cannot store dtype {array.dtype} (expected one of {sorted(SAFETENSORS_DTYPES.values())})"
            )
        raw = array.astype(native.newbyteorder("<"), copy=False).tobytes()
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[native],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def save_safetensors(
    path: str | os.PathLike, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``arrays`` to ``path`` crash-safely (a reader sees the old file or the new one)."""
    data = dump_safetensors(arrays, metadata)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write)
