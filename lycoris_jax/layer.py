"""Flax NNX adapter layers: one wrapper per algorithm serving ``nnx.Linear`` and ``nnx.Conv`` (1-D/2-D).

Mirrors ``lycoris_torch.layer``. State is a dict of structs: ``plans[name]`` is the frozen
``lycoris_core.AdapterPlan`` (static), ``factors[name]`` a dict of :class:`LycorisParam`
in PEFT's names and PyTorch layouts (plain dicts, so any valid adapter name is a key, unlike
``nnx.Dict`` whose keys are attributes), ``scaling[name]`` the live scale, held in a
:class:`LycorisScale` variable (state, not graph structure: a new scale never recompiles a jitted
function, and a traced scale may be set inside one). The delta branch runs the base layer's own
forward with ΔW as its kernel (``functional.forward_with_weight``), so merged and unmerged outputs
agree for every padding mode, stride, dilation and group count.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lycoris_core import LOHA_FACTORS, LOKR_FACTORS, AdapterPlan, LayerShape, plan_loha, plan_lokr
from lycoris_core.bookkeeping import LayerBookkeeping
from lycoris_core.paths import check_forward_path, choose_path
from lycoris_jax import functional, loha, lokr, paths

__all__ = [
    "BRANCH_DTYPES",
    "LINEAR_LAYERS",
    "SUPPORTED_LAYERS",
    "LoHaLayer",
    "LoKrLayer",
    "LycorisLayer",
    "LycorisParam",
    "LycorisScale",
    "check_branch_dtype",
    "kernel_layout_of",
    "layer_shape_of",
    "require_dropout_stream",
]

#: Base layer types the built-in adapters wrap.
SUPPORTED_LAYERS: tuple[type[nnx.Module], ...] = (nnx.Linear, nnx.Conv, nnx.LinearGeneral, nnx.Einsum)
#: The layers ``target_modules="all-linear"`` selects.
LINEAR_LAYERS: tuple[type[nnx.Module], ...] = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


class LycorisParam(nnx.Param):
    """An adapter factor. ``nnx.Optimizer(model, tx, wrt=LycorisParam)``, ``nnx.DiffState(0, LycorisParam)``
    and ``nnx.state(model, LycorisParam)`` select exactly the adapters."""


class LycorisScale(nnx.Variable):
    """An adapter's live scale (``alpha / r`` times ``set_scale``'s factor): a 0-d array, never trained
    (not an ``nnx.Param``); ``nnx.state(model, LycorisScale)`` selects every scale."""


def kernel_layout_of(module: Any, where: str = "", *, stacked: bool = False) -> functional.KernelLayout:
    """How a supported layer's kernel holds PEFT's PyTorch weight (see ``functional.KernelLayout``);
    ``stacked``: the kernel has a leading layer axis (a scanned stack) and the layout is one layer's."""
    shape = tuple(module.kernel.shape)[1 if stacked else 0 :]
    if isinstance(module, nnx.LinearGeneral):
        if module.batch_axis:
            raise TypeError(f"{where or 'LinearGeneral'}: batch_axis {dict(module.batch_axis)} is not supported")
        n_in = len(module.in_features)
        return functional.KernelLayout(shape, tuple(range(n_in)), tuple(range(n_in, len(shape))))
    if isinstance(module, nnx.Einsum):
        return functional.KernelLayout(shape, *functional.einsum_axes(module.einsum_str, where))
    return functional.KernelLayout(shape)


