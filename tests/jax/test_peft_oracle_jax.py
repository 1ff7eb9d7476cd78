"""Real-PEFT oracle for the Flax NNX twin: ``lycoris_jax`` against ``peft`` 0.21.2, both directions.

Every case uses a torch model and its NNX mirror (``tests/jax/mirrors.py``, same base weights) and checks:

1. PEFT -> JAX: PEFT creates the adapter (``init_weights=False``, so ΔW != 0) and saves it;
   ``lj.LycorisTuner.from_pretrained`` loads it. Same factor names, shapes and values; ΔW per module;
   eval forward; merged kernels and merged forward; unmerge restores the kernels; a scale-op sequence;
   fp32 gradients of a scalar loss for every factor; ``merge_and_unload``.
2. JAX -> PEFT: ``lj.LoHaModel``/``lj.LoKrModel`` create the adapter, save it, and
   ``peft.PeftModel.from_pretrained`` loads it on the torch mirror: same factors, ΔW and outputs.

Models are the "wide" mirrors (channels large enough that LoKr at r=2 decomposes w1/w2); flags that are
no-ops for every targeted layer are pruned from the case table. After creation (either side), one factor
that ΔW is linear in is multiplied by a power of two so that max|ΔW| ~ max|W|, and every case asserts that
the adapter moves the output by > 10x the forward tolerance (otherwise bf16 checks could not see it).

bf16 cases run a bf16 base on both sides with fp32 adapters (PEFT's autocast): the output is
``bf16(float32(base(x)) + x_fp32 @ ΔWᵀ)`` on both. Documented deviation (docs/DEVIATIONS.md, a):
PEFT's hand-written backward of LoHa's CP form (``use_effective_conv2d``) is wrong for
``hada_w1_a``/``hada_w2_a``; for those two factors, in modules that use the CP form, the JAX gradients
are compared with ``lycoris_torch``'s autograd instead. The largest error per (dtype, operation) is
printed at module teardown (``pytest -s``) and written to ``/tmp/oracle_max_errors_jax.json``.

The cases are ``parity_tests.cases.JAX_ORACLE`` / ``JAX_JIT_ORACLE`` and the tolerances the rows
``(dtype, op, "oracle_jax")`` of ``parity_tests.tolerances`` (one case table, one tolerance table).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from peft.tuners.lycoris_utils import LycorisLayer as PeftLycorisLayer
from safetensors.numpy import load_file

import lycoris_jax as lj
import lycoris_torch as lt
from parity_tests.cases import JAX_JIT_ORACLE, JAX_ORACLE, Case
from parity_tests.compare import Check
from parity_tests.compare import assert_close as check_close
from parity_tests.layouts import channels_first, channels_last, load_torch_state_into_nnx, torch_to_flax_kernel
from parity_tests.tolerances import tolerance
from tests.jax.mirrors import NnxConvWide, NnxMLPWide, TorchConvWide, TorchMLPWide

# --------------------------------------------------------------------------- error tracking
MAX_ERRORS: dict[str, dict[str, Any]] = {}
REPORT_PATH = Path("/tmp/oracle_max_errors_jax.json")


def _record(dtype: str, op: str, max_abs: float, max_rel: float, case_id: str) -> None:
    row = MAX_ERRORS.setdefault(
        f"{dtype}/{op}",
        {
            "max_abs": 0.0,
            "max_rel": 0.0,
            "worst_case": "",
            "checks": 0,
            "tol": tolerance(dtype, op, "oracle_jax").floor,
        },
    )
    row["checks"] += 1
    row["max_abs"] = max(row["max_abs"], max_abs)
    if max_rel > row["max_rel"] or not row["worst_case"]:
        row["max_rel"] = max(row["max_rel"], max_rel)
        row["worst_case"] = case_id


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread_and_error_report():
    """One torch thread while the module runs (tiny ops: OpenMP spin-waits cost ~100x on a busy 2-core box);
    afterwards print the largest error per (dtype, operation) and write it as JSON."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
    if not MAX_ERRORS:
        return
    REPORT_PATH.write_text(json.dumps(dict(sorted(MAX_ERRORS.items())), indent=2))
    lines = [f"{'dtype/operation':<22} {'checks':>6} {'max abs':>10} {'max rel':>10} {'tol':>9}  worst case"]
    for key, row in sorted(MAX_ERRORS.items()):
        lines.append(
            f"{key:<22} {row['checks']:>6} {row['max_abs']:>10.3e} {row['max_rel']:>10.3e} {row['tol']:>9.2e}"
            f"  {row['worst_case']}"
        )
    print("\nPEFT oracle (JAX), largest error vs reference (rel = max|JAX-ref| / max|ref|):\n" + "\n".join(lines))
    print(f"written to {REPORT_PATH}")


