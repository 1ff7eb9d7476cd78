"""The one case table: the parity matrix and the PEFT oracle tests draw their cases from here.

The matrix is algorithm x layer x dtype x options x inputs (random normal, or PEFT's arange style
with values up to 100) x forward path; each case runs through the NNX tuner and, as columns of
their own (ids ending ``-linen`` / ``-pytree``), the Linen transform and the pytree API. The oracle
suites (``tests/torch/test_peft_oracle.py``, ``tests/jax/test_peft_oracle_jax.py``) are views of the
same table (``suite``). Every combination left out has a stated reason in :data:`SKIPPED`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CASES",
    "EXPECTED_FAILURES",
    "FRONTS",
    "FRONT_SKIPS",
    "JAX_JIT_ORACLE",
    "JAX_ORACLE",
    "PATH_MODES",
    "QUICK",
    "SKIPPED",
    "TABLE",
    "TORCH_GRAD_ORACLE",
    "TORCH_ORACLE",
    "TPU_MODE",
    "Case",
    "LayerSpec",
    "ModelSpec",
    "front_ops",
    "shard",
]

DTYPES = ("fp32", "bf16", "fp16")
#: Forward paths with a column of their own (``lycoris_core.paths``); the default column is ``"auto"``.
PATH_MODES = ("peft", "merged", "factored")
#: The merged path as a TPU compiles it (``lycoris_jax.compiling_for("tpu")``: the fold rules of
#: ``lycoris_core.paths.fold_rule``), run on this machine: a column of its own for every layer and dtype.
TPU_MODE = "merged_tpu"
#: The JAX front ends every matrix case runs through (cell ids: ``<case>``, ``<case>-linen``, ``<case>-pytree``).
FRONTS = ("nnx", "linen", "pytree")


@dataclass(frozen=True)
class LayerSpec:
    """A base layer as both frameworks build it; ``input_shape`` is PyTorch's (channels first)."""

    name: str
    kind: str  # "linear" | "conv1d" | "conv2d"
    in_ch: int
    out_ch: int
    input_shape: tuple[int, ...]
    kernel: tuple[int, ...] = ()
    stride: int | tuple[int, ...] = 1
    padding: tuple[int, ...] = ()
    dilation: int = 1
    groups: int = 1
    targets: tuple[str, ...] = ("layer",)

    @property
    def pointwise(self) -> bool:
        return math.prod(self.kernel) == 1

    @property
    def dims(self) -> tuple[int, int]:
        """``(out, in/groups)``: what LoKr factorises."""
        return self.out_ch, self.in_ch // self.groups


@dataclass(frozen=True)
class ModelSpec:
    """A small model of several targeted layers (the JAX oracle's torch/NNX mirrors, by name)."""

    name: str
    targets: tuple[str, ...]
    #: ``(out, in/groups, pointwise)`` of every target, for the no-op flag rules.
    dims: tuple[tuple[int, int, bool], ...]


LAYERS = (
    LayerSpec("linear", "linear", 24, 36, (4, 24)),
    # out = in = 36: LoKr's W1 and W2 have equal, square shapes (6, 6) at r=16 (both full) and r=1
    # (W2 = w2_a @ w2_b): a swapped Kronecker order or a transposed factor changes values, not shapes
    LayerSpec("linear_eq", "linear", 36, 36, (4, 36)),
    LayerSpec("conv1d_k1", "conv1d", 12, 20, (2, 12, 9), (1,), padding=(0,)),
    LayerSpec("conv1d_k3", "conv1d", 12, 20, (2, 12, 9), (3,), padding=(1,)),
    LayerSpec("conv2d_1x1", "conv2d", 8, 12, (2, 8, 6, 6), (1, 1), padding=(0, 0)),
    LayerSpec("conv2d_3x3", "conv2d", 8, 12, (2, 8, 6, 6), (3, 3), padding=(1, 1)),
    LayerSpec("conv2d_3x5", "conv2d", 8, 12, (2, 8, 6, 6), (3, 5), padding=(1, 2)),
    LayerSpec("conv2d_grouped", "conv2d", 12, 24, (2, 12, 6, 6), (3, 3), padding=(1, 1), groups=3),
    LayerSpec("conv2d_strided_dilated", "conv2d", 8, 12, (2, 8, 9, 9), (3, 3), stride=2, padding=(2, 2), dilation=2),
)

