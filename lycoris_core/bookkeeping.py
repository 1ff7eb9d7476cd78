"""Framework-free behaviour shared by the twins' layers and tuners, as mixins.

``LayerBookkeeping`` holds what a ``LycorisLayer`` does with names, plans and scales (active and
merged adapters, the scale helpers, merge/unmerge order, the forward's control flow);
``TunerBookkeeping`` holds the model-level operations (target resolution, validate-then-inject,
checkpoint checks, set/delete/merge/scale across layers, PEFT files). Each twin supplies the few
framework hooks named in the class docstrings (tensors, RNG, graph surgery, file I/O).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

from lycoris_core import kohya, state
from lycoris_core.checkpoint import checkpoint_key
from lycoris_core.config import CONFIG_NAME, LycorisConfig, config_class_for
from lycoris_core.errors import CheckpointError
from lycoris_core.files import AdapterFiles, Checkpoint, read_adapter_files, read_checkpoint, save_adapters
from lycoris_core.paths import check_forward_path
from lycoris_core.plan import AdapterPlan, LayerShape
from lycoris_core.targets import NoMatchingModuleError, match_targets, resolve_rank_alpha

__all__ = ["LayerBookkeeping", "TunerBookkeeping"]


class LayerBookkeeping:
    """Per-layer adapter bookkeeping.

    State: ``plans`` ``{name: AdapterPlan}``, ``scaling`` ``{name: float}``, ``_active_adapter``,
    ``merged_adapters``, ``_disable_adapters``, ``cast_input_dtype_enabled``.
    Hooks: ``base_layer``, ``_available_adapters``, ``get_delta_weight``, ``_get_delta_activations``,
    ``_merged_weight(names, sign, check, where)``, ``_set_base_weight(w)``, ``_astype(x, dtype)``,
    ``_module_dropout_keep(name)`` (``True``, ``False`` or a boolean array), ``_where(c, a, b)``.
    """

    plans: dict[str, AdapterPlan]
    scaling: dict[str, float]

    def _init_bookkeeping(self) -> None:
        self.plans = {}
        self.scaling = {}
        self._active_adapter = []
        self.merged_adapters = []
        self._disable_adapters = False
        #: Cast the adapter branch input to ΔW's dtype (PEFT's ``cast_input_dtype_enabled``).
        self.cast_input_dtype_enabled = True

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
        self.plans = {**self.plans, adapter_name: plan}
        self.scaling = {**self.scaling, adapter_name: plan.scaling}

    def _forget_adapter(self, adapter_name: str) -> None:
        """Drop plan and scale; if it was active, keep the other active ones or the first remaining."""
        self.plans = {k: v for k, v in self.plans.items() if k != adapter_name}
        self.scaling = {k: v for k, v in self.scaling.items() if k != adapter_name}
        if adapter_name in self._active_adapter:
            remaining = [n for n in self._active_adapter if n != adapter_name]
            if not remaining and self.plans:
                remaining = [sorted(self.plans)[0]]
                warnings.warn(
                    f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {remaining[0]}.",
                    stacklevel=3,
                )
            self.set_adapter(remaining)

    def _merge_names(self, adapter_names: Sequence[str] | None) -> list[str]:
        return state.adapters_to_merge(
            adapter_names, self.active_adapters, self.merged_adapters, self._available_adapters
        )

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """``W += ΔW`` for ``adapter_names`` (default: the active ones) not merged yet, rounded to
        W's dtype after each adapter (PEFT's in-place add). With ``safe_merge`` the sum is formed
        on a copy and checked for NaN and ±inf first; on failure nothing changes."""
        names = self._merge_names(adapter_names)
        if names:
            self._set_base_weight(self._merged_weight(names, check=safe_merge, where=getattr(self, "module_path", "")))
            self.merged_adapters = [*self.merged_adapters, *names]

    def unmerge(self) -> None:
        """Subtract merged adapters in LIFO order, with ΔW recomputed from the current factors/scale."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        names = [n for n in reversed(self.merged_adapters) if n in self._available_adapters]
        self._set_base_weight(self._merged_weight(names, sign=-1))
        self.merged_adapters = []

    def _nonfinite_error(self, where: str, adapter_name: str) -> ValueError:
        return ValueError(
            f"{where + ': ' if where else ''}NaNs detected in the merged weights. "
            f"The adapter {adapter_name} seems to be broken"
        )

    def _check_unmerged(self, operation: str, names: Sequence[str]) -> None:
        """Refuse to rescale a merged adapter: unmerge subtracts ΔW at the scale it was merged with
        (PEFT uses the new scale and leaves a residue in the base weight; docs/DEVIATIONS.md k)."""
        merged = [n for n in names if n in self.merged_adapters]
        if merged:
            where = getattr(self, "module_path", "") or type(self).__name__
            raise ValueError(
                f"{where}: cannot {operation} adapter(s) {merged} while merged into the base weight; "
                "call unmerge_adapter() first"
            )

    def _rescaled(self, operation: str, *args: Any) -> dict[str, float]:
        """The scaling after ``operation`` (``"set_scale"``, ``"scale_layer"``, ``"unscale_layer"``),
        not yet applied: the scale, the result and the merged adapters are checked first."""
        if operation == "set_scale":
            adapter, scale = args
            new, touched = state.set_scale(self.scaling, self.plans, adapter, scale), [adapter]
        elif operation == "scale_layer":
            new, touched = state.scale_layer(self.scaling, self.active_adapters, *args), self.active_adapters
        else:
            new = state.unscale_layer(self.scaling, self.plans, self.active_adapters, *args)
            touched = self.active_adapters
        self._check_unmerged(operation, touched)
        return new

    def set_scale(self, adapter: str, scale: float) -> None:
        """``scaling = scale * alpha / r``; no-op for an adapter this layer does not hold."""
        self.scaling = self._rescaled("set_scale", adapter, scale)

    def scale_layer(self, scale: float) -> None:
        """Multiply the scaling of every active adapter by ``scale``."""
        self.scaling = self._rescaled("scale_layer", scale)

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide active adapters' scaling by ``scale``, or reset it to ``alpha / r`` when ``None``."""
        self.scaling = self._rescaled("unscale_layer", scale)

    def _cast_input_dtype(self, x: Any, dtype: Any) -> Any:
        if x is None or not self.cast_input_dtype_enabled or x.dtype == dtype:
            return x
        return self._astype(x, dtype)

    def _forward_path(self, adapter_name: str, x: Any) -> str:
        """The forward path of ``adapter_name`` for input ``x`` (``lycoris_core.paths``); PEFT's here."""
        return "peft"

    def _adapted_forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """PEFT's forward: base output plus every active adapter's delta (module dropout in
        training), the merged/disabled shortcuts, and the result cast back to ``x``'s dtype.

        Each adapter takes its forward path (:meth:`_forward_path`): ``"merged"`` adapters are folded
        into one base call (:meth:`_folded_forward` of :meth:`_fold` entries), ``"factored"`` and
        ``"peft"`` ones add a branch. Dropout draws keep PEFT's order: module, then rank, per adapter.
        """
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._astype(self.base_layer(x, *args, **kwargs), previous_dtype)
        if self.merged:
            return self._astype(self.base_layer(x, *args, **kwargs), previous_dtype)
        folds, branches = [], []
        for name in self.active_adapters:
            if name not in self._available_adapters:
                continue
            keep = self._module_dropout_keep(name)
            if keep is False:
                continue
            path = self._forward_path(name, x)
            if path == "merged":
                folds.append(self._fold(name, keep))
            elif path == "factored":
                branches.append((self._factored_activations(name, x, *args, **kwargs), keep))
            else:
                branches.append((self._get_delta_activations(name, x, *args, **kwargs), keep))
        result = self._folded_forward(folds, x, *args, **kwargs) if folds else self.base_layer(x, *args, **kwargs)
        for delta, keep in branches:
            result = result + delta if keep is True else self._where(keep, result + delta, result)
        return self._astype(result, previous_dtype)


