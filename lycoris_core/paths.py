"""Forward paths and the cost rule that picks one per adapter and call (framework-free).

Every path computes PEFT's ``base(x) + Σ f(x; ΔW)``; they differ in what they form:

- ``"peft"``: PEFT's arithmetic. ΔW is formed and the delta branch is a second layer call.
- ``"merged"``: one layer call with ``W + ΔW``. The backward never keeps ΔW: the Linear twins
  take factored gradients, other layers form ΔW again (rematerialised).
- ``"factored"``: no ΔW at all. LoKr contracts the input reshaped to ``(N, c, d)`` with ``W2``
  then ``W1`` (a conv: convolves each of the ``c`` input blocks with ``W2``, then mixes with
  ``W1``); LoHa goes through ``R``/``Q`` of width ``r²`` (``ΔW = R Qᵀ``; a conv: convolves with
  ``Q``'s ``r²`` channels). Gradients follow by autodiff and stay activation- and factor-sized.
- ``"auto"`` (the default): the cheapest of the last two by :func:`path_costs`.

A factored request where :func:`factorable` or the layer object does not allow it (a grouped or
masked conv, CP LoHa, ``LinearGeneral``/``Einsum``) takes ``"merged"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lycoris_core.plan import AdapterPlan, full_3d_lokr_w2

__all__ = [
    "FORWARD_PATHS",
    "FoldRule",
    "ForwardPath",
    "Split",
    "check_forward_path",
    "choose_path",
    "fold_rule",
    "path_costs",
]

ForwardPath = Literal["auto", "factored", "merged", "peft"]
FORWARD_PATHS: tuple[str, ...] = ("auto", "factored", "merged", "peft")

#: An elementwise pass over a kernel-sized array costs this many multiply-adds per element: it is
#: bound by memory traffic, not arithmetic. Calibrated with ``benchmarks/speed.py`` on CPU: B4
#: (LoKr 4096x4096: the eval forward's factored/merged crossover lies between 1024 and 4096 tokens;
#: in training the factored step stays cheaper through 4096) and B1 (d=512 Llama, 512 tokens: the
#: factored LoHa and LoKr steps beat the merged ones).
ELEMENTWISE_WEIGHT = 64.0


@dataclass(frozen=True)
class Split:
    """How one layer call's work is divided over devices: the input rows ``tokens`` ways, the kernel
    ``kernel`` ways, and their product ``matmul`` ways (the devices that split either: ``tokens ·
    kernel`` on different mesh axes, fewer where both use one axis, as under FSDP)."""

    tokens: int = 1
    kernel: int = 1
    matmul: int = 1


@dataclass(frozen=True)
class FoldRule:
    """How the ``"merged"`` route of one adapter forms ``W + ΔW`` and takes the input gradient, on one
    platform. Every choice is the same arithmetic in another order; ``fold_rule`` picks them.

    ``layer_dtype``: the sum ``W + ΔW`` is formed in float32 and rounded once to the layer's compute
    dtype (bf16 for a bf16 layer) before the matmul. A TPU at default matmul precision rounds a float32
    operand to bf16 in its matrix unit anyway, so the product is the same; the kernel-sized passes
    move half the bytes.
    ``matmul_form``: ΔW by the method's ``matmul_weight`` where it has one (LoHa: one product ``R Qᵀ``
    of width r² instead of two rank-r products and their elementwise product): more multiply-adds,
    which the matrix unit does nearly free, and one kernel-sized pass instead of three.
    ``dx_through_fold``: the backward's ``dx`` is ``dy (W + ΔW)ᵀ``, the fold shared with the forward
    (a rematerialised block forms it again for its backward anyway), instead of ``dy Wᵀ`` plus the
    branch's ``dx`` (LoKr's reshapes the activations to ``(N, c, d)``: layout copies on a TPU)."""

    layer_dtype: bool = False
    matmul_form: bool = False
    dx_through_fold: bool = False


def fold_rule(peft_type: str, platform: str, *, default_precision: bool = True) -> FoldRule:
    """The :class:`FoldRule` of a ``"merged"`` call of ``peft_type`` compiled for ``platform``
    (``"cpu"``, ``"gpu"``, ``"tpu"``); ``default_precision``: matmuls run at the platform's default
    precision (no ``"highest"`` requested). Chosen with ``benchmarks/tpu_aot.py`` (B6), the same for
    every method today (``peft_type`` is there for one that differs); on CPU and GPU the merged route
    is PEFT's fold, in the adapter's dtype."""
    if platform != "tpu":
        return FoldRule()
    return FoldRule(layer_dtype=default_precision, matmul_form=True, dx_through_fold=True)


def check_forward_path(value: object) -> str:
    """``value`` if it names a forward path, else a ``ValueError`` naming it."""
    if value not in FORWARD_PATHS:
        raise ValueError(f"forward_path: expected one of {list(FORWARD_PATHS)}, got {value!r}")
    return str(value)


def factorable(plan: AdapterPlan) -> bool:
    """The algebra of ``plan`` allows the factored path: any Linear adapter; on an ungrouped conv,
    LoKr (``W2`` full, low-rank or Tucker: convolve per input block, then mix with ``W1``) and plain
    LoHa (convolve with ``Q``'s ``r²`` channels, then mix with ``R``). Not: grouped convs, CP LoHa,
    and a Conv1d LoKr with a full 3-D ``lokr_w2`` (PEFT's own layout, docs/DEVIATIONS.md d)."""
    layer, shapes = plan.layer, plan.factor_shapes
    if plan.peft_type not in ("LOKR", "LOHA"):
        return False
    if layer.kind == "linear":
        return True
    if layer.groups != 1:
        return False
    if plan.peft_type == "LOHA":
        return "hada_t1" not in shapes
    return not full_3d_lokr_w2(shapes)


def path_costs(
    plan: AdapterPlan,
    tokens: int,
    *,
    training: bool,
    itemsize: int = 4,
    split: Split = Split(),
    platform: str = "cpu",
) -> dict[str, float]:
    """Multiply-adds each path adds to the frozen layer's forward (and, ``training``, backward), per
    device.

    ``tokens`` counts the input rows (``N``: batch times sequence; a conv's batch times positions).
    Kernel-sized elementwise passes count :data:`ELEMENTWISE_WEIGHT` each for 4-byte elements, in
    proportion to ``itemsize`` (the kernel dtype's bytes: a bf16 pass moves half the bytes).
    ``split`` (:class:`Split`): token-sized work divides by ``split.tokens``, kernel-sized work by
    ``split.kernel``, a matmul by ``split.matmul``. So data parallelism (the kernel whole on every
    device) favours ``"factored"``, and FSDP or tensor parallelism (both split alike) leave the
    balance as it is unsharded. The frozen layer's own ``dx`` is shared by every path and not counted.
    ``platform="tpu"``: relative bytes instead (:func:`_tpu_costs`), calibrated by the TPU compiler.
    """
    if platform == "tpu":
        return _tpu_costs(plan, tokens, training=training, split=split)
    layer = plan.layer
    out_f, in_f, numel = layer.out_features, layer.in_features, math.prod(plan.weight_shape)
    k = math.prod(layer.kernel_size)  # 1 for a Linear
    n, ew = tokens / split.tokens, ELEMENTWISE_WEIGHT * itemsize / 4
    numel, matmul = numel / split.kernel, tokens * numel / split.matmul
    if plan.peft_type == "LOKR":
        shapes = plan.factor_shapes
        a = shapes["lokr_w1"][0] if "lokr_w1" in shapes else shapes["lokr_w1_a"][0]
        c = shapes["lokr_w1"][1] if "lokr_w1" in shapes else shapes["lokr_w1_b"][1]
        b, d = out_f // a, in_f // c
        form = ew * numel  # kron: one product per element
        step = n * b * c * (d * k + a)  # x (N, c, d) . W2ᵀ -> (N, c, b) . W1ᵀ -> (N, a, b)
        linear_grads = n * a * d * 2 * (b + c)  # T, U, dW1, dW2 of ``lokr.linear_grads``
    else:
        r2 = float(plan.r * plan.r)
        form = numel * (2 * plan.r + ew)  # two rank-r products and their Hadamard product
        step = n * r2 * (in_f * k + out_f)  # (x Q) Rᵀ
        linear_grads = n * r2 * 2 * (in_f + out_f)  # Y, Z, dR, dQ of ``loha.linear_grads``
    # merged backward: factored for a Linear; a conv's weight gradient and ΔW formed again
    grads = linear_grads if layer.kind == "linear" else matmul + form
    costs = {
        "peft": form + matmul * (3 if training else 1),  # branch matmul, its dx and dΔW
        "merged": form + ew * numel + (grads if training else 0),
    }
    if factorable(plan):
        costs["factored"] = step * (3 if training else 1)
    return costs


#: TPU lanes: the minor dimension of every array on a TPU is stored in tiles of this many elements
TPU_LANES = 128
#: TPU thresholds, from ``benchmarks/tpu_aot.py --calibrate`` (single bf16 Linears from 256 to 16384
#: wide and every projection of B6's models, 256 to 8192 tokens, r = 8, 16, 64): "factored" when the
#: activations it moves are below this fraction of the kernel-sized work "merged" does, per
#: ``(training, eval)``; each the round value inside the interval that agrees with the most estimates
TPU_LOKR_RATIO = (0.42, 0.42)
TPU_LOHA_RATIO = (0.05, 0.07)
#: LoHa with ``r² > TPU_LOHA_WIDE · min(in, out)``: forming ``R Qᵀ`` costs ``r²`` multiply-adds per
#: kernel element, and "factored" pays off up to ``TPU_LOHA_WIDE_FACTOR`` times more activations;
#: per ``(training, eval)``
TPU_LOHA_WIDE, TPU_LOHA_WIDE_FACTOR = (0.1, 0.2), (16.0, 4.0)


def _lanes(n: int) -> int:
    return -(-n // TPU_LANES) * TPU_LANES


def _tpu_costs(plan: AdapterPlan, tokens: int, *, training: bool, split: Split) -> dict[str, float]:
    """A TPU's costs (bytes moved, relative): bound by memory traffic and the layout of what moves, not
    by multiply-adds (the matrix unit's are nearly free). ``"merged"``: kernel-sized work (LoKr's
    Kronecker product laid out in tiles of :data:`TPU_LANES`); ``"factored"``: activation-sized work
    (LoKr's ``(N, c, b)`` intermediate padded to whole tiles), scaled by the calibrated thresholds.
    The TPU compiler's estimate agrees in 92% of B6's grid (BENCHMARKS.md)."""
    layer = plan.layer
    out_f, in_f = layer.out_features, layer.in_features
    n, numel = tokens / split.tokens, math.prod(plan.weight_shape) / split.kernel
    mode = 0 if training else 1
    if plan.peft_type == "LOKR":
        shapes = plan.factor_shapes
        a = shapes["lokr_w1"][0] if "lokr_w1" in shapes else shapes["lokr_w1_a"][0]
        c = shapes["lokr_w1"][1] if "lokr_w1" in shapes else shapes["lokr_w1_b"][1]
        b, d = out_f // a, in_f // c
        merged = TPU_LOKR_RATIO[mode] * numel * _lanes(d) * _lanes(b) / (d * b)
        factored = n * (_lanes(in_f) + c * _lanes(b) + _lanes(out_f))
    else:
        wide = plan.r * plan.r > TPU_LOHA_WIDE[mode] * min(in_f, out_f)
        ratio = TPU_LOHA_RATIO[mode] * (TPU_LOHA_WIDE_FACTOR[mode] if wide else 1.0)
        merged, factored = ratio * numel, n * (in_f + out_f)
    costs = {"peft": math.inf, "merged": merged}
    if factorable(plan):
        costs["factored"] = factored
    return costs


def choose_path(
    requested: str,
    plan: AdapterPlan,
    tokens: int,
    *,
    training: bool,
    supported: bool,
    itemsize: int = 4,
    split: Split = Split(),
    platform: str = "cpu",
) -> str:
    """The path one adapter call takes: ``requested`` unless it is ``"auto"`` (cheapest of
    ``"merged"``/``"factored"`` by :func:`path_costs`, which takes the dtype's ``itemsize`` and the
    devices' ``split``) or ``"factored"`` where the algebra (:func:`factorable`) or the layer object
    (``supported=False``: a masked conv, a ``LinearGeneral``) does not allow it (then ``"merged"``)."""
    can_factor = supported and factorable(plan)
    if requested == "peft" or requested == "merged":
        return requested
    if requested == "factored":
        return "factored" if can_factor else "merged"
    if not can_factor:
        return "merged"
    costs = path_costs(plan, tokens, training=training, itemsize=itemsize, split=split, platform=platform)
    return "factored" if costs["factored"] <= costs["merged"] else "merged"