# The torch oracle's layers: channels 24 -> 48 so that decompose_both really decomposes w1 at r=2
# (48 -> (6, 8), 24 -> (4, 6)).
ORACLE_LAYERS = (
    LayerSpec("linear", "linear", 24, 36, (3, 5, 24)),
    LayerSpec("conv1d1", "conv1d", 24, 48, (2, 24, 9), (1,), padding=(0,)),
    LayerSpec("conv1d3", "conv1d", 24, 48, (2, 24, 9), (3,), padding=(1,)),
    LayerSpec("conv2d1x1", "conv2d", 24, 48, (2, 24, 5, 6), (1, 1), padding=(0, 0)),
    LayerSpec("conv2d3x3", "conv2d", 24, 48, (2, 24, 5, 6), (3, 3), padding=(1, 1)),
    LayerSpec("conv2d3x5", "conv2d", 24, 48, (2, 24, 5, 8), (3, 5), stride=(1, 2), padding=(1, 2)),
    LayerSpec("gconv2d3x3", "conv2d", 24, 48, (2, 24, 5, 6), (3, 3), padding=(1, 1), groups=3),
)
# The JAX oracle's models (``tests/jax/mirrors.py``: TorchMLPWide/NnxMLPWide, TorchConvWide/NnxConvWide).
ORACLE_MODELS = (
    ModelSpec("mlp", ("layers.0", "layers.1", "head"), ((48, 24, True), (36, 48, True), (8, 36, True))),
    ModelSpec("conv", ("c1", "c1p", "c2", "c2g"), ((48, 24, False), (24, 48, True), (48, 24, False), (96, 16, False))),
)

#: Config fields each suite starts from (a case's ``options`` override them).
SUITE_DEFAULTS: dict[str, dict[str, Any]] = {
    # rank_dropout > 0 only acts in training (the rank-dropout op injects one mask into every framework)
    "matrix": {"r": 2, "alpha": 3, "init_weights": False, "rank_dropout": 0.5},
    # alpha 6: scaling 3.0 (r=2) and 0.375 (r=16), exact in float32, so LoHa's float32 scale tensor is exact
    "oracle": {"alpha": 6},
    "oracle_grad": {"alpha": 6},
    "oracle_jax": {"alpha": 6, "init_weights": False},
    "oracle_jax_jit": {"alpha": 6, "init_weights": False},
}


