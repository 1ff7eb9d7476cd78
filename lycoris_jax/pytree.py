"""LyCORIS adapters over a params pytree: no module surgery, any Flax (Linen or NNX) or raw model.

>>> import jax, jax.numpy as jnp
>>> from lycoris_jax import pytree, LoKrConfig
>>> params = {"dense": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}}
>>> adapter = pytree.init(params, LoKrConfig(r=2, target_modules=["dense"]), key=jax.random.key(0))
>>> sorted(adapter.factors["dense"])
['lokr_w1', 'lokr_w2']
>>> merged = pytree.merge(params, adapter)  # kernel + ΔW, same tree structure
>>> jax.tree.structure(merged) == jax.tree.structure(params)
True

A *module* is the subtree holding a ``kernel`` leaf (Flax layout: ``(in, out)``, ``(*k, in/g, out)``)
or a ``weight`` leaf of 2 or more dims (PyTorch layout: ``(out, in)``, ``(out, in/g, *k)``). Its name
is the dotted path of that subtree (``model.layers.0.self_attn.q_proj`` in ``FlaxLlamaForCausalLM``),
which is the torch twin's module name, so ``target_modules``, ``exclude_modules``,
``layers_to_transform``, ``rank_pattern``/``alpha_pattern`` and the checkpoint keys mean what they
mean in PEFT. A 3-D Flax kernel can be a Conv1d, a ``DenseGeneral`` or a stack of layers: targeting
one needs ``kinds`` (never a silent guess); a ``DenseGeneral``/``Einsum`` kernel is the ``nn.Linear``
it equals, its input axes and output axes each flattened in C order.

The :class:`Adapter` is a pytree whose leaves are exactly the factor arrays (PEFT's names and
layouts), so ``jax.grad``, optax, orbax and ``jax.device_put`` take it as it is; its plans and
config are static. Files are PEFT's, in both directions, with the same checks and crash-safe
writes as the NNX tuner (``lycoris_core.files``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lycoris_core import (
    SAFETENSORS_METADATA,
    AdapterPlan,
    LayerShape,
    LycorisConfig,
    check_adapter_name,
    checkpoint_key,
    config_from_dict,
    kohya,
)
from lycoris_core.errors import CheckpointError
from lycoris_core.files import Checkpoint, read_adapter_files, save_adapters
from lycoris_core.plan import factor_names
from lycoris_core.resolve import Layer, check_peft_plans, resolve, saved_config, table_shapes
from lycoris_core.state import check_checkpoint, check_scale
from lycoris_core.targets import NoMatchingModuleError
from lycoris_core.tensors import dump_safetensors, read_tensors
from lycoris_jax import functional
from lycoris_jax.adapted import Active, Site, delta_kernel, dropout_draws, merge_kernel
from lycoris_jax.methods import method_for

__all__ = [
    "Adapter",
    "KindSpec",
    "Rename",
    "Target",
    "delta_weight",
    "from_pretrained",
    "init",
    "merge",
    "read_config",
    "save_pretrained",
]

Kind = Literal["linear", "conv1d", "conv2d"]
_KINDS = ("linear", "conv1d", "conv2d")


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted kernel: its leaf name (``"kernel"``: Flax layout, ``"weight"``: PyTorch layout),
    the adapter's plan (shapes in PyTorch layout, as in PEFT's files) and how a Flax kernel holds
    that layout (``functional.KernelLayout``: a ``DenseGeneral``/``Einsum`` kernel is the Linear it equals)."""

    leaf: Literal["kernel", "weight"]
    plan: AdapterPlan
    layout: functional.KernelLayout | None = None
    #: The module's path in the params tree (its name in PEFT's files may differ: ``rename``).
    path: tuple[str, ...] = ()
    #: A stacked kernel (leading layer axis, ``stacks``): per layer ``(module name, plan)``, or ``None``
    #: for a layer the config does not target (its factors stay zero, its scale 0). Empty otherwise.
    layers: tuple[tuple[str, AdapterPlan] | None, ...] = ()
    #: The kernel's partition spec (mesh axis names per kernel dim) when it was placed with a
    #: ``NamedSharding``: factors were placed to match, and ΔW is formed in these shards.
    spec: tuple[Any, ...] | None = None
    #: ``kinds`` described this module (the Linen transform then adapts a layer class it does not
    #: know, such as transformers' ``FlaxConv1D``, through its own call).
    declared: bool = False

    def module_plans(self, name: str) -> dict[str, AdapterPlan]:
        """``{module name: plan}`` as PEFT sees them: one per targeted layer of a stack."""
        return {entry[0]: entry[1] for entry in self.layers if entry} if self.layers else {name: self.plan}


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["factors"],
    meta_fields=["targets", "config_json", "adapter_name", "module_names"],
)
@dataclasses.dataclass(frozen=True)
class Adapter:
    """Factors ``{module: {factor: array}}`` (the only leaves) and static ``targets``
    (``((module, Target), ...)``), config (as JSON), adapter name, and the module names of the params
    it was made for (what a saved config must select among)."""

    factors: dict[str, dict[str, jax.Array]]
    targets: tuple[tuple[str, Target], ...]
    config_json: str
    adapter_name: str = "default"
    module_names: tuple[str, ...] = ()

    @property
    def config(self) -> LycorisConfig:
        return config_from_dict(json.loads(self.config_json))

    @property
    def plans(self) -> dict[str, AdapterPlan]:
        """``{module name: plan}`` as PEFT names them (a stack's targeted layers one by one)."""
        return {name: plan for module, target in self.targets for name, plan in target.module_plans(module).items()}

    def state_dict(self) -> dict[str, jax.Array]:
        """The factors under PEFT's checkpoint keys (``base_model.model.<module>.<factor>``); a stack's
        factors one key per targeted layer (``...layers.<i>.q_proj.lokr_w1``)."""
        out = {}
        for module, target in self.targets:
            factors = self.factors[module]
            if not target.layers:
                out.update({checkpoint_key(module, name): value for name, value in factors.items()})
                continue
            for i, entry in enumerate(target.layers):
                if entry is not None:
                    out.update({checkpoint_key(entry[0], name): value[i] for name, value in factors.items()})
        return out


