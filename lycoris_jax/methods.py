"""One record per LyCORIS method: PEFT's type and factor names, its plan, and its math in JAX.

Everything that differs between LoHa and LoKr is in its record; the layers, the adapted call
(``lycoris_jax.adapted``), the pytree API and the Linen transform look the method up by
``peft_type``. A new method is a plan (``lycoris_core``) and one record per framework:

>>> import lycoris_jax as lj
>>> lj.methods.method_for("LOKR").factor_names[:2]
('lokr_w1', 'lokr_w1_a')

``lycoris_torch.methods`` holds the torch twin's records under the same names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lycoris_core.plan import LOHA_FACTORS, LOKR_FACTORS, Planner, plan_loha, plan_lokr, register_plan
from lycoris_jax import loha, lokr

__all__ = ["LOHA", "LOKR", "METHODS", "Method", "method_for", "register"]


@dataclass(frozen=True)
class Method:
    """A LyCORIS method.

    ``delta_weight(factors, scale, weight_shape)``: ΔW in PyTorch layout (the one required piece).
    Optional, each a faster route where the algebra allows it (``None``: ΔW is formed instead):
    ``delta_grads(g, factors, scale, weight_shape) -> (dfactors, dscale)``, the gradients for a
    cotangent ``g`` of ΔW without forming ΔW; ``linear_forward(x (N, in), factors, scale) -> (N, out)``
    and ``linear_grads(x, dy, factors, scale) -> (dx, dfactors, dscale)``, a Linear's branch and its
    backward without ΔW; ``conv_forward(conv, x, factors, scale, weight_shape)``, an ungrouped conv's
    branch without ΔW. ``kinds``: the layer kinds it adapts.
    """

    peft_type: str
    factor_names: tuple[str, ...]
    plan: Planner
    delta_weight: Callable
    delta_grads: Callable | None = None
    linear_forward: Callable | None = None
    linear_grads: Callable | None = None
    conv_forward: Callable | None = None
    kinds: frozenset[str] = frozenset({"linear", "conv1d", "conv2d"})


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` (its plan goes to ``lycoris_core.plan.register_plan``); returns it."""
    register_plan(method.peft_type, method.factor_names, method.plan, method.kinds)
    METHODS[method.peft_type] = method
    return method


def method_for(peft_type: str) -> Method:
    """The registered record of ``peft_type``; a ``ValueError`` naming the registered ones otherwise."""
    try:
        return METHODS[peft_type]
    except KeyError:
        raise ValueError(f"unknown peft_type {peft_type!r}; registered methods: {sorted(METHODS)}") from None


LOKR = register(
    Method(
        "LOKR",
        LOKR_FACTORS,
        plan_lokr,
        lokr.delta_weight,
        lokr.delta_grads,
        lokr.linear_forward,
        lokr.linear_grads,
        lokr.conv_forward,
    )
)
LOHA = register(
    Method(
        "LOHA",
        LOHA_FACTORS,
        plan_loha,
        loha.delta_weight,
        loha.delta_grads,
        loha.linear_forward,
        loha.linear_grads,
        loha.conv_forward,
    )
)
