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
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from lycoris_core import LycorisConfig, kohya
from lycoris_core.paths import check_forward_path, choose_path
from lycoris_jax import functional, paths, pytree
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
        if context.method_name != "__call__" or not isinstance(layer, SUPPORTED) or _inside_delta.get():
            return next_fun(*args, **kwargs)
        name, target = {t.path: (n, t) for n, t in self.targets}.get(self._path_of(layer), (None, None))
        if target is None:
            return next_fun(*args, **kwargs)
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
        dense = isinstance(layer, nn.Dense)
        # a Linen plan sees one group's kernel: the layer itself says whether it is grouped
        supported = dense or (isinstance(layer, nn.Conv) and layer.mask is None and layer.feature_group_count == 1)
        kernel = layer.get_variable("params", "kernel")  # every SUPPORTED layer has one
        path = choose_path(
            self.forward_path,
            plan,
            math.prod(x.shape[:-1]),
            training=not self.deterministic,
            supported=supported,
            itemsize=jnp.dtype(kernel.dtype).itemsize,
            split=functional.split_of(x, kernel),
        )
        if path == "peft":
            result = next_fun(*args, **kwargs) if args else next_fun(x, *rest, **kwargs)
            return self._peft_branch(layer, name, target, factors, result, x, rest, kwargs)
        fdtype = jnp.result_type(*factors.values())
        rows, keep = pytree.dropout_draws(plan, None if self.deterministic else layer.make_rng("dropout"), fdtype)
        scale = self.scale * plan.scaling
        base_dtype = getattr(layer, "dtype", None)
        compute = base_dtype if self.branch_dtype == "base" and base_dtype is not None else fdtype
        if path == "factored":
            result = next_fun(x, *rest, **kwargs)
            cast = {k: v.astype(compute) for k, v in factors.items()}
            if dense:
                y = paths.factored_delta(plan.peft_type, x.astype(compute), cast, scale, plan.weight_shape[0])
            else:

                def conv(x: Any, weight: Any) -> Any:  # the layer's own conv, PyTorch-layout kernel
                    view = layer.clone(parent=None, use_bias=False, features=weight.shape[0], dtype=None)
                    token = _inside_delta.set(True)
                    try:
                        kernel = functional.to_flax_kernel(weight)
                        return view.apply({"params": {"kernel": kernel}}, x, *rest, **kwargs)
                    finally:
                        _inside_delta.reset(token)

                y = paths.factored_conv(plan.peft_type, conv, x.astype(compute), cast, scale, plan.weight_shape)
            y = y if rows is None else (y * rows).astype(y.dtype)
            return (
                (result + y).astype(result.dtype)
                if keep is True
                else jnp.where(keep, result + y, result).astype(result.dtype)
            )
        bias = layer.get_variable("params", "bias")
        to_kernel = target.layout.to_kernel if target.layout is not None else functional.to_flax_kernel
        dtype = (
            compute if self.branch_dtype == "base" and base_dtype is not None else jnp.result_type(kernel.dtype, fdtype)
        )

        def delta(f: Mapping[str, Any], s: Any, r: Any) -> Any:
            weight = pytree._DELTA[plan.peft_type](f, s, plan.weight_shape)
            if r is not None:
                weight = (weight * r.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(weight.dtype)
            return functional.constrain(to_kernel(weight), target.spec)

        def call(x: Any, k: Any, b: Any) -> Any:
            params = {"kernel": k} if b is None else {"kernel": k, "bias": b}
            view = layer.clone(
                parent=None, dtype=base_dtype if self.branch_dtype == "base" else None, param_dtype=k.dtype
            )
            token = _inside_delta.set(True)
            try:
                return view.apply({"params": params}, x, *rest, **kwargs)
            finally:
                _inside_delta.reset(token)

        fold = paths.Fold(factors, jnp.asarray(scale, jnp.result_type(float)), rows, keep)
        linear = (plan.peft_type, *plan.weight_shape) if dense else None
        return paths.folded_call(call, x, kernel, bias, [fold], delta, dtype=dtype, linear=linear)

    @nn.nowrap
    def _peft_branch(
        self,
        layer: nn.Module,
        name: str,
        target: pytree.Target,
        factors: dict,
        result: Any,
        x: Any,
        rest: tuple,
        kwargs: dict,
    ) -> Any:
        """PEFT's arithmetic: the layer's own call with ΔW as kernel, added to ``result``."""
        adapter = pytree.Adapter({name: factors}, ((name, target),), self.config_json, self.adapter_name)
        dropout = None if self.deterministic else layer.make_rng("dropout")
        delta = pytree.delta_weight(adapter, name, scale=self.scale, key=dropout)  # the layer's kernel layout
        if self.branch_dtype == "base" and getattr(layer, "dtype", None) is not None:
            delta = delta.astype(layer.dtype)
        token = _inside_delta.set(True)
        try:
            view = layer.clone(parent=None, use_bias=False, dtype=None, param_dtype=delta.dtype)
            branch = view.apply({"params": {"kernel": delta}}, x.astype(delta.dtype), *rest, **kwargs)
        finally:
            _inside_delta.reset(token)
        return (result + branch).astype(result.dtype)


def _one_layer(name: str, target: pytree.Target, factors: Mapping[str, Any]) -> pytree.Target:
    """A stack's target as one ``nn.scan`` step sees it: its own slice of the factors, one scale."""
    stacked = [f for f, v in factors.items() if v.ndim != len(target.plan.factor_shapes[f])]
    if stacked:
        raise ValueError(
            f"{name}: the factors {stacked} still carry the layer axis inside the scan; give nn.scan "
            "variable_axes={..., 'lycoris': 0} (the collection's name) so each step sees its layer's factors"
        )
    scalings = {entry[1].scaling if entry else 0.0 for entry in target.layers}
    if len(scalings) != 1:
        raise ValueError(
            f"{name}: inside nn.scan every layer of a stack needs the same alpha / r and must be targeted "
            f"(layers_to_transform, alpha_pattern give {sorted(scalings)}); the pytree API and the NNX tuner "
            "take per-layer scales"
        )
    spec = target.spec[1:] if target.spec else None
    return dataclasses.replace(target, layers=(), spec=spec)


def discover(module: nn.Module, params: Any, *args: Any, **kwargs: Any) -> dict[str, pytree.KindSpec | TypeError]:
    """``kinds`` for every supported layer ``module.apply({"params": params}, *args, **kwargs)`` calls
    (traced with ``jax.eval_shape``, nothing computed): a ``DenseGeneral``/``Einsum`` kernel's input
    and output axes, a Conv's rank; for a layer that cannot be adapted (``batch_dims``, an Einsum that
    is not a linear map), the ``TypeError`` saying why."""
    found: dict[str, pytree.KindSpec | TypeError] = {}

    def record(next_fun: Any, a: tuple, kw: dict, context: Any) -> Any:
        layer = context.module
        if context.method_name == "__call__" and isinstance(layer, SUPPORTED):
            name = ".".join(layer.path)
            try:
                found[name] = _spec_of(layer, a, kw, name)
            except TypeError as err:
                found[name] = err
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
    **options: Any,
) -> tuple[LycorisModule, dict]:
    """``(wrapped module, factors collection)`` for the targeted kernels of ``params`` (initialised
    as in PEFT, see :func:`lycoris_jax.pytree.init`). With ``example_args`` the layers' kinds are
    found by tracing one call (:func:`discover`, needed for ``DenseGeneral``/``Einsum``); ``kinds``
    given explicitly win. ``options`` are :class:`LycorisModule` fields (``scale``, ``deterministic``,
    ``collection``)."""
    kinds = _kinds(module, params, config, kinds, example_args, example_kwargs, rename)
    adapter = pytree.init(
        params,
        config,
        key=key,
        adapter_name=adapter_name,
        kinds=kinds,
        output_modules=output_modules,
        rename=rename,
        stacks=stacks,
    )
    return wrap(module, adapter, **options), collection_of(adapter)


