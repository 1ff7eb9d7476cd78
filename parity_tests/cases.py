"""The parity case table: algorithm x layer x dtype x options, with readable ids and stated skips."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CASES", "PATH_MODES", "QUICK", "SKIPPED", "Case", "LayerSpec", "build_cases"]

DTYPES = ("fp32", "bf16", "fp16")
#: Forward paths with a column of their own (``lycoris_core.paths``); the default column is ``"auto"``.
PATH_MODES = ("peft", "merged", "factored")


@dataclass(frozen=True)
class LayerSpec:
    """A base layer as both frameworks build it; ``input_shape`` is PyTorch's (channels first)."""

    name: str
    kind: str  # "linear" | "conv1d" | "conv2d"
    in_ch: int
    out_ch: int
    input_shape: tuple[int, ...]
    kernel: tuple[int, ...] = ()
    stride: int = 1
    padding: tuple[int, ...] = ()
    dilation: int = 1
    groups: int = 1

    @property
    def pointwise(self) -> bool:
        return math.prod(self.kernel) == 1


LAYERS = (
    LayerSpec("linear", "linear", 24, 36, (4, 24)),
    LayerSpec("conv1d_k1", "conv1d", 12, 20, (2, 12, 9), (1,), padding=(0,)),
    LayerSpec("conv1d_k3", "conv1d", 12, 20, (2, 12, 9), (3,), padding=(1,)),
    LayerSpec("conv2d_1x1", "conv2d", 8, 12, (2, 8, 6, 6), (1, 1), padding=(0, 0)),
    LayerSpec("conv2d_3x3", "conv2d", 8, 12, (2, 8, 6, 6), (3, 3), padding=(1, 1)),
    LayerSpec("conv2d_3x5", "conv2d", 8, 12, (2, 8, 6, 6), (3, 5), padding=(1, 2)),
    LayerSpec("conv2d_grouped", "conv2d", 12, 24, (2, 12, 6, 6), (3, 3), padding=(1, 1), groups=3),
    LayerSpec("conv2d_strided_dilated", "conv2d", 8, 12, (2, 8, 9, 9), (3, 3), stride=2, padding=(2, 2), dilation=2),
)


@dataclass(frozen=True)
class Case:
    """One parity case. ``options`` are extra config kwargs; ``labels`` name them in the id."""

    algo: str  # "loha" | "lokr"
    layer: LayerSpec
    dtype: str
    options: tuple[tuple[str, Any], ...] = ()
    labels: tuple[str, ...] = ()
    seed: int = 0
    extra_ops: tuple[str, ...] = field(default=())
    #: A column of its own: ``"branch_base"`` builds the JAX tuner with ``branch_dtype="base"`` (the
    #: branch in the base layer's compute dtype, mixed precision); a forward path (``"peft"``,
    #: ``"merged"``, ``"factored"``) builds both twins with that ``forward_path``. No mode: the
    #: default path (``"auto"``, the cost rule).
    mode: str = ""

    @property
    def id(self) -> str:
        return "-".join((self.algo, self.layer.name, self.dtype, *self.labels, *((self.mode,) if self.mode else ())))

    @property
    def tolerance_key(self) -> str:
        """The dtype row of the tolerance table: ``"bf16"``, or ``"bf16+branch_base"`` for a mode."""
        return f"{self.dtype}+{self.mode}" if self.mode else self.dtype

    @property
    def twin_kwargs(self) -> dict[str, Any]:
        """Extra arguments of both twins' tuners for this case's mode."""
        return {"forward_path": self.mode} if self.mode in PATH_MODES else {}

    @property
    def jax_kwargs(self) -> dict[str, Any]:
        """Extra arguments of the JAX tuner for this case's mode."""
        return {"branch_dtype": "base"} if self.mode == "branch_base" else self.twin_kwargs

    def config_kwargs(self) -> dict[str, Any]:
        """Config kwargs shared by PEFT and both twins (``rank_dropout`` > 0 only acts in training)."""
        kw: dict[str, Any] = {
            "r": 2,
            "alpha": 3,
            "target_modules": ["layer"],
            "init_weights": False,
            "rank_dropout": 0.5,
        }
        if self.algo == "lokr":
            kw["rank_dropout_scale"] = True
        kw.update(dict(self.options))
        return kw


def _lokr_options(layer: LayerSpec) -> list[tuple[tuple[tuple[str, Any], ...], tuple[str, ...]]]:
    opts = [((("r", 1),), ("r1",)), ((("r", 16),), ("r16",))]
    if not layer.pointwise:
        opts.append(((("r", 1), ("use_effective_conv2d", True)), ("r1", "effconv")))
    opts.append(((("r", 1), ("decompose_both", True), ("decompose_factor", 4)), ("r1", "decompose_both", "df4")))
    return opts


