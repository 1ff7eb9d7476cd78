"""The one target resolver: from a front end's table of modules to ``{module name: AdapterPlan}``.

Every front end (the NNX tuner, the pytree API, the Linen transform, the torch twin) only builds
the table, one :class:`Layer` per module name as PEFT would name it (a stack's layers one by one);
which modules get an adapter, with which rank, alpha and factor shapes, is decided here once:
PEFT's matching (``lycoris_core.targets``), ``"all-linear"`` without the output layer (and a
sequence-classification head), ``modules_to_save``, the stack rules, and the warnings. Layers
receive their plan and never plan again.

>>> from lycoris_core import LayerShape, LoKrConfig
>>> table = {"fc": Layer(LayerShape("linear", 16, 16), linear=True),
...          "lm_head": Layer(LayerShape("linear", 32, 16), linear=True, output=True)}
>>> sorted(resolve(LoKrConfig(r=2, target_modules="all-linear"), table))
['fc']
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lycoris_core.plan import AdapterPlan, LayerShape, method_kinds, plan_adapter
from lycoris_core.targets import check_target_module_exists, match_targets, resolve_rank_alpha

__all__ = [
    "SEQ_CLS_HEADS",
    "Layer",
    "check_peft_plans",
    "exact_pattern",
    "exact_targets",
    "resolve",
    "saved_config",
    "table_shapes",
]

#: Top-level heads PEFT leaves out of ``"all-linear"`` for ``task_type="SEQ_CLS"`` models without an
#: output embedding (PEFT's ``SEQ_CLS_HEAD_NAMES``; the first one the model has).
SEQ_CLS_HEADS = ("score", "classifier")


@dataclass(frozen=True)
class Layer:
    """One module of a model as a front end sees it (a row of :func:`resolve`'s table).

    ``shape``: the plan's view of the layer, ``None`` when this front end cannot adapt it; then
    ``error`` is what targeting it raises (naming the module and its class). ``linear``: a Linear-like
    layer, selected by ``"all-linear"`` when adaptable; ``skip``: why ``"all-linear"`` leaves out a
    layer that looks linear or holds a kernel (a warning, never a silent skip); a ``skip`` containing
    ``{}`` is a template filled with every name that shares it. ``output``: the model's output layer
    (``lm_head``), left out of ``"all-linear"``. ``stack``: the name of the stacked module this is one
    layer of (a stack's layers share one factor shape). ``shared``: every path of a module reachable
    by several (an adapter there would be bypassed). ``held``: the ``peft_type`` of the adapters the
    module already holds.
    """

    shape: LayerShape | None = None
    error: Exception | None = None
    linear: bool = False
    skip: str = ""
    output: bool = False
    stack: str | None = None
    shared: tuple[str, ...] = ()
    held: str | None = None
    type_name: str = ""


def resolve(
    config: Any,
    table: Mapping[str, Layer],
    *,
    model_type: str | None = None,
    plan: Callable[..., AdapterPlan] = plan_adapter,
    modules_to_save: bool = True,
    one_scale_per_stack: bool = False,
    front_end: str = "",
    kind_names: Mapping[str, str] | None = None,
    plans: Mapping[str, AdapterPlan] | None = None,
) -> dict[str, AdapterPlan]:
    """``{module name: AdapterPlan}`` for every module of ``table`` that ``config`` targets, in table order.

    PEFT's rules throughout: ``target_modules`` (``None``: PEFT's default for ``model_type``;
    ``"all-linear"``: the adaptable ``linear`` rows but ``output`` ones, and for ``SEQ_CLS`` a
    top-level ``score``/``classifier`` when no row is an output layer), ``exclude_modules``,
    ``modules_to_save`` (``modules_to_save=False``: a front end without it refuses the field),
    ``layers_to_transform``, ``rank_pattern``/``alpha_pattern`` and PEFT's errors and warnings.
    ``plan(shape, r, alpha, config, where=name)`` plans one layer (default: the registered planner of
    ``config.peft_type``). The layers of one stack need one factor shape, and with
    ``one_scale_per_stack`` (``nn.scan`` applies one adapter to every step) also one ``alpha / r`` and
    no layer left out. A layer whose kind the method does not adapt (``lycoris_core.plan.method_kinds``)
    is a ``TypeError`` naming the supported classes (``kind_names``: the front end's class per kind).
    ``plans``: modules' own plans, which replace the config's (a LyCORIS file's factorization,
    ``lycoris_core.kohya.file_plan``); each must be for its layer. Nothing is modified.
    """
    if config.modules_to_save and not modules_to_save:
        raise ValueError(
            f"modules_to_save={config.modules_to_save}: not supported by {front_end or 'this front end'} yet; "
            "train those modules with their own optimizer filter"
        )
    names = [name for name in table if name]
    outputs = [n for n in names if table[n].output]
    if not outputs and getattr(config, "task_type", None) == "SEQ_CLS":
        outputs = next(([h] for h in SEQ_CLS_HEADS if h in table), [])
    all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear"
    linear = [n for n in names if table[n].linear and table[n].shape is not None]
    if all_linear:
        _warn_skipped({n: table[n].skip for n in names if table[n].skip and n not in outputs})
    match = match_targets(config, names, linear_names=linear, output_names=outputs, model_type=model_type)
    own, out = plans, {}
    for name in match.targeted:
        row = table[name]
        if row.shared:
            raise ValueError(
                f"{name}: this module is shared, reachable as {list(row.shared)}; an adapter on it would be bypassed "
                "on all but one path. Untie it or exclude it (exclude_modules)."
            )
        if row.shape is None:
            raise row.error or TypeError(f"{name}: this module cannot be adapted")
        if row.held is not None and row.held != config.peft_type:
            raise TypeError(
                f"{name}: already holds a {row.held} adapter; mixing adapter types in one model is not supported"
            )
        kinds = method_kinds(config.peft_type)
        if row.shape.kind not in kinds:
            names = kind_names or {}
            supported = ", ".join(dict.fromkeys(names.get(k, k) for k in sorted(kinds)))
            raise TypeError(
                f"{name}: target module of type {row.type_name or row.shape.kind} not supported, "
                f"currently only adapters for {supported} are supported"
            )
        if own is not None and name in own:
            if own[name].layer.weight_shape != row.shape.weight_shape or own[name].peft_type != config.peft_type:
                raise ValueError(f"{name}: its plan is for a {own[name].peft_type} layer {own[name].weight_shape}")
            out[name] = own[name]
            continue
        r, alpha = resolve_rank_alpha(config, name)
        out[name] = plan(row.shape, r, alpha, config, where=name)
    _check_stacks(table, out, one_scale_per_stack)
    return out


def _warn_skipped(skipped: Mapping[str, str]) -> None:
    """One warning for the layers ``"all-linear"`` leaves out (templates grouped by their text)."""
    groups: dict[str, list[str]] = {}
    for name, why in skipped.items():
        groups.setdefault(why, []).append(name)
    templates = [why.format(sorted(group)) for why, group in groups.items() if "{}" in why]
    plain = [why for why in groups if "{}" not in why]
    for text in templates:
        warnings.warn(f"target_modules='all-linear' leaves out {text}", UserWarning, stacklevel=4)
    if plain:
        warnings.warn(f"target_modules='all-linear' leaves out: {'; '.join(plain)}", UserWarning, stacklevel=4)


def _check_stacks(table: Mapping[str, Layer], plans: Mapping[str, AdapterPlan], one_scale: bool) -> None:
    first: dict[str, str] = {}
    for name, plan in plans.items():
        stack = table[name].stack
        if stack is None:
            continue
        other_name = first.setdefault(stack, name)
        other = plans[other_name]
        if plan.factors != other.factors:
            raise ValueError(
                f"{stack}: the layers of one stack need one factor shape, but {other_name} (r={other.r}, "
                f"{other.factor_shapes}) and {name} (r={plan.r}, {plan.factor_shapes}) differ; make rank_pattern "
                "(and kinds) agree across the stack's layers (alpha may differ)"
            )
    if not one_scale:
        return
    for stack in first:
        layers = [n for n, row in table.items() if row.stack == stack]
        scalings = {plans[n].scaling if n in plans else 0.0 for n in layers}
        if len(scalings) != 1:
            raise ValueError(
                f"{stack}: inside nn.scan every layer of a stack needs the same alpha / r and must be targeted "
                f"(layers_to_transform, alpha_pattern give {sorted(scalings)}); the pytree API and the NNX tuner "
                "take per-layer scales"
            )


def exact_targets(selected: Iterable[str], module_names: Iterable[str] = ()) -> list[str] | str:
    """A ``target_modules`` value that selects exactly ``selected`` under PEFT's matching.

    A list of the full names when, among ``module_names`` (the model's), it selects nothing more
    (a name also matches every module ending in ``.<name>``); otherwise a regular expression that
    PEFT matches with ``re.fullmatch``, exact on any model.

    >>> exact_targets(["block.fc", "head"], ["block.fc", "head", "block"])
    ['block.fc', 'head']
    >>> exact_targets(["fc"], ["fc", "block.fc"])
    '(?:fc)'
    """
    chosen = sorted(set(selected))
    others = set(module_names) - set(chosen)
    if not any(o.endswith(f".{c}") for o in others for c in chosen):
        return chosen
    return "(?:" + "|".join(re.escape(name) for name in chosen) + ")"


def exact_pattern(name: str) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key that matches the module ``name`` and no other: PEFT
    matches keys against a dot-aligned suffix, and ``^`` anchors it at the start.

    >>> exact_pattern("block.fc")
    '^block\\\\.fc'
    """
    return "^" + re.escape(name)


def saved_config(config: Any, adapted: Collection[str], module_names: Iterable[str]) -> Any:
    """A copy of ``config`` for an adapter file whose ``target_modules`` selects exactly the ``adapted``
    modules under PEFT's matching, so that PEFT loads every factor saved: the user's value where it
    already does so among ``module_names`` (the model's), else :func:`exact_targets` (always for
    ``"all-linear"`` and for PEFT's per-architecture defaults, which PEFT resolves again on its model)."""
    names = [n for n in module_names if n]
    adapted = set(adapted)
    out = copy.deepcopy(config)
    targets = config.target_modules
    shorthand = targets is None or (isinstance(targets, str) and targets.lower() == "all-linear")
    if shorthand or {n for n in names if check_target_module_exists(config, n) is True} != adapted:
        out.target_modules = exact_targets(adapted, names)
    return out


def check_peft_plans(config: Any, plans: Mapping[str, AdapterPlan]) -> None:
    """Refuse (a ``ValueError`` naming the module) a plan no PEFT config can hold: one whose factors
    are not what ``config`` gives for its layer (a LyCORIS file's own factorization)."""
    for name, plan in plans.items():
        r, alpha = resolve_rank_alpha(config, name)
        peft = plan_adapter(plan.layer, r, alpha, config, where=name)
        if peft.factor_shapes != plan.factor_shapes:
            raise ValueError(
                f"{name}: its factors {plan.factor_shapes} (a LyCORIS file's own factorization) are not what any "
                f"PEFT config gives for its layer {plan.weight_shape} ({peft.factor_shapes} under this one): a "
                "PEFT directory cannot hold them; save_lycoris writes the adapter as a LyCORIS file"
            )


def table_shapes(table: Mapping[str, Layer]) -> dict[str, LayerShape | None]:
    """``{module name: LayerShape}`` of a table (``None`` for a module this front end cannot adapt)."""
    return {name: row.shape for name, row in table.items() if name}
