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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

from lycoris_core import kohya, state
from lycoris_core.checkpoint import SAFETENSORS_METADATA, SAFETENSORS_NAME, checkpoint_key
from lycoris_core.config import CONFIG_NAME, LycorisConfig, config_class_for
from lycoris_core.errors import CheckpointError
from lycoris_core.files import Checkpoint, read_adapter_files, save_adapters
from lycoris_core.paths import check_forward_path
from lycoris_core.plan import AdapterPlan, factor_names
from lycoris_core.resolve import Layer, check_peft_plans, resolve, saved_config, table_shapes
from lycoris_core.targets import NoMatchingModuleError
from lycoris_core.tensors import dump_safetensors, read_tensors

__all__ = ["LayerBookkeeping", "TunerBookkeeping"]


class LayerBookkeeping:
    """Per-layer adapter bookkeeping.

    State: ``plans`` ``{name: AdapterPlan}``, ``scaling`` ``{name: float}``, ``_active_adapter``,
    ``merged_adapters``, ``_disable_adapters``, ``cast_input_dtype_enabled``.
    Hooks: ``_available_adapters`` (names holding factors), ``_merged_weight(names, sign, check, where)``
    (the base weight with ``sign·ΔW`` of ``names`` added), ``_set_base_weight(w)``, ``set_adapter(names)``.
    The forward pass is each framework's own (``lycoris_jax.adapted.adapted_call``, the torch layer's).
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


class TunerBookkeeping:
    """Model-level operations shared by the twins' ``LycorisTuner``.

    State: ``model``, ``peft_config`` ``{name: config}``, ``active_adapter`` (list), ``forward_path``;
    class attributes ``config_cls`` (a concrete tuner's) and ``_registry`` (tuners by ``peft_type``).
    Framework hooks: ``_table_of(model, **options)`` (class method: the resolver's table,
    ``lycoris_core.resolve.Layer`` per module), ``_table_options`` (this tuner's options for it),
    ``_inject(adapter_name, config, plans, values, extra)``, ``_lycoris_layers()``, ``_unload_layers()``,
    ``_layer_state(name, layer, adapter_name)`` (``{module: {factor: array}}``), ``_numpy(array)``,
    ``eval()``. Targets, checkpoint checks, merging, scaling and files are here, once.
    """

    prefix: ClassVar[str]
    config_cls: ClassVar[type[LycorisConfig]]
    _registry: ClassVar[dict[str, type]]
    #: The front end's name in messages, and whether it has ``modules_to_save``.
    _front_end: ClassVar[str] = ""
    _modules_to_save: ClassVar[bool] = False
    #: The front end's layer class per layer kind, for messages.
    _kind_names: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        config_cls = cls.__dict__.get("config_cls")
        if config_cls is not None and config_cls.PEFT_TYPE:
            cls._registry[config_cls.PEFT_TYPE] = cls

    @property
    def active_adapters(self) -> list[str]:
        return list(self.active_adapter)

    # ------------------------------------------------------------------ targets
    @property
    def _table_options(self) -> dict[str, Any]:
        return {}

    def _table(self) -> dict[str, Layer]:
        return self._table_of(self.model, **self._table_options)

    def _resolve_targets(
        self,
        config: LycorisConfig,
        table: Mapping[str, Layer] | None = None,
        plans: Mapping[str, AdapterPlan] | None = None,
    ) -> dict[str, AdapterPlan]:
        """``{module name: AdapterPlan}`` of ``config`` on this model (``lycoris_core.resolve``; ``plans``:
        modules' own, e.g. a LyCORIS file's factorization); nothing changes."""
        model_config = getattr(self.model, "config", None)
        return resolve(
            config,
            self._table() if table is None else table,
            model_type=getattr(model_config, "model_type", None),
            modules_to_save=self._modules_to_save,
            front_end=self._front_end,
            kind_names=self._kind_names,
            plans=plans,
        )

    def set_forward_path(self, forward_path: str) -> None:
        """Use ``forward_path`` (``lycoris_core.paths``) in every adapter layer from the next call on."""
        self.forward_path = check_forward_path(forward_path)
        for _, layer in self._lycoris_layers():
            layer.forward_path = self.forward_path

    # ------------------------------------------------------------------ adding adapters
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

    def _add(
        self,
        adapter_name: str,
        config: LycorisConfig,
        tensors: Mapping[str, Any] | None,
        plans: Mapping[str, AdapterPlan] | None = None,
    ) -> None:
        """Validate (name, config, targets, plans, checkpoint ``tensors``), then inject and fill;
        all or nothing. Errors about a :class:`Checkpoint` name its file. ``plans``: modules' own
        plans (``lycoris_core.resolve.resolve``)."""
        self._check_new_adapter(adapter_name, config)  # about the name and the model, not a file
        path = getattr(tensors, "path", None)
        table = self._table()
        try:
            plans = self._resolve_targets(config, table, plans)
        except NoMatchingModuleError as err:
            if path is None:
                raise
            source = os.path.dirname(path) if os.path.basename(path) == SAFETENSORS_NAME else path
            raise NoMatchingModuleError(f"{source}: the adapter's config: {err}") from None
        values, extra = None, {}
        if tensors is not None:
            try:
                shapes = {k: tuple(v.shape) for k, v in tensors.items()}
                by_module, other = state.check_checkpoint(plans, shapes, factor_names(config.peft_type), table)
            except ValueError as err:  # the checkpoint does not fit this model
                if path is None or isinstance(err, CheckpointError):
                    raise
                raise CheckpointError(path, str(err)) from None
            values = {module: {f: tensors[key] for f, key in keys.items()} for module, keys in by_module.items()}
            extra = {bare: tensors[key] for bare, key in other.items()}
        try:
            self._inject(adapter_name, copy.deepcopy(config), plans, values, extra)
        except ValueError as err:  # checkpoint keys the model has no place for
            if path is None or isinstance(err, CheckpointError) or not extra:
                raise
            raise CheckpointError(path, str(err)) from None
        self.set_adapter(adapter_name if len(self.peft_config) == 1 else self.active_adapter)

    # ------------------------------------------------------------------ adapter management
    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate one adapter or a list of them (unmerging merged layers first, as PEFT does)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} do not exist; available: {sorted(self.peft_config)}")
        for _, layer in self._lycoris_layers():
            if layer.merged:
                warnings.warn(
                    "Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2
                )
                layer.unmerge()
            layer.set_adapter(names)
        self.active_adapter = names

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
        return {
            checkpoint_key(module, name): value
            for key, layer in self._lycoris_layers()
            if adapter_name in layer.plans
            for module, factors in self._layer_state(key, layer, adapter_name).items()
            for name, value in factors.items()
        }

    def _adapted_plans(self, adapter_name: str) -> dict[str, AdapterPlan]:
        """``{module name: plan}`` of one adapter, as PEFT names the modules (a stack's layers one by one)."""
        out = {}
        for key, layer in self._lycoris_layers():
            if adapter_name in layer.plans:
                out.update(dict.fromkeys(self._layer_state(key, layer, adapter_name), layer.plans[adapter_name]))
        return out

    @staticmethod
    def _serialize_state(tensors: Mapping[str, Any]) -> bytes:
        """safetensors bytes of ``{key: numpy array}`` with PEFT's metadata."""
        return dump_safetensors(tensors, SAFETENSORS_METADATA)

    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None
    ) -> None:
        """PEFT layout: ``default`` in ``save_directory``, others in ``save_directory/<name>/``.

        The saved config names exactly the modules the adapter holds (``lycoris_core.resolve.saved_config``),
        so PEFT loads every factor. Crash-safe: every selected adapter is checked and serialised first, then
        all files change in one step (``lycoris_core._io.replace_files``); a failure or an interrupt at any
        point leaves the previous checkpoint as it was. Saving nothing is an error.
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
        table = self._table()
        adapters = {}
        for name in names:
            tensors = {k: self._numpy(v) for k, v in self.adapter_state_dict(name).items()}
            if not tensors:
                raise ValueError(f"adapter {name!r} holds no weights to save")
            plans = self._adapted_plans(name)
            check_peft_plans(self.peft_config[name], plans)
            config = saved_config(self.peft_config[name], plans, table)
            if config.auto_mapping is None and getattr(self.model, "config", None) is None:
                config.auto_mapping = {
                    "base_model_class": type(self.model).__name__,
                    "parent_library": type(self.model).__module__,
                }
            adapters[name] = (config, self._serialize_state(tensors))
        save_adapters(save_directory, adapters)

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
        tensors = read_tensors(files, allow_nonfinite=allow_nonfinite)
        tuner = tuner_cls(model, config, adapter_name, state_dict=tensors, **kwargs)
        if not is_trainable:
            tuner.eval()
        return tuner

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
        equivalent would (:meth:`from_pretrained`), computing what lycoris-lora computes: a module whose
        factorization no PEFT config gives (lycoris-lora's ``factor``) keeps the file's own plan."""
        table = cls._table_of(model, **{k: v for k, v in kwargs.items() if k in cls._table_keys})
        source = kohya.read_lycoris(path, allow_nonfinite=allow_nonfinite)
        config, tensors, plans = kohya.lycoris_adapter(source, table_shapes(table), prefix=prefix)
        config.inference_mode = not is_trainable
        tuner_cls = cls._tuner_class_for(config.peft_type)
        state.check_adapter_name(adapter_name)
        tuner = tuner_cls(
            model, config, adapter_name, state_dict=Checkpoint(source.path, tensors), plans=plans, **kwargs
        )
        if not is_trainable:
            tuner.eval()
        return tuner

    #: The constructor options that ``_table_of`` takes.
    _table_keys: ClassVar[tuple[str, ...]] = ()

    def save_lycoris(
        self, path: str | os.PathLike, adapter_name: str = "default", *, prefix: str = kohya.LYCORIS_PREFIX
    ) -> None:
        """Write one adapter as a LyCORIS/kohya single file (crash-safe) that lycoris-lora loads and
        that computes what this adapter computes (``lycoris_core.kohya.peft_to_lycoris``)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found; available: {sorted(self.peft_config)}")
        tensors = {k: self._numpy(v) for k, v in self.adapter_state_dict(adapter_name).items()}
        kohya.save_adapter(
            path,
            self.peft_config[adapter_name],
            tensors,
            self._adapted_plans(adapter_name),
            prefix=prefix,
            where=adapter_name,
        )

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
        self._add(adapter_name, config, read_tensors(files, allow_nonfinite=allow_nonfinite))
        if not is_trainable:
            self.eval()
