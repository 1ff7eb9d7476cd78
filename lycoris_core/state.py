"""Framework-free bookkeeping shared by the twins' layers and tuners.

Pure functions over names, plans and scaling dicts: which adapters a merge touches, the scale
helpers, and the check of a checkpoint against planned factor shapes.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from lycoris_core.checkpoint import check_factor_shapes, split_checkpoint_keys
from lycoris_core.plan import AdapterPlan

__all__ = [
    "adapters_to_merge",
    "check_checkpoint",
    "modules_to_save_key",
    "scale_layer",
    "set_scale",
    "unscale_layer",
]


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
    new = dict(scaling)
    if adapter in plans:
        new[adapter] = scale * plans[adapter].alpha / plans[adapter].r
    return new


def scale_layer(scaling: Mapping[str, float], active: Collection[str], scale: float) -> dict:
    """Multiply the scaling of the ``active`` adapters present in ``scaling`` by ``scale``."""
    if scale == 1:
        return dict(scaling)
    return {k: v * scale if k in active else v for k, v in scaling.items()}


def unscale_layer(
    scaling: Mapping[str, float], plans: Mapping[str, AdapterPlan], active: Collection[str], scale: float | None
) -> dict:
    """Divide active adapters' scaling by ``scale``, or reset it to ``alpha / r`` when ``None``."""
    new = dict(scaling)
    for name in active:
        if name in new:
            new[name] = plans[name].alpha / plans[name].r if scale is None else new[name] / scale
    return new


def check_checkpoint(
    plans: Mapping[str, AdapterPlan | None], shapes: Mapping[str, tuple[int, ...]], factor_names: Collection[str]
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Check checkpoint tensor shapes (``{key: shape}``) against the planned modules.

    Every targeted module must have exactly its planned factors with the planned shapes (modules
    planned ``None``, e.g. custom layer types, just need some factors), and no factor may belong
    to an untargeted module. Returns ``split_checkpoint_keys``'s ``(by_module, other)``.
    """
    by_module, other = split_checkpoint_keys(shapes, factor_names)
    unexpected = sorted(set(by_module) - set(plans))
    if unexpected:
        raise ValueError(f"checkpoint has adapter weights for modules the config does not target: {unexpected}")
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
