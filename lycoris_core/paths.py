"""Forward paths and the cost rule that picks one per adapter and call (framework-free).

Every path computes PEFT's ``base(x) + Σ f(x; ΔW)``; they differ in what they form:

- ``"peft"``: PEFT's arithmetic. ΔW is formed and the delta branch is a second layer call.
- ``"merged"``: one layer call with ``W + ΔW``. The backward never keeps ΔW: the Linear twins
  take factored gradients, other layers form ΔW again (rematerialised).
- ``"factored"``: ``nn.Linear`` only, no ΔW at all. LoKr contracts the input reshaped to
  ``(N, c, d)`` with ``W2`` then ``W1``; LoHa goes through ``R``/``Q`` of width ``r²``
  (``ΔW = R Qᵀ``). Gradients follow by autodiff and stay activation- and factor-sized.
- ``"auto"`` (the default): the cheapest of the last two by :func:`path_costs`.

A factored request on a layer the algebra does not cover (conv, Tucker, ``LinearGeneral``)
takes ``"merged"``.
"""

from __future__ import annotations

import math
from typing import Literal

from lycoris_core.plan import AdapterPlan

__all__ = ["FORWARD_PATHS", "ForwardPath", "check_forward_path", "choose_path", "path_costs"]

ForwardPath = Literal["auto", "factored", "merged", "peft"]
FORWARD_PATHS: tuple[str, ...] = ("auto", "factored", "merged", "peft")

#: An elementwise pass over a kernel-sized array costs this many multiply-adds per element: it is
#: bound by memory traffic, not arithmetic. Calibrated with ``benchmarks/speed.py`` on CPU: B4
#: (LoKr 4096x4096: the eval forward's factored/merged crossover lies between 1024 and 4096 tokens;
#: in training the factored step stays cheaper through 4096) and B1 (d=512 Llama, 512 tokens: the
#: factored LoHa and LoKr steps beat the merged ones).
ELEMENTWISE_WEIGHT = 64.0


def check_forward_path(value: object) -> str:
    """``value`` if it names a forward path, else a ``ValueError`` naming it."""
    if value not in FORWARD_PATHS:
        raise ValueError(f"forward_path: expected one of {list(FORWARD_PATHS)}, got {value!r}")
    return str(value)


def factorable(plan: AdapterPlan) -> bool:
    """The factored path covers ``plan``: a Linear layer (LoKr ``W2`` is then 2-D, never Tucker)."""
    return plan.layer.kind == "linear" and plan.peft_type in ("LOKR", "LOHA")


def path_costs(plan: AdapterPlan, tokens: int, *, training: bool) -> dict[str, float]:
    """Multiply-adds each path adds to the frozen layer's forward (and, ``training``, backward).

    ``tokens`` counts the input rows (``N``: batch times sequence, times output positions for a
    conv). Kernel-sized elementwise passes count :data:`ELEMENTWISE_WEIGHT` each. The frozen
    layer's own ``dx`` is shared by every path and not counted.
    """
    out_f, in_f, numel = plan.layer.out_features, plan.layer.in_features, math.prod(plan.weight_shape)
    n, ew = float(tokens), ELEMENTWISE_WEIGHT
    if plan.peft_type == "LOKR":
        shapes = plan.factor_shapes
        a = shapes["lokr_w1"][0] if "lokr_w1" in shapes else shapes["lokr_w1_a"][0]
        c = shapes["lokr_w1"][1] if "lokr_w1" in shapes else shapes["lokr_w1_b"][1]
        b, d = out_f // a, in_f // c
        form = ew * numel  # kron: one product per element
        step = n * b * c * (a + d)  # x (N, c, d) . W2ᵀ -> (N, c, b) . W1ᵀ -> (N, a, b)
        grads = n * a * d * 2 * (b + c)  # T, U, dW1, dW2 of ``lokr.linear_grads``
    else:
        r2 = float(plan.r * plan.r)
        form = numel * (2 * plan.r + ew)  # two rank-r products and their Hadamard product
        step = n * r2 * (in_f + out_f)  # (x Q) Rᵀ
        grads = n * r2 * 2 * (in_f + out_f)  # Y, Z, dR, dQ of ``loha.linear_grads``
    costs = {
        "peft": form + n * numel * (3 if training else 1),  # branch matmul, its dx and dΔW
        "merged": form + ew * numel + (grads if training else 0),
    }
    if factorable(plan):
        costs["factored"] = step * (3 if training else 1)
    return costs


def choose_path(requested: str, plan: AdapterPlan, tokens: int, *, training: bool, linear: bool) -> str:
    """The path one adapter call takes: ``requested`` unless it is ``"auto"`` (cheapest of
    ``"merged"``/``"factored"`` by :func:`path_costs`) or a ``"factored"`` request on a layer
    that is not a plain Linear (``linear=False``) or not Linear-shaped (then ``"merged"``)."""
    can_factor = linear and factorable(plan)
    if requested == "peft" or requested == "merged":
        return requested
    if requested == "factored":
        return "factored" if can_factor else "merged"
    if not can_factor:
        return "merged"
    costs = path_costs(plan, tokens, training=training)
    return "factored" if costs["factored"] <= costs["merged"] else "merged"
