"""What an adapter holds, for ``lycoris-jax inspect``: PEFT directories and LyCORIS files alike.

PEFT directories are read from their config and safetensors header (no tensor data); LyCORIS files
are read whole (their per-module alphas are tensors). Framework-free.
"""

from __future__ import annotations

import math
import os
from typing import Any

from lycoris_core.checkpoint import split_checkpoint_keys
from lycoris_core.files import DTYPE_SIZES, read_adapter_files
from lycoris_core.kohya import read_lycoris
from lycoris_core.plan import LOHA_FACTORS, LOKR_FACTORS
from lycoris_core.targets import resolve_rank_alpha
from lycoris_core.tensors import SAFETENSORS_DTYPES

__all__ = ["describe"]

_METHOD = {"LOHA": "LoHa", "LOKR": "LoKr"}


def _row(module: str, peft_type: str, shapes: dict, dtypes: dict, r: Any, alpha: Any, scale: float) -> dict:
    params = sum(math.prod(s) for s in shapes.values())
    return {
        "module": module,
        "method": _METHOD.get(peft_type, peft_type),
        "r": r,
        "alpha": alpha,
        "scale": scale,
        "params": params,
        "bytes": sum(math.prod(shapes[k]) * DTYPE_SIZES[dtypes[k]] for k in shapes),
        "dtypes": sorted(set(dtypes.values())),
        "factors": {k: list(v) for k, v in sorted(shapes.items())},
    }


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path", "format" ("peft"/"lycoris"), "method", "modules": [row...], "params", "bytes"}``;
    a row holds module, method, r, alpha, scale, params, bytes, dtypes and factor shapes. ``r`` and
    ``alpha`` are those a load uses (for a LyCORIS file: ``LycorisModule.load_rank_alpha``), so
    ``scale == alpha / r`` on every row."""
    path = os.fspath(path)
    rows = []
    if os.path.isdir(path):
        files = read_adapter_files(path)
        config = files.config
        names = LOHA_FACTORS if config.peft_type == "LOHA" else LOKR_FACTORS
        by_module, _ = split_checkpoint_keys(files.tensors, names)
        for module, keys in sorted(by_module.items()):
            r, alpha = resolve_rank_alpha(config, module)
            shapes = {k: files.tensors[key].shape for k, key in keys.items()}
            dtypes = {k: files.tensors[key].dtype for k, key in keys.items()}
            rows.append(_row(module, config.peft_type, shapes, dtypes, r, alpha, alpha / r))
        fmt, methods = "peft", {config.peft_type}
    else:
        source = read_lycoris(path, allow_nonfinite=True)  # what it holds, NaN or not
        for name, m in source.modules.items():
            dtypes = {k: SAFETENSORS_DTYPES[v.dtype] for k, v in m.factors.items()}
            r, alpha = m.load_rank_alpha  # what a load uses, not the file's alpha as it stands
            rows.append(_row(name, m.peft_type, m.shapes, dtypes, r, alpha, m.scale))
        fmt, methods = "lycoris", {m.peft_type for m in source.modules.values()}
    return {
        "path": path,
        "format": fmt,
        "method": "/".join(_METHOD.get(t, t) for t in sorted(methods)),
        "modules": rows,
        "params": sum(r["params"] for r in rows),
        "bytes": sum(r["bytes"] for r in rows),
    }