class TunerBookkeeping:
    """Model-level operations shared by the twins' ``LycorisTuner``.

    State: ``model``, ``peft_config`` ``{name: config}``, ``active_adapter`` (list), and the class
    attributes ``prefix``, ``config_cls``, ``layers_mapping``. Class hooks: ``_registry`` (tuners
    by ``peft_type``), ``_layer_base`` (the twin's ``LycorisLayer``), ``_linear_type``,
    ``_layer_shape_of(module, key)``. Method hooks: ``_module_table()`` ``{name: module}``,
    ``_module_aliases()`` ``{id(module): [every name]}``, ``_lycoris_layers()``,
    ``_replace_child(parent, key, module)``,
    ``_inject(adapter_name, config, plans, fill)``, ``_fill(adapter_name, config, by_module, other,
    tensors)`` (returns the fill callback), ``_factor_tensors(layer, adapter_name)``,
    ``_read_state(path)``, ``_serialize_state(tensors)`` (safetensors bytes), ``_all_finite(tensor)``,
    ``eval()``, ``_unload_layers()``; optional:
    ``_output_embeddings()``, ``_layer_kwargs()``, ``_extra_state(adapter_name)``, ``_check_set_adapter(names)``,
    ``_after_set_adapter(names)``, ``_after_delete_adapter(adapter_name)``, ``_enable_adapters``.
    """

    prefix: ClassVar[str]
    config_cls: ClassVar[type[LycorisConfig]]
    layers_mapping: ClassVar[dict[type, type]]
    _registry: ClassVar[dict[str, type]]
    _layer_base: ClassVar[type]
    _linear_type: ClassVar[type]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        config_cls = cls.__dict__.get("config_cls")
        if config_cls is not None and config_cls.PEFT_TYPE:
            cls._registry[config_cls.PEFT_TYPE] = cls

    # ------------------------------------------------------------------ targets
    @property
    def active_adapters(self) -> list[str]:
        return list(self.active_adapter)

    @classmethod
    def _layer_class_for(cls, target: Any, key: str) -> type:
        base = target.get_base_layer() if isinstance(target, cls._layer_base) else target
        for subtype, layer_cls in cls.layers_mapping.items():
            if isinstance(base, subtype):
                return layer_cls
        supported = ", ".join(t.__name__ for t in cls.layers_mapping)
        raise TypeError(
            f"{key}: target module of type {type(base).__name__} not supported, "
            f"currently only adapters for {supported} are supported"
        )

    def _output_embeddings(self) -> Any:
        """The model's output layer, excluded from ``"all-linear"`` (``None`` if it has none)."""
        return None

    def _output_layer_names(self, config: LycorisConfig) -> list[str]:
        """Names excluded from ``"all-linear"``: the output embedding, or for ``SEQ_CLS`` models
        without one the classifier head (``score`` / ``classifier``), as PEFT does."""
        head = self._output_embeddings()
        if head is None and config.task_type == "SEQ_CLS":
            head = next(
                (h for h in (getattr(self.model, n, None) for n in ("score", "classifier")) if h is not None), None
            )
        return [n for n, m in self._module_table().items() if head is not None and m is head]

    def _linear_names(self, modules: Mapping[str, Any], config: LycorisConfig) -> list[str]:
        """The modules ``"all-linear"`` selects (framework hook: the JAX twin warns about linear-looking
        layers it cannot adapt instead of skipping them silently)."""
        return [n for n, m in modules.items() if isinstance(m, self._linear_type)]

    def _resolve_targets(self, config: LycorisConfig) -> dict[str, AdapterPlan | None]:
        """Match targets and plan every factor without touching the model: ``{name: plan or None}``
        (``None`` for layer classes without a ``plan_fn``, e.g. custom variants)."""
        modules = self._module_table()
        model_config = getattr(self.model, "config", None)
        match = match_targets(
            config,
            list(modules),
            linear_names=self._linear_names(modules, config),
            output_names=self._output_layer_names(config),
            model_type=getattr(model_config, "model_type", None),
        )
        aliases = self._module_aliases()
        plans: dict[str, AdapterPlan | None] = {}
        for key in match.targeted:
            target = modules[key]
            paths = aliases.get(id(target), [key])
            if len(paths) > 1:
                raise ValueError(
                    f"{key}: this module is shared, reachable as {paths}; an adapter on it would be bypassed on "
                    "all but one path. Untie it or exclude it (exclude_modules)."
                )
            layer_cls = self._layer_class_for(target, key)
            if isinstance(target, self._layer_base) and not isinstance(target, tuple(self.layers_mapping.values())):
                raise TypeError(
                    f"{key}: already holds a {type(target).__name__}; mixing adapter types in one model "
                    f"is not supported by {type(self).__name__}"
                )
            plan_fn: Callable[..., AdapterPlan] | None = getattr(layer_cls, "plan_fn", None)
            plans[key] = None
            if plan_fn is not None:
                base = target.get_base_layer() if isinstance(target, self._layer_base) else target
                shape: LayerShape = self._layer_shape_of(base, key)
                r, alpha = resolve_rank_alpha(config, key)
                plans[key] = plan_fn(shape, r, alpha, config, where=key)
        return plans

    # ------------------------------------------------------------------ adding adapters
    @classmethod
    def _create_new_module(cls, config: LycorisConfig, adapter_name: str, target: Any, **kwargs: Any) -> Any:
        """A new adapter layer of the type ``layers_mapping`` gives for ``target``."""
        layer_cls = cls._layer_class_for(target, kwargs.get("module_path", "target"))
        return layer_cls(target, adapter_name, config, **kwargs)

    def _layer_kwargs(self) -> dict[str, Any]:
        """Extra constructor arguments for new adapter layers (e.g. the JAX twin's ``rngs``)."""
        return {"forward_path": self.forward_path}

    def set_forward_path(self, forward_path: str) -> None:
        """Use ``forward_path`` (``lycoris_core.paths``) in every adapter layer from the next call on."""
        self.forward_path = check_forward_path(forward_path)
        for _, layer in self._lycoris_layers():
            layer.forward_path = self.forward_path

    def _create_and_replace(
        self,
        config: LycorisConfig,
        adapter_name: str,
        target: Any,
        target_name: Any,
        parent: Any,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        """Add ``adapter_name`` to an existing adapter layer, or replace ``target`` on ``parent``
        (attribute or item ``target_name``) by a new one. ``kwargs`` reach the layer."""
        r, alpha = resolve_rank_alpha(config, current_key)
        autocast = self.autocast_adapter_dtype
        if isinstance(target, self._layer_base):
            target.update_layer(adapter_name, r, alpha, config=config, autocast_adapter_dtype=autocast, **kwargs)
        else:
            new = self._create_new_module(
                config,
                adapter_name,
                target,
                r=r,
                alpha=alpha,
                autocast_adapter_dtype=autocast,
                module_path=current_key,
                **self._layer_kwargs(),
                **kwargs,
            )
            self._replace_child(parent, target_name, new)

    def _check_new_adapter(self, adapter_name: str, config: LycorisConfig | None = None) -> None:
        """A valid, unused name; a config of our type (when given); no adapter merged into the model."""
        state.check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; delete it first or pick another name")
        if config is not None and not isinstance(config, self.config_cls):
            raise TypeError(
                f"{type(self).__name__}: expected a {self.config_cls.__name__}, got {type(config).__name__}"
            )
        merged = sorted({n for _, layer in self._lycoris_layers() for n in layer.merged_adapters})
        if merged:
            raise ValueError(
                f"cannot add adapter {adapter_name!r} while adapter(s) {merged} are merged into the model; "
                "call unmerge_adapter() first"
            )

    def add_adapter(self, adapter_name: str, config: LycorisConfig) -> None:
        """Inject adapter ``adapter_name``; the first adapter becomes active, later ones do not."""
        self._add(adapter_name, config, None)

    @classmethod
    def _factor_names(cls) -> set[str]:
        return {n for c in cls.layers_mapping.values() for n in c.adapter_layer_names}

    def _add(self, adapter_name: str, config: LycorisConfig, tensors: Mapping[str, Any] | None) -> None:
        """Validate (name, config, targets, plans, checkpoint ``tensors``), then inject and fill;
        all or nothing. Errors about a :class:`Checkpoint` name its file."""
        self._check_new_adapter(adapter_name, config)  # about the name and the model, not a file
        path = getattr(tensors, "path", None)
        try:
            plans = self._resolve_targets(config)
        except NoMatchingModuleError as err:
            if path is None:
                raise
            raise NoMatchingModuleError(f"{os.path.dirname(path)}: the adapter's config: {err}") from None
        fill = None
        if tensors is not None:
            try:
                shapes = {k: tuple(v.shape) for k, v in tensors.items()}
                by_module, other = state.check_checkpoint(plans, shapes, self._factor_names(), self._module_table())
                fill = self._fill(adapter_name, config, by_module, other, tensors)
            except ValueError as err:  # the checkpoint does not fit this model
                if path is None or isinstance(err, CheckpointError):
                    raise
                raise CheckpointError(path, str(err)) from None
        self._inject(adapter_name, copy.deepcopy(config), plans, fill)
        self.set_adapter(adapter_name if len(self.peft_config) == 1 else self.active_adapter)

    # ------------------------------------------------------------------ adapter management
    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate one adapter or a list of them (unmerging merged layers first, as PEFT does)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} do not exist; available: {sorted(self.peft_config)}")
        self._check_set_adapter(names)
        for _, layer in self._lycoris_layers():
            if layer.merged:
                warnings.warn(
                    "Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2
                )
                layer.unmerge()
            layer.set_adapter(names)
        self.active_adapter = names
        self._after_set_adapter(names)

    def _check_set_adapter(self, names: list[str]) -> None:
        """Framework hook: raise before anything changes if ``names`` cannot be activated."""

    def _after_set_adapter(self, names: list[str]) -> None:
        """Framework hook (e.g. inference-mode freezing)."""

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; it must exist and not be merged."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        merged = [key for key, layer in self._lycoris_layers() if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(
                f"Cannot delete adapter(s) [{adapter_name!r}] while they are merged (in {merged}). "
                "Please unmerge them first."
            )
        self.peft_config = {k: v for k, v in self.peft_config.items() if k != adapter_name}
        remaining = [n for n in self.active_adapter if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [sorted(self.peft_config)[0]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # layers' own fallback choice is overridden just below
            for _, layer in self._lycoris_layers():
                layer.delete_adapter(adapter_name)
                layer.set_adapter(remaining)
        self.active_adapter = remaining
        self._after_delete_adapter(adapter_name)
        self._after_set_adapter(remaining)

    def _after_delete_adapter(self, adapter_name: str) -> None:
        """Framework hook (e.g. ``modules_to_save`` copies)."""

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: run the base model (merged layers are unmerged, as in PEFT)."""
        self._enable_adapters(False)
        try:
            yield
        finally:
            self._enable_adapters(True)

    def _enable_adapters(self, enabled: bool) -> None:
        for _, layer in self._lycoris_layers():
            layer.enable_adapters(enabled)
        if enabled:
            self._after_set_adapter(self.active_adapters)  # keep inference-mode adapters frozen

    # ------------------------------------------------------------------ merging and scaling
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters into the base weights of every layer. With ``safe_merge`` every merged
        weight is checked (NaN and ±inf) before any layer changes; a failure names module and adapter."""
        staged = []
        for key, layer in self._lycoris_layers():
            names = layer._merge_names(adapter_names)
            if names:
                staged.append((layer, names, layer._merged_weight(names, check=safe_merge, where=key)))
        for layer, names, weight in staged:
            layer._set_base_weight(weight)
            layer.merged_adapters = [*layer.merged_adapters, *names]

    def unmerge_adapter(self) -> None:
        for _, layer in self._lycoris_layers():
            layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> Any:
        """Merge, then return the plain model with every adapter layer replaced by its base layer."""
        self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        return self.unload()

    def unload(self) -> Any:
        """Return the plain model (adapter layers replaced by their base layers, nothing merged)."""
        self._unload_layers()
        self.peft_config = {}
        self.active_adapter = []
        return self.model

    def _rescale_all(self, operation: str, *args: Any) -> None:
        """Compute and check every layer's new scaling, then apply them all: all or nothing."""
        staged = [(layer, layer._rescaled(operation, *args)) for _, layer in self._lycoris_layers()]
        for layer, scaling in staged:
            layer.scaling = scaling

    def set_scale(self, adapter: str, scale: float) -> None:
        """``scaling = scale * alpha / r`` for ``adapter`` in every layer (refused while it is merged)."""
        if adapter not in self.peft_config:
            raise ValueError(f"Adapter {adapter!r} does not exist; available: {sorted(self.peft_config)}")
        self._rescale_all("set_scale", adapter, state.check_scale("set_scale: scale", scale))

    def scale_layer(self, scale: float) -> None:
        """Multiply the scaling of the active adapters in every layer (refused while merged)."""
        self._rescale_all("scale_layer", state.check_scale("scale_layer: scale", scale))

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide the active adapters' scaling by ``scale`` (non-zero), or reset it to ``alpha / r``."""
        if scale is not None:
            scale = state.check_scale("unscale_layer: scale", scale, nonzero=True)
        self._rescale_all("unscale_layer", scale)

    # ------------------------------------------------------------------ files
    def adapter_state_dict(self, adapter_name: str = "default") -> dict[str, Any]:
        """Checkpoint tensors of one adapter under PEFT's keys (``base_model.model.<path>.<factor>``)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        tensors = {
            checkpoint_key(module, name): value
            for key, layer in self._lycoris_layers()
            if adapter_name in layer.plans
            for module, factors in self._module_factors(key, layer, adapter_name).items()
            for name, value in factors.items()
        }
        tensors.update(self._extra_state(adapter_name))
        return tensors

    def _module_factors(self, key: str, layer: Any, adapter_name: str) -> dict[str, dict[str, Any]]:
        """``{module name: {factor: tensor}}`` a layer saves (the JAX twin splits a layer stack)."""
        return {key: self._factor_tensors(layer, adapter_name)}

    def _extra_state(self, adapter_name: str) -> dict[str, Any]:
        return {}

    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None
    ) -> None:
        """PEFT layout: ``default`` in ``save_directory``, others in ``save_directory/<name>/``.

        Crash-safe: every selected adapter is checked and serialised first, then all files change
        in one step (``lycoris_core._io.replace_files``); a failure or an interrupt at any point
        leaves the previous checkpoint as it was. Saving nothing is an error.
        """
        names = list(self.peft_config) if selected_adapters is None else selected_adapters
        if isinstance(names, str):
            raise TypeError(f"selected_adapters: expected a list of adapter names, got the string {names!r}")
        names = list(names)
        if not names:
            raise ValueError(
                "nothing to save: the model holds no adapters" if not self.peft_config else "selected_adapters is empty"
            )
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or len(set(names)) != len(names):
            raise ValueError(
                f"selected_adapters {names}: {'unknown ' + str(unknown) if unknown else 'duplicates'}; "
                f"available: {sorted(self.peft_config)}"
            )
        adapters = {}
        for name in names:
            tensors = self.adapter_state_dict(name)
            if not tensors:
                raise ValueError(f"adapter {name!r} holds no weights to save")
            config = self.peft_config[name]
            if config.auto_mapping is None and getattr(self.model, "config", None) is None:
                config = copy.deepcopy(config)
                config.auto_mapping = {
                    "base_model_class": type(self.model).__name__,
                    "parent_library": type(self.model).__module__,
                }
            adapters[name] = (config, self._serialize_state(tensors))
        save_adapters(save_directory, adapters)

    @classmethod
    def _read_checkpoint(cls, files: AdapterFiles, allow_nonfinite: bool) -> Checkpoint:
        return read_checkpoint(files, cls._factor_names(), cls._read_state, cls._all_finite, allow_nonfinite)

    @classmethod
    def from_pretrained(
        cls,
        model: Any,
        directory: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        *,
        allow_nonfinite: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Wrap ``model`` and load a PEFT-format adapter directory; dispatches on ``peft_type``.

        With ``is_trainable=False`` (the default, as in PEFT) the adapter is frozen and the whole
        model is put in eval mode (no rank/module dropout). Every error names the file at fault
        and leaves ``model`` untouched.
        """
        state.check_adapter_name(adapter_name)
        files = read_adapter_files(directory)
        try:
            tuner_cls = cls._tuner_class_for(files.config.peft_type)
        except ValueError as err:
            raise CheckpointError(os.path.join(directory, CONFIG_NAME), str(err)) from None
        config = files.config
        config.inference_mode = not is_trainable
        tensors = tuner_cls._read_checkpoint(files, allow_nonfinite)
        tuner = tuner_cls(model, config, adapter_name, state_dict=tensors, **kwargs)
        if not is_trainable:
            tuner.eval()
        return tuner

    @classmethod
    def _model_module_names(cls, model: Any, **kwargs: Any) -> list[str]:
        """Every module path of ``model`` as the tuner names them (framework hook)."""
        raise NotImplementedError

    @classmethod
    def from_lycoris(
        cls,
        model: Any,
        path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        *,
        prefix: str | None = None,
        allow_nonfinite: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Wrap ``model`` and load a LyCORIS/kohya single-file adapter (``lycoris_core.kohya``): its
        underscore names resolve against ``model``'s module paths (``prefix``: the file's, e.g.
        ``"lycoris"`` or ``"lora_unet"``; found when not given), then it loads as its PEFT
        equivalent would (:meth:`from_pretrained`), computing what lycoris-lora computes."""
        names = cls._model_module_names(model, **kwargs)
        with kohya.as_peft_directory(path, names, prefix=prefix, allow_nonfinite=allow_nonfinite) as directory:
            return cls.from_pretrained(
                model, directory, adapter_name, is_trainable, allow_nonfinite=allow_nonfinite, **kwargs
            )

    def save_lycoris(
        self, path: str | os.PathLike, adapter_name: str = "default", *, prefix: str = kohya.LYCORIS_PREFIX
    ) -> None:
        """Write one adapter as a LyCORIS/kohya single file (crash-safe) that lycoris-lora loads and
        that computes what this adapter computes (``lycoris_core.kohya.peft_to_lycoris``)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found; available: {sorted(self.peft_config)}")
        layers = {
            name: module.plans[adapter_name].layer
            for name, module in self._module_table().items()
            if isinstance(module, self._layer_base) and adapter_name in module.plans
        }
        save = lambda directory: self.save_pretrained(directory, [adapter_name])  # noqa: E731
        kohya.save_through_peft(save, adapter_name, path, prefix=prefix, layers=layers)

    @classmethod
    def _tuner_class_for(cls, peft_type: str) -> type:
        """``cls`` itself for a concrete tuner (its type must match), else the registered tuner."""
        config_class_for(peft_type)  # ValueError naming an unknown type
        own = getattr(cls, "config_cls", None)
        if own is not None:
            if own.PEFT_TYPE != peft_type:
                raise ValueError(f"{cls.__name__} cannot load a checkpoint with peft_type {peft_type!r}")
            return cls
        if peft_type not in cls._registry:
            raise ValueError(f"unknown peft_type {peft_type!r}; expected one of {sorted(cls._registry)}")
        return cls._registry[peft_type]

    def load_adapter(
        self,
        directory: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        *,
        allow_nonfinite: bool = False,
    ) -> None:
        """Add an adapter from a PEFT-format directory (not activated, as in PEFT). With
        ``is_trainable=False`` the model is put in eval mode, as PEFT's ``load_adapter`` does."""
        self._check_new_adapter(adapter_name)
        files = read_adapter_files(directory)
        config = files.config
        if config.peft_type != self.config_cls.PEFT_TYPE:
            raise CheckpointError(
                os.path.join(directory, CONFIG_NAME),
                f"{type(self).__name__} cannot load adapter {adapter_name!r} with peft_type {config.peft_type!r}",
            )
        config.inference_mode = not is_trainable
        self._add(adapter_name, config, self._read_checkpoint(files, allow_nonfinite))
        if not is_trainable:
            self.eval()
