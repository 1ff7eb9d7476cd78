"""A Linen module transform: LyCORIS adapters on any ``flax.linen`` module, without editing its code.

>>> import jax, jax.numpy as jnp, flax.linen as nn
>>> from lycoris_jax import linen, LoKrConfig
>>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(8)])
>>> x = jnp.ones((2, 4))
>>> params = model.init(jax.random.key(0), x)["params"]
>>> adapted, lycoris = linen.adapt(model, params, LoKrConfig(r=2, target_modules=["layers_2"]), key=jax.random.key(1))
>>> adapted.apply({"params": params, "lycoris": lycoris}, x).shape
(2, 8)

:func:`adapt` plans adapters for the targeted kernels of ``params`` (``lycoris_jax.pytree``'s rules
and module names) and returns a :class:`LycorisModule` wrapping the model, plus the factors as a
variable collection (``"lycoris"``, nested like ``params``). The wrapper shares the model's scope,
so ``params`` keep their tree; while it runs, the targeted ``nn.Dense``/``nn.DenseGeneral``/``nn.Einsum``/
``nn.Conv`` calls (found with
``nn.intercept_methods``) add the adapter branch as PEFT's unmerged forward computes it: the layer's
own computation with ΔW as kernel, no bias, the input cast to ΔW's dtype, the sum cast back.
Train the collection alone (``jax.grad`` with respect to it); merge, unmerge and save with the
pytree functions below, which take the collection. Rank/module dropout run when the wrapper is
built with ``deterministic=False`` and ``apply`` gets a ``"dropout"`` rng.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util

from lycoris_core import LycorisConfig, check_adapter_name, kohya
from lycoris_core.paths import check_forward_path
from lycoris_core.resolve import Layer
from lycoris_jax import functional, pytree
from lycoris_jax.adapted import Active, Site, adapted_call
from lycoris_jax.layer import check_branch_dtype

__all__ = [
    "LycorisModule",
    "adapt",
    "collection_of",
    "discover",
    "from_pretrained",
    "merge",
    "save_pretrained",
    "to_adapter",
    "unmerge",
    "wrap",
]

COLLECTION = "lycoris"
#: Linen layer types whose calls get the adapter branch.
SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv)
_inside_delta = contextvars.ContextVar("lycoris_inside_delta", default=False)


class LycorisModule(nn.Module):
    """``module`` with adapter branches on the layers named in ``targets`` (``((name, Target), ...)``).

    ``scale`` multiplies every ``alpha / r`` (PEFT's ``set_scale``); ``deterministic=False`` turns rank
    and module dropout on (keys from the ``"dropout"`` rng); ``enabled=False`` runs the plain model.
    """

    module: nn.Module
    targets: tuple[tuple[str, pytree.Target], ...]
    config_json: str
    adapter_name: str = "default"
    collection: str = COLLECTION
    scale: float = 1.0
    deterministic: bool = True
    enabled: bool = True
    #: ``"adapter"`` (PEFT): the branch computes in the factors' dtype; ``"base"``: in the layer's
    #: compute ``dtype`` (e.g. bfloat16), ΔW formed from the float32 factors and rounded once.
    branch_dtype: str = "adapter"
    #: How targeted layers compute their adapter (``lycoris_core.paths``): ``"auto"``, ``"merged"``,
    #: ``"factored"`` (``nn.Dense``) or ``"peft"`` (PEFT's two-branch arithmetic).
    forward_path: str = "auto"

    def setup(self) -> None:
        """Flax's lifecycle hook: shares the wrapped module's scope, so the model's params keep their paths."""
        nn.share_scope(self, self.module)  # the model's params keep their paths

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        check_branch_dtype(self.branch_dtype)
        check_forward_path(self.forward_path)
        if not self.enabled:
            return self.module(*args, **kwargs)
        with nn.intercept_methods(self._intercept):
            return self.module(*args, **kwargs)

    @nn.nowrap
    def _path_of(self, layer: nn.Module) -> tuple[str, ...]:
        """``layer``'s path below this module, read from its scope chain: ``Module.path`` keeps a name
        that ``nn.share_scope`` took away (the layers an ``nn.Sequential`` was built with still
        carry ``module``), while the variables are found along the chain."""
        names, scope = [], layer.scope
        while scope is not None and scope is not self.scope:
            names.append(scope.name)
            scope = scope.parent
        return tuple(reversed(names)) if scope is self.scope else tuple(layer.path[len(self.path) :])

    @nn.nowrap  # not a Linen method: it must not itself be intercepted
    def _intercept(self, next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        layer = context.module
        if context.method_name != "__call__" or _inside_delta.get():
            return next_fun(*args, **kwargs)
        name, target = {t.path: (n, t) for n, t in self.targets}.get(self._path_of(layer), (None, None))
        if target is None:
            return next_fun(*args, **kwargs)
        if not isinstance(layer, SUPPORTED) and not target.declared:
            raise TypeError(_unsupported(name, layer))
        factors = {f: layer.get_variable(self.collection, f) for f in target.plan.factor_shapes}
        missing = sorted(f for f, v in factors.items() if v is None)
        if missing:
            hint = (
                f"; this layer is in a stack: give nn.scan variable_axes={{..., {self.collection!r}: 0}} so each "
                "step sees its layer's factors"
                if target.layers
                else ""
            )
            raise ValueError(
                f"{name}: the {self.collection!r} collection lacks {missing}; pass the factors lycoris_jax.linen.adapt "
                f"returned (apply({{'params': ..., 'lycoris': ...}}, ...)){hint}"
            )
        if target.layers:
            target = _one_layer(name, target, factors)
        x, rest = (args[0], args[1:]) if args else (kwargs.pop("inputs"), ())
        plan = target.plan
        kernel = layer.get_variable("params", "kernel")  # every adapted layer has one
        dense = isinstance(layer, nn.Dense) or (not isinstance(layer, SUPPORTED) and kernel.ndim == 2)
        site = Site(
            target.layout if target.layout is not None else functional.KernelLayout(tuple(kernel.shape)),
            target.spec,
            linear=dense,
            # a Linen plan sees one group's kernel: the layer itself says whether it is grouped
            conv=isinstance(layer, nn.Conv) and layer.mask is None and layer.feature_group_count == 1,
        )
        dropout = not self.deterministic and bool(plan.rank_dropout or plan.module_dropout)

        def call(x: Any, k: Any, b: Any, dtype: Any) -> Any:
            return _own_call(layer, x, k, b, dtype, rest, kwargs)

        return adapted_call(
            call,
            x,
            kernel,
            layer.get_variable("params", "bias"),
            [Active(plan, factors, self.scale * plan.scaling)],
            site=site,
            route=self.forward_path,
            training=not self.deterministic,
            key=layer.make_rng("dropout") if dropout else None,
            branch_dtype=self.branch_dtype,
            base_dtype=getattr(layer, "dtype", None),
        )


def _own_call(layer: nn.Module, x: Any, kernel: Any, bias: Any, dtype: Any, rest: tuple, kwargs: dict) -> Any:
    """``layer``'s own computation with ``kernel`` and ``bias`` (``None``: none) as its params, computing
    in ``dtype`` (``None``: promoted): a detached clone applied to them (a kernel of other output
    channels for a factored conv). Calls inside are not adapted again."""
    fields = {f.name for f in dataclasses.fields(layer)}
    changes: dict[str, Any] = {"parent": None}
    if "dtype" in fields:
        changes["dtype"] = dtype
    params = {"kernel": kernel}
    if bias is not None:
        params["bias"] = bias
    elif "use_bias" in fields:
        changes["use_bias"] = False
    own = layer.get_variable("params", "kernel")
    if isinstance(getattr(layer, "features", None), int) and kernel.shape[-1] != own.shape[-1]:
        changes["features"] = kernel.shape[-1]
    token = _inside_delta.set(True)
    try:
        return layer.clone(**changes).apply({"params": params}, x, *rest, **kwargs)
    finally:
        _inside_delta.reset(token)


def _unsupported(name: str, layer: nn.Module) -> str:
    return (
        f"{name}: target module of type {type(layer).__name__} is not a layer the Linen transform knows "
        f"(only {', '.join('nn.' + t.__name__ for t in SUPPORTED)}); if it computes x @ W with its 'kernel' W, "
        f"give W's layout with kinds={{{name!r}: (in_axes, out_axes)}} (a kernel in torch's (out, in) layout: "
        "((1,), (0,))) and it is adapted through its own call"
    )


def _one_layer(name: str, target: pytree.Target, factors: Mapping[str, Any]) -> pytree.Target:
    """A stack's target as one ``nn.scan`` step sees it: its own slice of the factors, one scale (every
    layer's ``alpha / r`` is the same: ``adapt`` checked)."""
    stacked = [f for f, v in factors.items() if v.ndim != len(target.plan.factor_shapes[f])]
    if stacked:
        raise ValueError(
            f"{name}: the factors {stacked} still carry the layer axis inside the scan; give nn.scan "
            "variable_axes={..., 'lycoris': 0} (the collection's name) so each step sees its layer's factors"
        )
    spec = target.spec[1:] if target.spec else None
    return dataclasses.replace(target, layers=(), spec=spec)


def discover(module: nn.Module, params: Any, *args: Any, **kwargs: Any) -> dict[str, pytree.KindSpec | TypeError]:
    """``kinds`` for every supported layer ``module.apply({"params": params}, *args, **kwargs)`` calls
    (traced with ``jax.eval_shape``, nothing computed): a ``DenseGeneral``/``Einsum`` kernel's input
    and output axes, a Conv's rank; for a layer that cannot be adapted (``batch_dims``, an Einsum that
    is not a linear map), the ``TypeError`` saying why."""
    return {name: spec for name, (layer_type, spec) in _trace(module, params, args, kwargs).items() if layer_type}


def _trace(module: nn.Module, params: Any, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{name: (supported type or None, kinds entry or TypeError)}`` for every module with a ``kernel``
    param that one traced call runs (a layer type the transform does not know: ``(None, TypeError)``)."""
    found: dict[str, tuple[Any, Any]] = {}

    def record(next_fun: Any, a: tuple, kw: dict, context: Any) -> Any:
        layer = context.module
        if context.method_name == "__call__" and layer.scope is not None and layer.has_variable("params", "kernel"):
            name = ".".join(layer.path)
            if not isinstance(layer, SUPPORTED):
                found.setdefault(name, (None, TypeError(_unsupported(name, layer))))
            else:
                try:
                    found[name] = (type(layer), _spec_of(layer, a, kw, name))
                except TypeError as err:
                    found[name] = (type(layer), err)
        return next_fun(*a, **kw)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda p: module.apply({"params": p}, *args, **kwargs), params)
    return found


def _spec_of(layer: nn.Module, args: tuple, kwargs: dict, name: str) -> pytree.KindSpec:
    if isinstance(layer, nn.Conv):
        return "conv1d" if len(layer.kernel_size) == 1 else "conv2d"
    if isinstance(layer, nn.Dense):
        return "linear"
    if isinstance(layer, nn.DenseGeneral):
        if layer.batch_dims:
            raise TypeError(f"{name}: DenseGeneral with batch_dims {layer.batch_dims} is not supported")
        n_in = len(layer.axis) if isinstance(layer.axis, Sequence) else 1
        n_out = len(layer.features) if isinstance(layer.features, Sequence) else 1
        return tuple(range(n_in)), tuple(range(n_in, n_in + n_out))
    einsum_str = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or layer.einsum_str
    return functional.einsum_axes(einsum_str, name)


def _plan(
    module: nn.Module,
    params: Any,
    config: LycorisConfig,
    *,
    kinds: Mapping[str, pytree.KindSpec] | None,
    output_modules: Sequence[str],
    example_args: tuple,
    example_kwargs: Mapping[str, Any] | None,
    rename: pytree.Rename,
    stacks: Sequence[str],
    plans: Mapping[str, Any] | None = None,
) -> dict[str, pytree.Target]:
    """The targets of ``config`` for the Linen transform: the pytree API's table of kernels, refined by
    what one traced call shows (``example_args``): each layer's kind, a layer type the transform does
    not know (an error if targeted, unless ``kinds`` describes it), and kernels the call never reads
    (tied embeddings left by a checkpoint conversion), which are left out with a warning. ``nn.scan``
    applies one adapter to every step: a stack needs one ``alpha / r``."""
    user_kinds = dict(kinds or {})
    traced: dict[str, tuple[Any, Any]] = {}
    if example_args or example_kwargs:
        to_name = pytree._renamer(rename)
        traced = {to_name(p): entry for p, entry in _trace(module, params, example_args, example_kwargs or {}).items()}
    found = {re.escape(n): spec for n, (t, spec) in traced.items() if t is not None and not isinstance(spec, TypeError)}
    all_kinds = found | user_kinds

    def refine(table: dict[str, Layer]) -> dict[str, Layer]:
        if not traced:
            return table
        unread = []
        for name, row in table.items():
            layer_type, spec = traced.get(_stacked_name(name, stacks, traced), (None, None))
            declared = pytree._spec(name, user_kinds) is not None
            if spec is None:
                unread.append(name)
                error = ValueError(f"{name}: the traced call never reads this kernel (a tied or unused weight)")
                table[name] = dataclasses.replace(row, shape=None, error=error, linear=False, skip="")
            elif isinstance(spec, TypeError) and not declared:
                skip = str(spec) if row.linear or row.skip or layer_type is None else ""
                table[name] = dataclasses.replace(row, shape=None, error=spec, skip=skip)
        if unread and isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
            warnings.warn(
                f"target_modules='all-linear' leaves out kernels the traced call never reads: {sorted(unread)}",
                UserWarning,
                stacklevel=5,
            )
        return table

    return pytree._targets(
        params, config, all_kinds, output_modules, rename, stacks, table=refine, one_scale_per_stack=True, plans=plans
    )


def _stacked_name(name: str, stacks: Sequence[str], traced: Mapping[str, Any]) -> str:
    """The traced name of a module: an ``nn.scan`` stack's layer ``layers.3.mlp`` runs as ``layers.mlp``."""
    if name in traced:
        return name
    for stack in stacks:
        head, _, tail = name.removeprefix(f"{stack}.").partition(".")
        if name.startswith(f"{stack}.") and head.isdigit():
            return ".".join(filter(None, (stack, tail)))
    return name


def adapt(
    module: nn.Module,
    params: Any,
    config: LycorisConfig,
    *,
    key: jax.Array,
    adapter_name: str = "default",
    kinds: Mapping[str, pytree.KindSpec] | None = None,
    output_modules: Sequence[str] = ("lm_head",),
    example_args: tuple = (),
    example_kwargs: Mapping[str, Any] | None = None,
    rename: pytree.Rename = None,
    stacks: Sequence[str] = (),
    autocast_adapter_dtype: bool = True,
    **options: Any,
) -> tuple[LycorisModule, dict]:
    """``(wrapped module, factors collection)`` for the targeted kernels of ``params`` (initialised
    as in PEFT, see :func:`lycoris_jax.pytree.init`). With ``example_args`` one traced call finds the
    layers' kinds (:func:`discover`, needed for ``DenseGeneral``/``Einsum``), the layers the transform
    cannot adapt and the kernels the call never reads; ``kinds`` given explicitly win (and make a layer
    type the transform does not know, such as transformers' ``FlaxConv1D``, adaptable through its own
    call). ``options`` are :class:`LycorisModule` fields (``scale``, ``deterministic``, ``collection``,
    ``branch_dtype``, ``forward_path``)."""
    check_adapter_name(adapter_name)
    targets = _plan(
        module,
        params,
        config,
        kinds=kinds,
        output_modules=output_modules,
        example_args=example_args,
        example_kwargs=example_kwargs,
        rename=rename,
        stacks=stacks,
    )
    adapter = pytree._initialise(params, targets, config, key, adapter_name, autocast_adapter_dtype, rename, stacks)
    return wrap(module, adapter, **options), collection_of(adapter)


def wrap(module: nn.Module, adapter: pytree.Adapter, **options: Any) -> LycorisModule:
    """The :class:`LycorisModule` for an existing :class:`lycoris_jax.pytree.Adapter`'s plans."""
    return LycorisModule(module, adapter.targets, adapter.config_json, adapter.adapter_name, **options)


def collection_of(adapter: pytree.Adapter) -> dict:
    """The adapter's factors as a Linen collection nested like ``params`` (``{"model": {"layers": ...}}``)."""
    paths = {module: target.path for module, target in adapter.targets}
    flat = {(*paths[m], f): v for m, factors in adapter.factors.items() for f, v in factors.items()}
    return traverse_util.unflatten_dict(flat)


def to_adapter(adapted: LycorisModule, lycoris: Mapping) -> pytree.Adapter:
    """The :class:`lycoris_jax.pytree.Adapter` holding a collection's factors (for files, merging)."""
    names = {target.path: module for module, target in adapted.targets}
    factors: dict[str, dict[str, jax.Array]] = {}
    unexpected = []
    for path, value in traverse_util.flatten_dict(dict(lycoris)).items():
        if path[:-1] in names:
            factors.setdefault(names[path[:-1]], {})[path[-1]] = value
        else:
            unexpected.append(".".join(path[:-1]))
    if unexpected or set(factors) != set(names.values()):
        found = sorted({*factors, *unexpected})
        raise ValueError(f"the collection holds factors for {found}, the module expects {sorted(names.values())}")
    return pytree.Adapter(factors, adapted.targets, adapted.config_json, adapted.adapter_name)


def merge(adapted: LycorisModule, params: Any, lycoris: Mapping, *, key: jax.Array | None = None) -> Any:
    """``params`` with ``kernel + ΔW`` for every target (at the wrapper's ``scale``); run them with
    the plain module (or the wrapper built with ``enabled=False``)."""
    return pytree.merge(params, to_adapter(adapted, lycoris), scale=adapted.scale, key=key)


def unmerge(adapted: LycorisModule, merged: Any, lycoris: Mapping) -> Any:
    """The inverse of :func:`merge` (``kernel - ΔW``, at the same ``scale``), up to rounding."""
    return pytree.merge(merged, to_adapter(adapted, lycoris), scale=-adapted.scale)


def save_pretrained(adapted: LycorisModule, lycoris: Mapping, directory: str | os.PathLike) -> None:
    """PEFT's files (crash-safe), loadable by ``PeftModel.from_pretrained`` on the torch twin."""
    pytree.save_pretrained(to_adapter(adapted, lycoris), directory)


def from_pretrained(
    directory: str | os.PathLike,
    module: nn.Module,
    params: Any,
    *,
    example_args: tuple = (),
    example_kwargs: Mapping[str, Any] | None = None,
    adapter_name: str = "default",
    kinds: Mapping[str, pytree.KindSpec] | None = None,
    output_modules: Sequence[str] = ("lm_head",),
    autocast_adapter_dtype: bool = True,
    allow_nonfinite: bool = False,
    rename: pytree.Rename = None,
    stacks: Sequence[str] = (),
    **options: Any,
) -> tuple[LycorisModule, dict]:
    """``(wrapped module, factors collection)`` from a PEFT adapter directory, checked against
    ``params`` (as :func:`lycoris_jax.pytree.from_pretrained`); ``example_args`` and ``kinds`` as in
    :func:`adapt`; ``options`` are :class:`LycorisModule` fields."""
    check_adapter_name(adapter_name)
    plan = functools.partial(
        _plan,
        module,
        params,
        kinds=kinds,
        output_modules=output_modules,
        example_args=example_args,
        example_kwargs=example_kwargs,
        rename=rename,
        stacks=stacks,
    )
    adapter = pytree._load(
        directory, params, plan, adapter_name, autocast_adapter_dtype, allow_nonfinite, rename, stacks
    )
    return wrap(module, adapter, **options), collection_of(adapter)


def save_lycoris(
    adapted: LycorisModule, lycoris: Mapping, path: str | os.PathLike, *, prefix: str = kohya.LYCORIS_PREFIX
) -> None:
    """A LyCORIS/kohya single file (crash-safe) computing what the adapter computes."""
    pytree.save_lycoris(to_adapter(adapted, lycoris), path, prefix=prefix)


def from_lycoris(
    path: str | os.PathLike,
    module: nn.Module,
    params: Any,
    *,
    prefix: str | None = None,
    example_args: tuple = (),
    example_kwargs: Mapping[str, Any] | None = None,
    adapter_name: str = "default",
    kinds: Mapping[str, pytree.KindSpec] | None = None,
    output_modules: Sequence[str] = ("lm_head",),
    autocast_adapter_dtype: bool = True,
    allow_nonfinite: bool = False,
    rename: pytree.Rename = None,
    stacks: Sequence[str] = (),
    **options: Any,
) -> tuple[LycorisModule, dict]:
    """``(wrapped module, factors collection)`` from a LyCORIS/kohya single file; names resolve against
    ``params`` (``prefix``: the file's, found when not given), and it computes what lycoris-lora
    computes (``lycoris_core.kohya.lycoris_adapter``); other arguments as in :func:`from_pretrained`."""
    planner = functools.partial(
        _plan,
        module,
        params,
        kinds=kinds,
        output_modules=output_modules,
        example_args=example_args,
        example_kwargs=example_kwargs,
        rename=rename,
        stacks=stacks,
    )
    adapter = pytree._from_file(
        path,
        params,
        lambda config, own: planner(config, plans=own),
        prefix,
        adapter_name,
        kinds,
        output_modules,
        autocast_adapter_dtype,
        allow_nonfinite,
        rename,
        stacks,
    )
    return wrap(module, adapter, **options), collection_of(adapter)
