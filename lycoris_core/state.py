"""Framework-free bookkeeping shared by the twins' layers and tuners.

Pure functions over names, plans and scaling dicts: what an adapter may be called, which
adapters a merge touches, the scale helpers (with their input checks), and the check of a
checkpoint against planned factor shapes.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from lycoris_core.checkpoint import check_factor_shapes, split_checkpoint_keys
from lycoris_core.plan import LOHA_FACTORS, LOKR_FACTORS, AdapterPlan

__all__ = [
    "ADAPTER_NAME_RULE",
    "RESERVED_ADAPTER_NAMES",
    "adapters_to_merge",
    "check_adapter_name",
    "check_checkpoint",
    "check_scale",
    "modules_to_save_key",
    "scale_layer",
    "set_scale",
    "unscale_layer",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
ADAPTER_NAME_RULE = "1 to 64 ASCII letters, digits, '_' or '-', starting with a letter or digit"

#: Names our layers, tuners and checkpoints already give a meaning to (attributes of the twins'
#: ``LycorisLayer``/``LycorisTuner``/``ModulesToSaveWrapper``, factor names, PEFT's key prefix).
#: ``tests/core/test_names.py`` checks that it covers every attribute the twins define.
RESERVED_ADAPTER_NAMES = frozenset(
    {
        *LOHA_FACTORS,
        *LOKR_FACTORS,
        "active_adapter",
        "active_adapters",
        "adapter_layer_names",
        "adapter_state_dict",
        "add_adapter",
        "autocast_adapter_dtype",
        "base_layer",
        "base_model",
        "branch_dtype",
        "cast_input_dtype_enabled",
        "config_cls",
        "create_adapter_parameters",
        "delete_adapter",
        "delta_fn",
        "deterministic",
        "disable_adapter",
        "disable_adapters",
        "disabled",
        "enable_adapters",
        "extra_repr",
        "factor_device",
        "factors",
        "forward",
        "forward_path",
        "from_pretrained",
        "generator",
        "get_base_layer",
        "get_delta_weight",
        "get_nb_trainable_parameters",
        "kernel",
        "kernel_layout",
        "layer_plans",
        "layer_shape",
        "layers_mapping",
        "linear_grads",
        "load_adapter",
        "merge",
        "merge_adapter",
        "merge_and_unload",
        "merged",
        "merged_adapters",
        "method",
        "model",
        "module_path",
        "modules_to_save",
        "original_module",
        "output_modules",
        "peft_config",
        "peft_type",
        "plan",
        "plan_fn",
        "plans",
        "prefix",
        "print_trainable_parameters",
        "reset_adapter_parameters",
        "rngs",
        "save_pretrained",
        "scale_layer",
        "scaling",
        "set_adapter",
        "set_forward_path",
        "from_lycoris",
        "save_lycoris",
        "set_scale",
        "stack_size",
        "stacks",
        "trainable_filter",
        "training",
        "unload",
        "unmerge",
        "unmerge_adapter",
        "unscale_layer",
        "update",
        "update_layer",
        "weight",
    }
)


def check_adapter_name(name: Any) -> str:
    """Return ``name`` if it can name an adapter in both twins, else raise a ``ValueError``/``TypeError``.

    An adapter name becomes a directory name (``save_directory/<name>/``) and a container key in
    every layer, so it is one safe path component: no separators, no ``.``, nothing that starts
    with ``_`` or ``-``, and none of :data:`RESERVED_ADAPTER_NAMES`.

    >>> check_adapter_name("style-v2")
    'style-v2'
    >>> check_adapter_name("../x")
    Traceback (most recent call last):
    ...
    ValueError: adapter name '../x': expected 1 to 64 ASCII letters, digits, '_' or '-', starting with a letter or digit
    """
    if not isinstance(name, str):
        raise TypeError(f"adapter name: expected a string, got {type(name).__name__} {name!r}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"adapter name {name!r}: expected {ADAPTER_NAME_RULE}")
    if name in RESERVED_ADAPTER_NAMES:
        raise ValueError(f"adapter name {name!r}: reserved (an attribute or factor name of the adapter layers)")
    return name


def check_scale(where: str, value: Any, *, nonzero: bool = False) -> Any:
    """A finite real scale (``bool`` is refused); ``nonzero`` also refuses 0. Returns it as a float;
    a traced 0-d array (inside ``jax.jit``) has no value to check yet and is returned as it is."""
    if isinstance(value, bool) or (not isinstance(value, (int, float)) and not hasattr(value, "__float__")):
        raise TypeError(f"{where}: expected a real number, got {type(value).__name__} {value!r}")
    as_float = _as_float(value)
    if as_float is None:
        if getattr(value, "shape", None) == ():
            return value
        raise TypeError(f"{where}: expected a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(as_float):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    if nonzero and as_float == 0:
        raise ValueError(f"{where}: cannot divide the scaling by 0 (use unscale_layer() to reset it to alpha / r)")
    return as_float


def _as_float(value: Any) -> float | None:
    """``float(value)``, or ``None`` for a value that has none yet (traced) or is not a scalar."""
    try:
        return float(value)
    except TypeError:
        return None


def _finite_scaling(where: str, new: dict) -> dict:
    """``new`` if every scaling is finite (``set_scale(1e308)`` overflows), else a ``ValueError``;
    traced values cannot be checked and pass."""
    bad = {k: v for k, v in new.items() if (f := _as_float(v)) is not None and not math.isfinite(f)}
    if bad:
        raise ValueError(f"{where}: the resulting scaling {bad} is not finite")
    return new


def adapters_to_merge(
    adapter_names: Sequence[str] | None, active: Sequence[str], merged: Sequence[str], available: Collection[str]
) -> list[str]:
    """PEFT's ``check_adapters_to_merge``: default to ``active``, drop merged names (with PEFT's
    warnings) and names this layer does not hold."""
    if adapter_names is None:
        adapter_names = active
    if isinstance(adapter_names, str):
        raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
    names = list(adapter_names)
    if merged:
        names = [n for n in names if n not in merged]
        if names:
            warnings.warn(
                f"Already following adapters were merged {','.join(merged)}. "
                f"You are now additionally merging {','.join(names)}.",
                stacklevel=3,
            )
        else:
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=3)
    return [n for n in names if n in available]


def set_scale(scaling: Mapping[str, float], plans: Mapping[str, AdapterPlan], adapter: str, scale: float) -> dict:
    """``scaling[adapter] = scale * alpha / r``; unchanged if ``adapter`` is not in ``plans``."""
    scale = check_scale("set_scale: scale", scale)
    new = dict(scaling)
    if adapter in plans:
        new[adapter] = scale * plans[adapter].alpha / plans[adapter].r
    return _finite_scaling("set_scale", new)


def scale_layer(scaling: Mapping[str, float], active: Collection[str], scale: float) -> dict:
    """Multiply the scaling of the ``active`` adapters present in ``scaling`` by ``scale``."""
    scale = check_scale("scale_layer: scale", scale)
    if isinstance(scale, float) and scale == 1:
        return dict(scaling)
    return _finite_scaling("scale_layer", {k: v * scale if k in active else v for k, v in scaling.items()})


def unscale_layer(
    scaling: Mapping[str, float], plans: Mapping[str, AdapterPlan], active: Collection[str], scale: float | None
) -> dict:
    """Divide active adapters' scaling by ``scale``, or reset it to ``alpha / r`` when ``None``."""
    if scale is not None:
        scale = check_scale("unscale_layer: scale", scale, nonzero=True)
    new = dict(scaling)
    for name in active:
        if name in new:
            new[name] = plans[name].alpha / plans[name].r if scale is None else new[name] / scale
    return _finite_scaling("unscale_layer", new)


