"""Run one parity case through lycoris_torch, lycoris_jax and (when installed) real PEFT.

Every input (base weights, factors, activations, masks, probes) is drawn once in numpy from the
case seed and handed to each framework; layouts are converted only in ``parity_tests.layouts``.
Column pairs: ``jax-torch`` (the twins) and ``torch-peft`` (the oracle).
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch import nn

import lycoris_jax as lj
import lycoris_torch as lt
from lycoris_core import LayerShape, plan_adapter, resolve_rank_alpha
from parity_tests.cases import Case, LayerSpec
from parity_tests.compare import Cell, check, measure
from parity_tests.layouts import channels_first, channels_last, torch_to_flax_kernel

__all__ = ["OPERATIONS", "run_case"]

OPERATIONS = (
    "init",
    "delta_weight",
    "forward",
    "scale_ops",
    "merge",
    "unmerge",
    "safe_merge_nan",
    "safe_merge_inf",
    "multi_adapter",
    "disabled",
    "rank_dropout_mask",
    "grad",
    "save_load",
)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
JAX_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
#: PEFT's CP backward is wrong for these factors (docs/DEVIATIONS.md, deviation a).
PEFT_GRAD_DEVIATION = {"hada_w1_a", "hada_w2_a"}

try:  # real PEFT is the third column when installed
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


def _torch_layer(spec: LayerSpec) -> nn.Module:
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


def _nnx_layer(spec: LayerSpec, dtype: Any) -> nnx.Module:
    rngs = nnx.Rngs(0)
    if spec.kind == "linear":
        return nnx.Linear(spec.in_ch, spec.out_ch, param_dtype=dtype, rngs=rngs)
    return nnx.Conv(
        spec.in_ch,
        spec.out_ch,
        spec.kernel,
        strides=spec.stride,
        padding=[(p, p) for p in spec.padding],
        kernel_dilation=spec.dilation,
        feature_group_count=spec.groups,
        param_dtype=dtype,
        rngs=rngs,
    )


def _layer_shape(spec: LayerSpec) -> LayerShape:
    return LayerShape(spec.kind, spec.out_ch, spec.in_ch // spec.groups, spec.kernel, spec.groups)


class Inputs:
    """Everything random about a case, drawn once from its seed."""

    def __init__(self, case: Case) -> None:
        rng = np.random.default_rng(case.seed)
        spec = case.layer
        shape = _layer_shape(spec)
        self.weight = (rng.standard_normal(shape.weight_shape) * 0.2).astype(np.float32)
        self.bias = (rng.standard_normal(spec.out_ch) * 0.1).astype(np.float32)
        self.x = rng.standard_normal(spec.input_shape).astype(np.float32)
        cfg = _config(case, "lj")
        r, alpha = resolve_rank_alpha(cfg, "layer")
        self.plan = plan_adapter(shape, r, alpha, cfg)
        self.factors = {n: (rng.standard_normal(s) * 0.3).astype(np.float32) for n, s, _ in self.plan.factors}
        self.factors_b = {n: (rng.standard_normal(s) * 0.3).astype(np.float32) for n, s, _ in self.plan.factors}
        self.probe_seed = int(rng.integers(1 << 30))


def _config(case: Case, flavour: str) -> Any:
    kw = case.config_kwargs()
    if flavour == "peft":
        return (peft.LoHaConfig if case.algo == "loha" else peft.LoKrConfig)(**kw)
    mod = lj if flavour == "lj" else lt
    return (mod.LoHaConfig if case.algo == "loha" else mod.LoKrConfig)(**kw)


def _state(factors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"base_model.model.layer.{k}": v for k, v in factors.items()}


class Frameworks:
    """The base model and its adapted copies in torch, PEFT and JAX, all holding the same values."""

    def __init__(self, case: Case, inp: Inputs) -> None:
        self.case, self.inp = case, inp
        tdtype, jdtype = TORCH_DTYPES[case.dtype], JAX_DTYPES[case.dtype]
        base = _torch_layer(case.layer)
        with torch.no_grad():
            base.weight.copy_(torch.from_numpy(inp.weight))
            base.bias.copy_(torch.from_numpy(inp.bias))
        self.torch_base = TorchWrap(base).to(tdtype)
        self.tx = torch.from_numpy(inp.x).to(tdtype)
        self.jx = jnp.asarray(channels_last(inp.x), jdtype)
        tuner_t = lt.LoHaModel if case.algo == "loha" else lt.LoKrModel
        init_only = "init" in case.extra_ops
        state_t = None if init_only else {k: torch.from_numpy(v) for k, v in _state(inp.factors).items()}
        self.torch = tuner_t(
            copy.deepcopy(self.torch_base), _config(case, "lt"), state_dict=state_t, **case.twin_kwargs
        )
        self.jax = self.make_jax(None if init_only else _state(inp.factors))
        self.peft = None
        self.note = "" if peft is not None else " PEFT not installed: twins only;"
        if peft is not None:
            torch.manual_seed(case.seed)
            self.peft = peft.get_peft_model(copy.deepcopy(self.torch_base), _config(case, "peft"))
            if not init_only:
                self.set_peft_factors("default", inp.factors)
            try:
                self.peft.base_model.model.layer.get_delta_weight("default")
            except RuntimeError as err:  # PEFT's torch.kron on degenerate strides (DEVIATIONS.md i)
                self.peft = None
                self.note = f" PEFT crashes on this case ({str(err)[:40]}...; docs/DEVIATIONS.md i): twins only;"
        for model in (self.torch, self.peft):
            if model is not None:
                model.eval()
        self.jax.model.eval()

    def jax_base(self) -> NnxWrap:
        layer = _nnx_layer(self.case.layer, JAX_DTYPES[self.case.dtype])
        layer.kernel[...] = jnp.asarray(torch_to_flax_kernel(self.inp.weight), layer.kernel.dtype)
        layer.bias[...] = jnp.asarray(self.inp.bias, layer.bias.dtype)
        return NnxWrap(layer)

    def make_jax(self, state: dict[str, np.ndarray] | None) -> lj.LycorisTuner:
        tuner = lj.LoHaModel if self.case.algo == "loha" else lj.LoKrModel
        return tuner(
            self.jax_base(),
            _config(self.case, "lj"),
            rngs=nnx.Rngs(self.case.seed),
            state_dict=state,
            **self.case.jax_kwargs,
        )

    def set_peft_factors(self, name: str, factors: dict[str, np.ndarray]) -> None:
        layer = self.peft.base_model.model.layer
        with torch.no_grad():
            for k, v in factors.items():
                getattr(layer, k)[name].copy_(torch.from_numpy(v))

    # ---------------------------------------------------------------- uniform accessors
    def forward(self) -> dict[str, Any]:
        out = {"torch": self.torch(self.tx), "jax": channels_first(np.asarray(self.jax(self.jx), np.float32))}
        if self.peft is not None:
            out["peft"] = self.peft(self.tx)
        return out

    def delta(self) -> dict[str, Any]:
        out = {
            "torch": self.torch.model.layer.get_delta_weight("default"),
            "jax": self.jax.model.layer.get_delta_weight("default"),
        }
        if self.peft is not None:
            out["peft"] = self.peft.base_model.model.layer.get_delta_weight("default")
        return out

    def weights(self) -> dict[str, Any]:
        out = {
            "torch": self.torch.model.layer.get_base_layer().weight,
            "jax": lj.functional.to_torch_layout(
                np.asarray(self.jax.model.layer.get_base_layer().kernel[...], np.float32)
            ),
        }
        if self.peft is not None:
            out["peft"] = self.peft.base_model.model.layer.get_base_layer().weight
        return out

    def peft_layers(self) -> list[Any]:
        from peft.tuners.lycoris_utils import LycorisLayer as PeftLycorisLayer

        return [m for m in self.peft.modules() if isinstance(m, PeftLycorisLayer)]


def _compare(cell: Cell, values: dict[str, Any]) -> None:
    measure(cell, "jax-torch", values["jax"], values["torch"])
    if "peft" in values:
        measure(cell, "torch-peft", values["torch"], values["peft"])


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------- operations
def op_init(fw: Frameworks, cell: Cell) -> None:
    """Zero-initialised factors: same factor names/shapes everywhere and ΔW == 0."""
    names = {
        "torch": {k: tuple(v.shape) for k, v in fw.torch.model.layer.factors["default"].items()},
        "jax": {k: tuple(v.shape) for k, v in fw.jax.model.layer.factors["default"].items()},
    }
    if fw.peft is not None:
        layer = fw.peft.base_model.model.layer
        names["peft"] = {
            k: tuple(getattr(layer, k)["default"].shape)
            for k in layer.adapter_layer_names
            if "default" in getattr(layer, k)
        }
    check(cell, "jax-torch", names["jax"] == names["torch"], f"factors {names['jax']} != {names['torch']}")
    if "peft" in names:
        check(cell, "torch-peft", names["torch"] == names["peft"], f"factors {names['torch']} != {names['peft']}")
    delta = fw.delta()
    for key, value in delta.items():
        measure(cell, f"{key}-zero", value, np.zeros(np.shape(value)))
    # continue the case with the drawn (non-zero) factors
    fw.torch = (lt.LoHaModel if fw.case.algo == "loha" else lt.LoKrModel)(
        copy.deepcopy(fw.torch_base),
        _config(fw.case, "lt"),
        state_dict={k: torch.from_numpy(v) for k, v in _state(fw.inp.factors).items()},
        **fw.case.twin_kwargs,
    ).eval()
    fw.jax = fw.make_jax(_state(fw.inp.factors))
    fw.jax.model.eval()
    if fw.peft is not None:
        fw.set_peft_factors("default", fw.inp.factors)


def op_delta_weight(fw: Frameworks, cell: Cell) -> None:
    _compare(cell, fw.delta())


def op_forward(fw: Frameworks, cell: Cell) -> None:
    _compare(cell, fw.forward())


def op_scale_ops(fw: Frameworks, cell: Cell) -> None:
    """set_scale(2) -> scale_layer(3) -> unscale_layer(3) -> unscale_layer(), forward after each."""
    for method, args in (
        ("set_scale", ("default", 2.0)),
        ("scale_layer", (3.0,)),
        ("unscale_layer", (3.0,)),
        ("unscale_layer", ()),
    ):
        getattr(fw.torch, method)(*args)
        getattr(fw.jax, method)(*args)
        if fw.peft is not None:  # PEFT has the scale helpers on its layers only
            for layer in fw.peft_layers():
                getattr(layer, method)(*args)
        _compare(cell, fw.forward())


def op_merge(fw: Frameworks, cell: Cell) -> None:
    with _quiet():
        for model in (fw.torch, fw.jax, fw.peft):
            if model is not None:
                model.merge_adapter()
    _compare(cell, fw.weights())
    _compare(cell, fw.forward())


def op_unmerge(fw: Frameworks, cell: Cell) -> None:
    with _quiet():
        for model in (fw.torch, fw.jax, fw.peft):
            if model is not None:
                model.unmerge_adapter()
    weights = fw.weights()
    _compare(cell, weights)
    measure(cell, "torch-original", weights["torch"], torch.from_numpy(fw.inp.weight).to(TORCH_DTYPES[fw.case.dtype]))


def _safe_merge(fw: Frameworks, cell: Cell, bad: float) -> None:
    """Poison one factor element; every framework must refuse the safe merge and change nothing."""
    factor = next(iter(fw.inp.factors))
    before = fw.weights()
    raised = {}
    t_param = fw.torch.model.layer.factors["default"][factor]
    j_param = fw.jax.model.layer.factors["default"][factor]
    t_saved, j_saved = t_param.detach().clone(), j_param[...]
    with torch.no_grad():
        t_param.view(-1)[0] = bad
    j_param[...] = j_saved.reshape(-1).at[0].set(bad).reshape(j_saved.shape)
    targets = {"torch": fw.torch.merge_adapter, "jax": fw.jax.merge_adapter}
    if fw.peft is not None:
        p_param = getattr(fw.peft.base_model.model.layer, factor)["default"]
        p_saved = p_param.detach().clone()
        with torch.no_grad():
            p_param.view(-1)[0] = bad
        targets["peft"] = fw.peft.merge_adapter
    for key, merge in targets.items():
        try:
            merge(safe_merge=True)
            raised[key] = False
        except ValueError:
            raised[key] = True
    for key, flag in raised.items():
        check(cell, key, flag, "did not raise ValueError")
    after = fw.weights()
    for key in after:
        measure(cell, f"{key}-unchanged", after[key], before[key])
    with torch.no_grad():
        t_param.copy_(t_saved)
        if fw.peft is not None:
            p_param.copy_(p_saved)
    j_param[...] = j_saved


def op_safe_merge_nan(fw: Frameworks, cell: Cell) -> None:
    _safe_merge(fw, cell, float("nan"))


def op_safe_merge_inf(fw: Frameworks, cell: Cell) -> None:
    _safe_merge(fw, cell, float("inf"))


def op_multi_adapter(fw: Frameworks, cell: Cell) -> None:
    """A second adapter "b" with other factors; both active."""
    cfg_t, cfg_j = _config(fw.case, "lt"), _config(fw.case, "lj")
    fw.torch.add_adapter("b", cfg_t)
    fw.jax.add_adapter("b", cfg_j)
    with torch.no_grad():
        for k, v in fw.inp.factors_b.items():
            fw.torch.model.layer.factors["b"][k].copy_(torch.from_numpy(v))
            fw.jax.model.layer.factors["b"][k][...] = jnp.asarray(v)
    fw.torch.set_adapter(["default", "b"])
    fw.jax.set_adapter(["default", "b"])
    if fw.peft is not None:
        fw.peft.add_adapter("b", _config(fw.case, "peft"))
        fw.set_peft_factors("b", fw.inp.factors_b)
        fw.peft.base_model.set_adapter(["default", "b"])
        fw.peft.eval()
    _compare(cell, fw.forward())
    fw.torch.set_adapter("default")
    fw.jax.set_adapter("default")
    fw.torch.delete_adapter("b")
    fw.jax.delete_adapter("b")
    if fw.peft is not None:
        fw.peft.base_model.set_adapter("default")
        fw.peft.delete_adapter("b")


def op_disabled(fw: Frameworks, cell: Cell) -> None:
    base = fw.torch_base(fw.tx)
    with fw.torch.disable_adapter(), fw.jax.disable_adapter():
        values = fw.forward() if fw.peft is None else None
        if fw.peft is not None:
            with fw.peft.disable_adapter():
                values = fw.forward()
    _compare(cell, values)
    measure(cell, "torch-base", values["torch"], base)


def op_rank_dropout_mask(fw: Frameworks, cell: Cell) -> None:
    """ΔW with rank dropout: PEFT draws its mask from torch's global RNG; we reproduce that draw
    with the same seed and inject the mask into both twins."""
    out = fw.case.layer.out_ch
    p = fw.case.config_kwargs()["rank_dropout"]
    torch.manual_seed(fw.case.seed + 1)
    keep = torch.rand(out) > p
    values = {
        "torch": fw.torch.model.layer.get_delta_weight("default", rank_dropout_mask=keep),
        "jax": fw.jax.model.layer.get_delta_weight("default", rank_dropout_mask=jnp.asarray(keep.numpy())),
    }
    if fw.peft is not None:
        torch.manual_seed(fw.case.seed + 1)
        values["peft"] = fw.peft.base_model.model.layer.get_delta_weight("default", apply_rank_dropout=True)
    _compare(cell, values)


def op_grad(fw: Frameworks, cell: Cell) -> None:
    """Gradients of sum(y * probe) w.r.t. every factor."""
    y_shape = fw.torch(fw.tx).shape
    probe = np.random.default_rng(fw.inp.probe_seed).standard_normal(tuple(y_shape)).astype(np.float32)
    t_probe = torch.from_numpy(probe)

    def torch_grads(model: nn.Module, layer: Any, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        params = {k: get(k) for k in fw.inp.factors}
        for param in params.values():
            param.grad = None
            param.requires_grad_(True)
        (model(fw.tx).float() * t_probe).sum().backward()
        return {k: v.grad.clone() for k, v in params.items()}

    t_layer = fw.torch.model.layer
    tg = torch_grads(fw.torch, t_layer, lambda k: t_layer.factors["default"][k])
    j_probe = jnp.asarray(channels_last(probe))

    def loss(tuner: Any) -> jax.Array:
        return (tuner(fw.jx).astype(jnp.float32) * j_probe).sum()

    jg = nnx.grad(loss, argnums=nnx.DiffState(0, lj.LycorisParam))(fw.jax)
    jg = jg["model"]["layer"]["factors"]["default"]
    pg = None
    if fw.peft is not None:
        p_layer = fw.peft.base_model.model.layer
        pg = torch_grads(fw.peft, p_layer, lambda k: getattr(p_layer, k)["default"])
    for name in fw.inp.factors:
        measure(cell, f"jax-torch:{name}", jg[name][...], tg[name])
        if pg is not None:
            if name in PEFT_GRAD_DEVIATION and fw.case.algo == "loha" and t_layer.plans["default"].effective_conv:
                cell.note += f" {name}: PEFT's CP backward is wrong (docs/DEVIATIONS.md a), not compared;"
                continue
            measure(cell, f"torch-peft:{name}", tg[name], pg[name])


def op_save_load(fw: Frameworks, cell: Cell) -> None:
    """Save in one framework, load in the other (both ways, and PEFT both ways)."""
    reference = fw.forward()
    with tempfile.TemporaryDirectory() as d_t, tempfile.TemporaryDirectory() as d_j:
        fw.torch.save_pretrained(d_t)
        fw.jax.save_pretrained(d_j)
        jax_from_torch = lj.LycorisTuner.from_pretrained(fw.jax_base(), d_t)
        jax_from_torch.model.eval()
        torch_from_jax = lt.LycorisTuner.from_pretrained(copy.deepcopy(fw.torch_base), d_j).eval()
        measure(cell, "torch->jax", channels_first(np.asarray(jax_from_torch(fw.jx), np.float32)), reference["torch"])
        measure(cell, "jax->torch", torch_from_jax(fw.tx), reference["jax"])
        if fw.peft is not None:
            with tempfile.TemporaryDirectory() as d_p:
                fw.peft.save_pretrained(d_p)
                ours_from_peft = lt.LycorisTuner.from_pretrained(copy.deepcopy(fw.torch_base), d_p).eval()
                jax_from_peft = lj.LycorisTuner.from_pretrained(fw.jax_base(), d_p)
                jax_from_peft.model.eval()
                peft_from_ours = peft.PeftModel.from_pretrained(copy.deepcopy(fw.torch_base), d_t).eval()
                measure(cell, "peft->torch", ours_from_peft(fw.tx), reference["peft"])
                measure(
                    cell, "peft->jax", channels_first(np.asarray(jax_from_peft(fw.jx), np.float32)), reference["peft"]
                )
                measure(cell, "torch->peft", peft_from_ours(fw.tx), reference["torch"])


def run_case(case: Case, ops: tuple[str, ...] | None = None) -> list[Cell]:
    """Run ``ops`` (default: all that apply) on one case; returns one :class:`Cell` per operation."""
    ops = ops or tuple(op for op in OPERATIONS if op != "init" or "init" in case.extra_ops)
    inp = Inputs(case)
    fw = Frameworks(case, inp)
    cells = []
    for op in ops:
        cell = Cell(case.id, op, case.tolerance_key)
        if op == "grad" and case.dtype != "fp32":
            cell.note = "skipped: gradients compared in fp32 (a low-precision output rounding dominates them)"
            cells.append(cell)
            continue
        try:
            globals()[f"op_{op}"](fw, cell)
        except Exception as err:
            cell.passed = False
            cell.note += f" raised {type(err).__name__}: {err};"
        cell.note += fw.note
        cells.append(cell)
    return cells