def _np(x: Any) -> np.ndarray:
    """A torch tensor or JAX array as a float64 numpy array (bf16 widened exactly, in numpy: no JAX compile)."""
    if isinstance(x, torch.Tensor):
        return x.detach().double().numpy()
    return np.asarray(x).astype(np.float64)


def assert_close(case_id: str, dtype: str, op: str, actual: Any, expected: Any, ref_scale: float | None = None) -> None:
    """``max|actual - expected| <= tol · max|expected|`` (or ``· ref_scale``) for the row ``(dtype, op,
    "oracle_jax")`` (``parity_tests.compare.assert_close``); the message names case, operation, errors
    and the worst index."""

    def record(check: Check) -> None:
        _record(dtype, op, check.max_abs, check.rel, case_id)

    check_close(case_id, dtype, op, "oracle_jax", actual, expected, ref_scale, record=record)


# --------------------------------------------------------------------------- case table
MODELS = {"mlp": (TorchMLPWide, NnxMLPWide), "conv": (TorchConvWide, NnxConvWide)}
RNG_IMPL = "rbg"
CASES = JAX_ORACLE


# --------------------------------------------------------------------------- helpers
def _configs(case: Case) -> tuple[peft.PeftConfig, lj.LycorisConfig, type[lj.LycorisTuner]]:
    kw = case.config_kwargs()
    if case.algo == "loha":
        return peft.LoHaConfig(**kw), lj.LoHaConfig(**kw), lj.LoHaModel
    return peft.LoKrConfig(**kw), lj.LoKrConfig(**kw), lj.LoKrModel


def _torch_base(case: Case, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = MODELS[case.layer.name][0]()
    return (model.to(torch.bfloat16) if case.dtype == "bf16" else model).eval()


def _nnx_mirror(case: Case, torch_base: torch.nn.Module) -> nnx.Module:
    """The NNX mirror with ``torch_base``'s weights, kernels and biases cast to bf16 in bf16 cases."""
    model = MODELS[case.layer.name][1](_rngs(0))
    load_torch_state_into_nnx(model, torch_base.state_dict())
    if case.dtype == "bf16":
        for _, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Param):
                node.set_value(jnp.asarray(np.asarray(node.get_value()).astype(jnp.bfloat16)))
    return model


def _rngs(seed: int) -> nnx.Rngs:
    """``nnx.Rngs(seed)`` with an ``rbg`` key: initial values never matter here (both directions compare loaded
    values), and XLA compiles its per-shape ``uniform`` ~2x faster on CPU than threefry's."""
    return nnx.Rngs(jax.random.key(seed, impl=RNG_IMPL))


def _inputs(case: Case, seed: int = 1) -> tuple[tuple[torch.Tensor, ...], tuple[jax.Array, ...]]:
    """``(torch inputs NC..., JAX inputs N...C)`` with identical values (bf16-rounded once, in torch)."""
    rng = np.random.default_rng(seed)
    shapes = [(4, 24)] if case.layer.name == "mlp" else [(2, 24, 9), (2, 24, 5, 7)]
    xs_t = tuple(torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in shapes)
    if case.dtype == "bf16":
        xs_t = tuple(x.to(torch.bfloat16) for x in xs_t)
    jdtype = jnp.bfloat16 if case.dtype == "bf16" else np.float32
    return xs_t, tuple(jnp.asarray(channels_last(x.float().numpy()).astype(jdtype)) for x in xs_t)