def _kinds(
    module: nn.Module,
    params: Any,
    config: LycorisConfig,
    kinds: Mapping[str, pytree.KindSpec] | None,
    example_args: tuple,
    example_kwargs: Mapping[str, Any] | None,
    rename: pytree.Rename = None,
) -> dict[str, pytree.KindSpec]:
    if not example_args and not example_kwargs:
        return dict(kinds or {})
    to_name = pytree._renamer(rename)
    found = {to_name(p): spec for p, spec in discover(module, params, *example_args, **(example_kwargs or {})).items()}
    skipped = [str(spec) for spec in found.values() if isinstance(spec, TypeError)]
    targets = config.target_modules
    if skipped and isinstance(targets, str) and targets.lower() == "all-linear":
        warnings.warn(f"target_modules='all-linear' leaves out: {'; '.join(skipped)}", UserWarning, stacklevel=3)
    usable = {re.escape(name): spec for name, spec in found.items() if not isinstance(spec, TypeError)}
    return usable | dict(kinds or {})


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
    **kwargs: Any,
) -> tuple[LycorisModule, dict]:
    """``(wrapped module, factors collection)`` from a PEFT adapter directory, checked against
    ``params``; ``example_args`` as in :func:`adapt`; other ``kwargs`` are :class:`LycorisModule`
    fields or go to :func:`lycoris_jax.pytree.from_pretrained`."""
    options = {
        k: kwargs.pop(k)
        for k in ("scale", "deterministic", "collection", "enabled", "branch_dtype", "forward_path")
        if k in kwargs
    }
    config = pytree.read_config(directory)
    kwargs["kinds"] = _kinds(
        module, params, config, kwargs.get("kinds"), example_args, example_kwargs, kwargs.get("rename")
    )
    adapter = pytree.from_pretrained(directory, params, **kwargs)
    return wrap(module, adapter, **options), collection_of(adapter)


def save_lycoris(
    adapted: LycorisModule, lycoris: Mapping, path: str | os.PathLike, *, prefix: str = kohya.LYCORIS_PREFIX
) -> None:
    """A LyCORIS/kohya single file (crash-safe) computing what the adapter computes."""
    pytree.save_lycoris(to_adapter(adapted, lycoris), path, prefix=prefix)


def from_lycoris(
    path: str | os.PathLike, module: nn.Module, params: Any, *, prefix: str | None = None, **kwargs: Any
) -> tuple[LycorisModule, dict]:
    """``(wrapped module, factors collection)`` from a LyCORIS/kohya single file; names resolve against
    ``params`` (``prefix``: the file's, found when not given); ``kwargs`` as in :func:`from_pretrained`."""
    names = pytree.module_names(params, rename=kwargs.get("rename"), stacks=kwargs.get("stacks", ()))
    allow = kwargs.get("allow_nonfinite", False)
    with kohya.as_peft_directory(path, names, prefix=prefix, allow_nonfinite=allow) as directory:
        return from_pretrained(directory, module, params, **kwargs)
