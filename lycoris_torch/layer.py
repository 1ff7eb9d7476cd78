"""Adapter layers: one wrapper per algorithm serving ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``.

``LycorisLayer`` holds what every LyCORIS-style adapter shares (merge/unmerge, scale helpers,
rank and module dropout, several active adapters, input casting). Subclasses say how factors are
created and turned into a delta weight. State is a dict of structs: ``plans[name]`` is the frozen
``lycoris_core.AdapterPlan`` (r, alpha, dropouts, factor shapes), ``factors[name]`` the
``nn.ParameterDict`` of factors in PEFT's names and layouts, ``scaling[name]`` the live scale.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from lycoris_core import LOHA_FACTORS, LOKR_FACTORS, AdapterPlan, LayerShape, plan_loha, plan_lokr, state
from lycoris_torch import functional, loha, lokr

__all__ = ["SUPPORTED_LAYERS", "LoHaLayer", "LoKrLayer", "LycorisLayer", "layer_shape_of"]

#: Base layer types the built-in adapters wrap, most specific first.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Conv1d, nn.Linear)


def layer_shape_of(module: nn.Module, where: str = "") -> LayerShape:
    """The plan's view of a supported base layer; ``TypeError`` listing the supported types otherwise."""
    if isinstance(module, nn.Linear):
        return LayerShape("linear", module.out_features, module.in_features)
    if isinstance(module, nn.Conv2d):
        return LayerShape(
            "conv2d", module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size), module.groups
        )
    if isinstance(module, nn.Conv1d):
        return LayerShape(
            "conv1d", module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size), module.groups
        )
    raise TypeError(
        f"{where or 'target'}: target module of type {type(module).__name__} not supported, "
        f"currently only adapters for {', '.join(t.__name__ for t in SUPPORTED_LAYERS)} are supported"
    )


def _adapter_dtype(weight: torch.Tensor, autocast: bool) -> torch.dtype:
    """PEFT's rule: adapters take the base dtype, and fp16/bf16 are autocast to float32."""
    if autocast and weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


