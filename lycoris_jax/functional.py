"""Operations shared by every LyCORIS layer (JAX twin of ``lycoris_torch.functional``).

Also the one place where PyTorch layouts meet Flax layouts: :func:`to_flax_kernel` and
:func:`to_torch_layout`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lycoris_core import AdapterPlan, fan_in
from lycoris_core.paths import Split
from lycoris_core.sharding import factor_specs

__all__ = [
    "KernelLayout",
    "adapter_dtype",
    "apply_rank_dropout",
    "array_spec",
    "call_with_kernel",
    "compiling_for",
    "constrain",
    "default_precision",
    "einsum",
    "einsum_axes",
    "factor_sharding",
    "forward_with_weight",
    "init_factors",
    "kaiming_uniform",
    "kernel_spec",
    "like",
    "place_factors",
    "rank_dropout_keep",
    "rank_dropout_rows",
    "reshape",
    "scaled",
    "shard_like",
    "split_of",
    "target_platform",
    "to_flax_kernel",
    "to_torch_layout",
]


_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("lycoris_jax_platform", default=None)


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Trace adapter calls for ``platform`` (``"cpu"``, ``"gpu"``, ``"tpu"``) rather than JAX's default
    backend: for compiling ahead of time for other devices (a TPU topology on a CPU host, as
    ``benchmarks/tpu_aot.py`` does). The forward path and the fold (``lycoris_core.paths``) follow it.
    A function jitted and traced before keeps its trace (JAX's cache does not see the platform; the
    paths compute the same values either way, in another order): trace fresh functions inside, as B6
    does, or call ``jax.clear_caches()`` first.

    >>> with compiling_for("tpu"):
    ...     lowered = jax.jit(step).lower(*abstract_args)  # doctest: +SKIP
    """
    if platform not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"compiling_for: platform must be 'cpu', 'gpu' or 'tpu', got {platform!r}")
    token = _PLATFORM.set(platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def target_platform() -> str:
    """The platform adapter calls are traced for: :func:`compiling_for`'s, else JAX's default backend
    (``"cuda"``/``"rocm"`` read as ``"gpu"``)."""
    platform = _PLATFORM.get() or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def default_precision() -> bool:
    """Matmuls run at the platform's default precision (``jax_default_matmul_precision`` unset or
    the fastest level): a TPU then rounds float32 operands to bf16."""
    return jax.config.jax_default_matmul_precision in (None, "default", "fastest", "bfloat16", "DEFAULT")


def _explicit_spec(x: Any) -> tuple[Any, ...] | None:
    """``x``'s partition spec (padded to its rank) under an all-Explicit mesh, else ``None``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.are_all_axes_explicit:
        return None
    spec = tuple(jax.typeof(x).sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def split_of(x: jax.Array, kernel: jax.Array) -> Split:
    """How a layer call on ``x`` with ``kernel`` is divided over devices (``lycoris_core.paths.Split``),
    as their types show under an all-Explicit mesh: ``x``'s leading (token) dims and the kernel's
    mesh axes. ``Split()`` otherwise: Auto axes are not visible while tracing, so the cost rule then
    compares global sizes."""
    x_spec, k_spec = _explicit_spec(x), _explicit_spec(kernel)
    if x_spec is None or k_spec is None:
        return Split()
    sizes = dict(jax.sharding.get_abstract_mesh().shape)

    def axes(entries: tuple[Any, ...]) -> set[str]:
        return {n for e in entries if e is not None for n in (e if isinstance(e, (tuple, list)) else (e,))}

    token_axes, kernel_axes = axes(x_spec[:-1]), axes(k_spec)
    ways = lambda names: math.prod(sizes[n] for n in names)  # noqa: E731
    return Split(ways(token_axes), ways(kernel_axes), ways(token_axes | kernel_axes))


def _reshaped_spec(shape: tuple[int, ...], spec: tuple[Any, ...], new: tuple[int, ...]) -> tuple[Any, ...] | None:
    """The spec of ``reshape(shape -> new)`` when every sharded dim leads the group of dims it merges
    into or splits from (a C-order block stays a block); ``None`` when no such spec exists."""
    out: list[Any] = [None] * len(new)
    i = j = 0
    while i < len(shape) and j < len(new):
        group_in, group_out, size_in, size_out = [i], [j], shape[i], new[j]
        while size_in != size_out:
            if size_in < size_out:
                i += 1
                group_in.append(i)
                size_in *= shape[i]
            else:
                j += 1
                group_out.append(j)
                size_out *= new[j]
        sharded = [k for k in group_in if spec[k] is not None]
        if sharded and sharded != [group_in[0]]:
            return None
        if sharded:
            out[group_out[0]] = spec[group_in[0]]
        i, j = i + 1, j + 1
    return tuple(out)


def reshape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``x.reshape(shape)``; under an Explicit mesh, with the output sharding a C-order reshape of a
    sharded leading dim implies (JAX asks for it when a sharded dim is merged or split)."""
    spec = _explicit_spec(x)
    shape = tuple(shape)
    if spec is None or all(s is None for s in spec) or tuple(x.shape) == shape:
        return x.reshape(shape)
    out = _reshaped_spec(tuple(x.shape), spec, shape)
    if out is None:
        return x.reshape(shape)  # JAX names the dims it cannot place
    return jax.lax.reshape(x, shape, out_sharding=jax.sharding.PartitionSpec(*out))


def einsum(subscripts: str, *operands: jax.Array) -> jax.Array:
    """``jnp.einsum``; under an Explicit mesh each output index takes the sharding it has on the first
    operand that shards it (an axis used twice is kept once), so contractions over sharded dims are
    reduced instead of rejected as ambiguous."""
    specs = [_explicit_spec(op) for op in operands]
    if specs[0] is None or all(s is None for spec in specs for s in spec):  # type: ignore[union-attr]
        return jnp.einsum(subscripts, *operands)
    inputs, output = subscripts.replace(" ", "").split("->")
    where: dict[str, Any] = {}
    for letters, spec in zip(inputs.split(","), specs, strict=True):
        for letter, entry in zip(letters, spec, strict=True):  # type: ignore[arg-type]
            if entry is not None and where.get(letter) is None:
                where[letter] = entry
    used: set[Any] = set()
    out = []
    for letter in output:
        entry = where.get(letter)
        names = set(entry if isinstance(entry, tuple) else (entry,)) - {None}
        out.append(None if names & used else entry)
        used |= names
    return jnp.einsum(subscripts, *operands, out_sharding=jax.sharding.PartitionSpec(*out))


def like(value: jax.Array, reference: jax.Array) -> jax.Array:
    """``value`` resharded to ``reference``'s sharding under an Explicit mesh (a cotangent must have
    its primal's type); as it is otherwise."""
    spec = _explicit_spec(reference)
    if spec is None or _explicit_spec(value) == spec:
        return value
    return jax.sharding.reshard(value, jax.sharding.PartitionSpec(*spec))


def scaled(weight: jax.Array, scale: Any) -> jax.Array:
    """``weight * scale`` in ``weight``'s dtype, for a Python float (PEFT's case) or an array, traced
    or not (a live :class:`~lycoris_jax.LycorisScale`): the scale never promotes a bf16 ΔW."""
    return weight * jnp.asarray(scale, weight.dtype)


def rank_dropout_keep(key: jax.Array, num_rows: int, p: float) -> jax.Array:
    """Boolean keep-mask over ``num_rows`` output rows: ``uniform(key, (num_rows,)) > p``."""
    return jax.random.uniform(key, (num_rows,)) > p


def apply_rank_dropout(weight: jax.Array, keep: jax.Array, *, rescale: bool, mask_dtype: Any = None) -> jax.Array:
    """Zero the dropped output rows of ``weight`` ``(out, ...)`` (PyTorch layout); ``keep`` is ``(out,)``.

    The mask is built in ``mask_dtype`` (default: ``weight``'s; LoKr uses float32). With
    ``rescale`` kept rows are divided by ``mean(keep)``; an all-dropped mask gives zeros (PEFT
    gives NaN; docs/DEVIATIONS.md). The result keeps ``weight``'s dtype.
    """
    mask = rank_dropout_rows(keep, rescale=rescale, dtype=mask_dtype or weight.dtype)
    return (weight * mask.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(weight.dtype)


def rank_dropout_rows(keep: jax.Array, *, rescale: bool, dtype: Any) -> jax.Array:
    """The factor each output row of ΔW is multiplied by: ``keep`` as ``dtype``, divided by its mean
    when ``rescale`` (an all-dropped mask stays zeros)."""
    mask = keep.astype(dtype)
    if rescale:
        mask = mask / jnp.maximum(mask.mean(), jnp.finfo(mask.dtype).tiny)
    return mask


def to_flax_kernel(weight: Any) -> Any:
    """PyTorch layout -> Flax kernel: ``(out, in)`` -> ``(in, out)``; ``(out, in/g, *k)`` -> ``(*k, in/g, out)``."""
    return weight.transpose((*range(2, weight.ndim), 1, 0))


def to_torch_layout(kernel: Any) -> Any:
    """Flax kernel -> PyTorch layout (inverse of :func:`to_flax_kernel`)."""
    n = kernel.ndim
    return kernel.transpose((n - 1, n - 2, *range(n - 2)))


@dataclass(frozen=True)
class KernelLayout:
    """How a Flax kernel holds the PyTorch weight that PEFT's files store for it.

    ``in_axes``/``out_axes`` ``None``: a Linear or Conv kernel (``(in, out)``, ``(*k, in/g, out)``,
    :func:`to_flax_kernel`). Otherwise the kernel is the ``nn.Linear`` it equals: the kernel dims
    ``in_axes`` are its input and ``out_axes`` its output, each flattened in C order in kernel order
    (``nnx.LinearGeneral`` query ``(in, H, Dh)``: ``in_axes=(0,)``, ``out_axes=(1, 2)``, the
    ``nn.Linear(in, H*Dh)``; an ``nnx.Einsum`` kernel ``"ndh"`` in ``"btd,ndh->btnh"``:
    ``in_axes=(1,)``, ``out_axes=(0, 2)``).
    """

    shape: tuple[int, ...]
    in_axes: tuple[int, ...] | None = None
    out_axes: tuple[int, ...] | None = None

    @property
    def linear_features(self) -> tuple[int, int]:
        """``(out, in)`` of the ``nn.Linear`` this kernel equals."""
        assert self.in_axes is not None and self.out_axes is not None
        return math.prod(self.shape[a] for a in self.out_axes), math.prod(self.shape[a] for a in self.in_axes)

    def to_kernel(self, weight: Any) -> Any:
        """PyTorch layout ``(out, in[, *k])`` -> this kernel's shape and axis order."""
        if self.in_axes is None:
            return to_flax_kernel(weight)
        grouped = reshape(to_flax_kernel(weight), tuple(self.shape[a] for a in (*self.in_axes, *self.out_axes)))
        return grouped.transpose(tuple(int(i) for i in np.argsort((*self.in_axes, *self.out_axes))))


def einsum_axes(einsum_str: str | None, where: str = "") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(in_axes, out_axes)`` of the kernel (second operand) of ``"lhs,kernel->out"``: the kernel axes
    contracted with the input, and those that reach the output. Others are not a linear map."""
    where = where or "Einsum"
    if einsum_str is None:
        raise TypeError(
            f"{where}: an Einsum whose einsum_str is given at call time cannot be planned; set it in the constructor"
        )
    lhs, _, out = einsum_str.replace(" ", "").partition("->")
    operands = lhs.split(",")
    if len(operands) != 2 or not out or "." in operands[1] or len(set(operands[1])) != len(operands[1]):
        raise TypeError(f"{where}: expected 'input,kernel->output' with a plain kernel subscript, got {einsum_str!r}")
    x, kernel = operands
    in_axes = tuple(i for i, c in enumerate(kernel) if c in x and c not in out)
    out_axes = tuple(i for i, c in enumerate(kernel) if c in out and c not in x)
    if len(in_axes) + len(out_axes) != len(kernel) or not in_axes or not out_axes:
        raise TypeError(
            f"{where}: the kernel {kernel!r} of {einsum_str!r} is not a linear map from input to output axes "
            "(an axis is shared with both, or summed away); not supported"
        )
    return in_axes, out_axes


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """PyTorch's ``kaiming_uniform_(a=sqrt(5))``: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``,
    ``fan_in = shape[1] * prod(shape[2:])`` (PyTorch layout)."""
    bound = 1.0 / math.sqrt(fan_in(shape))
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


def adapter_dtype(kernel_dtype: Any, autocast: bool = True) -> Any:
    """PEFT's rule: adapters take the base dtype, and fp16/bf16 are autocast to float32."""
    if autocast and kernel_dtype in (jnp.bfloat16, jnp.float16):
        return jnp.float32
    return kernel_dtype if jnp.issubdtype(kernel_dtype, jnp.floating) else jnp.float32


def init_factors(
    next_key: Callable[[], jax.Array], plan: AdapterPlan, dtype: Any, kernel_dtype: Any, *, initialize: bool = True
) -> dict[str, jax.Array]:
    """A plan's factors: zeros, or PyTorch's Kaiming uniform with one ``next_key()`` per such factor
    in PEFT's order, rounded through the base kernel's dtype first (as PEFT does before its float32
    autocast). ``initialize=False`` gives all zeros (values about to be loaded)."""
    round_through = kernel_dtype if jnp.issubdtype(kernel_dtype, jnp.floating) else dtype
    out = {}
    for name, shape, init in plan.factors:
        if init == "zeros" or not initialize:
            out[name] = jnp.zeros(shape, dtype)
        else:
            out[name] = kaiming_uniform(next_key(), shape, jnp.float32).astype(round_through).astype(dtype)
    return out


class _KernelView:
    """The base layer seen with another kernel; by default no bias and no fixed compute dtype."""

    def __init__(self, base_layer: Any, kernel: jax.Array, bias: Any = None, dtype: Any = None) -> None:
        self._base_layer = base_layer
        self.kernel = kernel
        self.bias = bias
        self.use_bias = bias is not None
        self.dtype = dtype

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base_layer, name)


def call_with_kernel(
    base_layer: Any, x: jax.Array, kernel: jax.Array, bias: Any = None, dtype: Any = None, *args: Any, **kwargs: Any
) -> jax.Array:
    """The base layer's own ``__call__`` with ``kernel`` (its layout) and ``bias`` in place of its
    own, computing in ``dtype`` (``None``: the operands' promoted dtype)."""
    return type(base_layer).__call__(_KernelView(base_layer, kernel, bias, dtype), x, *args, **kwargs)


def forward_with_weight(
    base_layer: Any, x: jax.Array, weight: jax.Array, layout: KernelLayout | None = None, **kwargs: Any
) -> jax.Array:
    """Run the base layer's *own* ``__call__`` with ``weight`` (PyTorch layout, placed by ``layout``)
    as its kernel, no bias.

    Works for any layer whose forward reads ``self.kernel[...]``/``self.bias`` (``nnx.Linear``,
    ``nnx.Conv`` with every padding mode, strides, dilation, groups, masks, ``nnx.LinearGeneral``,
    ``nnx.Einsum``), so the delta branch is computed exactly like the merged layer. ``kwargs``
    (e.g. ``out_sharding``) pass through.
    """
    kernel = layout.to_kernel(weight) if layout is not None else to_flax_kernel(weight)
    return call_with_kernel(base_layer, x, shard_like(kernel, base_layer.kernel), **kwargs)


# ---------------------------------------------------------------- sharding
def _mesh_for(variable: Any) -> Any:
    """The mesh a kernel variable lives on: its metadata's, the current one, or its array's."""
    mesh = variable.get_metadata().get("mesh")
    if mesh is None and not jax.sharding.get_abstract_mesh().empty:
        mesh = jax.sharding.get_abstract_mesh()
    sharding = getattr(variable.get_value(), "sharding", None)
    if mesh is None and isinstance(sharding, jax.sharding.NamedSharding):
        mesh = sharding.mesh
    return mesh


def kernel_spec(variable: Any, ndim: int | None = None) -> tuple[Any, ...] | None:
    """A kernel variable's partition spec in mesh axis names (``out_sharding`` metadata, logical names
    resolved by its ``sharding_rules``), or ``None``; ``ndim`` drops a leading layer axis a scan
    slices away."""
    spec = variable.get_metadata().get("out_sharding")
    if not spec:
        return None
    rules = variable.get_metadata().get("sharding_rules")
    if rules:
        from flax.core import spmd

        spec = spmd.apply_rules(spec, rules)
    spec = tuple(spec)
    if ndim is not None and len(spec) == ndim + 1:
        spec = spec[1:]
    return spec if ndim is None or len(spec) == ndim else None


def factor_sharding(
    kernel: Any, plan: AdapterPlan, layout: KernelLayout, *, stacked: bool = False
) -> dict[str, dict[str, Any]]:
    """``{factor: Variable metadata}`` placing each factor like the kernel it adapts
    (``lycoris_core.sharding.factor_specs``): empty where the kernel has no ``out_sharding`` or no
    mesh is known. A stack's factors take the kernel's layer-axis entry first."""
    spec, mesh = kernel_spec(kernel), _mesh_for(kernel)
    if spec is None or mesh is None:
        return {}
    specs = _factor_partition(plan, layout, spec, mesh, stacked)
    return {name: {"out_sharding": names, "mesh": mesh} for name, names in specs.items()}


def _factor_partition(
    plan: AdapterPlan, layout: KernelLayout, kernel_spec: tuple[Any, ...], mesh: Any, stacked: bool
) -> dict[str, tuple[Any, ...]]:
    """``{factor: spec}`` for a kernel with ``kernel_spec`` on ``mesh`` (``factor_specs`` on the
    layout's in/out axes; a stack's leading layer-axis entry first)."""
    lead, spec = (kernel_spec[:1], kernel_spec[1:]) if stacked else ((), kernel_spec)
    ndim = len(layout.shape)
    in_axes = layout.in_axes if layout.in_axes is not None else (ndim - 2,)
    out_axes = layout.out_axes if layout.out_axes is not None else (ndim - 1,)
    specs = factor_specs(plan, spec, in_axes=in_axes, out_axes=out_axes, axis_sizes=dict(mesh.shape))
    return {name: (*lead, *names) for name, names in specs.items()}


def shard_like(value: jax.Array, kernel: Any) -> jax.Array:
    """``value`` (a kernel-shaped ΔW) constrained to the kernel variable's sharding under the current
    mesh (``jax.set_mesh``): formed in shards like the kernel, never replicated. No mesh, no spec: as is."""
    return constrain(value, kernel_spec(kernel, value.ndim))


def constrain(value: jax.Array, spec: tuple[Any, ...] | None) -> jax.Array:
    """``value`` constrained to ``spec`` (mesh axis names per dim) under the current mesh, in Auto or
    Explicit mode; as it is without a mesh or a spec."""
    mesh = jax.sharding.get_abstract_mesh()
    if spec is None or mesh.empty or len(spec) != value.ndim:
        return value
    sharding = jax.sharding.PartitionSpec(*spec)
    if mesh.are_all_axes_explicit:
        return jax.sharding.reshard(value, sharding)
    return jax.lax.with_sharding_constraint(value, sharding)


def array_spec(array: Any) -> tuple[tuple[Any, ...], Any] | None:
    """``(spec, mesh)`` of a concrete array placed with a ``NamedSharding`` (spec padded to its rank),
    else ``None`` (unsharded, or traced)."""
    sharding = getattr(array, "sharding", None) if not isinstance(array, jax.core.Tracer) else None
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    spec = tuple(sharding.spec) + (None,) * (array.ndim - len(sharding.spec))
    return (spec, sharding.mesh) if any(s is not None for s in spec) else None


def place_factors(
    factors: dict[str, jax.Array],
    plan: AdapterPlan,
    layout: KernelLayout,
    kernel_spec: tuple[Any, ...],
    mesh: Any,
    *,
    stacked: bool = False,
) -> dict[str, jax.Array]:
    """Factor arrays placed like ``lycoris_core.sharding.factor_specs`` says for a kernel with
    ``kernel_spec`` on ``mesh`` (a stack's leading layer-axis entry first)."""
    specs = _factor_partition(plan, layout, kernel_spec, mesh, stacked)
    return {
        name: jax.device_put(value, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*specs[name])))
        for name, value in factors.items()
    }