@dataclass(frozen=True)
class Case:
    """One case. ``options`` are config kwargs over the suite's defaults; ``labels`` name them in the id."""

    algo: str  # "loha" | "lokr"
    layer: LayerSpec | ModelSpec
    dtype: str  # "fp32" | "bf16" | "fp16" (oracle: also "fp64")
    options: tuple[tuple[str, Any], ...] = ()
    labels: tuple[str, ...] = ()
    seed: int = 0
    extra_ops: tuple[str, ...] = field(default=())
    #: A column of its own: ``"branch_base"`` builds the JAX tuner with ``branch_dtype="base"`` (the
    #: branch in the base layer's compute dtype, mixed precision); a forward path (``"peft"``,
    #: ``"merged"``, ``"factored"``) builds both twins with that ``forward_path``. No mode: the
    #: default path (``"auto"``, the cost rule).
    mode: str = ""
    #: ``"normal"``: standard-normal activations; ``"arange"``: ``arange(n) % 101`` (PEFT's test style,
    #: values up to 100; integers, exact in every dtype), where long sums carry large rounding errors.
    inputs: str = "normal"
    suite: str = "matrix"

    @property
    def id(self) -> str:
        tail = (*(("arange",) if self.inputs == "arange" else ()), *((self.mode,) if self.mode else ()))
        return "-".join((self.algo, self.layer.name, self.dtype, *self.labels, *tail))

    @property
    def tolerance_key(self) -> str:
        """The dtype row of the tolerance table: ``"bf16"``, or ``"bf16+branch_base"`` for a mode."""
        return f"{self.dtype}+{self.mode}" if self.mode else self.dtype

    @property
    def twin_kwargs(self) -> dict[str, Any]:
        """Extra arguments of both twins' tuners for this case's mode."""
        if self.mode == TPU_MODE:
            return {"forward_path": "merged"}
        return {"forward_path": self.mode} if self.mode in PATH_MODES else {}

    @property
    def jax_kwargs(self) -> dict[str, Any]:
        """Extra arguments of the JAX tuner (and the Linen wrapper) for this case's mode."""
        return {"branch_dtype": "base"} if self.mode == "branch_base" else self.twin_kwargs

    @property
    def fronts(self) -> tuple[str, ...]:
        """The JAX front ends this case runs through (:data:`FRONT_SKIPS` says why one is left out)."""
        return tuple(f for f in FRONTS if f == "nnx" or not _front_skip(f, "*", self))

    def config_kwargs(self) -> dict[str, Any]:
        """Config kwargs shared by PEFT and both twins."""
        kw = dict(SUITE_DEFAULTS[self.suite])
        kw["target_modules"] = list(self.layer.targets)
        if self.algo == "lokr" and self.suite == "matrix":
            kw["rank_dropout_scale"] = True
        kw.update(dict(self.options))
        return kw


# ---------------------------------------------------------------------------------------------- front ends
#: ``(front, op or "*", mode or "*", reason)``: what a JAX front end does not run, said once.
FRONT_SKIPS: tuple[tuple[str, str, str, str], ...] = (
    ("pytree", "*", "peft", "the pytree API's forward is merge(params) and the model: the merged path only"),
    ("pytree", "*", "merged", "the pytree API's forward is the merged path already (the -pytree column of the case)"),
    ("pytree", "*", "factored", "the pytree API's forward is merge(params) and the model: the merged path only"),
    ("pytree", "*", TPU_MODE, "the pytree API's forward is merge(params) and the model: no fold rules"),
    ("pytree", "*", "branch_base", "the pytree API has no branch (merge rounds W + ΔW to the kernel dtype once)"),
    ("linen", "delta_weight", "*", "the Linen API has no ΔW accessor; its ΔW is checked through linen.merge"),
    ("linen", "multi_adapter", "*", "a LycorisModule wraps one adapter; several adapters are merged one by one"),
    ("pytree", "disabled", "*", "nothing to disable: the base params are the model without the adapter"),
    ("linen", "safe_merge_nan", "*", "linen.merge has no safe mode (it returns new params; nothing is modified)"),
    ("linen", "safe_merge_inf", "*", "linen.merge has no safe mode (it returns new params; nothing is modified)"),
    ("pytree", "safe_merge_nan", "*", "pytree.merge has no safe mode (it returns new params; nothing is modified)"),
    ("pytree", "safe_merge_inf", "*", "pytree.merge has no safe mode (it returns new params; nothing is modified)"),
    (
        "linen",
        "rank_dropout_mask",
        "*",
        "masks are drawn from a JAX key inside apply; PEFT's torch draw cannot be injected through the public API",
    ),
    (
        "pytree",
        "rank_dropout_mask",
        "*",
        "masks are drawn from a JAX key inside merge; PEFT's torch draw cannot be injected through the public API",
    ),
)