def layer_shape_of(module: Any, where: str = "", *, stacked: bool = False) -> LayerShape:
    """The plan's view of a supported base layer; ``TypeError`` listing the supported types otherwise.
    ``nnx.LinearGeneral``/``nnx.Einsum`` are the ``nn.Linear`` they equal (``KernelLayout``)."""
    if isinstance(module, nnx.Linear):
        return LayerShape("linear", module.out_features, module.in_features)
    if isinstance(module, (nnx.LinearGeneral, nnx.Einsum)):
        return LayerShape("linear", *kernel_layout_of(module, where, stacked=stacked).linear_features)
    if isinstance(module, nnx.Conv) and len(module.kernel_size) in (1, 2):
        groups = module.feature_group_count
        kind = "conv1d" if len(module.kernel_size) == 1 else "conv2d"
        return LayerShape(kind, module.out_features, module.in_features // groups, tuple(module.kernel_size), groups)
    detail = f" with {len(module.kernel_size)} spatial dims" if isinstance(module, nnx.Conv) else ""
    raise TypeError(
        f"{where or 'target'}: target module of type {type(module).__name__}{detail} not supported, "
        "currently only adapters for Linear, Conv (1-D and 2-D), LinearGeneral and Einsum are supported"
    )


BRANCH_DTYPES = ("adapter", "base")


def check_branch_dtype(value: Any) -> str:
    """``"adapter"`` or ``"base"`` (``branch_dtype``), else a ``ValueError`` naming the value."""
    if value not in BRANCH_DTYPES:
        raise ValueError(f"branch_dtype: expected one of {list(BRANCH_DTYPES)}, got {value!r}")
    return value


def require_dropout_stream(rngs: nnx.Rngs, where: str) -> None:
    """Rank/module dropout draws keys from ``rngs.dropout()``: refuse an ``nnx.Rngs`` that has
    neither a ``dropout`` nor a ``default`` stream, naming the place, before it is needed."""
    if not hasattr(rngs, "dropout"):
        raise ValueError(
            f"{where}: rank_dropout/module_dropout need an nnx.Rngs with a 'dropout' (or 'default') stream, "
            f"got streams {sorted(k for k, _ in nnx.iter_children(rngs))}; e.g. rngs=nnx.Rngs(params=0, dropout=1)"
        )


class LycorisLayer(LayerBookkeeping, nnx.Module, abc.ABC):
    """Base of every adapter layer; wraps ``base_layer`` and adds ``Σ_active f(x; ΔW_name)``.

    Subclasses implement ``_available_adapters``, ``create_adapter_parameters``,
    ``reset_adapter_parameters``, ``update_layer``, ``get_delta_weight`` and
    ``_get_delta_activations``; they register each adapter with :meth:`_register_adapter`.
    Names, plans, scales, merge order and the forward's control flow come from
    ``lycoris_core.bookkeeping.LayerBookkeeping`` (shared with the PyTorch twin).
    ``deterministic`` follows ``model.train()`` / ``model.eval()``; dropout keys come from
    ``rngs.dropout()``, initialisation keys from ``rngs.params()``.
    """

    adapter_layer_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nnx.Module, *, rngs: nnx.Rngs, deterministic: bool = False) -> None:
        self.base_layer = base_layer
        self.factors: dict[str, dict[str, LycorisParam]] = nnx.data({})
        self._scales: dict[str, LycorisScale] = nnx.data({})
        #: ``{adapter: traced bool}`` for adapters merged by a safe merge under ``jax.jit``.
        self._merge_ok: dict[str, nnx.Variable] = nnx.data({})
        self._init_bookkeeping()
        #: ``True`` in eval mode (``model.eval()``); the tuner passes the mode of the model joined.
        self.deterministic = deterministic
        self.rngs = rngs

    # ------------------------------------------------------------------ interface
    @property
    @abc.abstractmethod
    def _available_adapters(self) -> set[str]:
        """Names of the adapters that hold parameters in this layer."""

    @abc.abstractmethod
    def create_adapter_parameters(self, adapter_name: str, r: int, **kwargs: Any) -> None:
        """Create the factor parameters for ``adapter_name``."""

    @abc.abstractmethod
    def reset_adapter_parameters(self, adapter_name: str) -> None:
        """Initialise the factors of ``adapter_name``."""

    @abc.abstractmethod
    def update_layer(self, adapter_name: str, r: int, alpha: float, **kwargs: Any) -> None:
        """Add adapter ``adapter_name`` with rank ``r`` and ``alpha`` to this layer."""

    @abc.abstractmethod
    def get_delta_weight(
        self, adapter_name: str, *, apply_rank_dropout: bool = False, rank_dropout_mask: jax.Array | None = None
    ) -> jax.Array:
        """ΔW in the base weight's *PyTorch* layout, optionally with rank dropout over output rows."""

    @abc.abstractmethod
    def _get_delta_activations(self, adapter_name: str, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """The adapter's contribution added to the base layer's output."""

    # ------------------------------------------------------------------ state
    @property
    def scaling(self) -> dict[str, Any]:
        """``{adapter: scale}``: Python floats where the values are concrete, arrays while traced."""
        return {name: _concrete_or_array(var.get_value()) for name, var in self._scales.items()}

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "scaling":  # before NNX's static-attribute check: the values may be arrays
            self._set_scaling(value)
        else:
            super().__setattr__(name, value)

    def _set_scaling(self, values: dict[str, Any]) -> None:
        """Replace the scales; an existing variable keeps its identity (and its place under ``nnx.jit``)."""
        scales = {}
        for name, value in values.items():
            var = self._scales.get(name)
            value = jnp.asarray(value, dtype=jnp.result_type(float))  # never weak-typed: one trace
            if var is not None and var.get_value().shape == value.shape:
                var.set_value(value)
            else:
                var = LycorisScale(value)
            scales[name] = var
        self._scales = nnx.data(scales)

    def get_base_layer(self) -> nnx.Module:
        base = self.base_layer
        while isinstance(base, LycorisLayer):
            base = base.base_layer
        return base

    @property
    def kernel(self) -> nnx.Param:
        return self.get_base_layer().kernel

    def _create_factors(self, adapter_name: str, plan: AdapterPlan, dtype: Any, initialize: bool = True) -> None:
        """Factors per the plan (``functional.init_factors``, keys from ``rngs.params()``)."""
        kernel_dtype = self.get_base_layer().kernel.dtype
        values = functional.init_factors(self._params_key, plan, dtype, kernel_dtype, initialize=initialize)
        sharding = functional.factor_sharding(self.get_base_layer().kernel, plan, self._kernel_layout())
        self.factors[adapter_name] = {
            name: LycorisParam(value, **sharding.get(name, {})) for name, value in values.items()
        }

    def _params_key(self) -> jax.Array:
        try:
            if getattr(self, "stack_size", 0):  # a stack's rngs are split per layer: one key each
                return nnx.vmap(lambda rngs: rngs.params(), in_axes=0, out_axes=0)(self.rngs)
            return self.rngs.params()
        except AttributeError:
            raise ValueError(
                f"{getattr(self, 'module_path', '') or type(self).__name__}: initialising adapter factors needs an "
                "nnx.Rngs with a 'params' or 'default' stream (e.g. rngs=nnx.Rngs(params=0, dropout=1))"
            ) from None

    def _factor_values(self, adapter_name: str) -> dict[str, jax.Array]:
        return {name: param[...] for name, param in self.factors[adapter_name].items()}

    # ------------------------------------------------------------------ adapter management
    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Activate ``adapter_names`` (training selects parameters by type, not by activity)."""
        self._active_adapter = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``; if it was the only active one, activate the first remaining."""
        if adapter_name in self.factors:
            del self.factors[adapter_name]
        self._forget_adapter(adapter_name)

    # ------------------------------------------------------------------ merge
    def _merged_weight(self, names: Sequence[str], *, sign: int = 1, check: bool = False, where: str = "") -> jax.Array:
        """The kernel with ``sign * ΔW`` of each of ``names`` added, rounded to the kernel dtype after
        each adapter (PEFT's in-place ``W += ΔW``); ``check`` raises on NaN or ±inf."""
        kernel = self.get_base_layer().kernel[...]
        for name in names:
            kernel = (kernel + sign * self._kernel_delta(name)).astype(kernel.dtype)
            if check and not bool(jnp.isfinite(kernel).all()):
                raise self._nonfinite_error(where, name)
        return kernel

    def unmerge(self) -> None:
        """Subtract merged adapters (LIFO); one merged by a traced safe merge that failed (its flag in
        ``_merge_ok`` false) left the kernel unchanged and is not subtracted."""
        flags = {name: var.get_value() for name, var in self._merge_ok.items()}
        if not flags or not self.merged:
            self._merge_ok = nnx.data({})
            return super().unmerge()
        kernel = self.get_base_layer().kernel[...]
        for name in reversed(self.merged_adapters):
            if name in self._available_adapters:
                unmerged = (kernel - self._kernel_delta(name)).astype(kernel.dtype)
                kernel = jnp.where(flags[name], unmerged, kernel) if name in flags else unmerged
        self._set_base_weight(kernel)
        self.merged_adapters = []
        self._merge_ok = nnx.data({})

    def _kernel_delta(self, name: str) -> jax.Array:
        """ΔW of ``name`` in the kernel's layout (what merging adds to the kernel), sharded like it."""
        delta = self._kernel_layout().to_kernel(self.get_delta_weight(name))
        return functional.shard_like(delta, self.get_base_layer().kernel)

    def _kernel_layout(self) -> functional.KernelLayout:
        return getattr(self, "kernel_layout", None) or functional.KernelLayout(tuple(self.kernel.shape))

    def _set_base_weight(self, kernel: jax.Array) -> None:
        self.get_base_layer().kernel[...] = kernel

    # ------------------------------------------------------------------ forward
    @staticmethod
    def _astype(x: jax.Array, dtype: Any) -> jax.Array:
        return x.astype(dtype)

    _where = staticmethod(jnp.where)

    def _module_dropout_keep(self, adapter_name: str) -> bool | jax.Array:
        p = self.plans[adapter_name].module_dropout
        if self.deterministic or p == 0:
            return True
        return jax.random.uniform(self._dropout_key()) > p

    def _dropout_key(self) -> jax.Array:
        require_dropout_stream(self.rngs, getattr(self, "module_path", "") or type(self).__name__)
        return self.rngs.dropout()

    def _rank_dropout(self, adapter_name: str, weight: jax.Array, apply: bool, mask: jax.Array | None) -> jax.Array:
        """Rank dropout over ΔW's output rows: an explicit ``mask`` (out,), or a draw when ``apply``."""
        plan = self.plans[adapter_name]
        if mask is None and not apply:
            return weight
        if mask is None:
            mask = functional.rank_dropout_keep(self._dropout_key(), weight.shape[0], plan.rank_dropout)
        mask_dtype = jnp.float32 if plan.fp32_dropout_mask else None
        return functional.apply_rank_dropout(weight, mask, rescale=plan.rank_dropout_scale, mask_dtype=mask_dtype)

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        return self._adapted_forward(x, *args, **kwargs)


def _concrete_or_array(value: Any) -> Any:
    """A concrete 0-d array as a Python float (what bookkeeping checks), anything else unchanged."""
    if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer) and value.shape == ():
        return float(value)
    return value