# ---------------------------------------------------------------- finding kernels
def _key_name(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaf_names(path: Sequence[Any]) -> tuple[str, ...]:
    """A leaf's key path as names, without the ``.value`` of an ``nnx.Variable`` in an ``nnx.State``."""
    names = tuple(_key_name(e) for e in path)
    if len(names) > 1 and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        names = names[:-1]
    return names


#: ``rename``: a module's dotted path in the params tree -> its name in PEFT's files (the torch
#: twin's module name), as a function or a mapping (names it lacks stay as they are).
Rename = Callable[[str], str] | Mapping[str, str] | None


def _renamer(rename: Rename) -> Callable[[str], str]:
    """``rename`` as a function (shared with ``lycoris_jax.linen``)."""
    if rename is None:
        return lambda name: name
    if isinstance(rename, Mapping):
        return lambda name: rename.get(name, name)
    return rename


class _Kernel(NamedTuple):
    """A module found in ``params``: its leaf name, array and path; for a stacked kernel the module
    name of each layer (the layer axis leads the array)."""

    leaf: str
    array: Any
    path: tuple[str, ...]
    layers: tuple[str, ...] = ()

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """One layer's kernel shape."""
        return tuple(self.array.shape[1:] if self.layers else self.array.shape)


def _kernels(params: Any, rename: Rename = None, stacks: Sequence[str] = ()) -> dict[str, _Kernel]:
    """``{module: _Kernel}`` for every ``kernel`` leaf and every ``weight`` of >= 2 dims; the name is
    ``rename`` of the dotted path. Below a ``stacks`` prefix the leading axis is the layer axis: the
    module is ``<stack>.*.<rest>`` and layer ``i`` is named ``rename("<stack>.<i>.<rest>")``."""
    to_name = _renamer(rename)
    prefixes = [tuple(stack.split(".")) for stack in stacks]
    found: dict[str, _Kernel] = {}
    sizes: dict[tuple[str, ...], tuple[int, str]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = _leaf_names(path)
        ndim = getattr(leaf, "ndim", 0)
        if not names or names[-1] not in ("kernel", "weight") or (names[-1] == "weight" and ndim < 2):
            continue
        module_path = names[:-1]
        stack = next((p for p in prefixes if module_path[: len(p)] == p), None)
        if stack is None:
            module, layers = to_name(".".join(module_path)), ()
        else:
            rest, where = module_path[len(stack) :], ".".join(names)
            if ndim < 3:
                raise ValueError(f"{where}: a {ndim}-D kernel under the stack {'.'.join(stack)!r} has no layer axis")
            size, first = sizes.setdefault(stack, (leaf.shape[0], where))
            if leaf.shape[0] != size:
                raise ValueError(
                    f"stack {'.'.join(stack)!r}: its kernels must share the leading layer axis, "
                    f"got {size} for {first} and {leaf.shape[0]} for {where}"
                )
            module = ".".join((*stack, "*", *rest))
            layers = tuple(to_name(".".join((*stack, str(i), *rest))) for i in range(size))
        if module in found:
            raise ValueError(
                f"{module}: two kernels have this name ({'.'.join(found[module].path)} and {'.'.join(module_path)})"
            )
        found[module] = _Kernel(names[-1], leaf, module_path, layers)
    empty = [".".join(p) for p in prefixes if p not in sizes]
    if empty:
        raise ValueError(f"stacks: {empty} hold no kernel of params")
    return found


#: A ``kinds`` entry: a layer kind, or ``(in_axes, out_axes)`` of a kernel that is the Linear it equals.
KindSpec = Kind | tuple[tuple[int, ...], tuple[int, ...]]


def _spec(module: str, kinds: Mapping[str, KindSpec]) -> KindSpec | None:
    return next((spec for pattern, spec in kinds.items() if re.fullmatch(pattern, module)), None)


def _layout(module: str, leaf: str, shape: tuple[int, ...], kinds: Mapping[str, KindSpec]) -> tuple[Kind, Any]:
    """``(kind, KernelLayout or None)`` of a kernel; a 3-D Flax kernel must be described in ``kinds``."""
    ndim, spec = len(shape), _spec(module, kinds)
    if isinstance(spec, tuple):
        in_axes, out_axes = (tuple(int(a) for a in axes) for axes in spec)
        if leaf != "kernel" or sorted((*in_axes, *out_axes)) != list(range(ndim)) or not in_axes or not out_axes:
            raise ValueError(f"{module}: kinds (in_axes, out_axes) {spec} must split the {ndim} axes of its kernel")
        return "linear", functional.KernelLayout(shape, in_axes, out_axes)
    if spec is not None:
        if spec not in _KINDS:
            raise ValueError(f"kinds for {module}: expected one of {list(_KINDS)} or (in_axes, out_axes), got {spec!r}")
        expected = {"linear": 2, "conv1d": 3, "conv2d": 4}[spec]
        if ndim != expected:
            raise ValueError(f"{module}: kinds says {spec} ({expected}-D kernel), but its {leaf} is {ndim}-D")
        kind = spec
    elif ndim == 2:
        kind = "linear"
    elif ndim == 4:
        kind = "conv2d"
    elif ndim == 3 and leaf == "weight":
        kind = "conv1d"
    else:
        raise ValueError(
            f"{module}: a {ndim}-D {leaf} could be a Conv1d, a DenseGeneral or a stack of layers; say which with "
            f"kinds={{{module!r}: 'conv1d'}} or kinds={{{module!r}: (in_axes, out_axes)}} (for a Linen module, "
            "lycoris_jax.linen.adapt(..., example_args=...) finds out)"
        )
    return kind, (functional.KernelLayout(shape) if leaf == "kernel" else None)  # type: ignore[return-value]


def _layer_shape(kind: Kind, leaf: str, shape: tuple[int, ...], layout: Any) -> LayerShape:
    if layout is not None and layout.in_axes is not None:
        return LayerShape("linear", *layout.linear_features)
    if leaf == "weight":  # PyTorch layout (out, in/g, *k)
        out, inp, *kernel = shape
    else:  # Flax layout (*k, in/g, out)
        *kernel, inp, out = shape
    return LayerShape(kind, out, inp, tuple(kernel))


def _table(
    kernels: Mapping[str, _Kernel],
    kinds: Mapping[str, KindSpec],
    output_modules: Sequence[str],
) -> tuple[dict[str, Layer], dict[str, tuple[Kind, Any]]]:
    """The resolver's table for the kernels of a params tree (a stack's layers one by one), and each
    adaptable module's ``(kind, layout)``. A layer's kind comes from ``kinds`` or its kernel's rank;
    what cannot be told (a 3-D Flax kernel) or is no float kernel is an error if targeted, and
    ``"all-linear"`` says what it leaves out: such kernels, and 2-D PyTorch-layout ``weight`` leaves,
    which may as well be embeddings (``kinds={name: "linear"}`` declares the linear ones)."""
    table: dict[str, Layer] = {}
    layouts: dict[str, tuple[Kind, Any]] = {}
    for module, k in kernels.items():
        for name in k.layers or (module,):
            spec = _spec(name, kinds)
            output = any(name == m or name.endswith(f".{m}") for m in output_modules)
            stack = module if k.layers else None
            if not jnp.issubdtype(k.array.dtype, jnp.floating):
                error = TypeError(f"{module}.{k.leaf}: expected a floating-point kernel, got {k.array.dtype}")
                table[name] = Layer(error=error, output=output, stack=stack)
                continue
            try:
                kind, layout = _layout(name, k.leaf, k.layer_shape, kinds)
            except ValueError as err:
                unknown = k.leaf == "kernel" and len(k.layer_shape) == 3 and spec is None
                skip = (
                    "3-D kernels that may be DenseGeneral/Einsum layers: {}; describe them with "
                    "kinds={{name: (in_axes, out_axes)}} (or name their stack in stacks=) to include them"
                    if unknown
                    else ""
                )
                table[name] = Layer(error=err, skip=skip, output=output, stack=stack)
                continue
            layouts[name] = (kind, layout)
            declared = isinstance(spec, tuple) or spec == "linear"
            ambiguous = k.leaf == "weight" and kind == "linear" and not declared
            table[name] = Layer(
                _layer_shape(kind, k.leaf, k.layer_shape, layout),
                linear=kind == "linear" and not ambiguous,
                skip=(
                    "2-D PyTorch-layout weight leaves, which may be Linear or Embedding layers: {}; declare the "
                    "linear ones with kinds={{name: 'linear'}} to include them"
                    if ambiguous
                    else ""
                ),
                output=output,
                stack=stack,
            )
    return table, layouts


def _targets(
    params: Any,
    config: LycorisConfig,
    kinds: Mapping[str, KindSpec] | None,
    output_modules: Sequence[str],
    rename: Rename = None,
    stacks: Sequence[str] = (),
    *,
    table: Callable[[dict[str, Layer]], dict[str, Layer]] | None = None,
    one_scale_per_stack: bool = False,
    plans: Mapping[str, AdapterPlan] | None = None,
) -> dict[str, Target]:
    """Match the config's targets against the modules of ``params`` (``lycoris_core.resolve``; a stack's
    layers one by one, as PEFT sees the unstacked model) and plan each (no arrays made). ``table``:
    a hook that refines the table (the Linen transform adds what a traced call shows)."""
    if not isinstance(config, LycorisConfig):
        raise TypeError(f"config: expected a LoHaConfig or LoKrConfig, got {type(config).__name__}")
    method_for(config.peft_type)
    kernels, kinds = _kernels(params, rename, stacks), kinds or {}
    rows, layouts = _table(kernels, kinds, output_modules)
    if table is not None:
        rows = table(rows)
    plans = resolve(
        config,
        rows,
        modules_to_save=False,
        one_scale_per_stack=one_scale_per_stack,
        front_end="the pytree API",
        plans=plans,
    )
    targets = {}
    for module, k in kernels.items():
        chosen = [name for name in (k.layers or (module,)) if name in plans]
        if not chosen:
            continue
        plan, layout = plans[chosen[0]], layouts[chosen[0]][1]
        if k.layers:
            odd = [n for n in chosen if layouts[n][1] != layout]
            if odd:
                raise ValueError(
                    f"{module}: the layers of one stack need one layout, but kinds gives {chosen[0]} and {odd[0]} "
                    "different ones; make kinds agree across the stack's layers"
                )
        layers = tuple((n, plans[n]) if n in plans else None for n in k.layers)
        placed = functional.array_spec(k.array)
        declared = _spec(chosen[0], kinds) is not None
        targets[module] = Target(k.leaf, plan, layout, k.path, layers, placed[0] if placed else None, declared)
    return targets


def _placed(factors: dict, targets: dict[str, Target], kernels: dict[str, _Kernel]) -> dict:
    """Each module's factors placed like its kernel (where the kernel has a ``NamedSharding``)."""
    out = {}
    for module, values in factors.items():
        target, placed = targets[module], functional.array_spec(kernels[module].array)
        if placed is None or target.layout is None:
            out[module] = values
            continue
        out[module] = functional.place_factors(
            values, target.plan, target.layout, placed[0], placed[1], stacked=bool(target.layers)
        )
    return out


def _adapter(
    factors: dict, targets: dict[str, Target], config: LycorisConfig, adapter_name: str, kernels: dict[str, _Kernel]
) -> Adapter:
    names = tuple(name for module, k in kernels.items() for name in (k.layers or (module,)))
    return Adapter(factors, tuple(sorted(targets.items())), config.to_json_string(), adapter_name, names)


# ---------------------------------------------------------------- the four functions
def init(
    params: Any,
    config: LycorisConfig,
    *,
    key: jax.Array,
    adapter_name: str = "default",
    kinds: Mapping[str, KindSpec] | None = None,
    output_modules: Sequence[str] = ("lm_head",),
    autocast_adapter_dtype: bool = True,
    rename: Rename = None,
    stacks: Sequence[str] = (),
) -> Adapter:
    """Plan and initialise adapters for the targeted kernels of ``params`` (PEFT's initialisation:
    zeros or PyTorch's Kaiming uniform, one key per module from ``key``).

    ``kinds`` maps module names (regexes, full match) to ``"linear"``/``"conv1d"``/``"conv2d"`` where
    the kernel's rank is ambiguous, or to ``(in_axes, out_axes)`` for a ``DenseGeneral``/``Einsum``
    kernel (the Linear it equals: input and output axes each flattened in C order); ``output_modules`` are left out of ``"all-linear"`` (PEFT's
    output embedding); ``rename`` maps module paths to the names PEFT's files use where they differ
    (diffusers' Flax ``down_blocks_0`` is torch's ``down_blocks.0``). ``stacks`` names the module
    paths of scanned layer stacks (``"model.layers"``): kernels below one carry a leading layer axis,
    layer ``i`` is the module ``model.layers.<i>...`` for every config field and checkpoint key, and
    its factors are stacked on that axis. Factors are float32 for a bf16/fp16 base (PEFT's
    autocast), else the base dtype; keys per module are drawn as on the unstacked model.
    """
    check_adapter_name(adapter_name)
    targets = _targets(params, config, kinds, output_modules, rename, stacks)
    return _initialise(params, targets, config, key, adapter_name, autocast_adapter_dtype, rename, stacks)


def _initialise(
    params: Any,
    targets: dict[str, Target],
    config: LycorisConfig,
    key: jax.Array,
    adapter_name: str,
    autocast_adapter_dtype: bool,
    rename: Rename,
    stacks: Sequence[str],
) -> Adapter:
    """The adapter with PEFT's initial factors for ``targets`` (one key per module, drawn from ``key``
    as on the unstacked model)."""
    kernels = _kernels(params, rename, stacks)
    per_layer = sorted(name for module, target in targets.items() for name in target.module_plans(module))
    keys = dict(zip(per_layer, jax.random.split(key, len(per_layer)), strict=True))  # as on the unstacked model
    factors = {}
    for module, target in targets.items():
        kernel_dtype = kernels[module].array.dtype
        dtype = functional.adapter_dtype(kernel_dtype, autocast_adapter_dtype)

        def one(name: str, plan: AdapterPlan, kernel_dtype: Any = kernel_dtype, dtype: Any = dtype) -> dict:
            split = iter(jax.random.split(keys[name], len(plan.factors)))
            return functional.init_factors(lambda: next(split), plan, dtype, kernel_dtype)

        if not target.layers:
            factors[module] = one(module, target.plan)
            continue
        zeros = {name: jnp.zeros(shape, dtype) for name, shape in target.plan.factor_shapes.items()}
        per = [one(*entry) if entry else zeros for entry in target.layers]
        factors[module] = {name: jnp.stack([p[name] for p in per]) for name in zeros}
    return _adapter(_placed(factors, targets, kernels), targets, config, adapter_name, kernels)


def _site(target: Target, *, stacked: bool = False) -> Site:
    """The adapted-call view of a target (a stack's layers: their shards are placed on the whole)."""
    return Site(target.layout, None if stacked else target.spec)


def _per_layer_scales(target: Target, scale: Any) -> jax.Array:
    """A stack's ``scale * alpha / r`` per layer (0 for the layers the config leaves out)."""
    per_layer = [entry[1].scaling if entry else 0.0 for entry in target.layers]
    if isinstance(scale, (int, float)):
        return jnp.asarray([scale * s for s in per_layer], jnp.result_type(float))
    return scale * jnp.asarray(per_layer, jnp.result_type(float))


def _layer_keys(target: Target, key: jax.Array | None) -> Any:
    return None if key is None else jax.random.split(key, len(target.layers))


def delta_weight(adapter: Adapter, module: str, *, scale: Any = 1.0, key: jax.Array | None = None) -> jax.Array:
    """ΔW of one module in its kernel's own layout, scaled by ``scale * alpha / r``; with ``key``,
    rank dropout (rows of ΔW) and module dropout (all of ΔW) as in PEFT's training forward. A stack's
    ΔW is stacked like its kernel (layers the config leaves out get zeros)."""
    target = dict(adapter.targets)[module]
    factors = adapter.factors[module]

    def one(factors: Mapping[str, jax.Array], scaling: Any, key: Any, site: Site) -> jax.Array:
        rows, keep = dropout_draws(target.plan, key, jnp.result_type(*factors.values()))
        delta = delta_kernel(Active(target.plan, factors, scaling), site, rows)
        return delta if keep is True else jnp.where(keep, delta, jnp.zeros_like(delta))

    if not target.layers:
        return one(factors, scale * target.plan.scaling, key, _site(target))
    layer = lambda f, s, k: one(f, s, k, _site(target, stacked=True))  # noqa: E731
    delta = jax.vmap(layer)(factors, _per_layer_scales(target, scale), _layer_keys(target, key))
    return functional.constrain(delta, target.spec)


def merge(params: Any, adapter: Adapter, *, scale: Any = 1.0, key: jax.Array | None = None) -> Any:
    """``params`` with every targeted kernel replaced by ``kernel + ΔW`` (in the kernel's layout and
    dtype, PEFT's merge arithmetic); same tree structure; differentiable in ``adapter`` and jittable.
    Training through it is the ``"merged"`` forward path (``lycoris_core.paths``): one matmul per
    layer; the backward pass takes the factors' gradients from the kernel's without forming ΔW
    (``lycoris_jax.adapted.merge_kernel``).

    ``scale`` multiplies every module's ``alpha / r`` (``set_scale``; a traced value is fine).
    ``key`` applies rank and module dropout as in PEFT's training forward (one draw per module).
    """
    if isinstance(scale, (int, float)):
        check_scale("merge: scale", scale)
    by_path = {target.path: (module, target) for module, target in adapter.targets}
    keys = (
        dict(zip(sorted(dict(adapter.targets)), jax.random.split(key, len(by_path)), strict=True))
        if key is not None
        else {}
    )

    def one(kernel: jax.Array, target: Target, factors: Mapping, scaling: Any, key: Any, site: Site) -> jax.Array:
        rows, keep = dropout_draws(target.plan, key, jnp.result_type(*factors.values()))
        return merge_kernel(kernel, [(Active(target.plan, factors, scaling), rows, keep)], site)

    def replace(path: Any, leaf: Any) -> Any:
        names = _leaf_names(path)
        module, target = by_path.get(names[:-1], (None, None))
        if target is None or names[-1] != target.leaf:
            return leaf
        one_layer = target.layout.shape if target.layout is not None else target.plan.weight_shape
        expected = (len(target.layers), *one_layer) if target.layers else tuple(one_layer)
        if tuple(leaf.shape) != expected:
            raise ValueError(f"{module}.{target.leaf}: shape {tuple(leaf.shape)} does not fit the adapter's {expected}")
        factors, key = adapter.factors[module], keys.get(module)
        if not target.layers:
            return one(leaf, target, factors, scale * target.plan.scaling, key, _site(target))
        layer = lambda w, f, s, k: one(w, target, f, s, k, _site(target, stacked=True))  # noqa: E731
        merged = jax.vmap(layer)(leaf, factors, _per_layer_scales(target, scale), _layer_keys(target, key))
        return functional.constrain(merged, target.spec)

    present = {k.path for k in _kernels(params).values()}
    missing = sorted(module for module, target in adapter.targets if target.path not in present)
    if missing:
        raise ValueError(f"the adapter targets modules these params lack: {missing}")
    return jax.tree_util.tree_map_with_path(replace, params)


def save_pretrained(adapter: Adapter, directory: str | os.PathLike) -> None:
    """PEFT's files (``adapter_config.json`` + ``adapter_model.safetensors``; a non-default adapter
    name goes to ``directory/<name>/``), written crash-safely; ``PeftModel.from_pretrained`` on the
    torch twin of the model loads them. The config names exactly the modules the adapter holds."""
    tensors = {k: np.asarray(jax.device_get(v)) for k, v in adapter.state_dict().items()}
    if not tensors:
        raise ValueError("nothing to save: the adapter holds no factors")
    names = adapter.module_names or tuple(adapter.plans)
    check_peft_plans(adapter.config, adapter.plans)
    config = saved_config(adapter.config, adapter.plans, names)
    save_adapters(directory, {adapter.adapter_name: (config, dump_safetensors(tensors, SAFETENSORS_METADATA))})


def save_lycoris(adapter: Adapter, path: str | os.PathLike, *, prefix: str = kohya.LYCORIS_PREFIX) -> None:
    """A LyCORIS/kohya single file (crash-safe) computing what ``adapter`` computes, for lycoris-lora
    and kohya-style tools (``lycoris_core.kohya.save_adapter``)."""
    tensors = {k: np.asarray(jax.device_get(v)) for k, v in adapter.state_dict().items()}
    kohya.save_adapter(path, adapter.config, tensors, adapter.plans, prefix=prefix, where=adapter.adapter_name)


def module_names(params: Any, *, rename: Rename = None, stacks: Sequence[str] = ()) -> list[str]:
    """The module names (PEFT's, after ``rename``; a stack's layers one by one) of every kernel in ``params``."""
    return [name for module, k in _kernels(params, rename, stacks).items() for name in (k.layers or (module,))]


def from_lycoris(
    path: str | os.PathLike,
    params: Any,
    *,
    prefix: str | None = None,
    adapter_name: str = "default",
    kinds: Mapping[str, KindSpec] | None = None,
    output_modules: Sequence[str] = ("lm_head",),
    autocast_adapter_dtype: bool = True,
    allow_nonfinite: bool = False,
    rename: Rename = None,
    stacks: Sequence[str] = (),
) -> Adapter:
    """Load a LyCORIS/kohya single-file adapter for ``params``: its underscore names resolve against
    :func:`module_names` (``prefix``: the file's, found when not given), and it computes what
    lycoris-lora computes (``lycoris_core.kohya.lycoris_adapter``: a factorization no PEFT config gives
    keeps the file's plan); other arguments as in :func:`from_pretrained`."""
    plan = lambda config, own: _targets(params, config, kinds, output_modules, rename, stacks, plans=own)  # noqa: E731
    return _from_file(
        path,
        params,
        plan,
        prefix,
        adapter_name,
        kinds,
        output_modules,
        autocast_adapter_dtype,
        allow_nonfinite,
        rename,
        stacks,
    )


def _from_file(
    path: str | os.PathLike,
    params: Any,
    plan: Callable[[LycorisConfig, Mapping[str, AdapterPlan]], dict[str, Target]],
    prefix: str | None,
    adapter_name: str,
    kinds: Mapping[str, KindSpec] | None,
    output_modules: Sequence[str],
    autocast_adapter_dtype: bool,
    allow_nonfinite: bool,
    rename: Rename,
    stacks: Sequence[str],
) -> Adapter:
    """A LyCORIS file's adapter on the targets ``plan(config, the file's own plans)`` gives (the pytree
    API's or the Linen transform's); errors name the file and its modules."""
    check_adapter_name(adapter_name)
    rows, _ = _table(_kernels(params, rename, stacks), kinds or {}, output_modules)
    source = kohya.read_lycoris(path, allow_nonfinite=allow_nonfinite)
    config, tensors, own = kohya.lycoris_adapter(source, table_shapes(rows), prefix=prefix)
    return _build(
        source.path,
        config,
        Checkpoint(source.path, tensors),
        params,
        lambda config: plan(config, own),
        adapter_name,
        autocast_adapter_dtype,
        rename,
        stacks,
    )


def read_config(directory: str | os.PathLike) -> LycorisConfig:
    """The adapter config of a PEFT directory (``lycoris_core``'s checks and errors)."""
    return read_adapter_files(directory).config


def from_pretrained(
    directory: str | os.PathLike,
    params: Any,
    *,
    adapter_name: str = "default",
    kinds: Mapping[str, KindSpec] | None = None,
    output_modules: Sequence[str] = ("lm_head",),
    autocast_adapter_dtype: bool = True,
    allow_nonfinite: bool = False,
    rename: Rename = None,
    stacks: Sequence[str] = (),
) -> Adapter:
    """Load a PEFT adapter directory for ``params`` (e.g. one PEFT saved for the torch twin).

    Every key, factor set, shape and dtype is checked against the plans for ``params`` before any
    array is made; errors name the file (:class:`lycoris_core.CheckpointError`). Values are cast to
    the adapter dtype (float32 for a bf16/fp16 base).
    """
    check_adapter_name(adapter_name)
    plan = lambda config: _targets(params, config, kinds, output_modules, rename, stacks)  # noqa: E731
    return _load(directory, params, plan, adapter_name, autocast_adapter_dtype, allow_nonfinite, rename, stacks)


def _load(
    directory: str | os.PathLike,
    params: Any,
    plan: Callable[[LycorisConfig], dict[str, Target]],
    adapter_name: str,
    autocast_adapter_dtype: bool,
    allow_nonfinite: bool,
    rename: Rename,
    stacks: Sequence[str],
) -> Adapter:
    """A PEFT directory's adapter on the targets ``plan(config)`` gives (the pytree API's or the Linen
    transform's), every key, factor set, shape and dtype checked first; errors name the file."""
    files = read_adapter_files(directory)
    try:
        method_for(files.config.peft_type)
    except ValueError as err:
        raise CheckpointError(files.weights, f"the pytree API cannot load it: {err}") from None
    tensors = read_tensors(files, allow_nonfinite=allow_nonfinite)
    return _build(
        os.fspath(directory), files.config, tensors, params, plan, adapter_name, autocast_adapter_dtype, rename, stacks
    )


def _build(
    source: str,
    config: LycorisConfig,
    tensors: Checkpoint,
    params: Any,
    plan: Callable[[LycorisConfig], dict[str, Target]],
    adapter_name: str,
    autocast_adapter_dtype: bool,
    rename: Rename,
    stacks: Sequence[str],
) -> Adapter:
    """The adapter of ``config`` with the values of ``tensors`` (PEFT's keys, read from ``source``: a
    directory or a LyCORIS file) on the targets ``plan(config)`` gives, every factor checked first."""
    try:
        targets = plan(config)
    except NoMatchingModuleError as err:
        raise NoMatchingModuleError(f"{source}: the adapter's config: {err}") from None
    kernels = _kernels(params, rename, stacks)
    plans = {name: plan for module, target in targets.items() for name, plan in target.module_plans(module).items()}
    every = [name for module, k in kernels.items() for name in (k.layers or (module,))]
    try:
        by_module, other = check_checkpoint(
            plans, {k: tuple(v.shape) for k, v in tensors.items()}, factor_names(config.peft_type), every
        )
    except ValueError as err:
        raise CheckpointError(tensors.path, str(err)) from None
    if other:
        raise CheckpointError(tensors.path, f"keys that are no {config.peft_type} factors: {sorted(other.values())}")
    factors = {}
    for module, target in targets.items():
        dtype = functional.adapter_dtype(kernels[module].array.dtype, autocast_adapter_dtype)

        def values(name: str, dtype: Any = dtype) -> dict[str, jax.Array]:
            return {factor: jnp.asarray(tensors[key], dtype) for factor, key in by_module[name].items()}

        if not target.layers:
            factors[module] = values(module)
            continue
        zeros = {name: jnp.zeros(shape, dtype) for name, shape in target.plan.factor_shapes.items()}
        per = [values(entry[0]) if entry else zeros for entry in target.layers]
        factors[module] = {name: jnp.stack([p[name] for p in per]) for name in zeros}
    return _adapter(_placed(factors, targets, kernels), targets, config, adapter_name, kernels)
