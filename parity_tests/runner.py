"""Run one parity case through lycoris_torch, lycoris_jax (NNX, Linen, pytree), PEFT and PEFT in float64.

Every input (base weights, factors, activations, masks, probes) is drawn once in numpy from the
case seed and handed to each framework; layouts are converted only in ``parity_tests.layouts``.
Columns: ``torch`` (the twin) and ``jax`` (the NNX tuner) fill the case's cell, ``linen`` and
``pytree`` cells of their own (``<case>-linen``, ``<case>-pytree``). Each is compared with PEFT's
arithmetic in float64 (``ref``) next to PEFT's own error in the case's dtype (``peft``)
(``parity_tests.compare``); on the ``"peft"`` forward path the twin must also equal PEFT bit for bit.

The operations run in :data:`OPERATIONS` order on one set of models, and each starts from the state
the previous ones left: the scale sequence ends on a scale of its own (``1.5 · alpha / r``), so merge,
unmerge, the disabled forward, rank dropout, gradients and files all run at a scale the sequence
produced, in every column.

Where PEFT cannot run a case (docs/DEVIATIONS.md i: its ``torch.kron`` crashes on a rank-1 Tucker
``W2`` of a Conv1d) the ``peft``/``ref`` columns are ``lycoris_torch`` on its ``"peft"`` path, in the
case's dtype and in float64; the same stands in for the two LoHa CP gradients PEFT gets wrong
(deviation a). Cells say so in their note.
"""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
import warnings
from collections.abc import Iterator
from fnmatch import fnmatch
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch import nn

import lycoris_jax as lj
import lycoris_torch as lt
from parity_tests.cases import EXPECTED_FAILURES, TPU_MODE, Case, LayerSpec, front_ops
from parity_tests.compare import Cell, check, dtype_name, measure, relative, to_numpy
from parity_tests.fronts import LinenSide, PytreeSide, linen_module, linen_params
from parity_tests.layouts import channels_first, channels_last, flax_to_torch_kernel, torch_to_flax_kernel
from parity_tests.tolerances import MATRIX_OPS

__all__ = ["OPERATIONS", "SCALE_STEPS", "run_case", "torch_layer"]

OPERATIONS = MATRIX_OPS
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
JAX_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
#: PEFT's CP backward is wrong for these factors (docs/DEVIATIONS.md, deviation a).
PEFT_GRAD_DEVIATION = {"hada_w1_a", "hada_w2_a"}
#: The scale sequence, PEFT's helpers in order, with the multiple of ``alpha / r`` each leaves; it ends
#: on a scale of its own, which every later operation inherits.
SCALE_STEPS: tuple[tuple[str, tuple[Any, ...], float], ...] = (
    ("set_scale", ("default", 2.0), 2.0),
    ("scale_layer", (3.0,), 6.0),
    ("unscale_layer", (3.0,), 2.0),
    ("unscale_layer", (), 1.0),
    ("scale_layer", (1.5,), 1.5),
)
#: The adapter effect (max|adapted - base| / max|adapted|) must exceed this many times the tolerance.
EFFECT_MARGIN = 10.0
#: Factors are scaled (by powers of two) until the adapter's effect is at least this.
MIN_EFFECT = 0.4
#: One factor per algorithm/form that ΔW is linear in (LoHa: w1_a in both forms; LoKr: w1 or w1_a).
LINEAR_FACTORS = ("hada_w1_a", "lokr_w1", "lokr_w1_a")

try:  # real PEFT is the oracle when installed
    import peft
except ImportError:  # pragma: no cover - exercised only without the test extra
    peft = None


