"""Model surgery on Flax NNX graphs (JAX twin of ``lycoris_torch.tuner``).

The operations themselves (target resolution, validate-then-inject, checkpoint checks,
set/delete/merge/scale, PEFT files) live in ``lycoris_core.bookkeeping.TunerBookkeeping``,
shared with the PyTorch twin; this module supplies the NNX graph surgery, arrays and file I/O.
Module names are the dotted graph paths (attribute names, list indices and dict keys joined by
"."), so an NNX model whose attributes mirror a torch model's gets the same names and keys.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors.flax import load_file, save

from lycoris_core import SAFETENSORS_METADATA, LoHaConfig, LoKrConfig, LycorisConfig
from lycoris_core.bookkeeping import TunerBookkeeping
from lycoris_core.paths import check_forward_path
from lycoris_jax.layer import (
    LINEAR_LAYERS,
    SUPPORTED_LAYERS,
    LoHaLayer,
    LoKrLayer,
    LycorisLayer,
    LycorisParam,
    check_branch_dtype,
    kernel_layout_of,
    layer_shape_of,
    require_dropout_stream,
)

__all__ = ["LoHaModel", "LoKrModel", "LycorisTuner", "default_rngs"]

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


class LycorisTuner(TunerBookkeeping, nnx.Module):
    """Base tuner: wraps an ``nnx.Module`` in place and manages named adapters on it.

    Subclasses set ``prefix``, ``config_cls`` and ``layers_mapping`` (base layer type -> adapter
    layer class); they are registered for :meth:`from_pretrained`. The tuner is itself an
    ``nnx.Module`` (``tuner.model`` is the adapted model), so ``nnx.jit``, ``nnx.grad`` and
    ``nnx.Optimizer(tuner, tx, wrt=lycoris_jax.LycorisParam)`` work on either.
    """

    _registry: ClassVar[dict[str, type]] = {}
    _layer_base = LycorisLayer
    _linear_type = LINEAR_LAYERS

    def __init__(
        self,
        model: nnx.Module,
        config: LycorisConfig,
        adapter_name: str = "default",
        *,
        rngs: nnx.Rngs | None = None,
        autocast_adapter_dtype: bool = True,
        state_dict: Mapping[str, Any] | None = None,
        stacks: Sequence[str] = (),
        branch_dtype: str = "adapter",
        forward_path: str = "auto",
    ) -> None:
        """Inject ``adapter_name`` into ``model`` (in place) and make it active.

        ``rngs`` provides ``params`` keys for initialisation and ``dropout`` keys for rank and
        module dropout; default :func:`default_rngs`. ``state_dict`` optionally gives the factors'
        values under PEFT checkpoint keys, checked against the planned shapes first. ``stacks`` names
        the module paths of scanned layer stacks (built with ``nnx.vmap``, applied with ``nnx.scan``):
        below ``"layers"``, the module ``layers.attn.q`` is the PEFT modules ``layers.<i>.attn.q``,
        one per layer, for every config field and checkpoint key; its adapter is one layer whose
        factors and scales carry the stack's leading layer axis. ``branch_dtype="base"`` runs the
        adapter branch in the base layer's compute ``dtype`` (e.g. bfloat16 on TPU) from float32
        factors; the default ``"adapter"`` is PEFT's arithmetic. ``forward_path`` says how the forward
        pass computes the adapters (``lycoris_core.paths``): ``"auto"`` (the cheaper of ``"merged"``
        and ``"factored"`` per call), one of those, or ``"peft"`` (PEFT's two-branch arithmetic).
        """
        self.stacks = tuple(stacks)
        self.forward_path = check_forward_path(forward_path)
        self.branch_dtype = check_branch_dtype(branch_dtype)
        self.model = model
        self.rngs = rngs if rngs is not None else default_rngs()
        self.peft_config: dict[str, LycorisConfig] = {}
        self.active_adapter: list[str] = [adapter_name]
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self._add(adapter_name, config, state_dict)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ walking the graph
    def _walk(self) -> tuple[dict[str, tuple[Path, nnx.Module]], dict[int, list[str]]]:
        """Pre-order walk (siblings in NNX's sorted order), not entering adapter layers:
        ``({name: (path, module)} for first visits, {id(module): [every name]})``."""
        found: dict[str, tuple[Path, nnx.Module]] = {}
        aliases: dict[int, list[str]] = {}

        def walk(path: Path, module: nnx.Module) -> None:
            name = _name(path)
            aliases.setdefault(id(module), []).append(name)
            if len(aliases[id(module)]) > 1:
                return
            found[name] = (path, module)
            if isinstance(module, LycorisLayer):
                return
            for key, child in nnx.iter_children(module):
                if isinstance(child, nnx.Module):
                    walk((*path, key), child)

        walk((), self.model)
        return found, aliases

    @classmethod
    def _model_module_names(cls, model: nnx.Module, stacks: Sequence[str] = (), **kwargs: Any) -> list[str]:
        names: list[str] = []

        def walk(path: Path, module: nnx.Module) -> None:
            names.append(_name(path))
            for key, child in nnx.iter_children(module):
                if isinstance(child, nnx.Module):
                    walk((*path, key), child)

        walk((), model)
        missing = [stack for stack in stacks if stack not in names]
        if missing:
            raise ValueError(f"stacks: the model has no module {missing[0]!r}")
        out = []
        for name in names:  # a module in a stack: one name per layer (``stack.<i>.rest``)
            stack = next((s for s in stacks if name == s or name.startswith(f"{s}.")), None)
            if stack is None:
                out.append(name)
                continue
            node = model
            for part in stack.split("."):
                node = node[int(part)] if part.isdigit() else getattr(node, part)
            size = jax.tree.leaves(nnx.state(node, nnx.Param))[0].shape[0]
            rest = name[len(stack) + 1 :]
            out += [".".join(filter(None, (stack, str(i), rest))) for i in range(size)]
        return out

    def _modules(self) -> dict[str, tuple[Path, nnx.Module]]:
        return self._walk()[0]

    def _module_aliases(self) -> dict[int, list[str]]:
        return self._walk()[1]

    def _module_table(self) -> dict[str, nnx.Module]:
        """``{PEFT module name: module}``: a module in a stack appears once per layer."""
        modules = self._modules()
        sizes = {stack: self._stack_size(stack, modules) for stack in self.stacks}  # one walk, not one per module
        return {n: module for name, (_, module) in modules.items() for n in self._layer_names(name, sizes)}

    def _stack_of(self, name: str) -> tuple[str, str] | None:
        """``(stack, rest)`` for a module in one of ``stacks`` (``rest`` is empty for the stack itself)."""
        for stack in self.stacks:
            if name == stack or name.startswith(f"{stack}."):
                return stack, name[len(stack) + 1 :]
        return None

    def _layer_names(self, name: str, sizes: Mapping[str, int] | None = None) -> tuple[str, ...]:
        """The PEFT module names of the module ``name``: ``stack.<i>.rest`` per layer, or ``(name,)``
        (``sizes``: the stacks' layer counts, when already known)."""
        found = self._stack_of(name)
        if found is None:
            return (name,)
        stack, rest = found
        size = sizes[stack] if sizes is not None else self._stack_size(stack)
        return tuple(".".join(filter(None, (stack, str(i), rest))) for i in range(size))

    def _stack_size(self, stack: str, modules: Mapping[str, Any] | None = None) -> int:
        """The leading axis every parameter below ``stack`` shares (``nnx.vmap``'s layer axis)."""
        node = (modules if modules is not None else self._modules()).get(stack)
        if node is None:
            raise ValueError(f"stacks: the model has no module {stack!r}")
        sizes = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(nnx.state(node[1], nnx.Param))}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                f"stacks: the parameters below {stack!r} must share one leading layer axis (an nnx.vmap-built "
                f"stack), got leading sizes {sorted(sizes, key=str)}"
            )
        return sizes.pop()

    def _layer_index(self, name: str) -> tuple[str, int | None]:
        """``(module, layer)`` for a PEFT module name: ``layers.3.attn.q`` -> ``("layers.attn.q", 3)``."""
        for stack in self.stacks:
            head, _, tail = name.removeprefix(f"{stack}.").partition(".")
            if name.startswith(f"{stack}.") and head.isdigit():
                return ".".join(filter(None, (stack, tail))), int(head)
        return name, None

    def _layer_shape_of(self, module: Any, key: str) -> Any:
        return layer_shape_of(module, key, stacked=self._layer_index(key)[1] is not None)

    def _lycoris_layers(self) -> Iterator[tuple[str, LycorisLayer]]:
        for name, (_, module) in self._modules().items():
            if isinstance(module, LycorisLayer):
                yield name, module

    def _node(self, path: Path) -> Any:
        node = self.model
        for key in path:
            node = _child(node, key)
        return node

    # ------------------------------------------------------------------ injection
    _replace_child = staticmethod(_set_child)

    def _layer_kwargs(self) -> dict[str, Any]:
        return {"rngs": self.rngs, "branch_dtype": self.branch_dtype, "forward_path": self.forward_path}

    def _resolve_targets(self, config: LycorisConfig) -> dict[str, Any]:
        if config.modules_to_save:
            raise ValueError(
                f"modules_to_save={config.modules_to_save}: not supported by the Flax twin yet; "
                "train those modules with their own optimizer filter"
            )
        plans = super()._resolve_targets(config)
        if any(p is not None and (p.rank_dropout or p.module_dropout) for p in plans.values()):
            require_dropout_stream(self.rngs, f"{type(self).__name__}")
        for stack in self.stacks:
            self._stack_size(stack)  # the stack exists and has one layer axis
        first: dict[str, str] = {}
        for name, plan in plans.items():
            module, index = self._layer_index(name)
            if index is None:
                continue
            other = plans[first.setdefault(module, name)]
            if plan is None or other is None or plan.factors != other.factors:
                raise ValueError(
                    f"{module}: the layers of one stack need one factor shape, but {first[module]} "
                    f"(r={getattr(other, 'r', None)}) and {name} (r={getattr(plan, 'r', None)}) differ; make "
                    "rank_pattern agree across the stack's layers (alpha may differ)"
                )
        return plans

    def _linear_names(self, modules: Mapping[str, Any], config: LycorisConfig) -> list[str]:
        """``"all-linear"``: every ``nnx.Linear``/``LinearGeneral``/``Einsum`` we can adapt. A linear
        layer in a configuration we cannot adapt, or another module holding a kernel of 2 or more
        dims, gets a warning naming it (never a silent skip)."""
        names, skipped = [], []
        for name, module in modules.items():
            if isinstance(module, LycorisLayer):
                names.append(name)
            elif isinstance(module, LINEAR_LAYERS):
                try:
                    kernel_layout_of(module, name)
                    names.append(name)
                except TypeError as err:
                    skipped.append(str(err))
            elif not isinstance(module, nnx.Conv) and getattr(getattr(module, "kernel", None), "ndim", 0) >= 2:
                skipped.append(f"{name}: a {type(module).__name__} holds a kernel but is not a supported layer type")
        targets = config.target_modules
        if skipped and isinstance(targets, str) and targets.lower() == "all-linear":
            warnings.warn(f"target_modules='all-linear' leaves out: {'; '.join(skipped)}", UserWarning, stacklevel=4)
        return names

    def _deterministic(self) -> bool:
        """The model's mode: eval iff it has modules with a mode and all are in eval mode
        (``deterministic`` / ``use_running_average`` True, as ``model.eval()`` leaves them)."""
        modes = [
            value
            for module in self._module_table().values()
            for attr in ("deterministic", "use_running_average")
            if isinstance(value := getattr(module, attr, None), bool)
        ]
        return bool(modes) and all(modes)

    def _inject(
        self, adapter_name: str, config: LycorisConfig, plans: dict[str, Any], fill: Callable[[], None] | None
    ) -> None:
        """Mutate the graph (then ``fill`` the new factors); undo everything if any step fails.
        Factors about to be filled are created as zeros (no random initialisation)."""
        modules = self._modules()
        replaced: list[tuple[Any, Any, nnx.Module]] = []
        updated: list[LycorisLayer] = []
        extra = {"deterministic": self._deterministic()}  # new layers join in the model's mode
        if fill is not None:
            extra["initialize"] = False
        stacked: dict[str, dict[int, Any]] = {}
        for name, plan in plans.items():
            module, index = self._layer_index(name)
            if index is not None:
                stacked.setdefault(module, {})[index] = plan
        try:
            for key in dict.fromkeys(self._layer_index(name)[0] for name in plans):
                path, target = modules[key]
                parent = self._node(path[:-1])
                if isinstance(target, LycorisLayer):
                    updated.append(target)  # before the call: a half-updated layer is rolled back too
                else:
                    replaced.append((parent, path[-1], target))
                if key in stacked:
                    size = len(self._layer_names(key))
                    extra["layers"] = tuple(stacked[key].get(i) for i in range(size))
                else:
                    extra.pop("layers", None)
                self._create_and_replace(config, adapter_name, target, path[-1], parent, key, **extra)
            if fill is not None:
                fill()
        except BaseException:
            for layer in updated:
                layer.delete_adapter(adapter_name)
            for parent, key, original in reversed(replaced):
                _set_child(parent, key, original)
            raise
        self.peft_config = {**self.peft_config, adapter_name: config}

    def _fill(
        self,
        adapter_name: str,
        config: LycorisConfig,
        by_module: dict[str, dict[str, str]],
        other: dict[str, str],
        tensors: Mapping[str, Any],
    ) -> Callable[[], None]:
        for bare, key in sorted(other.items()):
            raise ValueError(
                f"checkpoint key {bare!r} {tuple(tensors[key].shape)}: fits no adapter factor "
                "(modules_to_save weights are not supported by the Flax twin)"
            )

        def fill() -> None:
            table = self._module_table()
            for key, names in by_module.items():
                params, index = table[key].factors[adapter_name], self._layer_index(key)[1]
                for name, ckpt_key in names.items():
                    value = jnp.asarray(tensors[ckpt_key], params[name].dtype)
                    params[name][...] = value if index is None else params[name][...].at[index].set(value)

        return fill

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> jax.Array | None:
        """Merge adapters into every layer's kernel (PEFT's ``merge_adapter``).

        ``safe_merge`` outside ``jax.jit`` raises on NaN/±inf before any kernel changes. Under ``jax.jit``
        (kernels traced) there is nothing to raise on: the check becomes a returned flag with the same
        all-or-nothing rule: every kernel changes if all merged kernels are finite, none otherwise, and
        ``unmerge_adapter`` then subtracts only what was added. Returns that flag (``None`` otherwise).
        """
        traced = any(isinstance(layer.kernel[...], jax.core.Tracer) for _, layer in self._lycoris_layers())
        if not safe_merge or not traced:
            return super().merge_adapter(adapter_names, safe_merge)
        staged = []
        for _, layer in self._lycoris_layers():
            if names := layer._merge_names(adapter_names):
                staged.append((layer, names, layer._merged_weight(names)))
        ok = jnp.array(True)
        for *_, weight in staged:
            ok = ok & jnp.isfinite(weight).all()
        for layer, names, weight in staged:
            layer._set_base_weight(jnp.where(ok, weight, layer.kernel[...]))
            layer.merged_adapters = [*layer.merged_adapters, *names]
            layer._merge_ok = nnx.data({**layer._merge_ok, **{n: nnx.Variable(ok) for n in names}})
        return ok

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts: trainable are :meth:`trainable_filter`'s factors;
        total every ``nnx.Param`` (base and adapters). Shapes suffice (an ``nnx.eval_shape`` tuner)."""
        count = lambda state: sum(math.prod(x.shape) for x in jax.tree.leaves(state))  # noqa: E731
        # a stack holds zero factors for the layers its config leaves out: PEFT has no such parameters
        padding = {name: 0 for name in self.peft_config}
        for _, layer in self._lycoris_layers():
            for name, layers in getattr(layer, "layer_plans", {}).items():
                unused = sum(plan is None for plan in layers)
                padding[name] += unused * sum(math.prod(v.shape[1:]) for v in layer.factors[name].values())
        trainable = sum(padding[n] for n in self.active_adapters if not self.peft_config[n].inference_mode)
        all_padding = sum(padding.values())
        return (
            count(nnx.state(self, self.trainable_filter())) - trainable,
            count(nnx.state(self, nnx.Param)) - all_padding,
        )

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def trainable_filter(self) -> nnx.filterlib.Filter:
        """An NNX filter for the factors that should train: active adapters not in inference mode.

        JAX has no ``requires_grad``: pass this as ``wrt`` to ``nnx.Optimizer`` and ``nnx.DiffState``
        to get PEFT's rule (``wrt=LycorisParam`` trains every adapter's factors).
        """
        trainable = frozenset(n for n in self.active_adapters if not self.peft_config[n].inference_mode)

        def is_trainable(path: tuple[Any, ...], _: Any) -> bool:
            return any(a == "factors" and b in trainable for a, b in itertools.pairwise(path))

        return nnx.All(LycorisParam, is_trainable)

    # ------------------------------------------------------------------ framework hooks
    def _unload_layers(self) -> None:
        for _, (path, module) in self._modules().items():
            if isinstance(module, LycorisLayer):
                _set_child(self._node(path[:-1]), path[-1], module.get_base_layer())

    def _module_factors(self, key: str, layer: LycorisLayer, adapter_name: str) -> dict[str, dict[str, Any]]:
        """A stack saves one module per targeted layer (``layers.<i>.attn.q``), as PEFT names them."""
        tensors = self._factor_tensors(layer, adapter_name)
        layers = getattr(layer, "layer_plans", {}).get(adapter_name)
        if layers is None:
            return {key: tensors}
        names = self._layer_names(key)
        return {
            names[i]: {f: _row(v, i) for f, v in tensors.items()} for i, plan in enumerate(layers) if plan is not None
        }

    def _factor_tensors(self, layer: LycorisLayer, adapter_name: str) -> dict[str, jax.Array]:
        return {name: param.get_value() for name, param in layer.factors[adapter_name].items()}

    @staticmethod
    def _read_state(path: str) -> dict[str, jax.Array]:
        return load_file(path)

    @staticmethod
    def _serialize_state(tensors: Mapping[str, jax.Array]) -> bytes:
        return save(dict(tensors), SAFETENSORS_METADATA)

    @staticmethod
    def _all_finite(tensor: jax.Array) -> bool:
        return bool(jnp.isfinite(tensor).all())


def _row(value: Any, i: int) -> Any:
    """Layer ``i`` of a stacked factor (a shape for an ``nnx.eval_shape`` tuner)."""
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
    return value[i]


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
    layers_mapping: ClassVar[dict[type[nnx.Module], type[LycorisLayer]]] = dict.fromkeys(SUPPORTED_LAYERS, LoHaLayer)


class LoKrModel(LycorisTuner):
    """LoKr (low-rank Kronecker product) adapters on a Flax NNX model."""

    prefix = "lokr_"
    config_cls = LoKrConfig
    layers_mapping: ClassVar[dict[type[nnx.Module], type[LycorisLayer]]] = dict.fromkeys(SUPPORTED_LAYERS, LoKrLayer)