def _front_skip(front: str, op: str, case: Case) -> str | None:
    """Why ``front`` does not run ``op`` of ``case`` (``op="*"``: the whole case), or ``None``."""
    for f, o, mode, reason in FRONT_SKIPS:
        if f == front and mode in ("*", case.mode) and (o == "*" or (op != "*" and o == op)):
            return reason
    return None


def front_ops(case: Case, front: str, ops: tuple[str, ...]) -> tuple[str, ...]:
    """The operations of ``ops`` that ``front`` runs for ``case``."""
    if front == "nnx":
        return ops
    if front not in case.fronts:
        return ()
    return tuple(op for op in ops if not _front_skip(front, op, case))


#: Cells that fail on a known bug in the library, until it is fixed: ``(cell id pattern (fnmatch), op,
#: substring of the failing check, note)``. Only the failures containing the substring are expected; a
#: matching cell whose expected failure stops happening fails, so the entries go with the fix.
EXPECTED_FAILURES: tuple[tuple[str, str, str, str], ...] = ()


# ---------------------------------------------------------------------------------------------- the matrix
def _lokr_options(layer: LayerSpec) -> list[tuple[tuple[tuple[str, Any], ...], tuple[str, ...]]]:
    opts = [((("r", 1),), ("r1",)), ((("r", 16),), ("r16",))]
    if not layer.pointwise:
        opts.append(((("r", 1), ("use_effective_conv2d", True)), ("r1", "effconv")))
    opts.append(((("r", 1), ("decompose_both", True), ("decompose_factor", 4)), ("r1", "decompose_both", "df4")))
    return opts


def _loha_options(layer: LayerSpec) -> list[tuple[tuple[tuple[str, Any], ...], tuple[str, ...]]]:
    return [((), ("plain",))] + ([] if layer.pointwise else [((("use_effective_conv2d", True),), ("effconv",))])


def _matrix(inputs: str, skipped: list[tuple[str, str]]) -> list[Case]:
    """One input style's cases (``"arange"``: in fp32 the option axes on the default path and every
    forward path on the base options; in bf16/fp16 every path and the mixed-precision column on every
    other layer, alternating the dtype, so each path sees each dtype on half the layers)."""
    cases: list[Case] = []
    arange = inputs == "arange"
    for i, layer in enumerate(LAYERS):
        for j, dtype in enumerate(DTYPES):
            if arange and dtype != "fp32" and (i + j) % 2:
                continue
            loha_opts, lokr_opts = _loha_options(layer), _lokr_options(layer)
            if layer.pointwise and not arange:
                skipped.append(
                    (
                        f"loha-{layer.name}-{dtype}-effconv",
                        "effective conv is off for Linear and kernel-1 convs (PEFT rule): same as plain",
                    )
                )
            if dtype != "fp32":
                # The option axes change factor shapes only, whose arithmetic is fp32 in every dtype.
                for algo, opts in (("loha", loha_opts), ("lokr", lokr_opts)):
                    for _opts, labels in opts[1:] if not arange else ():
                        skipped.append(
                            (
                                f"{algo}-{layer.name}-{dtype}-{'-'.join(labels)}",
                                "factor-shape option covered in fp32; adapters are fp32 in low-precision cases too",
                            )
                        )
                loha_opts, lokr_opts = loha_opts[:1], lokr_opts[:1]
            for opts, labels in loha_opts:
                cases.append(Case("loha", layer, dtype, opts, labels, inputs=inputs))
            for opts, labels in lokr_opts:
                cases.append(Case("lokr", layer, dtype, opts, labels, inputs=inputs))
            if dtype != "fp32":  # mixed precision: the same cases with the branch in the base's dtype
                cases.append(Case("loha", layer, dtype, *loha_opts[0], mode="branch_base", inputs=inputs))
                cases.append(Case("lokr", layer, dtype, *lokr_opts[0], mode="branch_base", inputs=inputs))
            # every forward path on every layer and dtype (a factored request the algebra does not allow,
            # e.g. a grouped conv, is served by the merged path); the TPU's fold rules on normal inputs
            for path in (*PATH_MODES, *(() if arange else (TPU_MODE,))):
                cases.append(Case("loha", layer, dtype, *loha_opts[0], mode=path, inputs=inputs))
                cases.append(Case("lokr", layer, dtype, *lokr_opts[0], mode=path, inputs=inputs))
            if dtype == "fp32" and not arange:  # the LoKr factor shapes (and LoHa's CP form) on the factored path
                for opts, labels in _lokr_options(layer)[1:]:
                    cases.append(Case("lokr", layer, dtype, opts, labels, mode="factored"))
                for opts, labels in _loha_options(layer)[1:]:
                    cases.append(Case("loha", layer, dtype, opts, labels, mode="factored"))
    return cases


