"""Validate a PEFT-format LoHa/LoKr adapter directory across frameworks, without a base model.

Every module's ΔW is rebuilt from the checkpoint factors with ``lycoris_torch``, ``lycoris_jax``
and (if installed) PEFT's own functions, in the flattened ``(out, in/groups·K)`` layout that the
factors determine, and the three are compared.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from lycoris_core import LOHA_FACTORS, LOKR_FACTORS, LycorisConfig, resolve_rank_alpha
from lycoris_core.checkpoint import SAFETENSORS_NAME, split_checkpoint_keys

__all__ = ["ModuleCheck", "check_directory"]


@dataclass
class ModuleCheck:
    module: str
    shape: tuple[int, ...]
    scaling: float
    jax_vs_torch: float
    torch_vs_peft: float | None
    norm: float

    @property
    def passed(self) -> bool:
        tol = 2e-6 * max(self.norm, 1e-30)
        return self.jax_vs_torch <= tol and (self.torch_vs_peft is None or self.torch_vs_peft <= tol)


def _flat_shape(factors: dict[str, np.ndarray], peft_type: str) -> tuple[int, ...]:
    """The ΔW shape the factors imply: ``(out, in·K)`` for plain forms, ``(out, in, kh, kw)`` for CP."""
    f = {k: v.shape for k, v in factors.items()}
    if peft_type == "LOHA":
        if "hada_t1" in f:
            return (f["hada_w1_a"][1], f["hada_w1_b"][1], *f["hada_t1"][2:])
        return (f["hada_w1_a"][0], f["hada_w1_b"][1])
    a, c = f["lokr_w1"] if "lokr_w1" in f else (f["lokr_w1_a"][0], f["lokr_w1_b"][1])
    if "lokr_w2" in f:
        b, rest = f["lokr_w2"][0], math.prod(f["lokr_w2"][1:])
    elif "lokr_t2" in f:
        b, rest = f["lokr_w2_a"][1], f["lokr_w2_b"][1] * math.prod(f["lokr_t2"][2:])
    else:
        b, rest = f["lokr_w2_a"][0], f["lokr_w2_b"][1]
    return (a * b, c * rest)


def _peft_delta(factors: dict[str, Any], scale: float, shape: tuple[int, ...], peft_type: str) -> Any:
    import torch

    if peft_type == "LOHA":
        from peft.tuners.loha.layer import make_weight, make_weight_cp

        s = torch.tensor(scale)
        if "hada_t1" in factors:
            w = make_weight_cp(
                *(factors[k] for k in ("hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b")),
                scale=s,
            )
        else:
            w = make_weight(*(factors[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")), scale=s)
        return w.reshape(shape)
    from peft.tuners.lokr.layer import make_kron, make_weight_cp

    w1 = factors["lokr_w1"] if "lokr_w1" in factors else factors["lokr_w1_a"] @ factors["lokr_w1_b"]
    if "lokr_w2" in factors:
        w2 = factors["lokr_w2"]
    elif "lokr_t2" in factors:
        w2 = make_weight_cp(factors["lokr_t2"], factors["lokr_w2_a"], factors["lokr_w2_b"])
    else:
        w2 = factors["lokr_w2_a"] @ factors["lokr_w2_b"]
    return make_kron(w1, w2, scale).reshape(shape)


def check_directory(directory: str | os.PathLike) -> list[ModuleCheck]:
    """Per-module agreement of ΔW rebuilt by the twins (and PEFT) from an adapter directory."""
    import jax.numpy as jnp
    import torch
    from safetensors.numpy import load_file

    import lycoris_jax as lj
    import lycoris_torch as lt

    config = LycorisConfig.from_pretrained(directory)
    if config.peft_type not in ("LOHA", "LOKR"):
        raise ValueError(f"{os.fspath(directory)!r}: check supports LOHA and LOKR adapters, got {config.peft_type!r}")
    path = os.path.join(directory, SAFETENSORS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{os.fspath(directory)!r}: no {SAFETENSORS_NAME} found (only safetensors files are read)")
    tensors = {k: v.astype(np.float32) for k, v in load_file(path).items()}
    names = LOHA_FACTORS if config.peft_type == "LOHA" else LOKR_FACTORS
    by_module, _ = split_checkpoint_keys(tensors, names)
    if not by_module:
        raise ValueError(f"{os.fspath(directory)!r}: no {config.peft_type} factors found in {SAFETENSORS_NAME}")
    try:
        import peft  # noqa: F401

        have_peft = True
    except ImportError:
        have_peft = False
    results = []
    for module, keys in sorted(by_module.items()):
        factors = {name: tensors[key] for name, key in keys.items()}
        r, alpha = resolve_rank_alpha(config, module)
        scale = alpha / r
        shape = _flat_shape(factors, config.peft_type)
        t_mod, j_mod = (lt.loha, lj.loha) if config.peft_type == "LOHA" else (lt.lokr, lj.lokr)
        tf = {k: torch.from_numpy(v) for k, v in factors.items()}
        dt = t_mod.delta_weight(tf, scale, shape).numpy().astype(np.float64)
        dj = np.asarray(j_mod.delta_weight({k: jnp.asarray(v) for k, v in factors.items()}, scale, shape), np.float64)
        dp = _peft_delta(tf, scale, shape, config.peft_type).numpy().astype(np.float64) if have_peft else None
        results.append(
            ModuleCheck(
                module,
                shape,
                scale,
                float(np.abs(dj - dt).max()),
                None if dp is None else float(np.abs(dt - dp).max()),
                float(np.abs(dt).max()),
            )
        )
    return results