def build_cases() -> tuple[list[Case], list[tuple[str, str]]]:
    """All cases, and ``(id, reason)`` for every combination left out."""
    cases: list[Case] = []
    skipped: list[tuple[str, str]] = []
    for layer in LAYERS:
        for dtype in DTYPES:
            loha_opts = [((), ("plain",))]
            if layer.pointwise:
                skipped.append(
                    (
                        f"loha-{layer.name}-{dtype}-effconv",
                        "effective conv is off for Linear and kernel-1 convs (PEFT rule): same as plain",
                    )
                )
            else:
                loha_opts.append(((("use_effective_conv2d", True),), ("effconv",)))
            lokr_opts = _lokr_options(layer)
            if dtype != "fp32":
                # The option axes change factor shapes only, whose arithmetic is fp32 in every dtype.
                for _opts, labels in lokr_opts[1:]:
                    skipped.append(
                        (
                            f"lokr-{layer.name}-{dtype}-{'-'.join(labels)}",
                            "factor-shape option covered in fp32; adapters are fp32 in low-precision cases too",
                        )
                    )
                lokr_opts = lokr_opts[:1]
                for _opts, labels in loha_opts[1:]:
                    skipped.append(
                        (
                            f"loha-{layer.name}-{dtype}-{'-'.join(labels)}",
                            "factor-shape option covered in fp32; adapters are fp32 in low-precision cases too",
                        )
                    )
                loha_opts = loha_opts[:1]
            for opts, labels in loha_opts:
                cases.append(Case("loha", layer, dtype, opts, labels))
            for opts, labels in lokr_opts:
                cases.append(Case("lokr", layer, dtype, opts, labels))
            if dtype != "fp32":  # mixed precision: the same cases with the branch in the base's dtype
                cases.append(Case("loha", layer, dtype, *loha_opts[0], mode="branch_base"))
                cases.append(Case("lokr", layer, dtype, *lokr_opts[0], mode="branch_base"))
            for path in PATH_MODES:  # every forward path on every layer and dtype (a factored request
                # the algebra does not allow, e.g. a grouped conv, is served by the merged path)
                cases.append(Case("loha", layer, dtype, *loha_opts[0], mode=path))
                cases.append(Case("lokr", layer, dtype, *lokr_opts[0], mode=path))
            if dtype == "fp32":  # the LoKr factor shapes (and LoHa's CP form) on the factored path
                for opts, labels in _lokr_options(layer)[1:]:
                    cases.append(Case("lokr", layer, dtype, opts, labels, mode="factored"))
                if not layer.pointwise:
                    cases.append(
                        Case("loha", layer, dtype, (("use_effective_conv2d", True),), ("effconv",), mode="factored")
                    )
    skipped.append(("loha-*-r16", "LoHa's factor structure does not depend on r (unlike LoKr's full/decomposed w1/w2)"))
    skipped.append(("lokr-linear-*-effconv", "effective conv is forced off for Linear (PEFT rule)"))
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
        patterns = (("rank_pattern", {"lay.r": 5, "layer": 3}), ("alpha_pattern", {"layer": 7.5}))
        cases.append(Case("loha", layer, "fp32", patterns, ("patterns",)))
        cases.append(Case("lokr", layer, "fp32", patterns, ("patterns",)))
    return cases, skipped


CASES, SKIPPED = build_cases()
_QUICK_IDS = {
    "loha-linear-fp32-plain",
    "lokr-linear-fp32-r1",
    "lokr-linear-fp32-r16",
    "loha-conv2d_3x5-fp32-effconv",
    "lokr-conv2d_grouped-fp32-r1-effconv",
    "lokr-conv1d_k3-fp32-r16",
    "loha-conv1d_k3-bf16-plain",
    "lokr-linear-bf16-r1-branch_base",
    "lokr-conv2d_strided_dilated-fp16-r1",
    "lokr-linear-fp32-r1-decompose_both-df4",
    "loha-linear-fp32-patterns",
    "lokr-conv2d_3x3-fp32-r1-init_lycoris",
    "loha-linear-fp32-plain-merged",
    "lokr-linear-fp32-r16-factored",
    "loha-conv2d_3x3-bf16-plain-merged",
    "lokr-linear-fp32-r1-peft",
}
QUICK = [c for c in CASES if c.id in _QUICK_IDS]
