"""Editing checkpoint files byte by byte: the safetensors header and data, tensors, the JSON config."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lycoris_core import CONFIG_NAME, SAFETENSORS_METADATA, SAFETENSORS_NAME


def read_raw(path: str | os.PathLike) -> tuple[dict[str, Any], bytes]:
    """``(header with __metadata__, data section)`` of a safetensors file."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: str | os.PathLike, header: dict[str, Any] | bytes, data: bytes, length: int | None = None) -> None:
    """Write a header (dict or raw bytes) and data; ``length`` overrides the 8-byte header length."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write((len(head) if length is None else length).to_bytes(8, "little") + head + data)


def tensors(d: str | os.PathLike) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(d, SAFETENSORS_NAME), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def edit_tensors(d: str | os.PathLike, fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    save_file(fn(tensors(d)), os.path.join(d, SAFETENSORS_NAME), SAFETENSORS_METADATA)


def edit_config(d: str | os.PathLike, fn: Callable[[dict[str, Any]], Any]) -> None:
    """Apply ``fn`` to the config dict in place and write it back (NaN/Infinity allowed, as Python writes them)."""
    path = os.path.join(d, CONFIG_NAME)
    data = json.loads(open(path).read())
    fn(data)
    open(path, "w").write(json.dumps(data))


def weights(d: str | os.PathLike) -> str:
    return os.path.join(d, SAFETENSORS_NAME)


def key(module: str, factor: str) -> str:
    return f"base_model.model.{module}.{factor}"