class TorchWrap(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class NnxWrap(nnx.Module):
    def __init__(self, layer: nnx.Module) -> None:
        self.layer = layer

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layer(x)


def torch_layer(spec: LayerSpec) -> nn.Module:
    """The case's base layer in PyTorch (float32, PyTorch's default initialisation)."""
    if spec.kind == "linear":
        return nn.Linear(spec.in_ch, spec.out_ch)
    conv = nn.Conv1d if spec.kind == "conv1d" else nn.Conv2d
    return conv(
        spec.in_ch,
        spec.out_ch,
        spec.kernel,
        stride=spec.stride,
        padding=spec.padding,
        dilation=spec.dilation,
        groups=spec.groups,
    )


def _nnx_layer(spec: LayerSpec, dtype: Any, compute_dtype: Any = None) -> nnx.Module:
    """The NNX layer with ``dtype`` params; ``compute_dtype`` its ``dtype`` (``None``: the operands')."""
    rngs = nnx.Rngs(0)
    if spec.kind == "linear":
        return nnx.Linear(spec.in_ch, spec.out_ch, dtype=compute_dtype, param_dtype=dtype, rngs=rngs)
    return nnx.Conv(
        spec.in_ch,
        spec.out_ch,
        spec.kernel,
        strides=spec.stride,
        padding=[(p, p) for p in spec.padding],
        kernel_dilation=spec.dilation,
        feature_group_count=spec.groups,
        dtype=compute_dtype,
        param_dtype=dtype,
        rngs=rngs,
    )


def _rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` as float32 holding exactly what a ``dtype`` tensor holds."""
    return torch.from_numpy(values).to(TORCH_DTYPES[dtype]).float().numpy()


def _config(case: Case, flavour: str, **overrides: Any) -> Any:
    kw = {**case.config_kwargs(), **overrides}
    if flavour == "peft":
        return (peft.LoHaConfig if case.algo == "loha" else peft.LoKrConfig)(**kw)
    mod = lj if flavour == "lj" else lt
    return (mod.LoHaConfig if case.algo == "loha" else mod.LoKrConfig)(**kw)


def _twin(case: Case, base: nn.Module, config: Any, **kwargs: Any) -> Any:
    """A ``lycoris_torch`` tuner on a copy of ``base`` (which sets its dtype)."""
    tuner = lt.LoHaModel if case.algo == "loha" else lt.LoKrModel
    return tuner(copy.deepcopy(base), config, **kwargs).eval()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------- torch models
class TorchSide:
    """A PEFT model or a ``lycoris_torch`` tuner behind one interface (inputs in its dtype)."""

    def __init__(self, model: Any, is_peft: bool, dtype: torch.dtype) -> None:
        self.model, self.is_peft, self.dtype = model, is_peft, dtype

    @property
    def layer(self) -> Any:
        return self.model.base_model.model.layer if self.is_peft else self.model.model.layer

    def factor(self, name: str, adapter: str = "default") -> torch.Tensor:
        return getattr(self.layer, name)[adapter] if self.is_peft else self.layer.factors[adapter][name]

    def factor_shapes(self, adapter: str = "default") -> dict[str, tuple[int, ...]]:
        if not self.is_peft:
            return {k: tuple(v.shape) for k, v in self.layer.factors[adapter].items()}
        layer = self.layer
        return {
            n: tuple(getattr(layer, n)[adapter].shape)
            for n in layer.adapter_layer_names
            if adapter in getattr(layer, n)
        }

    def set_factors(self, factors: dict[str, np.ndarray], adapter: str = "default") -> None:
        with torch.no_grad():
            for k, v in factors.items():
                self.factor(k, adapter).copy_(torch.from_numpy(v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x.to(self.dtype))

    def delta(self, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad():
            return self.layer.get_delta_weight("default", **kwargs)

    def weight(self) -> torch.Tensor:
        return self.layer.get_base_layer().weight.detach().clone()

    def scale(self, method: str, args: tuple[Any, ...]) -> None:
        if self.is_peft:  # PEFT has the scale helpers on its layers only
            from peft.tuners.lycoris_utils import LycorisLayer as PeftLycorisLayer

            for module in self.model.modules():
                if isinstance(module, PeftLycorisLayer):
                    getattr(module, method)(*args)
        else:
            getattr(self.model, method)(*args)

    def scaling(self) -> float:
        return float(self.layer.scaling["default"])

    def merge(self, safe: bool = False) -> None:
        with _quiet():
            self.model.merge_adapter(safe_merge=safe)

    def unmerge(self) -> None:
        with _quiet():
            self.model.unmerge_adapter()

    def add_b(self, config: Any, factors: dict[str, np.ndarray]) -> None:
        self.model.add_adapter("b", config)
        self.set_factors(factors, "b")
        (self.model.base_model if self.is_peft else self.model).set_adapter(["default", "b"])
        self.model.eval()

    def remove_b(self) -> None:
        (self.model.base_model if self.is_peft else self.model).set_adapter("default")
        self.model.delete_adapter("b")

    def disabled(self) -> contextlib.AbstractContextManager:
        return self.model.disable_adapter()

    def grads(self, x: torch.Tensor, probe: np.ndarray, names: list[str]) -> dict[str, torch.Tensor]:
        params = {k: self.factor(k) for k in names}
        for param in params.values():
            param.grad = None
            param.requires_grad_(True)
        (self.model(x.to(self.dtype)).double() * torch.from_numpy(probe).double()).sum().backward()
        return {k: v.grad.clone() for k, v in params.items()}

    def save(self, directory: str, **kwargs: Any) -> None:
        self.model.save_pretrained(directory, **kwargs)


class NnxSide:
    """The NNX tuner (channels-last inside, channels-first and PyTorch layouts outside)."""

    def __init__(self, case: Case, run: Run, state: dict[str, np.ndarray] | None, config: Any = None) -> None:
        self.case, self.run = case, run
        tuner = lj.LoHaModel if case.algo == "loha" else lj.LoKrModel
        self.model = tuner(
            run.jax_base(),
            config or _config(case, "lj"),
            rngs=nnx.Rngs(case.seed),
            state_dict=state,
            **case.jax_kwargs,
        )
        self.model.model.eval()

    @property
    def layer(self) -> Any:
        return self.model.model.layer

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.layer.factors["default"].items()}

    def forward(self, x: jax.Array) -> jax.Array:
        return self.model(x)

    def delta(self, **kwargs: Any) -> jax.Array:
        return self.layer.get_delta_weight("default", **kwargs)

    def weight(self) -> np.ndarray:
        return flax_to_torch_kernel(np.asarray(self.layer.get_base_layer().kernel[...]))

    def scale(self, method: str, args: tuple[Any, ...]) -> None:
        getattr(self.model, method)(*args)

    def merge(self, safe: bool = False) -> None:
        with _quiet():
            self.model.merge_adapter(safe_merge=safe)

    def unmerge(self) -> None:
        with _quiet():
            self.model.unmerge_adapter()

    def add_b(self, config: Any, factors: dict[str, np.ndarray]) -> None:
        self.model.add_adapter("b", config)
        for k, v in factors.items():
            self.layer.factors["b"][k][...] = jnp.asarray(v)
        self.model.set_adapter(["default", "b"])

    def remove_b(self) -> None:
        self.model.set_adapter("default")
        self.model.delete_adapter("b")

    def disabled(self) -> contextlib.AbstractContextManager:
        return self.model.disable_adapter()

    def grads(self, x: jax.Array, probe: np.ndarray, names: list[str]) -> dict[str, jax.Array]:
        j_probe = jnp.asarray(channels_last(probe))

        def loss(tuner: Any) -> jax.Array:
            return (tuner(x).astype(jnp.float32) * j_probe).sum()

        grads = nnx.grad(loss, argnums=nnx.DiffState(0, lj.LycorisParam))(self.model)
        factors = grads["model"]["layer"]["factors"]["default"]
        return {name: factors[name][...] for name in names}


# ---------------------------------------------------------------------------------------------- inputs
class Inputs:
    """Everything random about a case, drawn once from its seed; values rounded to the case's dtype."""

    def __init__(self, case: Case, factor_shapes: dict[str, tuple[int, ...]]) -> None:
        rng = np.random.default_rng(case.seed)
        spec = case.layer
        weight_shape = (spec.out_ch, spec.in_ch // spec.groups, *spec.kernel)
        self.weight = _rounded((rng.standard_normal(weight_shape) * 0.2).astype(np.float32), case.dtype)
        self.bias = _rounded((rng.standard_normal(spec.out_ch) * 0.1).astype(np.float32), case.dtype)
        if case.inputs == "arange":  # PEFT's test style: torch.arange(n).view(shape), values up to 100
            x = (np.arange(math.prod(spec.input_shape)) % 101).reshape(spec.input_shape).astype(np.float32)
        else:
            x = rng.standard_normal(spec.input_shape).astype(np.float32)
        self.x = _rounded(x, case.dtype)
        self.factors = {n: (rng.standard_normal(s) * 0.3).astype(np.float32) for n, s in factor_shapes.items()}
        self.factors_b = {n: (rng.standard_normal(s) * 0.3).astype(np.float32) for n, s in factor_shapes.items()}
        self.probe_seed = int(rng.integers(1 << 30))

    def amplify(self, gain: float) -> None:
        """Multiply the factor ΔW is linear in by ``gain`` (a power of two: exact)."""
        for factors in (self.factors, self.factors_b):
            name = next(n for n in LINEAR_FACTORS if n in factors)
            factors[name] = factors[name] * np.float32(gain)


def _gain(weight_max: float, delta_max: float) -> float:
    """The power of two that brings max|ΔW| to between max|W| and twice that (so the adapter's effect
    is far above every tolerance in every dtype)."""
    return 2.0 ** math.ceil(math.log2(weight_max / delta_max)) if delta_max > 0 else 1.0


def _state(factors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"base_model.model.layer.{k}": v for k, v in factors.items()}


# ---------------------------------------------------------------------------------------------- the run
class Run:
    """The models of one case in every framework, all holding the same values, and its cells."""

    def __init__(self, case: Case) -> None:
        self.case = case
        dtype = TORCH_DTYPES[case.dtype]
        self.notes: list[str] = []
        spec = case.layer
        base = torch_layer(spec)
        # PEFT first: the factor names and shapes come from it (not from the plan under test)
        self.peft_real = peft is not None
        self.m = 1.0  # the scale multiple of alpha / r the scale sequence has left
        if self.peft_real:
            torch.manual_seed(case.seed)
            probe_model = peft.get_peft_model(TorchWrap(copy.deepcopy(base)), _config(case, "peft"))
            shapes = TorchSide(probe_model, True, torch.float32).factor_shapes()
        else:  # pragma: no cover - without the test extra
            self.notes.append("PEFT not installed: float64 reference from lycoris_torch's peft path")
            shapes = _twin(case, TorchWrap(base), _config(case, "lt")).model.layer.plans["default"].factor_shapes
        self.inp = inp = Inputs(case, shapes)
        with torch.no_grad():
            base.weight.copy_(torch.from_numpy(inp.weight))
            base.bias.copy_(torch.from_numpy(inp.bias))
        self.torch_base = TorchWrap(base).to(dtype).eval()
        self.torch_base64 = TorchWrap(copy.deepcopy(base)).double().eval()
        self.tx = torch.from_numpy(inp.x).to(dtype)
        self.x64 = torch.from_numpy(inp.x).double()
        self.jx = jnp.asarray(channels_last(inp.x), JAX_DTYPES[case.dtype])
        self.sides: dict[str, Any] = {}
        self._build_references()
        # the adapter moves the output far above every tolerance: max|ΔW| ~ max|W|, then doubled while
        # it moves the output by less than MIN_EFFECT of its largest value (the guard in op_forward)
        self.sides["ref"].set_factors(inp.factors)
        inp.amplify(_gain(float(np.abs(inp.weight).max()), float(np.abs(to_numpy(self.sides["ref"].delta())).max())))
        with torch.no_grad():
            base_out = self.torch_base64(self.x64)
        for _ in range(4):
            self.sides["ref"].set_factors(inp.factors)
            if relative(self.sides["ref"].forward(self.x64), base_out)[1] >= MIN_EFFECT:
                break
            inp.amplify(2.0)
        for name in ("peft", "ref"):
            self.sides[name].set_factors(inp.factors)
        twin = _twin(case, self.torch_base, _config(case, "lt"), state_dict=self._torch_state(), **case.twin_kwargs)
        self.sides["torch"] = TorchSide(twin, False, dtype)
        self.sides["jax"] = NnxSide(case, self, _state(inp.factors))
        self._build_fronts()

    # ------------------------------------------------------------------ construction
    def _torch_state(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in _state(self.inp.factors).items()}

    def _build_references(self) -> None:
        """``peft`` (PEFT in the case's dtype) and ``ref`` (PEFT in float64), or lycoris_torch's peft path
        in both dtypes where PEFT cannot run the case."""
        case = self.case
        if self.peft_real:
            models = {}
            for name, base in (("peft", self.torch_base), ("ref", self.torch_base64)):
                torch.manual_seed(case.seed)
                models[name] = peft.get_peft_model(copy.deepcopy(base), _config(case, "peft")).eval()
            self.sides["peft"] = TorchSide(models["peft"], True, TORCH_DTYPES[case.dtype])
            self.sides["ref"] = TorchSide(models["ref"], True, torch.float64)
            try:
                self.sides["ref"].delta()
                return
            except RuntimeError as err:  # PEFT's torch.kron on degenerate strides (DEVIATIONS.md i)
                self.notes.append(
                    f"PEFT crashes on this case ({str(err)[:40]}...; docs/DEVIATIONS.md i): peft/float64 columns "
                    "are lycoris_torch's peft path"
                )
                self.peft_real = False
        for name, dtype in (("peft", case.dtype), ("ref", "fp64")):
            base = self.torch_base if name == "peft" else self.torch_base64
            model = _twin(case, base, _config(case, "lt"), forward_path="peft")
            self.sides[name] = TorchSide(model, False, TORCH_DTYPES[dtype])

    def _build_fronts(self) -> None:
        case = self.case
        if len(case.fronts) == 1:
            return
        self.peft_dir = tempfile.TemporaryDirectory()
        self.sides["peft"].save(self.peft_dir.name)  # the case's factors, written by PEFT
        module = linen_module(case.layer, JAX_DTYPES[case.dtype] if case.mode == "branch_base" else None)
        params = linen_params(case.layer, self.inp.weight, self.inp.bias, JAX_DTYPES[case.dtype])
        if "linen" in case.fronts:
            self.sides["linen"] = LinenSide(case, module, params, self.peft_dir.name)
        if "pytree" in case.fronts:
            self.sides["pytree"] = PytreeSide(case, module, params, self.peft_dir.name)

    def jax_base(self) -> NnxWrap:
        """The NNX base model; mixed precision (``branch_base``) sets the layer's compute ``dtype``,
        which ``branch_dtype="base"`` computes the branch in."""
        dtype = JAX_DTYPES[self.case.dtype]
        layer = _nnx_layer(self.case.layer, dtype, dtype if self.case.mode == "branch_base" else None)
        layer.kernel[...] = jnp.asarray(torch_to_flax_kernel(self.inp.weight), layer.kernel.dtype)
        layer.bias[...] = jnp.asarray(self.inp.bias, layer.bias.dtype)
        return NnxWrap(layer)

    def x_for(self, name: str) -> Any:
        """The input in the layout and dtype column ``name`` takes."""
        if name in ("jax", "linen", "pytree"):
            return self.jx
        return self.x64 if name == "ref" else self.tx

    # ------------------------------------------------------------------ comparing
    def cells_for(self, op: str) -> dict[str, Cell]:
        case = self.case
        return {
            front: Cell(
                case.id if front == "nnx" else f"{case.id}-{front}",
                op,
                f"{case.dtype}+pytree" if front == "pytree" else case.tolerance_key,
            )
            for front in case.fronts
            if op in front_ops(case, front, (op,))
        }

    def compare(
        self,
        cells: dict[str, Cell],
        label: str,
        values: dict[str, Any],
        scale: float | None = None,
        direct: bool = True,
    ) -> None:
        """Every column of ``values`` against ``values["ref"]`` (float64), next to PEFT's own error;
        on the ``"peft"`` path the twin against PEFT bit for bit as well."""
        ref, peft_value = values["ref"], values.get("peft")
        for column, value in values.items():
            cell = cells.get(_FRONT_OF.get(column, ""))
            if cell is None:
                continue
            measure(cell, f"{label} {column}", value, ref, peft=peft_value, scale=scale)
        if self.case.mode == "peft" and self.peft_real and "torch" in values and "nnx" in cells and direct:
            measure(cells["nnx"], f"{label} torch=peft", values["torch"], peft_value, against="peft")

    def check_dtypes(self, cells: dict[str, Cell], label: str, values: dict[str, Any]) -> None:
        """Every column's result has the dtype PEFT's has (bf16 in, bf16 out)."""
        expected = dtype_name(values["peft"])
        for column, value in values.items():
            if column == "ref":
                continue
            cell = cells.get(_FRONT_OF.get(column, ""))
            if cell is not None:
                check(
                    cell,
                    f"{label} {column}",
                    dtype_name(value) == expected,
                    f"dtype {dtype_name(value)}, PEFT {expected}",
                )

    def forwards(self, names: list[str] | None = None) -> dict[str, Any]:
        out = {}
        for name, side in self.sides.items():
            if names is None or name in names:
                y = side.forward(self.x_for(name))
                out[name] = channels_first(y) if name in ("jax", "linen", "pytree") else y
        return out

    def stand_in(self, dtype: str) -> TorchSide:
        """lycoris_torch on its "peft" path in ``dtype`` at this run's scale (deviation a's gradients)."""
        case = self.case
        base = self.torch_base64 if dtype == "fp64" else self.torch_base
        model = _twin(case, base, _config(case, "lt"), state_dict=self._torch_state(), forward_path="peft")
        model.set_scale("default", self.m)
        return TorchSide(model, False, TORCH_DTYPES[dtype])


_FRONT_OF = {"torch": "nnx", "jax": "nnx", "linen": "linen", "pytree": "pytree"}


# ---------------------------------------------------------------------------------------------- operations
def op_init(run: Run, cells: dict[str, Cell]) -> None:
    """Zero-initialised factors: same factor names/shapes everywhere (as PEFT's) and ΔW == 0 exactly."""
    case = run.case
    torch.manual_seed(case.seed)
    peft_model = peft.get_peft_model(copy.deepcopy(run.torch_base), _config(case, "peft")).eval()
    theirs = TorchSide(peft_model, True, TORCH_DTYPES[case.dtype])
    sides: dict[str, Any] = {
        "torch": TorchSide(_twin(case, run.torch_base, _config(case, "lt")), False, theirs.dtype),
        "jax": NnxSide(case, run, None),
    }
    expected = theirs.factor_shapes()
    zero = np.zeros(run.inp.weight.shape)
    for name, side in sides.items():
        shapes = side.factor_shapes()
        check(cells["nnx"], f"factors {name}", shapes == expected, f"{shapes} != PEFT's {expected}")
        measure(cells["nnx"], f"ΔW {name}", side.delta(), zero, against="exact", scale=1.0)
    measure(cells["nnx"], "ΔW peft", theirs.delta(), zero, against="exact", scale=1.0)
    for front in ("linen", "pytree"):
        if front in cells:
            side = run.sides[front]
            shapes = side.init_shapes(_config(case, "lj"))
            check(cells[front], f"factors {front}", shapes == expected, f"{shapes} != PEFT's {expected}")
            measure(cells[front], f"ΔW {front}", side.init_delta(_config(case, "lj")), zero, against="exact", scale=1.0)


def op_delta_weight(run: Run, cells: dict[str, Cell]) -> None:
    values = {name: side.delta() for name, side in run.sides.items() if name != "linen"}
    run.compare(cells, "ΔW", values)


def op_forward(run: Run, cells: dict[str, Cell]) -> None:
    """The eval forward; the adapter's effect must be far above the tolerance, or the cell is blind."""
    values = run.forwards()
    run.check_dtypes(cells, "forward", values)
    run.compare(cells, "forward", values)
    with torch.no_grad():
        base = run.torch_base64(run.x64)
    _, effect, _ = relative(values["ref"], base)
    for cell in cells.values():
        bound = max((c.allowed for c in cell.checks), default=0.0)
        check(
            cell,
            "adapter effect",
            effect > EFFECT_MARGIN * bound,
            f"blind: the adapter moves the output by {effect:.2e} of max|y|, not > {EFFECT_MARGIN:g} x the "
            f"tolerance {bound:.2e}",
        )


def op_scale_ops(run: Run, cells: dict[str, Cell]) -> None:
    """PEFT's scale helpers in sequence, forward after each; the last scale stays for later operations."""
    for method, args, multiple in SCALE_STEPS:
        for side in run.sides.values():
            side.scale(method, args)
        run.m = multiple
        label = f"{method}{args}"
        peft_scale = run.sides["peft"].scaling()
        for name in ("torch", "jax"):
            ours = run.sides[name].layer.scaling["default"]
            check(cells["nnx"], f"{label} scaling {name}", ours == peft_scale, f"{ours} != PEFT's {peft_scale}")
        run.compare(cells, label, run.forwards())


def _weights(run: Run) -> dict[str, Any]:
    return {name: side.weight() for name, side in run.sides.items()}


def op_merge(run: Run, cells: dict[str, Cell]) -> None:
    for side in run.sides.values():
        side.merge()
    weights = _weights(run)
    run.check_dtypes(cells, "merged weight", {k: v for k, v in weights.items() if k != "ref"})
    run.compare(cells, "merged weight", weights)
    values = run.forwards()
    run.check_dtypes(cells, "merged forward", values)
    run.compare(cells, "merged forward", values)


def op_unmerge(run: Run, cells: dict[str, Cell]) -> None:
    for side in run.sides.values():
        side.unmerge()
    run.compare(cells, "unmerged weight", _weights(run), scale=float(np.abs(run.inp.weight).max()))


def _safe_merge(run: Run, cells: dict[str, Cell], bad: float) -> None:
    """Poison one factor element; every framework must refuse the safe merge and change nothing."""
    cell = cells["nnx"]
    factor = next(iter(run.inp.factors))
    sides = {name: run.sides[name] for name in ("torch", "jax", "peft")}
    before = {name: side.weight() for name, side in sides.items()}
    saved = {}
    for name, side in sides.items():
        if name == "jax":
            param = side.layer.factors["default"][factor]
            saved[name] = param[...]
            param[...] = saved[name].reshape(-1).at[0].set(bad).reshape(saved[name].shape)
        else:
            param = side.factor(factor)
            saved[name] = param.detach().clone()
            with torch.no_grad():
                param.view(-1)[0] = bad
    for name, side in sides.items():
        try:
            side.merge(safe=True)
            raised = False
        except ValueError:
            raised = True
        check(cell, name, raised, "did not raise ValueError")
        measure(cell, f"{name} unchanged", side.weight(), before[name], against="exact")
    for name, side in sides.items():
        if name == "jax":
            side.layer.factors["default"][factor][...] = saved[name]
        else:
            with torch.no_grad():
                side.factor(factor).copy_(saved[name])


def op_safe_merge_nan(run: Run, cells: dict[str, Cell]) -> None:
    _safe_merge(run, cells, float("nan"))


def op_safe_merge_inf(run: Run, cells: dict[str, Cell]) -> None:
    _safe_merge(run, cells, float("inf"))


def op_multi_adapter(run: Run, cells: dict[str, Cell]) -> None:
    """A second adapter "b" with other factors; both active (the pytree API: merged one after the other)."""
    for name in ("torch", "jax", "peft", "ref"):
        side = run.sides[name]
        flavour = "lj" if name == "jax" else "peft" if side.is_peft else "lt"
        side.add_b(_config(run.case, flavour), run.inp.factors_b)
    if "pytree" in run.sides:
        with tempfile.TemporaryDirectory() as d:
            run.sides["peft"].save(d, selected_adapters=["b"])
            run.sides["pytree"].add_b(f"{d}/b")
    try:
        run.compare(cells, "forward a+b", run.forwards([n for n in run.sides if n != "linen"]))
    finally:
        for name, side in run.sides.items():
            if name != "linen":
                side.remove_b()


def op_disabled(run: Run, cells: dict[str, Cell]) -> None:
    with contextlib.ExitStack() as stack:
        for name, side in run.sides.items():
            if name != "pytree":
                stack.enter_context(side.disabled())
        values = run.forwards([n for n in run.sides if n != "pytree"])
    run.compare(cells, "disabled forward", values)


def op_rank_dropout_mask(run: Run, cells: dict[str, Cell]) -> None:
    """ΔW with rank dropout: PEFT draws its mask from torch's global RNG; we reproduce that draw
    with the same seed and inject the mask into both twins."""
    out = run.case.layer.out_ch
    p = run.case.config_kwargs()["rank_dropout"]
    torch.manual_seed(run.case.seed + 1)
    keep = torch.rand(out) > p
    values = {
        "torch": run.sides["torch"].delta(rank_dropout_mask=keep),
        "jax": run.sides["jax"].delta(rank_dropout_mask=jnp.asarray(keep.numpy())),
    }
    for name in ("peft", "ref"):
        torch.manual_seed(run.case.seed + 1)
        values[name] = run.sides[name].delta(apply_rank_dropout=True)
    run.compare(cells, "ΔW with rank dropout", values)


def op_grad(run: Run, cells: dict[str, Cell]) -> None:
    """Gradients of sum(y * probe) w.r.t. every factor, at the scale the sequence left."""
    y_shape = tuple(run.forwards(["ref"])["ref"].shape)
    probe = np.random.default_rng(run.inp.probe_seed).standard_normal(y_shape).astype(np.float32)
    names = list(run.inp.factors)
    grads = {name: side.grads(run.x_for(name), probe, names) for name, side in run.sides.items()}
    deviation = run.case.algo == "loha" and run.sides["torch"].layer.plans["default"].effective_conv
    if deviation and run.peft_real:  # PEFT's CP backward is wrong for two factors: lycoris_torch's peft path stands in
        for name, side in (("peft", run.stand_in(run.case.dtype)), ("ref", run.stand_in("fp64"))):
            stand = side.grads(run.x_for(name), probe, names)
            for factor in PEFT_GRAD_DEVIATION:
                grads[name][factor] = stand[factor]
        for cell in cells.values():
            cell.note += (
                " hada_w1_a/hada_w2_a: PEFT's CP backward is wrong (DEVIATIONS.md a); reference from lycoris_torch;"
            )
    for factor in names:
        run.compare(cells, f"d{factor}", {name: g[factor] for name, g in grads.items()})


def op_save_load(run: Run, cells: dict[str, Cell]) -> None:
    """Save in one framework, load in the others (PEFT both ways; the Linen and pytree APIs both ways),
    each loaded model at the scale the sequence left."""
    case, m = run.case, run.m
    values = run.forwards(["peft", "ref"])
    with contextlib.ExitStack() as stack:
        dirs = {name: stack.enter_context(tempfile.TemporaryDirectory()) for name in ("torch", "jax", "peft")}
        run.sides["torch"].save(dirs["torch"])
        run.sides["jax"].model.save_pretrained(dirs["jax"])
        run.sides["peft"].save(dirs["peft"])

        def torch_load(directory: str, load_peft: bool) -> torch.Tensor:
            base = copy.deepcopy(run.torch_base)
            if load_peft and run.peft_real:
                side = TorchSide(peft.PeftModel.from_pretrained(base, directory).eval(), True, run.tx.dtype)
            else:
                kwargs = {} if load_peft else case.twin_kwargs
                side = TorchSide(lt.LycorisTuner.from_pretrained(base, directory, **kwargs).eval(), False, run.tx.dtype)
            side.scale("set_scale", ("default", m))
            return side.forward(run.tx)

        def jax_load(directory: str) -> np.ndarray:
            tuner = lj.LycorisTuner.from_pretrained(run.jax_base(), directory, **case.jax_kwargs)
            tuner.model.eval()
            tuner.set_scale("default", m)
            return channels_first(tuner(run.jx))

        loaded = {
            "torch": {"jax->torch": torch_load(dirs["jax"], False), "peft->torch": torch_load(dirs["peft"], False)},
            "jax": {"torch->jax": jax_load(dirs["torch"]), "peft->jax": jax_load(dirs["peft"])},
        }
        loaded["torch"]["torch->peft"] = torch_load(dirs["torch"], True)
        for front in ("linen", "pytree"):
            if front in run.sides:
                side = run.sides[front]
                directory = stack.enter_context(tempfile.TemporaryDirectory())
                side.save(directory)
                loaded[front] = {
                    f"{front}->peft": torch_load(directory, True),
                    f"{front}->torch": torch_load(directory, False),
                }
                loaded[front][f"peft->{front}"] = channels_first(side.loaded(dirs["peft"]).forward(run.jx))
    for column, results in loaded.items():
        for label, value in results.items():
            run.compare(
                cells, f"forward {label}", {column: value, "peft": values["peft"], "ref": values["ref"]}, direct=False
            )
    if case.mode == "peft" and run.peft_real:  # both loaded onto a fresh base: PEFT's arithmetic, bit for bit
        ours, theirs = loaded["torch"]["peft->torch"], loaded["torch"]["torch->peft"]
        measure(cells["nnx"], "forward peft->torch = torch->peft", ours, theirs, against="peft")


def run_case(case: Case, ops: tuple[str, ...] | None = None) -> list[Cell]:
    """Run ``ops`` (default: all that apply) on one case; returns one :class:`Cell` per front end and
    operation. A setup that raises fails every cell of the case."""
    ops = ops or tuple(op for op in OPERATIONS if op != "init" or "init" in case.extra_ops)
    platform = _tpu_rules() if case.mode == TPU_MODE else contextlib.nullcontext()
    with _quiet(), platform:
        try:
            run = Run(case)
        except Exception as err:
            run, setup_error = Run.__new__(Run), f"setup raised {type(err).__name__}: {err}"
            run.case, run.notes = case, []
        else:
            setup_error = ""
        return _run_ops(run, ops, setup_error)


@contextlib.contextmanager
def _tpu_rules() -> Iterator[None]:
    """The TPU's fold rules on this machine (``lycoris_jax.compiling_for("tpu")``), JAX's caches cleared
    on entry and exit: a jitted function traced by another case keeps its trace otherwise."""
    jax.clear_caches()
    try:
        with lj.compiling_for("tpu"):
            yield
    finally:
        jax.clear_caches()


def _run_ops(run: Run, ops: tuple[str, ...], setup_error: str) -> list[Cell]:
    note = "".join(f" {n};" for n in run.notes)
    cells: list[Cell] = []
    for op in ops:
        op_cells = run.cells_for(op)
        try:
            if setup_error:
                raise RuntimeError(setup_error)
            globals()[f"op_{op}"](run, op_cells)
        except Exception as err:
            for cell in op_cells.values():
                cell.failures.append(setup_error or f"raised {type(err).__name__}: {err}")
        for cell in op_cells.values():
            cell.note += note
            cell.xfail = next(
                ((what, why) for pattern, o, what, why in EXPECTED_FAILURES if o == op and fnmatch(cell.case, pattern)),
                None,
            )
        cells += [op_cells[f] for f in ("nnx", "linen", "pytree") if f in op_cells]
    return cells