def check_checkpoint(
    plans: Mapping[str, AdapterPlan | None],
    shapes: Mapping[str, tuple[int, ...]],
    factor_names: Collection[str],
    module_names: Collection[str] = (),
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Check checkpoint tensor shapes (``{key: shape}``) against the planned modules.

    Every targeted module must have exactly its planned factors with the planned shapes (modules
    planned ``None``, e.g. custom layer types, just need some factors), and no factor may belong
    to an untargeted module (``module_names``, the model's modules, tells which of those the model
    lacks altogether). Returns ``split_checkpoint_keys``'s ``(by_module, other)``.
    """
    by_module, other = split_checkpoint_keys(shapes, factor_names)
    unexpected = sorted(set(by_module) - set(plans))
    if unexpected:
        absent = [m for m in unexpected if m not in module_names]
        untargeted = [m for m in unexpected if m in module_names]
        parts = []
        if absent:
            parts.append(f"modules the model does not have: {absent}")
        if untargeted:
            parts.append(f"modules the config does not target: {untargeted}")
        raise ValueError(f"checkpoint has adapter weights for {'; and for '.join(parts)}")
    for key, plan in plans.items():
        found = {name: tuple(shapes[k]) for name, k in by_module.get(key, {}).items()}
        if plan is not None:
            check_factor_shapes(key, plan.factor_shapes, found)
        elif not found:
            raise ValueError(f"{key}: checkpoint has no weights for this targeted module")
    return by_module, other


def modules_to_save_key(config: Any, key: str) -> bool:
    """Whether module path ``key`` gets a ``modules_to_save`` copy: PEFT's rule, a literal
    suffix match (``"head"`` also selects ``"lm_head"``)."""
    return any(key.endswith(m) for m in config.modules_to_save or ())
