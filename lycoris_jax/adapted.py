"""The adapted call: one layer call with its active adapters, shared by every JAX front end.

The NNX layers (``lycoris_jax.layer``) and the Linen transform (``lycoris_jax.linen``) only collect
what a call needs — the layer's own forward with another kernel, the input, kernel and bias, the
active adapters' plans, factors and scales, the route, the mode, a dropout key — and call
:func:`adapted_call`, which owns everything between the plan and the math:

- the route (``lycoris_core.paths``): ``"merged"`` (one call with ``W + Σ ΔW``), ``"factored"`` (no
  ΔW: ``linear_forward``/``conv_forward`` of the method) or ``"peft"`` (PEFT's arithmetic: the
  layer's own call with ΔW as kernel, added to the base output), per adapter, where the algebra
  and the layer allow it;
- rank and module dropout, drawn from one key per call (:func:`dropout_draws`), and ΔW's row
  scaling (:func:`delta_kernel`);
- the dtype rule: the branch computes in the factors' dtype (PEFT) or, ``branch_dtype="base"``, in the
  layer's compute dtype; the result is always in the base layer's own output dtype;
- the one factored backward of a Linear (:func:`_factored_backward`): the frozen layer's backward
  plus each adapter's ``linear_grads``, never a ΔW-sized gradient (on a TPU the merged route's ``dx``
  goes through ``W + ΔW``, formed again: ``lycoris_core.paths.fold_rule``);
- ΔW-cotangent gradients for a merged kernel (:func:`merge_kernel`, the pytree API's ``merge``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from lycoris_core.paths import FoldRule, choose_path, fold_rule
from lycoris_core.plan import AdapterPlan
from lycoris_jax import functional
from lycoris_jax.methods import method_for

__all__ = [
    "Active",
    "LayerCall",
    "Site",
    "adapted_call",
    "delta_kernel",
    "dropout_draws",
    "merge_kernel",
    "route_of",
]

#: ``call(x, kernel, bias, dtype)``: the layer's own forward with ``kernel`` (its layout) and ``bias``
#: (``None``: no bias) in place of its own, computing in ``dtype`` (``None``: the operands' promoted
#: dtype). A factored conv calls it with a kernel of other output channels.
LayerCall = Callable[[jax.Array, jax.Array, Any, Any], jax.Array]


@dataclass(frozen=True)
class Active:
    """One active adapter at one call: its plan, factors (PEFT's names and layouts) and live scale
    (``alpha / r`` times the user's; a Python float or a 0-d array, traced or not)."""

    plan: AdapterPlan
    factors: Mapping[str, jax.Array]
    scale: Any


@dataclass(frozen=True)
class Site:
    """The layer an adapted call runs on. ``layout``: how its kernel holds PEFT's PyTorch weight;
    ``spec``: the kernel's partition spec (ΔW is formed in these shards); ``linear``: a plain Linear
    (``(in, out)`` kernel: factored branch and backward); ``conv``: an ungrouped, unmasked conv (factored
    branch through ``call``). Neither: the factored route is not offered (``LinearGeneral``, ``Einsum``,
    grouped or masked convs)."""

    layout: functional.KernelLayout | None
    spec: tuple[Any, ...] | None = None
    linear: bool = False
    conv: bool = False


def dropout_draws(plan: AdapterPlan, key: jax.Array | None, dtype: Any) -> tuple[jax.Array | None, Any]:
    """``(rows, keep)`` of one training call: rank dropout's ``(out,)`` row factors (``None``: none), in
    float32 for LoKr and ``dtype`` (ΔW's) otherwise as PEFT builds them, and module dropout's keep flag
    (``True``: kept), from ``key`` split in two (``None``: eval)."""
    if key is None or not (plan.rank_dropout or plan.module_dropout):
        return None, True
    rank_key, module_key = jax.random.split(key)
    rows, keep = None, True
    if plan.rank_dropout:
        mask = functional.rank_dropout_keep(rank_key, plan.weight_shape[0], plan.rank_dropout)
        mask_dtype = jnp.float32 if plan.fp32_dropout_mask else dtype
        rows = functional.rank_dropout_rows(mask, rescale=plan.rank_dropout_scale, dtype=mask_dtype)
    if plan.module_dropout:
        keep = jax.random.uniform(module_key) > plan.module_dropout
    return rows, keep


def _row_scaled(weight: jax.Array, rows: jax.Array | None) -> jax.Array:
    """``weight`` (PyTorch layout, output rows first) with each row times ``rows``, in its own dtype."""
    if rows is None:
        return weight
    return (weight * rows.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(weight.dtype)


def delta_kernel(active: Active, site: Site, rows: jax.Array | None = None, *, matmul_form: bool = False) -> jax.Array:
    """ΔW of one adapter in the kernel's layout and shards, rank-dropout ``rows`` applied;
    ``matmul_form``: by the method's ``matmul_weight`` where it has one."""
    plan, method = active.plan, method_for(active.plan.peft_type)
    form = method.matmul_weight if matmul_form and method.matmul_weight is not None else method.delta_weight
    weight = form(active.factors, active.scale, plan.weight_shape)
    return _placed(_row_scaled(weight, rows), site)


def _placed(weight: jax.Array, site: Site) -> jax.Array:
    """A PyTorch-layout ΔW in the kernel's layout (as it is for a PyTorch-layout ``weight`` leaf:
    ``site.layout`` ``None``) and shards."""
    kernel = weight if site.layout is None else site.layout.to_kernel(weight)
    return functional.constrain(kernel, site.spec)


def _kept(value: jax.Array, keep: Any) -> jax.Array:
    return value if keep is True or keep is None else jnp.where(keep, value, jnp.zeros_like(value))


def adapted_call(
    call: LayerCall,
    x: jax.Array,
    kernel: jax.Array,
    bias: Any,
    adapters: Sequence[Active],
    *,
    site: Site,
    route: str = "auto",
    training: bool = False,
    key: jax.Array | None = None,
    branch_dtype: str = "adapter",
    base_dtype: Any = None,
    cast_input: bool = True,
    out_sharding: Any = None,
) -> jax.Array:
    """``base(x) + Σ f(x; ΔW)`` over ``adapters``, in the base layer's own output dtype.

    ``call``: :data:`LayerCall`; ``kernel``/``bias``: the layer's; ``base_dtype``: the layer's own
    compute dtype (``None``: promoted). ``route``: the requested forward path; each adapter takes
    ``lycoris_core.paths.choose_path`` of it for this call (tokens: ``x``'s leading dims; the training
    cost counts when ``training``; the kernel's itemsize and, under an Explicit mesh, the split).
    ``key``: this call's dropout key (``None``: eval), split once per adapter. ``branch_dtype="base"``
    computes the branch in ``base_dtype``. ``cast_input``: the branch input is cast to the branch's
    dtype (PEFT's ``cast_input_dtype_enabled``). ``out_sharding``: a factored branch's output sharding.
    """
    base_out = jax.eval_shape(lambda x, k, b: call(x, k, b, base_dtype), x, kernel, bias)
    if not adapters:
        return call(x, kernel, bias, base_dtype)
    keys = list(jax.random.split(key, len(adapters))) if key is not None else [None] * len(adapters)
    platform, precise = functional.target_platform(), functional.default_precision()
    folds, branches = [], []
    for active, k in zip(adapters, keys, strict=True):
        fdtype = jnp.result_type(*active.factors.values())
        rows, keep = dropout_draws(active.plan, k, fdtype)
        path = route_of(active.plan, x, kernel, site, route, training=training)
        entry = (active, rows, keep)
        (folds if path == "merged" else branches).append((path, entry))
    compute_of = lambda fdtype: base_dtype if branch_dtype == "base" and base_dtype is not None else fdtype  # noqa: E731
    peft = [entry for path, entry in branches if path == "peft"]  # only a "peft" request: never beside folds
    if peft:
        result = _peft(call, x, kernel, bias, peft, site, compute_of, base_dtype, cast_input)
    elif folds:
        entries = [entry for _, entry in folds]
        fdtype = jnp.result_type(*entries[0][0].factors.values())
        compute = compute_of(fdtype)
        base_branch = branch_dtype == "base" and base_dtype is not None
        acc = compute if base_branch else jnp.result_type(kernel.dtype, compute)
        rules = [fold_rule(a.plan.peft_type, platform, default_precision=precise) for a, _, _ in entries]
        layer = base_dtype if base_dtype is not None else jnp.result_type(x.dtype, kernel.dtype)
        fold_dtype = layer if rules[0].layer_dtype and site.linear else acc  # a conv: ΔW's gradient through it
        view_dtype = base_dtype if branch_dtype == "base" or fold_dtype != acc else None
        result = _merged(call, x, kernel, bias, entries, site, (acc, fold_dtype), view_dtype, rules)
    else:
        result = call(x, kernel, bias, base_dtype)
    for path, (active, rows, keep) in branches:
        if path != "factored":
            continue
        y = _factored(call, x, active, site, compute_of, cast_input)
        y = y if rows is None else (y * rows).astype(y.dtype)
        if out_sharding is not None:
            y = jax.sharding.reshard(y, out_sharding)
        result = result + y if keep is True else jnp.where(keep, result + y, result)
    return result.astype(base_out.dtype)


def route_of(plan: AdapterPlan, x: jax.Array, kernel: jax.Array, site: Site, route: str, *, training: bool) -> str:
    """The path one adapter's call takes: ``lycoris_core.paths.choose_path`` of ``route`` for ``x``'s
    token count, the kernel's itemsize and (an Explicit mesh) how the call is split, where the method
    and the layer offer the factored route."""
    method = method_for(plan.peft_type)
    supported = (site.linear and method.linear_forward is not None) or (site.conv and method.conv_forward is not None)
    return choose_path(
        route,
        plan,
        math.prod(x.shape[:-1]),
        training=training,
        supported=supported,
        itemsize=jnp.dtype(kernel.dtype).itemsize,
        split=functional.split_of(x, kernel),
        platform=functional.target_platform(),
    )


def _arrays(entries: Sequence[tuple[Active, Any, Any]]) -> tuple:
    """The traced inputs of the adapters: ``(factors, scale, rows, keep)`` each."""
    return tuple(
        (dict(a.factors), jnp.asarray(a.scale, jnp.result_type(float)), rows, None if keep is True else keep)
        for a, rows, keep in entries
    )


def _merged(
    call: LayerCall,
    x: jax.Array,
    kernel: jax.Array,
    bias: Any,
    entries: Sequence[tuple[Active, Any, Any]],
    site: Site,
    dtypes: tuple[Any, Any],
    view_dtype: Any,
    rules: Sequence[FoldRule],
) -> jax.Array:
    """The ``"merged"`` route: one call with ``W + Σ keep·ΔW``, summed in ``dtypes[0]`` and rounded
    once to ``dtypes[1]``, each ΔW as its ``rules`` (``lycoris_core.paths.FoldRule``) say. A Linear's
    backward is :func:`_factored_backward` (``dx`` through the fold where a rule asks); other layers
    form ΔW again (``jax.checkpoint``)."""
    plans = [a.plan for a, _, _ in entries]
    acc, fold_dtype = dtypes

    def fold(kernel: jax.Array, arrays: tuple) -> jax.Array:
        total = kernel.astype(acc)
        for plan, rule, (factors, scale, rows, keep) in zip(plans, rules, arrays, strict=True):
            delta = delta_kernel(Active(plan, factors, scale), site, rows, matmul_form=rule.matmul_form)
            total = total + _kept(delta, keep).astype(acc)
        return total.astype(fold_dtype)

    def primal(x: jax.Array, kernel: jax.Array, bias: Any, arrays: tuple) -> jax.Array:
        return call(x, fold(kernel, arrays), bias, view_dtype)

    arrays = _arrays(entries)
    if not site.linear:
        return jax.checkpoint(primal)(x, kernel, bias, arrays)
    if any(rule.dx_through_fold for rule in rules):
        return _factored_backward(primal, primal, x, kernel, bias, arrays, plans, None, dx_through_fold=True)
    frozen = lambda x, k, b, a: call(x, k.astype(fold_dtype), b, view_dtype)  # noqa: E731
    return _factored_backward(primal, frozen, x, kernel, bias, arrays, plans, None)


def _peft(
    call: LayerCall,
    x: jax.Array,
    kernel: jax.Array,
    bias: Any,
    entries: Sequence[tuple[Active, Any, Any]],
    site: Site,
    compute_of: Callable[[Any], Any],
    base_dtype: Any,
    cast_input: bool,
) -> jax.Array:
    """PEFT's route: the base call, plus the layer's own call with each ΔW as kernel (no bias) on the
    input cast to the branch's dtype. A Linear's backward is :func:`_factored_backward` (the base
    call included, so its backward is the frozen one); other layers form ΔW again."""
    plans = [a.plan for a, _, _ in entries]
    computes = [compute_of(jnp.result_type(*a.factors.values())) for a, _, _ in entries]

    def branch(plan: AdapterPlan, compute: Any, x: jax.Array, factors: dict, scale: Any, rows: Any) -> jax.Array:
        xc = x.astype(compute) if cast_input and x.dtype != compute else x
        delta = delta_kernel(Active(plan, factors, scale), site, rows).astype(compute)
        return call(xc, delta, None, None)

    def add(result: jax.Array, x: jax.Array, arrays: tuple) -> jax.Array:
        for plan, compute, (factors, scale, rows, keep) in zip(plans, computes, arrays, strict=True):
            y = branch(plan, compute, x, factors, scale, rows)
            result = result + y if keep is None else jnp.where(keep, result + y, result)
        return result

    arrays = _arrays(entries)
    frozen = lambda x, k, b, a=None: call(x, k, b, base_dtype)  # noqa: E731
    if not site.linear:
        return jax.checkpoint(add)(frozen(x, kernel, bias), x, arrays)
    primal = lambda x, k, b, a: add(frozen(x, k, b), x, a)  # noqa: E731
    branch_dtype = computes[0] if cast_input else None
    return _factored_backward(primal, frozen, x, kernel, bias, arrays, plans, branch_dtype)


def _factored(
    call: LayerCall, x: jax.Array, active: Active, site: Site, compute_of: Callable[[Any], Any], cast_input: bool
) -> jax.Array:
    """The ``"factored"`` branch (no ΔW): a Linear's ``linear_forward`` on ``x`` flattened to tokens, a
    conv's ``conv_forward`` through the layer's own convolution."""
    plan, method = active.plan, method_for(active.plan.peft_type)
    compute = compute_of(jnp.result_type(*active.factors.values()))
    factors = {k: v.astype(compute) for k, v in active.factors.items()}
    x = x.astype(compute) if cast_input and x.dtype != compute else x
    if site.linear:
        tokens = math.prod(x.shape[:-1])
        y = method.linear_forward(functional.reshape(x, (tokens, x.shape[-1])), factors, active.scale)
        return functional.reshape(y, (*x.shape[:-1], plan.weight_shape[0]))

    def conv(x: jax.Array, weight: jax.Array) -> jax.Array:  # the layer's own conv, PyTorch-layout kernel
        return call(x, functional.to_flax_kernel(weight), None, None)

    return method.conv_forward(conv, x, factors, active.scale, plan.weight_shape)


def _factored_backward(
    primal: Callable[[jax.Array, jax.Array, Any, tuple], jax.Array],
    frozen: Callable[[jax.Array, jax.Array, Any], jax.Array],
    x: jax.Array,
    kernel: jax.Array,
    bias: Any,
    arrays: tuple,
    plans: Sequence[AdapterPlan],
    branch_x_dtype: Any,
    *,
    dx_through_fold: bool = False,
) -> jax.Array:
    """``primal(x, kernel, bias, arrays)`` of a Linear with its adapters, whose backward pass is the
    frozen layer's (``frozen(x, kernel, bias, arrays)``'s: ``dx`` through ``W``, ``dW`` and ``db`` only
    if asked) plus each adapter's ``linear_grads`` on ``dy`` (rank-dropout rows and module dropout
    applied): no ΔW-sized gradient is formed, and sharded factor gradients are reduced at factor size.
    ``dx_through_fold``: ``frozen`` is the merged call itself, whose ``dx`` already holds the adapters'
    (their ``linear_grads``' ``dx`` is dropped, and never computed). ``branch_x_dtype``: the dtype the
    branches saw ``x`` in (``None``: as it is)."""
    grads = [method_for(p.peft_type).linear_grads for p in plans]
    out_features, in_features = plans[0].weight_shape

    @jax.custom_vjp
    def run(x: jax.Array, kernel: jax.Array, bias: Any, arrays: tuple) -> jax.Array:
        return primal(x, kernel, bias, arrays)

    def forward(x: jax.Array, kernel: jax.Array, bias: Any, arrays: tuple) -> tuple[jax.Array, tuple]:
        return run(x, kernel, bias, arrays), (x, kernel, bias, arrays)

    def backward(res: tuple, dy: jax.Array) -> tuple:
        x, kernel, bias, arrays = res
        out, frozen_vjp = jax.vjp(lambda x, k, b: frozen(x, k, b, arrays), x, kernel, bias)
        dx, dkernel, dbias = frozen_vjp(dy.astype(out.dtype))
        tokens = math.prod(x.shape[:-1])
        xb = x if branch_x_dtype is None else x.astype(branch_x_dtype)
        x2 = functional.reshape(xb, (tokens, in_features))
        dy2 = functional.reshape(dy, (tokens, out_features))
        darrays = []
        for linear_grads, (factors, scale, rows, keep) in zip(grads, arrays, strict=True):
            fdtype = jnp.result_type(*factors.values())
            dyi = (dy2 if rows is None else dy2 * rows).astype(fdtype)
            dxi, dfactors, dscale = linear_grads(x2.astype(fdtype), _kept(dyi, keep), factors, scale)
            if not dx_through_fold:
                dx = dx + functional.reshape(dxi, x.shape).astype(dx.dtype)
            darrays.append((dfactors, jnp.reshape(dscale, jnp.shape(scale)).astype(scale.dtype), None, None))
        return dx.astype(x.dtype), dkernel.astype(kernel.dtype), dbias, tuple(darrays)

    run.defvjp(forward, backward)
    return run(x, kernel, bias, arrays)


def merge_kernel(kernel: jax.Array, adapters: Sequence[tuple[Active, Any, Any]], site: Site) -> jax.Array:
    """``kernel + Σ keep·ΔW`` in the kernel's dtype (PEFT's merge arithmetic), each ``(Active, rows,
    keep)``. Differentiable in the factors and scales without forming ΔW in the backward pass: the
    kernel's cotangent goes back through the layout (a transpose) to each method's ``delta_grads``."""
    plans = [a.plan for a, _, _ in adapters]
    arrays = _arrays(adapters)

    def primal(kernel: jax.Array, arrays: tuple) -> jax.Array:
        total = kernel
        for plan, (factors, scale, rows, keep) in zip(plans, arrays, strict=True):
            total = total + _kept(delta_kernel(Active(plan, factors, scale), site, rows), keep)
        return total.astype(kernel.dtype)

    @jax.custom_vjp
    def run(kernel: jax.Array, arrays: tuple) -> jax.Array:
        return primal(kernel, arrays)

    def forward(kernel: jax.Array, arrays: tuple) -> tuple[jax.Array, tuple]:
        return run(kernel, arrays), arrays

    def backward(arrays: tuple, dk: jax.Array) -> tuple:
        darrays = []
        for plan, (factors, scale, rows, keep) in zip(plans, arrays, strict=True):
            method, fdtype = method_for(plan.peft_type), jnp.result_type(*factors.values())
            place = lambda w, rows=rows: _placed(_row_scaled(w, rows), site)  # noqa: E731
            (g,) = jax.linear_transpose(place, jax.ShapeDtypeStruct(plan.weight_shape, fdtype))(
                _kept(dk, keep).astype(fdtype)
            )
            dfactors, dscale = _delta_grads(method, g, factors, scale, plan.weight_shape)
            darrays.append((dfactors, jnp.reshape(dscale, jnp.shape(scale)).astype(scale.dtype), None, None))
        return dk, tuple(darrays)

    run.defvjp(forward, backward)
    return run(kernel, arrays)


def _delta_grads(method: Any, g: jax.Array, factors: dict, scale: Any, shape: tuple[int, ...]) -> tuple[dict, Any]:
    """The method's ``delta_grads``, or reverse-mode through its ``delta_weight`` where it has none."""
    if method.delta_grads is not None:
        return method.delta_grads(g, factors, scale, shape)
    _, vjp = jax.vjp(lambda f, s: method.delta_weight(f, s, shape), factors, scale)
    return vjp(g)