def _extra_cases() -> list[Case]:
    """Initialisation (zero ΔW in every framework) and rank/alpha patterns."""
    cases = []
    by_name = {layer.name: layer for layer in LAYERS}
    for name in ("linear", "conv2d_3x3"):
        layer = by_name[name]
        cases.append(Case("loha", layer, "fp32", (("init_weights", True),), ("init_true",), extra_ops=("init",)))
        cases.append(
            Case("lokr", layer, "fp32", (("init_weights", True), ("r", 16)), ("r16", "init_true"), extra_ops=("init",))
        )
        cases.append(
            Case(
                "lokr",
                layer,
                "fp32",
                (("init_weights", "lycoris"), ("r", 1)),
                ("r1", "init_lycoris"),
                extra_ops=("init",),
            )
        )
        # "ayer" must not match the module "layer" (patterns match dot-aligned suffixes): an alpha taken
        # from it (9.0) instead of "layer"'s (7.5) shows a pattern matched against the wrong module
        patterns = (("rank_pattern", {"lay.r": 5, "layer": 3}), ("alpha_pattern", {"ayer": 9.0, "layer": 7.5}))
        cases.append(Case("loha", layer, "fp32", patterns, ("patterns",)))
        cases.append(Case("lokr", layer, "fp32", patterns, ("patterns",)))
    return cases


def _matrix_cases() -> tuple[list[Case], list[tuple[str, str]]]:
    skipped: list[tuple[str, str]] = []
    cases = _matrix("normal", skipped) + _extra_cases() + _matrix("arange", skipped)
    skipped.append(("loha-*-r16", "LoHa's factor structure does not depend on r (unlike LoKr's full/decomposed w1/w2)"))
    skipped.append(("lokr-linear*-effconv", "effective conv is forced off for Linear (PEFT rule)"))
    skipped.append(
        (
            "*-arange-* (fp32 option axes on a path; bf16/fp16 on every other layer)",
            "arange inputs test long sums of large terms: the option axes run in fp32 on the default path, every "
            "path on the base options; in bf16/fp16 each path and dtype on half the layers (alternating)",
        )
    )
    for front, op, mode, reason in FRONT_SKIPS:
        skipped.append((f"*{'' if mode == '*' else '-' + mode}-{front} / {op}", reason))
    return cases, skipped


# ---------------------------------------------------------------------------------------------- oracles
def _factorization(dimension: int, factor: int) -> tuple[int, int]:
    """PEFT's own ``factorization`` where installed (the pruning rules are PEFT's), else ``lycoris_core``'s."""
    try:
        from peft.tuners.lokr.layer import factorization
    except ImportError:  # pragma: no cover - without the test extra
        from lycoris_core import factorization
    return factorization(dimension, factor)


def _lokr_full(dims: tuple[int, int], r: int, df: int, decompose_both: bool) -> tuple[bool, bool]:
    """PEFT's rule: are (w1, w2) stored full?"""
    (a, b), (c, d) = _factorization(dims[0], df), _factorization(dims[1], df)
    return not (decompose_both and r < max(a, c) / 2), r >= max(b, d) / 2


