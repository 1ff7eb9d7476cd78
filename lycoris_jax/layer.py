"""Flax NNX adapter layers: one wrapper for every LyCORIS method on ``nnx.Linear``, ``nnx.Conv`` (1-D/2-D),
``nnx.LinearGeneral`` and ``nnx.Einsum``.

Mirrors ``lycoris_torch.layer``. State is a dict of structs: ``plans[name]`` is the frozen
``lycoris_core.AdapterPlan`` (static; planned once by ``lycoris_core.resolve``, never here),
``factors[name]`` a dict of :class:`LycorisParam` in PEFT's names and PyTorch layouts (plain dicts,
so any valid adapter name is a key, unlike ``nnx.Dict`` whose keys are attributes), ``scaling[name]``
the live scale, held in a :class:`LycorisScale` variable (state, not graph structure: a new scale
never recompiles a jitted function, and a traced scale may be set inside one). A call collects its
active adapters and hands them to ``lycoris_jax.adapted.adapted_call`` with the base layer's own
forward, so every route agrees with PEFT for every padding mode, stride, dilation and group count.
The method's math comes from its record (``lycoris_jax.methods``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lycoris_core import AdapterPlan, LayerShape
from lycoris_core.bookkeeping import LayerBookkeeping
from lycoris_core.paths import check_forward_path
from lycoris_jax import functional
from lycoris_jax.adapted import Active, Site, adapted_call, delta_kernel, route_of
from lycoris_jax.methods import Method, method_for

__all__ = [
    "BRANCH_DTYPES",
    "LAYER_CLASSES",
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


class LycorisLayer(LayerBookkeeping, nnx.Module):
    """One adapter layer: wraps ``base_layer`` and adds ``Σ_active f(x; ΔW_name)`` (PEFT's forward).

    Adapters arrive with their plans (:meth:`update_layer`); names, scales, merge order and the
    scale helpers come from ``lycoris_core.bookkeeping.LayerBookkeeping`` (shared with the PyTorch
    twin). ``deterministic`` follows ``model.train()`` / ``model.eval()``; dropout keys come from
    ``rngs.dropout()``, initialisation keys from ``rngs.params()``. ``stack_size`` > 0: a scanned
    stack, whose kernel, factors and scales carry a leading layer axis that ``nnx.scan`` slices
    (plans, shapes and layouts are one layer's).
    """

    def __init__(
        self,
        base_layer: nnx.Module,
        *,
        rngs: nnx.Rngs,
        module_path: str = "",
        deterministic: bool = False,
        branch_dtype: str = "adapter",
        forward_path: str = "auto",
        stack_size: int = 0,
    ) -> None:
        self.base_layer = base_layer
        self.factors: dict[str, dict[str, LycorisParam]] = nnx.data({})
        self._scales: dict[str, LycorisScale] = nnx.data({})
        #: ``{adapter: traced bool}`` for adapters merged by a safe merge under ``jax.jit``.
        self._merge_ok: dict[str, nnx.Variable] = nnx.data({})
        self._init_bookkeeping()
        #: ``True`` in eval mode (``model.eval()``); the tuner passes the mode of the model joined.
        self.deterministic = deterministic
        #: How the forward pass computes the adapters (``lycoris_core.paths``): ``"auto"`` picks
        #: ``"merged"`` or ``"factored"`` per call by cost; ``"peft"`` is PEFT's arithmetic.
        self.forward_path = check_forward_path(forward_path)
        #: ``"adapter"`` (PEFT): the branch computes in the factors' dtype (float32 for a bf16 base);
        #: ``"base"``: in the base layer's compute ``dtype`` (float32 factors, ΔW rounded once).
        self.branch_dtype = check_branch_dtype(branch_dtype)
        self.stack_size = stack_size
        self.rngs = rngs.split(stack_size) if stack_size else rngs
        self.module_path = module_path
        stacked = bool(stack_size)
        self.layer_shape = layer_shape_of(self.get_base_layer(), module_path, stacked=stacked)
        self.kernel_layout = kernel_layout_of(self.get_base_layer(), module_path, stacked=stacked)
        #: ``{adapter: per-layer plans}`` of a stack (``None`` for a layer the config leaves out).
        self.layer_plans: dict[str, tuple[AdapterPlan | None, ...]] = {}

    # ------------------------------------------------------------------ state
    @property
    def _available_adapters(self) -> set[str]:
        return set(self.factors)

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
        """The wrapped layer (the one the adapters attach to), as PEFT's ``get_base_layer``."""
        base = self.base_layer
        while isinstance(base, LycorisLayer):
            base = base.base_layer
        return base

    @property
    def kernel(self) -> nnx.Param:
        return self.get_base_layer().kernel

    def method(self, adapter_name: str) -> Method:
        """The record of ``adapter_name``'s method (``lycoris_jax.methods``)."""
        return method_for(self.plans[adapter_name].peft_type)

    def _factor_values(self, adapter_name: str) -> dict[str, jax.Array]:
        return {name: param[...] for name, param in self.factors[adapter_name].items()}

    # ------------------------------------------------------------------ adding adapters
    def update_layer(
        self,
        adapter_name: str,
        plan: AdapterPlan | tuple[AdapterPlan | None, ...],
        *,
        autocast_adapter_dtype: bool = True,
        initialize: bool = True,
    ) -> None:
        """Add ``adapter_name`` with its ``plan`` (a stack: one plan per layer, ``None`` for layers the
        config leaves out) and create its factors: zeros, or PEFT's initialisation from
        ``rngs.params()``; ``initialize=False`` leaves zeros (values about to be loaded)."""
        layers = plan if isinstance(plan, tuple) else None
        if bool(self.stack_size) != (layers is not None):
            raise ValueError(f"{self.module_path}: a layer stack takes one plan per layer, a single layer one plan")
        one = next(p for p in layers if p is not None) if layers else plan
        if one.rank_dropout or one.module_dropout:
            require_dropout_stream(self.rngs, self.module_path or type(self).__name__)
        kernel = self.get_base_layer().kernel
        dtype = functional.adapter_dtype(kernel.dtype, autocast_adapter_dtype)
        values = self._initial_factors(layers or (one,), dtype, initialize)
        sharding = functional.factor_sharding(kernel, one, self.kernel_layout, stacked=layers is not None)
        self.factors[adapter_name] = {
            name: LycorisParam(value, **sharding.get(name, {})) for name, value in values.items()
        }
        self._register_adapter(adapter_name, one)
        if layers:
            self.layer_plans = {**self.layer_plans, adapter_name: layers}
            self.scaling = {**self.scaling, adapter_name: [p.scaling if p else 0.0 for p in layers]}

    def _initial_factors(self, layers: tuple[AdapterPlan | None, ...], dtype: Any, initialize: bool) -> dict:
        """One layer's factors, or a stack's stacked on the layer axis (each targeted layer from its own
        key, zeros for the others)."""
        kernel_dtype = self.get_base_layer().kernel.dtype
        key = self._params_key() if initialize else None  # loading needs no params stream
        if not self.stack_size:
            return functional.init_factors(key, layers[0], dtype, kernel_dtype, initialize=initialize)
        plan = next(p for p in layers if p is not None)
        zeros = {name: jnp.zeros(shape, dtype) for name, shape in plan.factor_shapes.items()}
        per = []
        for i, layer_plan in enumerate(layers):
            if layer_plan is None or not initialize:
                per.append(zeros)
                continue
            split = iter(jax.random.split(key[i], len(layer_plan.factors)))
            per.append(functional.init_factors(split.__next__, layer_plan, dtype, kernel_dtype))
        return {name: jnp.stack([p[name] for p in per]) for name in zeros}

    def _params_key(self) -> Any:
        """``rngs.params`` (a stack: one key per layer, its rngs are split)."""
        try:
            if self.stack_size:
                return nnx.vmap(lambda rngs: rngs.params(), in_axes=0, out_axes=0)(self.rngs)
            return self.rngs.params
        except AttributeError:
            raise ValueError(
                f"{self.module_path or type(self).__name__}: initialising adapter factors needs an "
                "nnx.Rngs with a 'params' or 'default' stream (e.g. rngs=nnx.Rngs(params=0, dropout=1))"
            ) from None

    def reset_adapter_parameters(self, adapter_name: str) -> None:
        """Draw fresh initial values (from ``rngs.params()``) for ``adapter_name``."""
        dtype = next(iter(self.factors[adapter_name].values())).dtype
        layers = self.layer_plans.get(adapter_name, (self.plans[adapter_name],))
        for name, value in self._initial_factors(layers, dtype, True).items():
            self.factors[adapter_name][name][...] = value

    # ------------------------------------------------------------------ adapter management
    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Activate ``adapter_names`` (training selects parameters by type, not by activity)."""
        self._active_adapter = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)

    def enable_adapters(self, enabled: bool) -> None:
        """Turn every adapter of this layer on or off (off: the base layer's output alone)."""
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``; if it was the only active one, activate the first remaining."""
        if adapter_name in self.factors:
            del self.factors[adapter_name]
        self.layer_plans = {k: v for k, v in self.layer_plans.items() if k != adapter_name}
        self._forget_adapter(adapter_name)

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

    # ------------------------------------------------------------------ ΔW and merging
    def _site(self) -> Site:
        """What the adapted call needs to know about the base layer."""
        base = self.get_base_layer()
        kernel = base.kernel
        return Site(
            self.kernel_layout,
            functional.kernel_spec(kernel, len(self.kernel_layout.shape)),
            linear=isinstance(base, nnx.Linear),
            conv=isinstance(base, nnx.Conv) and base.mask is None and base.feature_group_count == 1,
        )

    def get_delta_weight(
        self, adapter_name: str, *, apply_rank_dropout: bool = False, rank_dropout_mask: jax.Array | None = None
    ) -> jax.Array:
        """ΔW in the base weight's *PyTorch* layout, optionally with rank dropout over its output rows
        (an explicit ``rank_dropout_mask`` ``(out,)``, or a draw from ``rngs.dropout()``)."""
        plan = self.plans[adapter_name]
        weight = self.method(adapter_name).delta_weight(
            self._factor_values(adapter_name), self.scaling[adapter_name], self.layer_shape.weight_shape
        )
        if rank_dropout_mask is None and not apply_rank_dropout:
            return weight
        if rank_dropout_mask is None:
            rank_dropout_mask = functional.rank_dropout_keep(self._dropout_key(), weight.shape[0], plan.rank_dropout)
        mask_dtype = jnp.float32 if plan.fp32_dropout_mask else None
        return functional.apply_rank_dropout(
            weight, rank_dropout_mask, rescale=plan.rank_dropout_scale, mask_dtype=mask_dtype
        )

    def _kernel_delta(self, name: str) -> jax.Array:
        """ΔW of ``name`` in the kernel's layout and shards (what merging adds); a stack outside
        ``nnx.scan`` forms one per layer."""
        site, plan = self._site(), self.plans[name]
        factors, scale = self._factor_values(name), self._scales[name].get_value()
        if self.stack_size and self.kernel[...].ndim != len(self.kernel_layout.shape):
            one = lambda f, s: delta_kernel(Active(plan, f, s), dataclasses.replace(site, spec=None))  # noqa: E731
            return functional.shard_like(jax.vmap(one)(factors, scale), self.kernel)
        return delta_kernel(Active(plan, factors, scale), site)

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

    def _set_base_weight(self, kernel: jax.Array) -> None:
        self.get_base_layer().kernel[...] = kernel

    # ------------------------------------------------------------------ forward
    def _forward_path(self, adapter_name: str, x: jax.Array) -> str:
        """The path ``adapter_name`` takes for input ``x`` in this mode (``lycoris_jax.adapted.route_of``)."""
        kernel = self.get_base_layer().kernel[...]
        return route_of(
            self.plans[adapter_name], x, kernel, self._site(), self.forward_path, training=not self.deterministic
        )

    def _dropout_key(self) -> jax.Array:
        require_dropout_stream(self.rngs, self.module_path or type(self).__name__)
        return self.rngs.dropout()

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """PEFT's forward (``lycoris_jax.adapted.adapted_call``): the base output plus every active
        adapter's, in the base layer's output dtype; the merged and disabled shortcuts."""
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [
            Active(self.plans[n], self._factor_values(n), self._scales[n].get_value())
            for n in self.active_adapters
            if n in self._available_adapters
        ]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        dropout = not self.deterministic and any(a.plan.rank_dropout or a.plan.module_dropout for a in active)

        def call(x: jax.Array, kernel: jax.Array, bias: Any, dtype: Any) -> jax.Array:
            return functional.call_with_kernel(base, x, kernel, bias, dtype, *args, **kwargs)

        bias = getattr(base, "bias", None)
        return adapted_call(
            call,
            x,
            base.kernel[...],
            bias[...] if bias is not None else None,
            active,
            site=self._site(),
            route=self.forward_path,
            training=not self.deterministic,
            key=self._dropout_key() if dropout else None,
            branch_dtype=self.branch_dtype,
            base_dtype=getattr(base, "dtype", None),
            cast_input=self.cast_input_dtype_enabled,
            out_sharding=kwargs.get("out_sharding"),
        )


def _concrete_or_array(value: Any) -> Any:
    """A concrete 0-d array as a Python float (what bookkeeping checks), anything else unchanged."""
    if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer) and value.shape == ():
        return float(value)
    return value


class LoHaLayer(LycorisLayer):
    """A :class:`LycorisLayer` holding LoHa adapters (factors ``hada_*``)."""

    peft_type: ClassVar[str] = "LOHA"


class LoKrLayer(LycorisLayer):
    """A :class:`LycorisLayer` holding LoKr adapters (factors ``lokr_*``)."""

    peft_type: ClassVar[str] = "LOKR"


#: The layer class a tuner wraps a base layer in, per method (another method: :class:`LycorisLayer`).
LAYER_CLASSES: dict[str, type[LycorisLayer]] = {"LOHA": LoHaLayer, "LOKR": LoKrLayer}