def _as_tuple(y: Any) -> tuple[Any, ...]:
    return y if isinstance(y, tuple) else (y,)


def _check_outputs(case_id: str, dtype: str, op: str, y_jax: Any, y_torch: Any) -> None:
    """Compare every output (JAX channels-last, torch channels-first), dtypes included."""
    for i, (yj, yt) in enumerate(zip(_as_tuple(y_jax), _as_tuple(y_torch), strict=True)):
        assert str(yj.dtype) == str(yt.dtype).removeprefix("torch."), f"{case_id} [{op}] out{i}: dtype {yj.dtype}"
        assert_close(f"{case_id}:out{i}", dtype, op, channels_first(_np(yj)), yt)


def _torch_forward(model: torch.nn.Module, xs: tuple[torch.Tensor, ...]) -> Any:
    with torch.no_grad():
        return model(*xs)


def _jax_layers(tuner: lj.LycorisTuner) -> dict[str, lj.LycorisLayer]:
    return {
        ".".join(str(p) for p in path): m for path, m in nnx.iter_modules(tuner.model) if isinstance(m, lj.LycorisLayer)
    }


def _peft_layers(peft_model: peft.PeftModel) -> dict[str, PeftLycorisLayer]:
    prefix = "base_model.model."
    return {n.removeprefix(prefix): m for n, m in peft_model.named_modules() if isinstance(m, PeftLycorisLayer)}


def _peft_factors(layer: PeftLycorisLayer, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {n: getattr(layer, n)[adapter] for n in layer.adapter_layer_names if adapter in getattr(layer, n)}


def _check_factors(case: Case, label: str, peft_model: peft.PeftModel, tuner: lj.LycorisTuner) -> None:
    """Same modules, factor names, shapes (PyTorch layouts), fp32 dtypes and values; same ΔW per module."""
    cid = f"{case.id}:{label}"
    ours, theirs = _jax_layers(tuner), _peft_layers(peft_model)
    assert sorted(ours) == sorted(theirs) == sorted(case.layer.targets), f"{cid} [modules]: {sorted(ours)}"
    for key, layer in ours.items():
        assert isinstance(layer, lj.LoHaLayer if case.algo == "loha" else lj.LoKrLayer), f"{cid}:{key}"
        p_factors, o_factors = _peft_factors(theirs[key]), dict(layer.factors["default"])
        assert sorted(o_factors) == sorted(p_factors), f"{cid}:{key} [factor names]: {sorted(o_factors)}"
        for name, p in p_factors.items():
            o = o_factors[name][...]
            assert o.shape == tuple(p.shape), f"{cid}:{key}.{name} [factor shape]: {o.shape} vs {tuple(p.shape)}"
            assert o.dtype == jnp.float32 and p.dtype == torch.float32, f"{cid}:{key}.{name}: {o.dtype}, {p.dtype}"
            assert_close(f"{cid}:{key}.{name}", case.dtype, "checkpoint", o, p)
        delta = layer.get_delta_weight("default")
        with torch.no_grad():
            assert_close(f"{cid}:{key}", case.dtype, "delta", delta, theirs[key].get_delta_weight("default"))
        assert np.abs(_np(delta)).max() > 0, f"{cid}:{key} [delta]: ΔW is zero, the case would test nothing"


def _loss_cotangents(y_torch: Any, seed: int = 4) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(tuple(y.shape)).astype(np.float32) for y in _as_tuple(y_torch))


def _torch_grads(model: torch.nn.Module, xs: tuple[torch.Tensor, ...], gs: tuple[np.ndarray, ...]) -> None:
    """Backpropagate ``Σ <y_i, g_i>`` (fills ``.grad``)."""
    ys = _as_tuple(model(*xs))
    sum((y * torch.from_numpy(g)).sum() for y, g in zip(ys, gs, strict=True)).backward()