def _oracle_case(suite: str, alg: str, layer: Any, dtype: str, r: int, init: Any, eff: bool, db: bool, df: int) -> Case:
    options: dict[str, Any] = {"r": r, "use_effective_conv2d": eff}
    labels = [f"r{r}"]
    if alg == "lokr":
        options.update(decompose_both=db, decompose_factor=df)
        labels += [*(["decompose_both"] if db else []), f"df{df}"]
    if init is not None:
        options["init_weights"] = init
        labels.append(f"init_{str(init).lower()}")
    return Case(alg, layer, dtype, tuple(options.items()), (*labels, *(["effconv"] if eff else [])), suite=suite)


def _torch_oracle() -> list[Case]:
    """The product alg x layer x {fp32, bf16} x r {2, 16} x init x effconv (x LoKr decompose_both x
    decompose_factor), minus combinations whose flag is a no-op.

    A flag is a no-op when PEFT ignores it for that layer/rank: ``use_effective_conv2d`` on Linear
    and kernel-1 convs (and, for LoKr, whenever w2 is full), ``decompose_both`` whenever w1 stays
    full. Such no-op variants are kept only as witnesses in the fp32, ``init_weights=False`` slice
    (they check that we ignore the flag exactly where PEFT does); elsewhere they would repeat a case.
    """
    cases = []
    for alg, layer, dtype, r in itertools.product(("loha", "lokr"), ORACLE_LAYERS, ("fp32", "bf16"), (2, 16)):
        inits: tuple[Any, ...] = (True, False, "lycoris") if alg == "lokr" else (True, False)
        dbs, dfs = ((False, True), (-1, 4)) if alg == "lokr" else ((False,), (-1,))
        for init, eff, db, df in itertools.product(inits, (False, True), dbs, dfs):
            witness = dtype == "fp32" and init is False
            if alg == "lokr":
                w1_full, w2_full = _lokr_full(layer.dims, r, df, db)
                eff_noop = layer.pointwise or w2_full
                db_noop = w1_full
                if (
                    (eff and eff_noop and not witness)
                    or (db and db_noop and not witness)
                    or (eff and db and eff_noop and db_noop)
                ):
                    continue
            elif eff and layer.pointwise and not witness:
                continue
            cases.append(_oracle_case("oracle", alg, layer, dtype, r, init, eff, db, df))
    return cases


def _torch_grad_oracle() -> list[Case]:
    """float64 gradients vs PEFT (LoHa's CP form: PEFT's backward of hada_w1_a/w2_a is wrong, skipped there)."""
    by = {layer.name: layer for layer in ORACLE_LAYERS}
    spec = [
        ("loha", "conv2d3x3", 2, True, False, -1),
        ("loha", "conv2d3x5", 4, True, False, -1),
        ("loha", "conv1d3", 2, True, False, -1),
        ("loha", "gconv2d3x3", 2, True, False, -1),
        ("loha", "linear", 2, False, False, -1),
        ("loha", "conv2d3x3", 2, False, False, -1),
        ("lokr", "linear", 2, False, True, -1),
        ("lokr", "linear", 16, False, False, -1),
        ("lokr", "conv1d3", 16, False, False, -1),  # full 3-D lokr_w2 (PEFT's Conv1d Kronecker layout)
        ("lokr", "conv2d3x3", 2, True, True, -1),
        ("lokr", "conv2d3x5", 2, False, False, -1),
        ("lokr", "gconv2d3x3", 2, True, False, 4),
    ]
    return [_oracle_case("oracle_grad", a, by[n], "fp64", r, False, e, db, df) for a, n, r, e, db, df in spec]


