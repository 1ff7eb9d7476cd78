"""Reading PEFT adapter directories safely, before any framework touches the bytes.

A directory is ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's files). Everything
here validates and reports; nothing is loaded into a model. The safetensors header is parsed and
checked in plain Python (length, JSON, dtypes, shapes, offsets covering the data exactly), so a
truncated file, a lying header or an integer factor is a :class:`CheckpointError` naming the file
and the key, never a framework traceback. Pickle files are never read.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lycoris_core._io import INCOMPLETE_MARKER, replace_files
from lycoris_core.checkpoint import SAFETENSORS_NAME, split_checkpoint_keys
from lycoris_core.config import CONFIG_NAME, LycorisConfig
from lycoris_core.errors import CheckpointError

__all__ = [
    "FLOAT_DTYPES",
    "AdapterFiles",
    "Checkpoint",
    "TensorInfo",
    "check_directory",
    "check_factor_dtypes",
    "read_adapter_files",
    "read_checkpoint",
    "read_safetensors_header",
    "save_adapters",
    "weights_file",
]

#: Bytes per element of every safetensors dtype.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
#: More dimensions than any tensor we read has; bounds the work a hostile header can ask for.
MAX_DIMS = 16
#: Dtypes a factor may be stored in; values are cast to the factor's own dtype on load (PEFT's rule).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
#: The safetensors library's own limit on the header.
MAX_HEADER_BYTES = 100_000_000
#: Files PEFT may have written that hold pickles; we name them in the error, never open them.
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: safetensors dtype string and shape."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class AdapterFiles:
    """A validated adapter directory: its config, weights file and the weights' header."""

    config: LycorisConfig
    weights: str
    tensors: dict[str, TensorInfo]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
        raise ValueError(f"duplicate keys {dup}")
    return out


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """``({key: TensorInfo}, metadata)`` of a safetensors file, after checking that the header
    is well formed and describes the data section exactly (no truncation, holes or overlaps)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(path, f"not a safetensors file: only {size} bytes")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    path, f"header length {n} exceeds the file ({size} bytes): truncated or not a safetensors file"
                )
            raw = fh.read(n)
    except OSError as err:
        raise CheckpointError(path, f"cannot read: {err.strerror or err}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as err:  # JSON, UTF-8, duplicate keys, nesting, huge integers
        raise CheckpointError(path, f"damaged safetensors header (not JSON): {type(err).__name__}: {err}") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, f"damaged safetensors header: expected a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(
            path, f"damaged safetensors header: __metadata__ must map strings to strings, got {metadata!r}"
        )
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        info, begin, end = _entry(path, key, entry)
        tensors[key] = info
        spans.append((begin, end, key))
    pos = 0
    for begin, end, key in sorted(spans):
        if begin != pos:
            what = "overlaps another tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise CheckpointError(path, f"damaged safetensors header: tensor {key!r} {what}")
        pos = end
    if pos != data_len:
        raise CheckpointError(
            path,
            f"the header describes {pos} bytes of tensor data but the file holds {data_len}: "
            + ("truncated" if data_len < pos else "damaged (trailing bytes)"),
        )
    return tensors, metadata


def _entry(path: str, key: str, entry: Any) -> tuple[TensorInfo, int, int]:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(path, f"damaged safetensors header: tensor {key!r}: {what}")

    if not isinstance(entry, dict):
        raise bad(f"expected an object, got {entry!r}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise bad(f"unknown dtype {str(dtype)[:40]!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
        raise bad(f"expected a shape of at most {MAX_DIMS} non-negative integers, got {str(shape)[:80]}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise bad(f"expected data_offsets [begin, end], got {str(offsets)[:80]}")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != nbytes:
        needs = f"{nbytes} bytes" if nbytes < 2**63 else "more bytes than any file holds"
        raise bad(f"{dtype} {tuple(shape)} needs {needs}, its data_offsets {offsets} span {end - begin}")
    return TensorInfo(dtype, tuple(shape)), begin, end


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_factor_dtypes(path: str, tensors: Mapping[str, TensorInfo], keys: Iterable[str]) -> None:
    """Factors must be stored as floats (F16, BF16, F32, F64); integer, bool and F8 are refused."""
    bad = {k: tensors[k].dtype for k in keys if tensors[k].dtype not in FLOAT_DTYPES}
    if bad:
        raise CheckpointError(path, f"adapter factors must be floating point {list(FLOAT_DTYPES)}, got {bad}")


def check_directory(directory: str | os.PathLike) -> None:
    """An existing directory that no interrupted in-place save has left half-written."""
    if not os.path.isdir(directory):
        raise CheckpointError(directory, "not a directory (expected a PEFT adapter directory)")
    if os.path.lexists(os.path.join(directory, INCOMPLETE_MARKER)):
        raise CheckpointError(
            directory, f"an interrupted save left old and new files mixed ({INCOMPLETE_MARKER}); save the adapter again"
        )


def weights_file(directory: str | os.PathLike) -> str:
    """The directory's ``adapter_model.safetensors``; a clear error for anything else it may hold."""
    check_directory(directory)
    path = os.path.join(directory, SAFETENSORS_NAME)
    if os.path.isfile(path):
        return path
    pickles = [n for n in PICKLE_NAMES if os.path.isfile(os.path.join(directory, n))]
    if pickles:
        raise CheckpointError(
            directory,
            f"only a pickle checkpoint ({pickles[0]}) is here, and pickle files are never loaded (they can run code); "
            f"convert it once where you trust it (load it with torch and save {SAFETENSORS_NAME} with safetensors)",
        )
    raise CheckpointError(directory, f"no {SAFETENSORS_NAME} found (only safetensors files are read)")