def _jax_grads(tuner: lj.LycorisTuner, xs: tuple[jax.Array, ...], gs: tuple[np.ndarray, ...]) -> lj.LycorisTuner:
    """A copy of ``tuner`` whose factors hold d Σ <y_i, g_i> / d factor (``nnx.grad`` over ``LycorisParam``)."""
    gs_last = tuple(jnp.asarray(channels_last(g)) for g in gs)

    def loss(model: lj.LycorisTuner) -> jax.Array:
        return sum((y * g).sum() for y, g in zip(_as_tuple(model(*xs)), gs_last, strict=True))

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, lj.LycorisParam))(tuner)
    out = nnx.clone(tuner)
    nnx.update(out, grads)
    return out


PEFT_CP_BACKWARD_BUG = ("hada_w1_a", "hada_w2_a")


def _check_grads(case: Case, peft_model: peft.PeftModel, tuner: lj.LycorisTuner, torch_base, xs_t, xs_j, ckpt) -> None:
    """fp32 gradients of every factor vs PEFT's autograd; LoHa CP ``hada_w{1,2}_a`` vs ``lycoris_torch``."""
    y = _torch_forward(peft_model, xs_t)
    gs = _loss_cotangents(y)
    _torch_grads(peft_model, xs_t, gs)
    grads = _jax_layers(_jax_grads(tuner, xs_j, gs))
    reference: dict[str, dict[str, torch.Tensor]] = {
        key: {n: p.grad for n, p in _peft_factors(layer).items()} for key, layer in _peft_layers(peft_model).items()
    }
    if case.algo == "loha" and case.config_kwargs()["use_effective_conv2d"]:
        twin = lt.LycorisTuner.from_pretrained(copy.deepcopy(torch_base), ckpt, is_trainable=True).eval()
        _torch_grads(twin, xs_t, gs)
        for key, layer in twin.model.named_modules():
            if isinstance(layer, lt.LycorisLayer) and "hada_t1" in layer.factors["default"]:
                for name in PEFT_CP_BACKWARD_BUG:
                    right, wrong = _np(layer.factors["default"][name].grad), _np(reference[key][name])
                    assert np.abs(wrong - right).max() > 0.1 * np.abs(right).max(), (
                        f"{case.id}:{key}.{name}: PEFT's CP backward now matches autograd; drop the exception"
                    )
                    reference[key][name] = layer.factors["default"][name].grad
    for key, factors in reference.items():
        for name, g in factors.items():
            assert g is not None, f"{case.id}:{key}.{name} [grad]: no torch gradient"
            assert_close(f"{case.id}:{key}.{name}", "fp32", "grad", grads[key].factors["default"][name][...], g)


def _flax_kernels(model: Any, keys: list[str]) -> dict[str, jax.Array]:
    out = {}
    for key in keys:
        layer = model
        for part in key.split("."):
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        out[key] = (layer.get_base_layer() if isinstance(layer, lj.LycorisLayer) else layer).kernel[...]
    return out


def _torch_kernels(model: torch.nn.Module, keys: list[str]) -> dict[str, np.ndarray]:
    """Torch weights under ``keys`` as Flax kernels (float64)."""
    out = {}
    for key in keys:
        layer = model.get_submodule(key)
        layer = layer.get_base_layer() if isinstance(layer, PeftLycorisLayer) else layer
        out[key] = torch_to_flax_kernel(_np(layer.weight))
    return out


#: One factor per algorithm/form in which ΔW is linear (LoHa: w1_a in both forms; LoKr: w1 or w1_a).
LINEAR_FACTORS = ("hada_w1_a", "lokr_w1", "lokr_w1_a")


def _gain(weight_max: float, delta_max: float) -> float:
    """The power of two (exact in every float format) that brings max|ΔW| closest to max|W|."""
    return 2.0 ** round(math.log2(weight_max / delta_max))


