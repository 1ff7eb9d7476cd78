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
from lycoris_core.checkpoint import split_checkpoint_keys
from lycoris_core.errors import CheckpointError
from lycoris_core.files import FLOAT_DTYPES, AdapterFiles, Checkpoint, check_factor_dtypes, read_safetensors_header
from lycoris_core.plan import all_factor_names

__all__ = [
    "NUMPY_DTYPES",
    "SAFETENSORS_DTYPES",
    "dump_safetensors",
    "load_safetensors",
    "read_tensors",
    "save_safetensors",
]

#: safetensors dtype -> numpy dtype, for the float dtypes a factor may have.
NUMPY_DTYPES = {
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}
#: safetensors dtype -> numpy dtype, for every other dtype a PEFT file may hold (``modules_to_save``
#: buffers such as a BatchNorm's ``num_batches_tracked``).
OTHER_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
}
#: numpy dtype -> safetensors dtype.
SAFETENSORS_DTYPES = {v: k for k, v in (NUMPY_DTYPES | OTHER_DTYPES).items()}


def load_safetensors(
    path: str | os.PathLike, *, floats_only: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``({key: array}, metadata)``; only float tensors (``FLOAT_DTYPES``) unless ``floats_only=False``
    (then the integer and bool dtypes of :data:`OTHER_DTYPES` too)."""
    path = os.fspath(path)
    infos, metadata = read_safetensors_header(path)
    known = NUMPY_DTYPES if floats_only else NUMPY_DTYPES | OTHER_DTYPES
    bad = {k: v.dtype for k, v in infos.items() if v.dtype not in known}
    if bad:
        expected = list(FLOAT_DTYPES) if floats_only else sorted(known)
        raise CheckpointError(path, f"tensors must be {'floating point ' if floats_only else ''}{expected}, got {bad}")
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        data = fh.read()
    arrays = {}
    for key, info in infos.items():
        begin, end = header[key]["data_offsets"]
        arrays[key] = np.frombuffer(data[begin:end], known[info.dtype].newbyteorder("<")).reshape(info.shape)
    return arrays, metadata


def dump_safetensors(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding ``arrays`` (C order, little-endian)."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    chunks, offset = [], 0
    for key in sorted(arrays):
        array = np.asarray(arrays[key])
        array = np.ascontiguousarray(array).reshape(array.shape)  # ascontiguousarray makes a 0-d array 1-d
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


def read_tensors(files: AdapterFiles, *, allow_nonfinite: bool = False) -> Checkpoint:
    """The tensors of a validated PEFT directory (``lycoris_core.files.read_adapter_files``) as numpy
    arrays, for any front end: factor dtypes are checked from the header first, then the data is read,
    then (unless ``allow_nonfinite``) NaN/inf in any factor is refused, naming the keys."""
    path = files.weights
    by_module, _ = split_checkpoint_keys(files.tensors, all_factor_names())
    factor_keys = sorted(k for keys in by_module.values() for k in keys.values())
    check_factor_dtypes(path, files.tensors, factor_keys)
    tensors, _ = load_safetensors(path, floats_only=False)
    if not allow_nonfinite:
        bad = [k for k in factor_keys if not np.isfinite(tensors[k]).all()]
        if bad:
            raise CheckpointError(
                path, f"non-finite values (NaN or inf) in {bad}; pass allow_nonfinite=True to load them anyway"
            )
    return Checkpoint(path, tensors)