class LycorisLayer(nn.Module, ABC):
    """Base of every adapter layer; wraps ``base_layer`` and adds ``Σ_active f(x; ΔW_name)``.

    Subclasses implement ``_available_adapters``, ``create_adapter_parameters``,
    ``reset_adapter_parameters``, ``update_layer``, ``get_delta_weight`` and
    ``_get_delta_activations``; they register each adapter with :meth:`_register_adapter`.
    """

    #: Names of the factor parameters this layer type may hold (PEFT's ``adapter_layer_names``).
    adapter_layer_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.factors = nn.ModuleDict()
        self.plans: dict[str, AdapterPlan] = {}
        self.scaling: dict[str, float] = {}
        self._active_adapter: list[str] = []
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        #: Cast the adapter branch input to ΔW's dtype (PEFT's ``cast_input_dtype_enabled``).
        self.cast_input_dtype_enabled = True
        #: Generator for rank/module dropout; ``None`` uses torch's global one, as PEFT does.
        self.generator: torch.Generator | None = None

    # ------------------------------------------------------------------ interface
    @property
    @abstractmethod
    def _available_adapters(self) -> set[str]:
        """Names of the adapters that hold parameters in this layer."""

    @abstractmethod
    def create_adapter_parameters(self, adapter_name: str, r: int, **kwargs: Any) -> None:
        """Create (uninitialised) factor parameters for ``adapter_name``."""

    @abstractmethod
    def reset_adapter_parameters(self, adapter_name: str) -> None:
        """Initialise the factors of ``adapter_name``."""

    @abstractmethod
    def update_layer(self, adapter_name: str, r: int, alpha: float, **kwargs: Any) -> None:
        """Add adapter ``adapter_name`` with rank ``r`` and ``alpha`` to this layer."""

    @abstractmethod
    def get_delta_weight(
        self, adapter_name: str, *, apply_rank_dropout: bool = False, rank_dropout_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ΔW in the base weight's layout, optionally with rank dropout over its output rows."""

    @abstractmethod
    def _get_delta_activations(self, adapter_name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The adapter's contribution added to the base layer's output."""

    # ------------------------------------------------------------------ state
    def get_base_layer(self) -> nn.Module:
        base = self.base_layer
        while isinstance(base, LycorisLayer):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> list[str]:
        return self.active_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def _register_adapter(self, adapter_name: str, plan: AdapterPlan) -> None:
        self.plans[adapter_name] = plan
        self.scaling[adapter_name] = plan.scaling

    def _create_factors(self, adapter_name: str, plan: AdapterPlan, device: torch.device | str = "cpu") -> None:
        """Uninitialised float32 factors with the plan's shapes (PEFT creates them on CPU, then moves)."""
        self.factors[adapter_name] = nn.ParameterDict(
            {name: nn.Parameter(torch.empty(shape, device=device)) for name, shape, _ in plan.factors}
        )

    def _init_factors(self, adapter_name: str) -> None:
        """Zeros or PyTorch's ``kaiming_uniform_(a=sqrt(5))`` per the plan, in PEFT's RNG order."""
        params = self.factors[adapter_name]
        with torch.no_grad():
            for name, _, init in self.plans[adapter_name].factors:
                if params[name].is_meta:
                    continue
                if init == "zeros":
                    nn.init.zeros_(params[name])
                else:
                    nn.init.kaiming_uniform_(params[name], a=math.sqrt(5), generator=self.generator)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        weight = self.get_base_layer().weight
        if weight.is_meta:
            return
        dtype = _adapter_dtype(weight, autocast_adapter_dtype)
        params = self.factors[adapter_name]
        for name, param in params.items():
            if param.is_meta:
                continue
            # PEFT moves new factors to the base dtype and only then autocasts them to float32,
            # so with a bf16/fp16 base the initial values are rounded through it: same here.
            value = param.detach().to(weight.device, weight.dtype if weight.dtype.is_floating_point else dtype)
            params[name] = nn.Parameter(value.to(dtype), requires_grad=param.requires_grad)

    def _init_empty_weights(self, cls: type, *args: Any, **kwargs: Any) -> None:
        """Run ``cls.__init__`` on the meta device, then allocate uninitialised storage on ``device``."""
        kwargs = kwargs.copy()
        final_device = kwargs.pop("device", "cpu")
        cls.__init__(self, *args, device="meta", **kwargs)
        self.to_empty(device=final_device)

    # ------------------------------------------------------------------ adapter management
    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate ``adapter_names``; only their factors require grad (none in inference mode)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for key, params in self.factors.items():
            for param in params.values():
                param.requires_grad_((key in names) and not inference_mode)
        self._active_adapter = names

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for params in self.factors.values():
                for param in params.values():
                    param.requires_grad_(False)
            self._disable_adapters = True

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``; if it was the only active one, activate the first remaining."""
        if adapter_name in self.factors:
            del self.factors[adapter_name]
        self.plans.pop(adapter_name, None)
        self.scaling.pop(adapter_name, None)
        if adapter_name in self._active_adapter:
            remaining = [n for n in self._active_adapter if n != adapter_name]
            if not remaining and self.plans:
                remaining = [sorted(self.plans)[0]]
                warnings.warn(
                    f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {remaining[0]}."
                )
            self.set_adapter(remaining)

    # ------------------------------------------------------------------ merge
    def _merge_names(self, adapter_names: Sequence[str] | None) -> list[str]:
        return state.adapters_to_merge(
            adapter_names, self.active_adapters, self.merged_adapters, self._available_adapters
        )

    def _safe_merged_weight(self, names: Sequence[str], where: str = "") -> torch.Tensor:
        """The merged weight for ``names`` computed on a copy; ``ValueError`` if it is not finite."""
        merged = self.get_base_layer().weight.data.clone()
        for name in names:
            merged += self.get_delta_weight(name)
            if not torch.isfinite(merged).all():
                raise ValueError(
                    f"{where + ': ' if where else ''}NaNs detected in the merged weights. "
                    f"The adapter {name} seems to be broken"
                )
        return merged

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """``W += ΔW`` for ``adapter_names`` (default: the active ones) not merged yet.

        With ``safe_merge`` the sum is formed on a copy and checked for NaN and ±inf first; on
        failure nothing changes, not even for adapters earlier in the same call.
        """
        names = self._merge_names(adapter_names)
        if not names:
            return
        weight = self.get_base_layer().weight
        if safe_merge:
            weight.data = self._safe_merged_weight(names)
        else:
            for name in names:
                weight.data += self.get_delta_weight(name)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Subtract merged adapters in LIFO order, with ΔW recomputed from the current factors/scale."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self._available_adapters:
                weight.data -= self.get_delta_weight(name)

    # ------------------------------------------------------------------ scaling
    def set_scale(self, adapter: str, scale: float) -> None:
        """``scaling = scale * alpha / r``; no-op for an adapter this layer does not hold."""
        self.scaling = state.set_scale(self.scaling, self.plans, adapter, scale)

    def scale_layer(self, scale: float) -> None:
        """Multiply the scaling of every active adapter by ``scale``."""
        self.scaling = state.scale_layer(self.scaling, self.active_adapters, scale)

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide active adapters' scaling by ``scale``, or reset it to ``alpha / r`` when ``None``."""
        self.scaling = state.unscale_layer(self.scaling, self.plans, self.active_adapters, scale)

    # ------------------------------------------------------------------ forward
    def _cast_input_dtype(self, x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if x is None or not self.cast_input_dtype_enabled or x.dtype == dtype:
            return x
        return x.to(dtype=dtype)

    def _rank_dropout(
        self, adapter_name: str, weight: torch.Tensor, apply: bool, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Rank dropout over ΔW's output rows: an explicit ``mask`` (out,), or a draw when ``apply``."""
        plan = self.plans[adapter_name]
        if mask is None and not apply:
            return weight
        if mask is None:
            mask = functional.rank_dropout_keep(weight.shape[0], plan.rank_dropout, generator=self.generator)
        return functional.apply_rank_dropout(weight, mask, rescale=plan.rank_dropout_scale)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(x, *args, **kwargs)
        elif self.merged:
            result = self.base_layer(x, *args, **kwargs)
        else:
            result = self.base_layer(x, *args, **kwargs)
            for name in self.active_adapters:
                if name not in self._available_adapters:
                    continue
                # PEFT draws one number per active adapter in training even when module_dropout == 0;
                # we keep that so that seeded runs consume the global RNG identically.
                if not self.training or torch.rand(1, generator=self.generator) > self.plans[name].module_dropout:
                    result = result + self._get_delta_activations(name, x, *args, **kwargs)
        return result.to(previous_dtype)

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.plans)}, active={self.active_adapters}, merged={self.merged_adapters}"


class _FactorizedLayer(LycorisLayer):
    """Adapters whose factors follow a ``lycoris_core`` plan and whose ΔW is a pure function of them."""

    plan_fn: ClassVar[Callable[..., AdapterPlan]]
    delta_fn: ClassVar[Callable[..., torch.Tensor]]

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: Any,
        r: int,
        alpha: float,
        *,
        autocast_adapter_dtype: bool = True,
        module_path: str = "",
    ) -> None:
        super().__init__(base_layer)
        self.layer_shape = layer_shape_of(self.get_base_layer(), module_path)
        self.module_path = module_path
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, r, alpha, config=config, autocast_adapter_dtype=autocast_adapter_dtype)

    @property
    def _available_adapters(self) -> set[str]:
        return set(self.factors)

    def plan(self, r: int, alpha: float, config: Any) -> AdapterPlan:
        """This layer's factor plan for one adapter (pure; raises on bad rank)."""
        return type(self).plan_fn(self.layer_shape, r, alpha, config, where=self.module_path)

    def create_adapter_parameters(self, adapter_name: str, r: int, *, plan: AdapterPlan, **kwargs: Any) -> None:
        device = "meta" if self.get_base_layer().weight.is_meta else "cpu"
        self._create_factors(adapter_name, plan, device)

    def reset_adapter_parameters(self, adapter_name: str) -> None:
        self._init_factors(adapter_name)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        alpha: float,
        *,
        config: Any,
        autocast_adapter_dtype: bool = True,
        **kwargs: Any,
    ) -> None:
        plan = self.plan(r, alpha, config)
        self.create_adapter_parameters(adapter_name, r, plan=plan)
        self._register_adapter(adapter_name, plan)
        self.reset_adapter_parameters(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name, autocast_adapter_dtype)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(
        self, adapter_name: str, *, apply_rank_dropout: bool = False, rank_dropout_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        weight = type(self).delta_fn(
            dict(self.factors[adapter_name]), self.scaling[adapter_name], self.get_base_layer().weight.shape
        )
        return self._rank_dropout(adapter_name, weight, apply_rank_dropout, rank_dropout_mask)

    def _get_delta_activations(self, adapter_name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        apply = self.training and bool(self.plans[adapter_name].rank_dropout)
        delta = self.get_delta_weight(adapter_name, apply_rank_dropout=apply)
        x = self._cast_input_dtype(x, delta.dtype)
        return functional.forward_with_weight(self.get_base_layer(), x, delta)


class LoHaLayer(_FactorizedLayer):
    """LoHa adapter on a Linear, Conv1d or Conv2d layer (factors ``hada_*``)."""

    adapter_layer_names = LOHA_FACTORS
    plan_fn = staticmethod(plan_loha)
    delta_fn = staticmethod(loha.delta_weight)


class LoKrLayer(_FactorizedLayer):
    """LoKr adapter on a Linear, Conv1d or Conv2d layer (factors ``lokr_*``)."""

    adapter_layer_names = LOKR_FACTORS
    plan_fn = staticmethod(plan_lokr)
    delta_fn = staticmethod(lokr.delta_weight)
