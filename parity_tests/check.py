"""Validate a PEFT-format LoHa/LoKr adapter directory, then compare frameworks on it, without a base model.

The directory is first validated the way a loader does (config, safetensors header, key names,
factor sets and shapes against the plan the config implies, dtypes, finite values); anything
wrong there is unusable input (:class:`lycoris_core.errors.CheckpointError`), never a verdict.
Only then is every module's ΔW rebuilt from its factors with ``lycoris_torch``, ``lycoris_jax``
and (if installed) PEFT's own functions, in the flattened ``(out, in/groups·K)`` layout that the
factors determine, and the three compared.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lycoris_core import LOHA_FACTORS, LOKR_FACTORS, check_target_module_exists, resolve_rank_alpha
from lycoris_core.checkpoint import split_checkpoint_keys
from lycoris_core.errors import CheckpointError
from lycoris_core.files import check_factor_dtypes, read_adapter_files
from lycoris_core.plan import plan_from_factors
from lycoris_core.state import modules_to_save_key
from parity_tests.tolerances import tolerance

__all__ = ["CheckReport", "ModuleCheck", "check_directory"]


@dataclass
class ModuleCheck:
    module: str
    shape: tuple[int, ...]
    scaling: float
    jax_vs_torch: float
    torch_vs_peft: float | None
    norm: float
    #: Why there is no PEFT column for this module (not installed, or PEFT's own error).
    peft_note: str | None = None

    @property
    def passed(self) -> bool:
        tol = tolerance("fp32", "check", "peft").floor * max(self.norm, 1e-30)
        return self.jax_vs_torch <= tol and (self.torch_vs_peft is None or self.torch_vs_peft <= tol)


@dataclass
class CheckReport:
    """Per-module verdicts, and the ``modules_to_save`` keys that hold no factors (not compared)."""

    modules: list[ModuleCheck]
    modules_to_save: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(m.passed for m in self.modules)


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


def _progress(items: list) -> Any:
    """``items`` with a tqdm bar on a terminal (none when piped, or without tqdm)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="check", unit="module", disable=None, leave=False)


def _in_modules_to_save(config: Any, bare_key: str) -> bool:
    """Whether a key's module (or a module above it: ``classifier.dense.weight``) is in ``modules_to_save``."""
    parts = bare_key.split(".")
    return any(modules_to_save_key(config, ".".join(parts[:i])) for i in range(1, len(parts)))


def _validate(directory: str | os.PathLike) -> tuple[Any, str, dict[str, dict[str, str]], list[str]]:
    """Loader-grade validation: ``(config, weights path, {module: {factor: key}}, modules_to_save keys)``."""
    files = read_adapter_files(directory)
    config, path = files.config, files.weights
    if config.peft_type not in ("LOHA", "LOKR"):
        raise CheckpointError(path, f"check supports LOHA and LOKR adapters, got {config.peft_type!r}")
    names = LOHA_FACTORS if config.peft_type == "LOHA" else LOKR_FACTORS
    by_module, other = split_checkpoint_keys(files.tensors, names)
    saved = sorted(k for bare, k in other.items() if _in_modules_to_save(config, bare))
    unexpected = sorted(set(other.values()) - set(saved))
    if unexpected:
        raise CheckpointError(
            path, f"keys that are neither {config.peft_type} factors nor modules_to_save weights: {unexpected}"
        )
    if not by_module:
        raise CheckpointError(path, f"no {config.peft_type} factors found")
    targets = config.target_modules
    if targets is not None and not (isinstance(targets, str) and targets.lower() == "all-linear"):
        untargeted = sorted(m for m in by_module if not check_target_module_exists(config, m))
        if untargeted:
            raise CheckpointError(path, f"factors for modules the config does not target: {untargeted}")
    check_factor_dtypes(path, files.tensors, [k for keys in by_module.values() for k in keys.values()])
    for module, keys in by_module.items():
        r, alpha = resolve_rank_alpha(config, module)
        shapes = {name: files.tensors[key].shape for name, key in keys.items()}
        try:
            plan_from_factors(config.peft_type, shapes, r, alpha, config, where=module)
        except ValueError as err:
            raise CheckpointError(path, str(err)) from None
    return config, path, by_module, saved


def check_directory(directory: str | os.PathLike) -> CheckReport:
    """Validate an adapter directory (:class:`CheckpointError` if unusable), then report per-module
    agreement of ΔW rebuilt by the twins (and PEFT) from it."""
    import jax.numpy as jnp
    import torch
    from safetensors import safe_open

    import lycoris_jax as lj
    import lycoris_torch as lt

    config, path, by_module, saved = _validate(directory)
    try:
        with safe_open(path, framework="pt") as fh:
            tensors = {k: fh.get_tensor(k).float() for keys in by_module.values() for k in keys.values()}
    except Exception as err:  # the reader's own checks, whatever it raises
        raise CheckpointError(path, f"cannot read tensors: {type(err).__name__}: {err}") from None
    bad = sorted(k for k, v in tensors.items() if not bool(torch.isfinite(v).all()))
    if bad:
        raise CheckpointError(path, f"bad data: non-finite values (NaN or inf) in {bad}")
    try:
        import peft  # noqa: F401

        have_peft = True
    except ImportError:
        have_peft = False
    results = []
    for module, keys in _progress(sorted(by_module.items())):
        tf = {name: tensors[key] for name, key in keys.items()}
        factors = {name: t.numpy() for name, t in tf.items()}
        r, alpha = resolve_rank_alpha(config, module)
        scale = alpha / r
        shape = _flat_shape(factors, config.peft_type)
        t_mod, j_mod = (lt.loha, lj.loha) if config.peft_type == "LOHA" else (lt.lokr, lj.lokr)
        dt = t_mod.delta_weight(tf, scale, shape).numpy().astype(np.float64)
        if not np.isfinite(dt).all():
            raise CheckpointError(path, f"bad data: {module}: ΔW overflows float32 (inf/NaN) from finite factors")
        dj = np.asarray(j_mod.delta_weight({k: jnp.asarray(v) for k, v in factors.items()}, scale, shape), np.float64)
        dp, note = None, None if have_peft else "PEFT is not installed"
        if have_peft:
            try:
                dp = _peft_delta(tf, scale, shape, config.peft_type).numpy().astype(np.float64)
            except RuntimeError as err:  # e.g. docs/DEVIATIONS.md i: PEFT's kron of a rank-1 Tucker w2
                note = f"PEFT raises {type(err).__name__}: {str(err).splitlines()[0][:80]}"
        results.append(
            ModuleCheck(
                module,
                shape,
                scale,
                float(np.abs(dj - dt).max()),
                None if dp is None else float(np.abs(dt - dp).max()),
                float(np.abs(dt).max()),
                note,
            )
        )
    return CheckReport(results, saved)