def _amplify_peft(peft_model: peft.PeftModel) -> None:
    """Scale each module's ΔW to about max|W| (Kaiming factors give LoHa a ΔW of ~1% of W, invisible next to
    bf16 rounding) by multiplying a factor that ΔW is linear in by a power of two."""
    for layer in _peft_layers(peft_model).values():
        factors = _peft_factors(layer)
        name = next(n for n in LINEAR_FACTORS if n in factors)
        with torch.no_grad():
            w_max, d_max = layer.get_base_layer().weight.abs().max(), layer.get_delta_weight("default").abs().max()
            factors[name].mul_(_gain(float(w_max), float(d_max)))


def _amplify_jax(tuner: lj.LycorisTuner) -> None:
    """:func:`_amplify_peft` for a JAX tuner (in numpy: no JAX compile)."""
    for layer in _jax_layers(tuner).values():
        factors = layer.factors["default"]
        name = next(n for n in LINEAR_FACTORS if n in factors)
        gain = _gain(np.abs(_np(layer.kernel[...])).max(), np.abs(_np(layer.get_delta_weight("default"))).max())
        factors[name].set_value(jnp.asarray(np.asarray(factors[name][...]) * np.float32(gain)))


def _check_adapter_effect(case_id: str, dtype: str, y_adapted: Any, y_base: Any) -> None:
    """The adapter must move every output by far more than the forward tolerance, or the forward checks are blind."""
    for i, (ya, yb) in enumerate(zip(_as_tuple(y_adapted), _as_tuple(y_base), strict=True)):
        a, b = _np(ya), _np(yb)
        effect = float(np.abs(a - b).max() / np.abs(a).max())
        bound = 10 * tolerance(dtype, "forward", "oracle_jax").floor
        assert effect > bound, f"{case_id}:out{i} [adapter effect]: only {effect:.2e} of max|y|"


SCALE_STEPS = [
    ("set_scale(default, 2)", lambda m: m.set_scale("default", 2)),
    ("scale_layer(3)", lambda m: m.scale_layer(3)),
    ("unscale_layer(3)", lambda m: m.unscale_layer(3)),
    ("unscale_layer()", lambda m: m.unscale_layer()),
]