class _FactorizedLayer(LycorisLayer):
    """Adapters whose factors follow a ``lycoris_core`` plan and whose ΔW is a pure function of them."""

    plan_fn: ClassVar[Callable[..., AdapterPlan]]
    delta_fn: ClassVar[Callable[..., jax.Array]]
    peft_type: ClassVar[str]

    def __init__(
        self,
        base_layer: nnx.Module,
        adapter_name: str,
        config: Any,
        r: int,
        alpha: float,
        *,
        rngs: nnx.Rngs,
        deterministic: bool = False,
        autocast_adapter_dtype: bool = True,
        module_path: str = "",
        initialize: bool = True,
        layers: tuple[AdapterPlan | None, ...] | None = None,
        branch_dtype: str = "adapter",
        forward_path: str = "auto",
    ) -> None:
        stacked = layers is not None
        #: How the forward pass computes the adapters (``lycoris_core.paths``): ``"auto"`` picks
        #: ``"merged"`` or ``"factored"`` per call by cost; ``"peft"`` is PEFT's arithmetic.
        self.forward_path = check_forward_path(forward_path)
        #: ``"adapter"`` (PEFT): the branch computes in the factors' dtype (float32 for a bf16 base);
        #: ``"base"``: in the base layer's compute ``dtype`` (float32 factors, ΔW rounded once).
        self.branch_dtype = check_branch_dtype(branch_dtype)
        #: A scanned stack's layer count (0: one layer). The kernel, factors and scales then carry a
        #: leading layer axis that ``nnx.scan`` slices; plans, shapes and layouts are one layer's.
        self.stack_size = len(layers) if stacked else 0
        super().__init__(base_layer, rngs=rngs.split(len(layers)) if stacked else rngs, deterministic=deterministic)
        self.layer_shape = layer_shape_of(self.get_base_layer(), module_path, stacked=stacked)
        self.kernel_layout = kernel_layout_of(self.get_base_layer(), module_path, stacked=stacked)
        self.module_path = module_path
        #: ``{adapter: per-layer plans}`` of a stack (``None`` for a layer the config leaves out).
        self.layer_plans: dict[str, tuple[AdapterPlan | None, ...]] = {}
        self._active_adapter = [adapter_name]
        self.update_layer(
            adapter_name,
            r,
            alpha,
            config=config,
            autocast_adapter_dtype=autocast_adapter_dtype,
            initialize=initialize,
            layers=layers,
        )

    @property
    def _available_adapters(self) -> set[str]:
        return set(self.factors)

    def plan(self, r: int, alpha: float, config: Any) -> AdapterPlan:
        """This layer's factor plan for one adapter (pure; raises on bad rank)."""
        return type(self).plan_fn(self.layer_shape, r, alpha, config, where=self.module_path)

    def create_adapter_parameters(
        self,
        adapter_name: str,
        r: int,
        *,
        plan: AdapterPlan,
        autocast_adapter_dtype: bool = True,
        initialize: bool = True,
        **kwargs: Any,
    ) -> None:
        dtype = functional.adapter_dtype(self.get_base_layer().kernel.dtype, autocast_adapter_dtype)
        self._create_factors(adapter_name, plan, dtype, initialize)

    def reset_adapter_parameters(self, adapter_name: str) -> None:
        """Draw fresh initial values (from ``rngs.params()``) for ``adapter_name``."""
        dtype = next(iter(self.factors[adapter_name].values())).dtype
        self._create_factors(adapter_name, self.plans[adapter_name], dtype)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        alpha: float,
        *,
        config: Any,
        autocast_adapter_dtype: bool = True,
        initialize: bool = True,
        **kwargs: Any,
    ) -> None:
        """Plan and create ``adapter_name``; ``initialize=False`` leaves zeros (values to be loaded).
        A stack passes ``layers`` (per-layer plans, planned by the tuner) instead of ``r``/``alpha``."""
        layers = kwargs.get("layers")
        if self.stack_size and layers is None:
            raise ValueError(f"{self.module_path}: a layer stack takes per-layer plans (layers=...)")
        plan = next(p for p in layers if p is not None) if layers else self.plan(r, alpha, config)
        if plan.rank_dropout or plan.module_dropout:
            require_dropout_stream(self.rngs, self.module_path or type(self).__name__)
        if layers:
            self._create_stacked_factors(adapter_name, layers, autocast_adapter_dtype, initialize)
        else:
            self.create_adapter_parameters(
                adapter_name, r, plan=plan, autocast_adapter_dtype=autocast_adapter_dtype, initialize=initialize
            )
        self._register_adapter(adapter_name, plan)
        if layers:
            self.layer_plans = {**self.layer_plans, adapter_name: tuple(layers)}
            self.scaling = {**self.scaling, adapter_name: [p.scaling if p else 0.0 for p in layers]}

    def _create_stacked_factors(
        self, adapter_name: str, layers: tuple[AdapterPlan | None, ...], autocast: bool, initialize: bool
    ) -> None:
        """Each targeted layer's factors from its own key (``rngs.params()`` gives one per layer), zeros
        for the others, stacked on the layer axis."""
        kernel_dtype = self.get_base_layer().kernel.dtype
        dtype = functional.adapter_dtype(kernel_dtype, autocast)
        keys = self._params_key()  # one per layer
        plan = next(p for p in layers if p is not None)
        zeros = {name: jnp.zeros(shape, dtype) for name, shape in plan.factor_shapes.items()}
        per = []
        for key, layer_plan in zip(keys, layers, strict=True):
            if layer_plan is None:
                per.append(zeros)
                continue
            split = iter(jax.random.split(key, len(layer_plan.factors)))
            per.append(functional.init_factors(split.__next__, layer_plan, dtype, kernel_dtype, initialize=initialize))
        sharding = functional.factor_sharding(self.get_base_layer().kernel, plan, self.kernel_layout, stacked=True)
        self.factors[adapter_name] = {
            name: LycorisParam(jnp.stack([p[name] for p in per]), **sharding.get(name, {})) for name in zeros
        }

    def _rescaled(self, operation: str, *args: Any) -> dict[str, Any]:
        """As for one layer; a stack's ``alpha / r`` is per layer (0 where the config leaves it out)."""
        new = super()._rescaled(operation, *args)
        for name, layers in self.layer_plans.items():
            base = jnp.asarray([p.scaling if p else 0.0 for p in layers], jnp.result_type(float))
            if operation == "set_scale" and args[0] == name:
                new[name] = args[1] * base
            elif operation == "unscale_layer" and args[0] is None and name in self.active_adapters:
                new[name] = base
        return new

    def delete_adapter(self, adapter_name: str) -> None:
        self.layer_plans = {k: v for k, v in self.layer_plans.items() if k != adapter_name}
        super().delete_adapter(adapter_name)

    def _kernel_delta(self, name: str) -> jax.Array:
        """ΔW in the kernel's layout; for a stack outside ``nnx.scan`` (merging), one per layer."""
        if not self.stack_size or self.get_base_layer().kernel.ndim == len(self.kernel_layout.shape):
            return super()._kernel_delta(name)
        layout, weight_shape = self._kernel_layout(), self.layer_shape.weight_shape
        per_layer = lambda f, s: layout.to_kernel(type(self).delta_fn(f, s, weight_shape))  # noqa: E731
        return functional.shard_like(jax.vmap(per_layer)(self._factor_values(name), self.scaling[name]), self.kernel)

    def get_delta_weight(
        self, adapter_name: str, *, apply_rank_dropout: bool = False, rank_dropout_mask: jax.Array | None = None
    ) -> jax.Array:
        weight = type(self).delta_fn(
            self._factor_values(adapter_name), self.scaling[adapter_name], self.layer_shape.weight_shape
        )
        return self._rank_dropout(adapter_name, weight, apply_rank_dropout, rank_dropout_mask)

    # ------------------------------------------------------------------ forward paths
    def _forward_path(self, adapter_name: str, x: jax.Array) -> str:
        """``lycoris_core.paths.choose_path`` for this call: tokens are ``x``'s leading dims; the
        training cost counts when dropout is on (``model.train()``); the kernel's dtype and the
        shardings visible at trace time (``functional.split_of``) weigh the costs."""
        base = self.get_base_layer()
        kernel = base.kernel[...]
        return choose_path(
            self.forward_path,
            self.plans[adapter_name],
            math.prod(x.shape[:-1]),
            training=not self.deterministic,
            supported=isinstance(base, nnx.Linear)
            or (isinstance(base, nnx.Conv) and base.mask is None and base.feature_group_count == 1),
            itemsize=jnp.dtype(kernel.dtype).itemsize,
            split=functional.split_of(x, kernel),
        )

    def _rank_dropout_draw(self, adapter_name: str) -> jax.Array | None:
        """This call's rank-dropout keep mask ``(out,)``, or ``None`` (eval, or no rank dropout)."""
        plan = self.plans[adapter_name]
        if self.deterministic or not plan.rank_dropout:
            return None
        return functional.rank_dropout_keep(self._dropout_key(), self.layer_shape.out_features, plan.rank_dropout)

    def _rows(self, adapter_name: str, mask: jax.Array | None, factor_dtype: Any) -> jax.Array | None:
        """The factor each output row is multiplied by under rank dropout (PEFT's mask dtype)."""
        if mask is None:
            return None
        plan = self.plans[adapter_name]
        dtype = jnp.float32 if plan.fp32_dropout_mask else factor_dtype
        return functional.rank_dropout_rows(mask, rescale=plan.rank_dropout_scale, dtype=dtype)

    def _compute_dtype(self, factors: dict[str, jax.Array]) -> Any:
        """The branch's dtype: the factors' (PEFT), or the base layer's ``dtype`` (``branch_dtype="base"``)."""
        base = self.get_base_layer()
        if self.branch_dtype == "base" and getattr(base, "dtype", None) is not None:
            return base.dtype
        return jnp.result_type(*factors.values())

    def _fold(self, adapter_name: str, keep: Any) -> paths.Fold:
        factors = self._factor_values(adapter_name)
        mask = self._rank_dropout_draw(adapter_name)
        rows = self._rows(adapter_name, mask, jnp.result_type(*factors.values()))
        return paths.Fold(factors, self._scales[adapter_name].get_value(), rows, keep)

    def _folded_forward(self, folds: list[paths.Fold], x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """The ``"merged"`` path: the base layer called once with ``W + Σ ΔW`` (and its bias), ΔW
        formed in shards like the kernel; computed in ``W``'s and the factors' promoted dtype, or the
        base's compute dtype (``branch_dtype="base"``)."""
        base = self.get_base_layer()
        kernel = base.kernel
        layout, weight_shape, delta_fn = self.kernel_layout, self.layer_shape.weight_shape, type(self).delta_fn

        def delta(factors: dict, scale: Any, rows: Any) -> jax.Array:
            weight = delta_fn(factors, scale, weight_shape)
            if rows is not None:
                weight = (weight * rows.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(weight.dtype)
            return functional.shard_like(layout.to_kernel(weight), kernel)

        compute = self._compute_dtype(dict(folds[0].factors))
        view_dtype = base.dtype if self.branch_dtype == "base" else None
        dtype = (
            compute
            if self.branch_dtype == "base" and base.dtype is not None
            else jnp.result_type(kernel.dtype, compute)
        )
        bias = base.bias[...] if getattr(base, "bias", None) is not None else None

        def call(x: jax.Array, k: jax.Array, b: Any) -> jax.Array:
            return functional.call_with_kernel(base, x, k, b, view_dtype, **kwargs)

        linear = (type(self).peft_type, *weight_shape) if isinstance(base, nnx.Linear) else None
        return paths.folded_call(call, x, kernel[...], bias, folds, delta, dtype=dtype, linear=linear)

    def _factored_activations(self, adapter_name: str, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """The ``"factored"`` branch of an ``nnx.Linear`` or ``nnx.Conv`` adapter: no ΔW formed, forward
        or backward; rank dropout scales the output channels."""
        plan = self.plans[adapter_name]
        mask = self._rank_dropout_draw(adapter_name)
        factors = self._factor_values(adapter_name)
        compute = self._compute_dtype(factors)
        rows = self._rows(adapter_name, mask, jnp.result_type(*factors.values()))
        factors = {k: v.astype(compute) for k, v in factors.items()}
        scale = self._scales[adapter_name].get_value()
        x = self._cast_input_dtype(x, compute)
        base = self.get_base_layer()
        if isinstance(base, nnx.Conv):

            def conv(x: jax.Array, weight: jax.Array) -> jax.Array:
                return functional.call_with_kernel(base, x, functional.to_flax_kernel(weight), **kwargs)

            y = paths.factored_conv(plan.peft_type, conv, x, factors, scale, self.layer_shape.weight_shape)
        else:
            y = paths.factored_delta(plan.peft_type, x, factors, scale, self.layer_shape.out_features)
        if rows is not None:
            y = (y * rows).astype(y.dtype)
        out_sharding = kwargs.get("out_sharding")
        return jax.sharding.reshard(y, out_sharding) if out_sharding is not None else y

    def _get_delta_activations(self, adapter_name: str, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """PEFT's branch: the base layer's own forward with ΔW (formed in shards like the kernel) as
        kernel, in the factors' dtype (or the base's, ``branch_dtype="base"``). ΔW is not kept for the
        backward pass: an ``nnx.Linear`` gets the factored gradients of :meth:`_factored_backward`,
        other layers form ΔW again (``jax.checkpoint``)."""
        plan, base = self.plans[adapter_name], self.get_base_layer()
        mask = self._rank_dropout_draw(adapter_name)  # drawn outside: keys are state
        factors = self._factor_values(adapter_name)
        compute = self._compute_dtype(factors)
        x = self._cast_input_dtype(x, compute)

        def branch(factors: dict, scale: Any, mask: Any, x: jax.Array) -> jax.Array:
            delta = type(self).delta_fn(factors, scale, self.layer_shape.weight_shape)
            if mask is not None:
                mask_dtype = jnp.float32 if plan.fp32_dropout_mask else None
                delta = functional.apply_rank_dropout(
                    delta, mask, rescale=plan.rank_dropout_scale, mask_dtype=mask_dtype
                )
            return functional.forward_with_weight(base, x, delta.astype(compute), self.kernel_layout, **kwargs)

        scale = self.scaling[adapter_name]
        if isinstance(base, nnx.Linear):
            return self._factored_backward(plan, branch, x, factors, scale, mask)
        return jax.checkpoint(branch)(factors, scale, mask, x)

    def _factored_backward(
        self, plan: AdapterPlan, branch: Callable, x: jax.Array, factors: dict, scale: Any, mask: Any
    ) -> jax.Array:
        """``branch`` (PEFT's forward) with a backward pass that never forms ΔW or a ΔW-sized gradient
        (``loha``/``lokr.linear_grads``): a training step's temporaries stay activation- and
        factor-sized, and sharded factor gradients are reduced at factor size."""
        grads, (out_features, in_features) = type(self).linear_grads, self.layer_shape.weight_shape

        @jax.custom_vjp
        def run(x: jax.Array, factors: dict, scale: Any, mask: Any) -> jax.Array:
            return branch(factors, scale, mask, x)

        def forward(x: jax.Array, factors: dict, scale: Any, mask: Any) -> tuple[jax.Array, tuple]:
            return run(x, factors, scale, mask), (x, factors, scale, mask)

        def backward(res: tuple, dy: jax.Array) -> tuple:
            x, factors, scale, mask = res
            tokens = math.prod(x.shape[:-1])
            dy2 = functional.reshape(dy, (tokens, out_features))
            if mask is not None:  # the rows' factors in the forward's dtype (ΔW's, from the factors)
                mask_dtype = jnp.float32 if plan.fp32_dropout_mask else jnp.result_type(*factors.values())
                rows = functional.rank_dropout_rows(mask, rescale=plan.rank_dropout_scale, dtype=mask_dtype)
                dy2 = (dy2 * rows).astype(dy.dtype)
            dx, dfactors, dscale = grads(functional.reshape(x, (tokens, in_features)), dy2, factors, scale)
            dx = functional.reshape(dx, x.shape).astype(x.dtype)
            return dx, dfactors, jnp.reshape(dscale, jnp.shape(scale)), None

        run.defvjp(forward, backward)
        return run(x, factors, scale, mask)


class LoHaLayer(_FactorizedLayer):
    """LoHa adapter on an ``nnx.Linear`` or ``nnx.Conv`` (factors ``hada_*``)."""

    adapter_layer_names = LOHA_FACTORS
    peft_type = "LOHA"
    plan_fn = staticmethod(plan_loha)
    delta_fn = staticmethod(loha.delta_weight)
    linear_grads = staticmethod(loha.linear_grads)


class LoKrLayer(_FactorizedLayer):
    """LoKr adapter on an ``nnx.Linear`` or ``nnx.Conv`` (factors ``lokr_*``)."""

    adapter_layer_names = LOKR_FACTORS
    peft_type = "LOKR"
    plan_fn = staticmethod(plan_lokr)
    delta_fn = staticmethod(lokr.delta_weight)
    linear_grads = staticmethod(lokr.linear_grads)