def read_adapter_files(directory: str | os.PathLike) -> AdapterFiles:
    """Validate a PEFT adapter directory: its config, and its weights' header (not the data)."""
    check_directory(directory)
    config = LycorisConfig.from_pretrained(directory)
    weights = weights_file(directory)
    tensors, _ = read_safetensors_header(weights)
    return AdapterFiles(config, weights, tensors)


class Checkpoint(dict):
    """Checkpoint tensors ``{key: tensor}`` read from the file ``path`` (named in every error)."""

    def __init__(self, path: str, tensors: Mapping[str, Any]) -> None:
        super().__init__(tensors)
        self.path = path


def read_checkpoint(
    files: AdapterFiles,
    factor_names: Collection[str],
    read_state: Callable[[str], Mapping[str, Any]],
    all_finite: Callable[[Any], bool],
    allow_nonfinite: bool = False,
) -> Checkpoint:
    """Read the tensors of a validated directory with a framework's ``read_state``: factor dtypes
    are checked from the header first, then the data is read, then (unless ``allow_nonfinite``)
    NaN/inf in any factor is refused."""
    path = files.weights
    by_module, _ = split_checkpoint_keys(files.tensors, factor_names)
    factor_keys = sorted(k for keys in by_module.values() for k in keys.values())
    check_factor_dtypes(path, files.tensors, factor_keys)
    try:
        tensors = read_state(path)
    except Exception as err:  # the framework's reader: whatever it raises, name the file
        raise CheckpointError(path, f"cannot read tensors: {type(err).__name__}: {err}") from None
    if not allow_nonfinite:
        bad = [k for k in factor_keys if not all_finite(tensors[k])]
        if bad:
            raise CheckpointError(
                path, f"non-finite values (NaN or inf) in {bad}; pass allow_nonfinite=True to load them anyway"
            )
    return Checkpoint(path, tensors)


def save_adapters(directory: str | os.PathLike, adapters: Mapping[str, tuple[LycorisConfig, bytes]]) -> None:
    """Write ``{adapter name: (config, safetensors bytes)}`` in PEFT's layout (``default`` in
    ``directory``, others in ``directory/<name>/``; configs with ``inference_mode: true``), all
    serialised first, then replaced in one crash-safe step (``_io.replace_files``)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{os.fspath(directory)!r}: exists and is not a directory")
    if not adapters:
        raise ValueError("nothing to save: no adapters")
    out: dict[str, bytes] = {}
    for name, (config, weights) in adapters.items():
        config = copy.deepcopy(config)
        config.inference_mode = True
        sub = "" if name == "default" else name
        out[os.path.join(sub, CONFIG_NAME)] = config.to_json_string().encode("utf-8")
        out[os.path.join(sub, SAFETENSORS_NAME)] = weights
    replace_files(directory, out)
