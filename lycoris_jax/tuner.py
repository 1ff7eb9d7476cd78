"""Model surgery on Flax NNX graphs and model-level operations (JAX twin of ``lycoris_torch.tuner``).

Module names are the dotted graph paths (attribute names, list indices and dict keys joined by
"."), so an NNX model whose attributes mirror a torch model's gets the same names and the same
PEFT checkpoint keys. Every target is resolved and checked before the graph changes; a failure
restores every replaced module.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors.flax import load_file, save_file

from lycoris_core import (
    SAFETENSORS_METADATA,
    SAFETENSORS_NAME,
    LoHaConfig,
    LoKrConfig,
    LycorisConfig,
    checkpoint_key,
    config_class_for,
    match_targets,
    resolve_rank_alpha,
)
from lycoris_core._io import atomic_write
from lycoris_core.state import check_checkpoint
from lycoris_jax.layer import LoHaLayer, LoKrLayer, LycorisLayer, _FactorizedLayer, layer_shape_of

__all__ = ["LoHaModel", "LoKrModel", "LycorisTuner"]

_TUNERS: dict[str, type[LycorisTuner]] = {}
Path = tuple[Any, ...]


def _name(path: Path) -> str:
    return ".".join(str(p) for p in path)


def _child(node: Any, key: Any) -> Any:
    if isinstance(node, (list, tuple, dict, nnx.List, nnx.Dict)):
        return node[key]
    return getattr(node, key)


def _set_child(node: Any, key: Any, value: Any) -> None:
    if isinstance(node, (list, dict, nnx.List, nnx.Dict)):
        node[key] = value
    else:
        setattr(node, key, value)


def default_rngs() -> nnx.Rngs:
    """The documented default when no ``rngs`` is given: ``nnx.Rngs(params=0, dropout=1)``."""
    return nnx.Rngs(params=0, dropout=1)


class LycorisTuner(nnx.Module):
    """Base tuner: wraps an ``nnx.Module`` in place and manages named adapters on it.

    Subclasses set ``prefix``, ``config_cls`` and ``layers_mapping`` (base layer type -> adapter
    layer class); they are registered for :meth:`from_pretrained`. The tuner is itself an
    ``nnx.Module`` (``tuner.model`` is the adapted model), so ``nnx.jit``, ``nnx.grad`` and
    ``nnx.Optimizer(tuner, tx, wrt=lycoris_jax.LycorisParam)`` work on either.
    """

    prefix: ClassVar[str]
    config_cls: ClassVar[type[LycorisConfig]]
    layers_mapping: ClassVar[dict[type[nnx.Module], type[LycorisLayer]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        config_cls = cls.__dict__.get("config_cls")
        if config_cls is not None and config_cls.PEFT_TYPE:
            _TUNERS[config_cls.PEFT_TYPE] = cls

    def __init__(
        self,
        model: nnx.Module,
        config: LycorisConfig,
        adapter_name: str = "default",
        *,
        rngs: nnx.Rngs | None = None,
        autocast_adapter_dtype: bool = True,
        state_dict: Mapping[str, Any] | None = None,
    ) -> None:
        """Inject ``adapter_name`` into ``model`` (in place) and make it active.

        ``rngs`` provides ``params`` keys for initialisation and ``dropout`` keys for rank and
        module dropout; default :func:`default_rngs`. ``state_dict`` optionally gives the factors'
        values under PEFT checkpoint keys, checked against the planned shapes first.
        """
        self.model = model
        self.rngs = rngs if rngs is not None else default_rngs()
        self.peft_config: dict[str, LycorisConfig] = {}
        self.active_adapter: list[str] = [adapter_name]
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self._add(adapter_name, config, state_dict)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ walking the graph
    def _modules(self) -> dict[str, tuple[Path, nnx.Module]]:
        """``{dotted name: (path, module)}`` in pre-order (siblings in NNX's sorted order), skipping
        shared modules seen before and everything inside existing adapter layers."""
        found: dict[str, tuple[Path, nnx.Module]] = {}
        seen: set[int] = set()

        def walk(path: Path, module: nnx.Module) -> None:
            seen.add(id(module))
            found[_name(path)] = (path, module)
            if isinstance(module, LycorisLayer):
                return
            for key, child in nnx.iter_children(module):
                if isinstance(child, nnx.Module) and id(child) not in seen:
                    walk((*path, key), child)

        walk((), self.model)
        return found

    def _lycoris_layers(self) -> Iterator[tuple[str, LycorisLayer]]:
        for name, (_, module) in self._modules().items():
            if isinstance(module, LycorisLayer):
                yield name, module

    def _node(self, path: Path) -> Any:
        node = self.model
        for key in path:
            node = _child(node, key)
        return node

    @classmethod
    def _layer_class_for(cls, target: Any, key: str) -> type[LycorisLayer]:
        base = target.get_base_layer() if isinstance(target, LycorisLayer) else target
        for subtype, layer_cls in cls.layers_mapping.items():
            if isinstance(base, subtype):
                return layer_cls
        supported = ", ".join(t.__name__ for t in cls.layers_mapping)
        raise TypeError(
            f"{key}: target module of type {type(base).__name__} not supported, "
            f"currently only adapters for {supported} are supported"
        )

    # ------------------------------------------------------------------ injection
    @classmethod
    def _create_new_module(
        cls, config: LycorisConfig, adapter_name: str, target: nnx.Module, **kwargs: Any
    ) -> LycorisLayer:
        layer_cls = cls._layer_class_for(target, kwargs.get("module_path", "target"))
        return layer_cls(target, adapter_name, config, **kwargs)

    def _create_and_replace(
        self,
        config: LycorisConfig,
        adapter_name: str,
        target: nnx.Module,
        target_name: Any,
        parent: Any,
        current_key: str,
    ) -> None:
        """Add ``adapter_name`` to an existing adapter layer, or replace ``target`` by a new one."""
        r, alpha = resolve_rank_alpha(config, current_key)
        if isinstance(target, LycorisLayer):
            target.update_layer(
                adapter_name, r, alpha, config=config, autocast_adapter_dtype=self.autocast_adapter_dtype
            )
        else:
            new = self._create_new_module(
                config,
                adapter_name,
                target,
                r=r,
                alpha=alpha,
                rngs=self.rngs,
                autocast_adapter_dtype=self.autocast_adapter_dtype,
                module_path=current_key,
            )
            _set_child(parent, target_name, new)

    def _resolve_targets(self, config: LycorisConfig) -> dict[str, Any]:
        """Match targets and plan every factor without touching the graph: ``{name: plan or None}``."""
        if config.modules_to_save:
            raise ValueError(
                f"modules_to_save={config.modules_to_save}: not supported by the Flax twin yet; "
                "train those modules with their own optimizer filter"
            )
        modules = self._modules()
        model_config = getattr(self.model, "config", None)
        match = match_targets(
            config,
            list(modules),
            linear_names=[n for n, (_, m) in modules.items() if isinstance(m, nnx.Linear)],
            model_type=getattr(model_config, "model_type", None),
        )
        plans: dict[str, Any] = {}
        for key in match.targeted:
            target = modules[key][1]
            layer_cls = self._layer_class_for(target, key)
            if isinstance(target, LycorisLayer) and not isinstance(target, tuple(self.layers_mapping.values())):
                raise TypeError(
                    f"{key}: already holds a {type(target).__name__}; mixing adapter types in one model "
                    f"is not supported by {type(self).__name__}"
                )
            plans[key] = None
            if issubclass(layer_cls, _FactorizedLayer):
                base = target.get_base_layer() if isinstance(target, LycorisLayer) else target
                r, alpha = resolve_rank_alpha(config, key)
                plans[key] = layer_cls.plan_fn(layer_shape_of(base, key), r, alpha, config, where=key)
        return plans

    def _check_new_adapter(self, adapter_name: str, config: LycorisConfig) -> None:
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name: expected a non-empty string, got {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; delete it first or pick another name")
        if not isinstance(config, self.config_cls):
            raise TypeError(
                f"{type(self).__name__}: expected a {self.config_cls.__name__}, got {type(config).__name__}"
            )

    def add_adapter(self, adapter_name: str, config: LycorisConfig) -> None:
        """Inject adapter ``adapter_name``; the first adapter becomes active, later ones do not."""
        self._add(adapter_name, config, None)

    def _add(self, adapter_name: str, config: LycorisConfig, state: Mapping[str, Any] | None) -> None:
        """Validate (names, targets, plans, ``state`` if given), inject, fill values; all or nothing."""
        self._check_new_adapter(adapter_name, config)
        plans = self._resolve_targets(config)
        fill = None
        if state is not None:
            factor_names = {n for c in self.layers_mapping.values() for n in c.adapter_layer_names}
            by_module, other = check_checkpoint(plans, {k: tuple(v.shape) for k, v in state.items()}, factor_names)
            if other:
                raise ValueError(f"checkpoint keys fit no adapter factor: {sorted(other.values())}")

            def fill() -> None:
                modules = self._modules()
                for key, names in by_module.items():
                    params = modules[key][1].factors[adapter_name]
                    for name, ckpt_key in names.items():
                        params[name][...] = jnp.asarray(state[ckpt_key], params[name].dtype)

        self._inject(adapter_name, config, plans, fill)
        self.set_adapter(adapter_name if len(self.peft_config) == 1 else self.active_adapter)

    def _inject(
        self, adapter_name: str, config: LycorisConfig, plans: dict[str, Any], fill: Callable[[], None] | None = None
    ) -> None:
        modules = self._modules()
        replaced: list[tuple[Any, Any, nnx.Module]] = []
        updated: list[LycorisLayer] = []
        config = copy.deepcopy(config)
        try:
            for key in plans:
                path, target = modules[key]
                parent = self._node(path[:-1])
                self._create_and_replace(config, adapter_name, target, path[-1], parent, key)
                (updated if isinstance(target, LycorisLayer) else replaced).append(
                    target if isinstance(target, LycorisLayer) else (parent, path[-1], target)
                )
            if fill is not None:
                fill()
        except BaseException:
            for layer in updated:
                layer.delete_adapter(adapter_name)
            for parent, key, original in reversed(replaced):
                _set_child(parent, key, original)
            raise
        self.peft_config = {**self.peft_config, adapter_name: config}

    # ------------------------------------------------------------------ adapter management
    @property
    def active_adapters(self) -> list[str]:
        return list(self.active_adapter)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate one adapter or a list of them (unmerging merged layers first, as PEFT does)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} do not exist; available: {sorted(self.peft_config)}")
        for _, layer in self._lycoris_layers():
            if layer.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
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
        for _, layer in self._lycoris_layers():
            layer.delete_adapter(adapter_name)
        remaining = [n for n in self.active_adapter if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [sorted(self.peft_config)[0]]
        self.active_adapter = remaining

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: run the base model (merged layers are unmerged, as in PEFT)."""
        for _, layer in self._lycoris_layers():
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for _, layer in self._lycoris_layers():
                layer.enable_adapters(True)

    # ------------------------------------------------------------------ merging
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters into the base kernels. With ``safe_merge`` every merged kernel is checked
        (NaN and ±inf) before any layer changes; a failure names the module and adapter."""
        staged = []
        for key, layer in self._lycoris_layers():
            names = layer._merge_names(adapter_names)
            if names:
                staged.append((layer, names, layer._merged_kernel(names, check=safe_merge, where=key)))
        for layer, names, kernel in staged:
            layer.get_base_layer().kernel[...] = kernel
            layer.merged_adapters = [*layer.merged_adapters, *names]

    def unmerge_adapter(self) -> None:
        for _, layer in self._lycoris_layers():
            layer.unmerge()

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> nnx.Module:
        if merge:
            self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        for _, (path, module) in self._modules().items():
            if isinstance(module, LycorisLayer):
                _set_child(self._node(path[:-1]), path[-1], module.get_base_layer())
        self.peft_config = {}
        return self.model

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nnx.Module:
        """Merge, then return the plain model with every adapter layer replaced by its base layer."""
        return self._unload(True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nnx.Module:
        """Return the plain model without merging (adapters discarded)."""
        return self._unload(False)

    # ------------------------------------------------------------------ scaling
    def set_scale(self, adapter: str, scale: float) -> None:
        for _, layer in self._lycoris_layers():
            layer.set_scale(adapter, scale)

    def scale_layer(self, scale: float) -> None:
        for _, layer in self._lycoris_layers():
            layer.scale_layer(scale)

    def unscale_layer(self, scale: float | None = None) -> None:
        for _, layer in self._lycoris_layers():
            layer.unscale_layer(scale)

    # ------------------------------------------------------------------ files
    def adapter_state_dict(self, adapter_name: str = "default") -> dict[str, jax.Array]:
        """Factors of one adapter under PEFT's keys (``base_model.model.<path>.<factor>``), PyTorch layouts."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        return {
            checkpoint_key(key, name): param[...]
            for key, layer in self._lycoris_layers()
            if adapter_name in layer.factors
            for name, param in layer.factors[adapter_name].items()
        }

    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None
    ) -> None:
        """PEFT layout: ``default`` in ``save_directory``, others in ``save_directory/<name>/``."""
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            tensors = self.adapter_state_dict(name)
            directory = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
            os.makedirs(directory, exist_ok=True)
            atomic_write(
                os.path.join(directory, SAFETENSORS_NAME),
                lambda tmp, tensors=tensors: save_file(tensors, tmp, SAFETENSORS_METADATA),
            )
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            config.save_pretrained(directory)

    @classmethod
    def from_pretrained(
        cls,
        model: nnx.Module,
        directory: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> LycorisTuner:
        """Wrap ``model`` and load a PEFT-format adapter directory; dispatches on ``peft_type``."""
        config = LycorisConfig.from_pretrained(directory)
        tuner_cls = cls._tuner_class_for(config.peft_type)
        config.inference_mode = not is_trainable
        return tuner_cls(model, config, adapter_name, state_dict=_read_safetensors(directory), **kwargs)

    @classmethod
    def _tuner_class_for(cls, peft_type: str) -> type[LycorisTuner]:
        config_class_for(peft_type)
        if cls is not LycorisTuner:
            if cls.config_cls.PEFT_TYPE != peft_type:
                raise ValueError(f"{cls.__name__} cannot load a checkpoint with peft_type {peft_type!r}")
            return cls
        if peft_type not in _TUNERS:
            raise ValueError(f"unknown peft_type {peft_type!r}; expected one of {sorted(_TUNERS)}")
        return _TUNERS[peft_type]

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        """Add an adapter from a PEFT-format directory (not activated, as in PEFT)."""
        config = LycorisConfig.from_pretrained(directory)
        if config.peft_type != self.config_cls.PEFT_TYPE:
            raise ValueError(
                f"{type(self).__name__} cannot load adapter {adapter_name!r} with peft_type {config.peft_type!r}"
            )
        config.inference_mode = not is_trainable
        self._add(adapter_name, config, _read_safetensors(directory))


def _read_safetensors(directory: str | os.PathLike) -> dict[str, jax.Array]:
    """Read ``adapter_model.safetensors`` (never pickle); ``ValueError`` if it is missing."""
    path = os.path.join(directory, SAFETENSORS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{os.fspath(directory)!r}: no {SAFETENSORS_NAME} found (only safetensors files are read)")
    return load_file(path)


class LoHaModel(LycorisTuner):
    """LoHa (low-rank Hadamard product) adapters on a Flax NNX model.

    >>> from flax import nnx
    >>> import jax.numpy as jnp, lycoris_jax as lj
    >>> model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)))
    >>> tuner = lj.LoHaModel(model, lj.LoHaConfig(r=2, target_modules=["layers.0"]))
    >>> tuner(jnp.zeros((1, 8))).shape
    (1, 8)
    """

    prefix = "hada_"
    config_cls = LoHaConfig
    layers_mapping: ClassVar[dict[type[nnx.Module], type[LycorisLayer]]] = {nnx.Conv: LoHaLayer, nnx.Linear: LoHaLayer}


class LoKrModel(LycorisTuner):
    """LoKr (low-rank Kronecker product) adapters on a Flax NNX model."""

    prefix = "lokr_"
    config_cls = LoKrConfig
    layers_mapping: ClassVar[dict[type[nnx.Module], type[LycorisLayer]]] = {nnx.Conv: LoKrLayer, nnx.Linear: LoKrLayer}