def _jax_noop_flags(case: Case) -> tuple[bool, bool]:
    """``(effconv is a no-op, decompose_both is a no-op)`` for every targeted layer, by PEFT's own rules
    (LoKr: effconv needs a non-pointwise layer with decomposed w2; decompose_both a w1 that decomposes)."""
    kw = case.config_kwargs()
    eff_noop = db_noop = True
    for out, inp, pointwise in case.layer.dims:
        if case.algo == "loha":
            eff_noop &= pointwise
            continue
        (a, b), (c, d) = _factorization(out, kw["decompose_factor"]), _factorization(inp, kw["decompose_factor"])
        w2_full = kw["r"] >= max(b, d) / 2
        eff_noop &= pointwise or w2_full
        db_noop &= not kw["r"] < max(a, c) / 2
    return eff_noop, db_noop


def _jax_oracle() -> list[Case]:
    """The product {alg} x {model} x {dtype} x {r} x {effconv} (x LoKr {decompose_both} x {decompose_factor}),
    minus cases where a flag is a no-op for every targeted layer (they would repeat another case)."""
    cases = []
    for alg, model, dtype, r, eff in itertools.product(
        ("loha", "lokr"), ORACLE_MODELS, ("fp32", "bf16"), (2, 16), (False, True)
    ):
        for db, df in itertools.product((False, True), (-1, 4)) if alg == "lokr" else [(False, -1)]:
            case = _oracle_case("oracle_jax", alg, model, dtype, r, None, eff, db, df)
            eff_noop, db_noop = _jax_noop_flags(case)
            if (eff and eff_noop) or (db and db_noop):
                continue
            cases.append(case)
    return cases


def _jax_jit_oracle() -> list[Case]:
    conv = ORACLE_MODELS[1]
    return [
        _oracle_case("oracle_jax_jit", "lokr", conv, "fp32", 2, None, True, True, -1),
        _oracle_case("oracle_jax_jit", "loha", conv, "fp32", 2, None, True, False, -1),
    ]


# ---------------------------------------------------------------------------------------------- views
CASES, SKIPPED = _matrix_cases()
TORCH_ORACLE = _torch_oracle()
TORCH_GRAD_ORACLE = _torch_grad_oracle()
JAX_ORACLE = _jax_oracle()
JAX_JIT_ORACLE = _jax_jit_oracle()
#: Every case of every suite.
TABLE: list[Case] = CASES + TORCH_ORACLE + TORCH_GRAD_ORACLE + JAX_ORACLE + JAX_JIT_ORACLE

#: The quick set: every op, dtype and path, a case that sees each mutant (``parity_tests.mutants``).
_QUICK_IDS = {
    "loha-linear-fp32-plain",
    "lokr-linear-fp32-r1",
    "lokr-linear-fp32-r16",
    "lokr-linear_eq-fp32-r16",
    "loha-conv2d_3x5-fp32-effconv",
    "lokr-conv2d_grouped-fp32-r1-effconv",
    "lokr-conv1d_k3-fp32-r16",
    "loha-conv1d_k3-bf16-plain",
    "lokr-linear-bf16-r1-branch_base",
    "lokr-linear-bf16-r1-peft",
    "lokr-conv2d_strided_dilated-fp16-r1",
    "lokr-linear-fp32-r1-decompose_both-df4",
    "loha-linear-fp32-patterns",
    "lokr-conv2d_3x3-fp32-r1-init_lycoris",
    "loha-linear-fp32-plain-merged",
    "lokr-linear-fp32-r16-factored",
    "loha-conv2d_3x3-bf16-plain-merged",
    "lokr-linear-fp32-r1-peft",
    "lokr-conv2d_3x3-fp32-r1-arange",
    "loha-linear-fp32-plain-arange-factored",
}
QUICK = [c for c in CASES if c.id in _QUICK_IDS]


def shard(cases: list[Case], index: int, count: int) -> list[Case]:
    """The ``index``-th of ``count`` interleaved shards (1-based): every layer and dtype in each."""
    if not 1 <= index <= count:
        raise ValueError(f"shard: expected 1 <= I <= N, got {index}/{count}")
    return cases[index - 1 :: count]
