"""Adapter factor shardings derived from the base kernel's (framework-free: mesh axis *names*).

A kernel's partition spec names, per kernel dim, the mesh axis (or axes) it is split over. The
kernel is the ``nn.Linear`` ``(out, in)`` it equals (``in_axes``/``out_axes`` of its layout, each
flattened in C order), so its flattened ``out`` is split over the mesh axis of its leading out dim
when the other out dims are whole, and likewise ``in``. Each factor dim that indexes ``out`` or ``in``
in PEFT's layout takes that axis where the axis size divides it, so the factors' product, ΔW, comes
out split exactly like the kernel (``ΔW[rows of device k]`` needs only device ``k``'s factor rows):

- LoHa ``hada_w{1,2}_a (out, r)`` along ``out``, ``hada_w{1,2}_b (r, in·K)`` along ``in`` (``in`` leads
  ``in·K``); the CP form's ``(r, out)``/``(r, in)`` on their second dim; ``hada_t*`` whole.
- LoKr: the outer factor ``lokr_w1 (a, c)`` (or ``lokr_w1_a (a, r)``, ``lokr_w1_b (r, c)``): a block of
  ``a/n`` rows of ``W1`` gives a contiguous block of ``kron(W1, W2)``'s rows; the inner ``W2``
  factors stay whole (they are small).
Anything else is replicated (``None``).

>>> from lycoris_core import LayerShape, LoKrConfig, plan_lokr
>>> plan = plan_lokr(LayerShape("linear", 4096, 1024), 8, 8, LoKrConfig())
>>> factor_specs(plan, (None, "model"), in_axes=(0,), out_axes=(1,), axis_sizes={"model": 4})["lokr_w1"]
('model', None)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lycoris_core.plan import AdapterPlan

__all__ = ["factor_specs", "flat_axis"]

#: factor -> {dim: "out" | "in"} in PEFT's layouts.
_ROLES: dict[str, dict[str, dict[int, str]]] = {
    "plain": {
        "hada_w1_a": {0: "out"},
        "hada_w1_b": {1: "in"},
        "hada_w2_a": {0: "out"},
        "hada_w2_b": {1: "in"},
        "lokr_w1": {0: "out", 1: "in"},
        "lokr_w1_a": {0: "out"},
        "lokr_w1_b": {1: "in"},
    },
    "cp": {"hada_w1_a": {1: "out"}, "hada_w1_b": {1: "in"}, "hada_w2_a": {1: "out"}, "hada_w2_b": {1: "in"}},
}


def flat_axis(spec: Sequence[Any], axes: Sequence[int]) -> Any:
    """The mesh axis of the C-order flattening of kernel dims ``axes``: the leading dim's entry when
    the others are whole (``None``), else ``None`` (a split that is not contiguous)."""
    entries = [spec[a] if a < len(spec) else None for a in axes]
    return entries[0] if all(e is None for e in entries[1:]) else None


def _axis_size(name: Any, axis_sizes: Mapping[str, int]) -> int:
    names = name if isinstance(name, (tuple, list)) else (name,)
    return math.prod(axis_sizes[n] for n in names)


def factor_specs(
    plan: AdapterPlan,
    kernel_spec: Sequence[Any],
    *,
    in_axes: Sequence[int],
    out_axes: Sequence[int],
    axis_sizes: Mapping[str, int],
) -> dict[str, tuple[Any, ...]]:
    """``{factor: spec}`` (one entry per factor dim: a mesh axis name, a tuple of them, or ``None``)."""
    axis = {"out": flat_axis(kernel_spec, out_axes), "in": flat_axis(kernel_spec, in_axes)}
    features = {"out": plan.layer.out_features, "in": plan.layer.in_features}
    roles = _ROLES["cp" if "hada_t1" in plan.factor_shapes else "plain"]
    specs = {}
    for name, shape, _ in plan.factors:
        spec: list[Any] = [None] * len(shape)
        for dim, side in roles.get(name, {}).items():
            mesh_axis = axis[side]
            if mesh_axis is None:
                continue
            size = _axis_size(mesh_axis, axis_sizes)
            # the dim splits evenly, and so does the feature it indexes (in·K: ``in`` leads)
            if shape[dim] % size == 0 and features[side] % size == 0:
                spec[dim] = mesh_axis
        specs[name] = tuple(spec)
    return specs