# --------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_peft(case: Case, tmp_path: Path) -> None:
    """PEFT -> JAX (factors, ΔW, forward, merge/unmerge, scale ops, grads, merge_and_unload), JAX -> PEFT."""
    cid, dtype, keys, kw = case.id, case.dtype, list(case.layer.targets), case.config_kwargs()
    pcfg, jcfg, tuner_cls = _configs(case)
    torch_base = _torch_base(case)
    xs_t, xs_j = _inputs(case)

    # (1) PEFT creates and saves; JAX loads
    y_base = _torch_forward(torch_base, xs_t)
    mirror = _nnx_mirror(case, torch_base)
    _check_outputs(cid, dtype, "base_forward", mirror(*xs_j), y_base)
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(copy.deepcopy(torch_base), pcfg).eval()
    _amplify_peft(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    y_peft = _torch_forward(peft_model, xs_t)
    _check_adapter_effect(f"{cid}:peft->jax", dtype, y_peft, y_base)
    tuner = lj.LycorisTuner.from_pretrained(mirror, tmp_path / "peft", rngs=_rngs(0))
    assert type(tuner) is tuner_cls, cid
    tuner.eval()
    _check_factors(case, "peft->jax", peft_model, tuner)
    _check_outputs(cid, dtype, "forward", tuner(*xs_j), y_peft)

    # merge -> kernels and forward; unmerge -> kernels back
    w0_jax, w0_peft = _flax_kernels(tuner.model, keys), copy.deepcopy(peft_model.state_dict())
    peft_model.merge_adapter()
    tuner.merge_adapter()
    merged = _flax_kernels(tuner.model, keys)
    for key, kernel in _torch_kernels(peft_model.base_model.model, keys).items():
        assert_close(f"{cid}:{key}", dtype, "merge_weight", merged[key], kernel)
    _check_outputs(f"{cid}:merged", dtype, "merge_forward", tuner(*xs_j), _torch_forward(peft_model, xs_t))
    peft_model.unmerge_adapter()
    tuner.unmerge_adapter()
    unmerged = _flax_kernels(tuner.model, keys)
    for key, kernel in _torch_kernels(peft_model.base_model.model, keys).items():
        assert_close(f"{cid}:{key}", dtype, "unmerge_weight", unmerged[key], kernel)
        ref = max(np.abs(_np(merged[key])).max(), np.abs(_np(w0_jax[key])).max())
        assert_close(f"{cid}:{key}", dtype, "unmerge_vs_orig", unmerged[key], w0_jax[key], ref)
    layers = _jax_layers(tuner)
    for key in keys:  # later steps start from the original weights on both sides
        layers[key].get_base_layer().kernel.set_value(w0_jax[key])
    peft_model.load_state_dict(w0_peft)

    # scale ops on both, forward after each
    for label, op in SCALE_STEPS:
        op(tuner)
        for layer in _peft_layers(peft_model).values():
            op(layer)
        for key, layer in _peft_layers(peft_model).items():
            assert layers[key].scaling["default"] == layer.scaling["default"], f"{cid}:{key} [{label}] scaling"
        _check_outputs(f"{cid}:{label}", dtype, "scale_forward", tuner(*xs_j), _torch_forward(peft_model, xs_t))
    assert all(layer.scaling["default"] == kw["alpha"] / kw["r"] for layer in layers.values()), cid

    # gradients of every factor (fp32 only)
    if dtype == "fp32":
        _check_grads(case, peft_model, tuner, torch_base, xs_t, xs_j, tmp_path / "peft")

    # merge_and_unload
    merged_jax = tuner.merge_and_unload()
    merged_peft = peft_model.merge_and_unload()
    assert not any(isinstance(m, lj.LycorisLayer) for _, m in nnx.iter_modules(merged_jax)), cid
    kernels = _flax_kernels(merged_jax, keys)
    for key, kernel in _torch_kernels(merged_peft, keys).items():
        assert_close(f"{cid}:merge_and_unload:{key}", dtype, "merge_weight", kernels[key], kernel)
    _check_outputs(
        f"{cid}:merge_and_unload", dtype, "merge_forward", merged_jax(*xs_j), _torch_forward(merged_peft, xs_t)
    )

    # (2) JAX creates and saves; PEFT loads
    jax_tuner = tuner_cls(_nnx_mirror(case, torch_base), jcfg, rngs=_rngs(2))
    jax_tuner.eval()
    _amplify_jax(jax_tuner)
    jax_tuner.save_pretrained(tmp_path / "jax")
    saved_peft = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    saved_jax = load_file(tmp_path / "jax" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in saved_jax.items()} == {k: v.shape for k, v in saved_peft.items()}, (
        f"{cid} [checkpoint keys/shapes]: JAX {sorted(saved_jax)}, PEFT {sorted(saved_peft)}"
    )
    peft_loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_base), tmp_path / "jax").eval()
    _check_factors(case, "jax->peft", peft_loaded, jax_tuner)
    y_loaded = _torch_forward(peft_loaded, xs_t)
    _check_adapter_effect(f"{cid}:jax->peft", dtype, y_loaded, y_base)
    _check_outputs(f"{cid}:jax->peft", dtype, "load_forward", jax_tuner(*xs_j), y_loaded)


# --------------------------------------------------------------------------- jit
JIT_CASES = JAX_JIT_ORACLE


@pytest.mark.parametrize("case", JIT_CASES, ids=[c.id for c in JIT_CASES])
def test_jit_forward_equals_eager(case: Case) -> None:
    """``nnx.jit``-compiled forward of a JAX-created adapter equals the eager forward."""
    _, jcfg, tuner_cls = _configs(case)
    tuner = tuner_cls(_nnx_mirror(case, _torch_base(case)), jcfg, rngs=_rngs(2))
    tuner.eval()
    _amplify_jax(tuner)
    _, xs = _inputs(case)
    eager = tuner(*xs)
    jitted = nnx.jit(lambda model, *args: model(*args))(tuner, *xs)
    for i, (yj, ye) in enumerate(zip(_as_tuple(jitted), _as_tuple(eager), strict=True)):
        assert_close(f"{case.id}:out{i}", case.dtype, "jit", yj, ye)
