"""One record per LyCORIS method, the same for both twins: PEFT's type and factor names, its plan
(framework-free) and its math (one framework's functions).

``lycoris_jax.methods`` and ``lycoris_torch.methods`` each hold a :class:`Registry` of records
whose math is theirs; registering a record also tells the framework-free code its factor names,
plan and layer kinds (``lycoris_core.plan.register_plan``). A new method is its plan and one record
per framework.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lycoris_core.plan import LAYER_KINDS, Planner, register_plan

__all__ = ["Method", "Registry"]


@dataclass(frozen=True)
class Method:
    """A LyCORIS method in one framework.

    ``delta_weight(factors, scale, weight_shape)``: ΔW in PyTorch layout (the one required piece).
    Optional, each a faster route where the algebra allows it (``None``: ΔW is formed instead):
    ``delta_grads(g, factors, scale, weight_shape) -> (dfactors, dscale)``, the gradients for a
    cotangent ``g`` of ΔW without forming ΔW (JAX); ``linear_forward(x (N, in), factors, scale) ->
    (N, out)`` and ``linear_grads(x, dy, factors, scale)``, a Linear's branch and its backward without
    ΔW; ``conv_forward(conv, x, factors, scale, weight_shape)``, an ungrouped conv's branch without ΔW;
    ``matmul_weight(factors, scale, weight_shape)``, ΔW again, formed by one matmul where a matrix unit
    makes that cheapest (``lycoris_core.paths.FoldRule``). ``kinds``: the layer kinds it adapts.
    """

    peft_type: str
    factor_names: tuple[str, ...]
    plan: Planner
    delta_weight: Callable
    delta_grads: Callable | None = None
    linear_forward: Callable | None = None
    linear_grads: Callable | None = None
    conv_forward: Callable | None = None
    matmul_weight: Callable | None = None
    kinds: frozenset[str] = LAYER_KINDS

    @classmethod
    def from_module(cls, peft_type: str, factor_names: tuple[str, ...], plan: Planner, math: Any) -> Method:
        """The record whose math is the functions of the same names in the module ``math``
        (``delta_weight``, and whichever of the optional routes it defines)."""
        optional = ("delta_grads", "linear_forward", "linear_grads", "conv_forward", "matmul_weight")
        routes = {name: getattr(math, name) for name in optional if hasattr(math, name)}
        return cls(peft_type, factor_names, plan, math.delta_weight, **routes)


class Registry(dict):
    """``{peft_type: Method}`` of one framework."""

    def register(self, method: Method) -> Method:
        """Add ``method`` (its plan goes to ``lycoris_core.plan.register_plan``); returns it."""
        register_plan(method.peft_type, method.factor_names, method.plan, method.kinds)
        self[method.peft_type] = method
        return method

    def method_for(self, peft_type: str) -> Method:
        """The record of ``peft_type``; a ``ValueError`` naming the registered ones otherwise."""
        try:
            return self[peft_type]
        except KeyError:
            raise ValueError(f"unknown peft_type {peft_type!r}; registered methods: {sorted(self)}") from None
