"""Shape plans: from a base layer's shape and a config, which factors exist and their shapes.

Everything here is plain Python and hashable, so a plan can be a ``jax.jit`` static value.
Shapes are PyTorch layouts (Linear ``(out, in)``, Conv ``(out, in/groups, *kernel)``), the
layout of PEFT checkpoints, on both twins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "LOHA_FACTORS",
    "LOKR_FACTORS",
    "AdapterPlan",
    "LayerShape",
    "all_factor_names",
    "candidate_layers",
    "factor_names",
    "factorization",
    "fan_in",
    "full_3d_lokr_w2",
    "method_kinds",
    "plan_adapter",
    "plan_from_factors",
    "plan_loha",
    "plan_lokr",
    "register_plan",
]

LayerKind = Literal["linear", "conv1d", "conv2d"]
Init = Literal["zeros", "kaiming"]

#: Factor names in PEFT's initialisation order (the order RNG draws happen in).
LOHA_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@dataclass(frozen=True)
class LayerShape:
    """A base layer as the plan sees it.

    ``in_features`` is per group for convolutions (``in_channels // groups``).
    """

    kind: LayerKind
    out_features: int
    in_features: int
    kernel_size: tuple[int, ...] = ()
    groups: int = 1

    def __post_init__(self) -> None:
        expected = {"linear": 0, "conv1d": 1, "conv2d": 2}.get(self.kind)
        if expected is None:
            raise ValueError(f"LayerShape.kind: expected 'linear', 'conv1d' or 'conv2d', got {self.kind!r}")
        if len(self.kernel_size) != expected:
            raise ValueError(f"LayerShape: {self.kind} expects {expected} kernel dims, got {self.kernel_size!r}")

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Base weight in PyTorch layout: ``(out, in)`` or ``(out, in/groups, *kernel)``."""
        return (self.out_features, self.in_features, *self.kernel_size)

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def is_pointwise(self) -> bool:
        """Linear, or a convolution whose kernel is all ones (1 / 1x1)."""
        return self.kernel_numel == 1


@dataclass(frozen=True)
class AdapterPlan:
    """One adapter on one layer: hyper-parameters and the factors to create.

    ``factors`` is ``((name, shape, init), ...)`` in PEFT's initialisation order; ``init`` is
    ``"zeros"`` or ``"kaiming"`` (PyTorch's ``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(fan_in), +)).
    ``rank_dropout_scale`` is always True for LoHa (PEFT always rescales its rank-dropout mask);
    ``fp32_dropout_mask``: the mask is built and rescaled in float32 (LoKr) rather than in ΔW's dtype (LoHa).
    """

    peft_type: str
    layer: LayerShape
    r: int
    alpha: float
    factors: tuple[tuple[str, tuple[int, ...], Init], ...]
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = False
    effective_conv: bool = False
    fp32_dropout_mask: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for name, shape, _ in self.factors}

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.layer.weight_shape


def fan_in(shape: tuple[int, ...]) -> int:
    """PyTorch's fan-in: ``shape[1] * prod(shape[2:])``."""
    if len(shape) < 2:
        raise ValueError(f"fan_in: expected at least 2 dims, got shape {shape}")
    return shape[1] * math.prod(shape[2:])


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m * n == dimension`` exactly as PEFT/LyCORIS do.

    >>> factorization(256), factorization(128), factorization(127), factorization(128, 4)
    ((16, 16), (8, 16), (1, 127), (4, 32))
    >>> factorization(128, 32)  # a dividing factor is returned unsorted
    (32, 4)
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        m, n = n, m
    return m, n


def full_3d_lokr_w2(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """A Conv1d LoKr whose ``lokr_w2`` is full and 3-D: PEFT's ``torch.kron`` pads ``W1`` on the left,
    a layout that is no channel-Kronecker product (docs/DEVIATIONS.md, d)."""
    return len(shapes.get("lokr_w2", ())) == 3


def _check_rank(where: str, r: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{where}: `r` should be a positive integer value but the value passed is {r!r}")


def plan_loha(layer: LayerShape, r: int, alpha: float, config: Any, *, where: str = "") -> AdapterPlan:
    """LoHa factors (PEFT section 5.3). CP form iff ``use_effective_conv2d`` and kernel != 1."""
    _check_rank(where or "LoHa", r)
    out, inp, kernel = layer.out_features, layer.in_features, layer.kernel_size
    effective = bool(config.use_effective_conv2d) and layer.kind != "linear" and not layer.is_pointwise
    b_init: Init = "zeros" if config.init_weights else "kaiming"
    if effective:
        t_shape = (r, r, *kernel) if layer.kind == "conv2d" else (r, r, kernel[0], 1)
        factors = (
            ("hada_w1_a", (r, out), "kaiming"),
            ("hada_w1_b", (r, inp), "kaiming"),
            ("hada_w2_a", (r, out), "kaiming"),
            ("hada_w2_b", (r, inp), b_init),
            ("hada_t1", t_shape, "kaiming"),
            ("hada_t2", t_shape, "kaiming"),
        )
    else:
        flat = inp * layer.kernel_numel
        factors = (
            ("hada_w1_a", (out, r), "kaiming"),
            ("hada_w1_b", (r, flat), "kaiming"),
            ("hada_w2_a", (out, r), "kaiming"),
            ("hada_w2_b", (r, flat), b_init),
        )
    return AdapterPlan(
        "LOHA",
        layer,
        r,
        alpha,
        factors,
        rank_dropout=config.rank_dropout,
        module_dropout=config.module_dropout,
        rank_dropout_scale=True,
        effective_conv=effective,
    )


def plan_lokr(layer: LayerShape, r: int, alpha: float, config: Any, *, where: str = "") -> AdapterPlan:
    """LoKr factors (PEFT section 6.2): ``out = a*b``, ``in = c*d``; ``w1`` is (a, c), ``w2`` (b, d[, *k])."""
    _check_rank(where or "LoKr", r)
    a, b = factorization(layer.out_features, config.decompose_factor)
    c, d = factorization(layer.in_features, config.decompose_factor)
    kernel = layer.kernel_size
    use_w1 = not (config.decompose_both and r < max(a, c) / 2)
    use_w2 = r >= max(b, d) / 2
    effective = bool(config.use_effective_conv2d) and layer.kind != "linear" and not layer.is_pointwise
    init = config.init_weights
    # (zero-initialised factors) for True / "lycoris"; False initialises everything with Kaiming.
    zeros = {True: {"lokr_w1", "lokr_w1_a"}, "lycoris": {"lokr_w2", "lokr_w2_b"}}.get(init, set())

    def f(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...], Init]:
        return (name, shape, "zeros" if name in zeros else "kaiming")

    factors = [f("lokr_w1", (a, c))] if use_w1 else [f("lokr_w1_a", (a, r)), f("lokr_w1_b", (r, c))]
    if use_w2:
        factors.append(f("lokr_w2", (b, d, *kernel)))
    elif effective:
        t_shape = (r, r, *kernel) if layer.kind == "conv2d" else (r, r, kernel[0], 1)
        factors += [f("lokr_w2_a", (r, b)), f("lokr_w2_b", (r, d)), f("lokr_t2", t_shape)]
    else:
        factors += [f("lokr_w2_a", (b, r)), f("lokr_w2_b", (r, d * layer.kernel_numel))]
    return AdapterPlan(
        "LOKR",
        layer,
        r,
        alpha,
        tuple(factors),
        rank_dropout=config.rank_dropout,
        module_dropout=config.module_dropout,
        rank_dropout_scale=bool(config.rank_dropout_scale),
        effective_conv=effective and not use_w2,
        fp32_dropout_mask=True,
    )


Planner = Callable[..., AdapterPlan]
#: Every layer kind a plan knows.
LAYER_KINDS = frozenset({"linear", "conv1d", "conv2d"})
_PLANNERS: dict[str, tuple[tuple[str, ...], Planner]] = {
    "LOHA": (LOHA_FACTORS, plan_loha),
    "LOKR": (LOKR_FACTORS, plan_lokr),
}
_KINDS: dict[str, frozenset[str]] = {"LOHA": LAYER_KINDS, "LOKR": LAYER_KINDS}


def register_plan(
    peft_type: str, factors: tuple[str, ...], planner: Planner, kinds: frozenset[str] = LAYER_KINDS
) -> None:
    """Make a LyCORIS method known to the framework-free code: its factor names (PEFT's
    ``adapter_layer_names``, in initialisation order), ``planner(layer, r, alpha, config, *, where)``
    and the layer ``kinds`` it adapts. The twins' method records call this
    (``lycoris_jax.methods.register``, ``lycoris_torch.methods.register``) with the same values."""
    known = _PLANNERS.get(peft_type)
    if known is not None and (known[0] != tuple(factors) or _KINDS[peft_type] != frozenset(kinds)):
        raise ValueError(f"register_plan: {peft_type!r} is already registered with other factors or kinds")
    _PLANNERS[peft_type] = (tuple(factors), planner)
    _KINDS[peft_type] = frozenset(kinds)


def method_kinds(peft_type: str) -> frozenset[str]:
    """The layer kinds a registered method adapts (every kind for an unknown one: its planner decides)."""
    return _KINDS.get(peft_type, LAYER_KINDS)


def factor_names(peft_type: str) -> tuple[str, ...]:
    """The factor names of a registered method (``("hada_w1_a", ...)`` for ``"LOHA"``)."""
    try:
        return _PLANNERS[peft_type][0]
    except KeyError:
        raise ValueError(f"unknown peft_type {peft_type!r}; registered: {sorted(_PLANNERS)}") from None


def all_factor_names() -> set[str]:
    """Every registered method's factor names (what a checkpoint key may end in)."""
    return {name for names, _ in _PLANNERS.values() for name in names}


def plan_adapter(layer: LayerShape, r: int, alpha: float, config: Any, *, where: str = "") -> AdapterPlan:
    """Dispatch on ``config.peft_type`` to the method's registered planner (:func:`register_plan`)."""
    try:
        _, planner = _PLANNERS[config.peft_type]
    except KeyError:
        raise ValueError(f"plan_adapter: unknown peft_type {config.peft_type!r}") from None
    return planner(layer, r, alpha, config, where=where)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_layers(peft_type: str, f: Mapping[str, tuple[int, ...]]) -> list[LayerShape]:
    """Layer shapes whose plans could have produced factor shapes ``f`` (missing keys: none)."""

    def conv(out: int, inp: int, kernel: tuple[int, ...]) -> list[LayerShape]:
        shapes = [LayerShape("conv2d", out, inp, kernel)] if len(kernel) == 2 else []
        if len(kernel) == 1 or (len(kernel) == 2 and kernel[1] == 1):
            shapes.append(LayerShape("conv1d", out, inp, kernel[:1]))
        return shapes

    try:
        if peft_type == "LOHA":
            if "hada_t1" in f:
                return conv(f["hada_w1_a"][1], f["hada_w1_b"][1], tuple(f["hada_t1"][2:]))
            return [LayerShape("linear", f["hada_w1_a"][0], f["hada_w1_b"][1])]
        a, c = f["lokr_w1"] if "lokr_w1" in f else (f["lokr_w1_a"][0], f["lokr_w1_b"][1])
        if "lokr_w2" in f:
            b, d, *kernel = f["lokr_w2"]
            kernel = tuple(kernel)
            return [LayerShape("linear", a * b, c * d)] if not kernel else conv(a * b, c * d, kernel)
        if "lokr_t2" in f:
            return conv(a * f["lokr_w2_a"][1], c * f["lokr_w2_b"][1], tuple(f["lokr_t2"][2:]))
        b, flat = f["lokr_w2_a"][0], f["lokr_w2_b"][1]
        return [
            LayerShape("linear", a * b, c * flat) if k == 1 else LayerShape("conv1d", a * b, c * (flat // k), (k,))
            for k in _divisors(flat)
        ]
    except (KeyError, IndexError, ValueError, TypeError):
        return []


def plan_from_factors(
    peft_type: str, shapes: Mapping[str, tuple[int, ...]], r: int, alpha: float, config: Any, *, where: str = ""
) -> AdapterPlan:
    """The plan that produced a checkpoint's factor ``shapes`` for one module, without the model.

    Infers the layer shapes the factors allow (the flattened kernel of a plain conv reads as a
    Linear or a Conv1d) and keeps the one whose plan under ``config`` (``r``, ``alpha`` already
    resolved for this module) has exactly these factors; otherwise a ``ValueError`` naming the
    module, what it holds and what a plan would hold.

    >>> from lycoris_core.config import LoKrConfig
    >>> plan_from_factors("LOKR", {"lokr_w1": (4, 4), "lokr_w2": (4, 4)}, 8, 8, LoKrConfig()).layer
    LayerShape(kind='linear', out_features=16, in_features=16, kernel_size=(), groups=1)
    """
    names = LOHA_FACTORS if peft_type == "LOHA" else LOKR_FACTORS
    found = {k: tuple(v) for k, v in shapes.items()}
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ValueError(f"{where}: {unknown} are not {peft_type} factors")
    candidates = candidate_layers(peft_type, found)
    plans = []
    for layer in candidates:
        try:
            plans.append(plan_adapter(layer, r, alpha, config, where=where))
        except ValueError:
            continue
    for plan in plans:
        if plan.factor_shapes == found:
            return plan
    if not plans:
        raise ValueError(f"{where}: factors {found} are not a complete {peft_type} set (missing or mis-shaped factors)")
    closest = min(plans, key=lambda p: len(set(p.factor_shapes) ^ set(found)))
    raise ValueError(
        f"{where}: factors {found} fit no layer under this config (r={r}); a layer of weight shape "
        f"{closest.weight_shape} would hold {closest.factor_shapes}"
    )
