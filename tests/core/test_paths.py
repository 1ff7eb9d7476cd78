"""The forward-path cost rule (``lycoris_core.paths``): framework-free, no arrays."""

from __future__ import annotations

import pytest

from lycoris_core import LayerShape, LoHaConfig, LoKrConfig, plan_loha, plan_lokr
from lycoris_core.paths import FORWARD_PATHS, Split, check_forward_path, choose_path, path_costs

LINEAR = LayerShape("linear", 512, 512)
CONV = LayerShape("conv2d", 64, 32, (3, 3))


def lokr(shape=LINEAR, **kw):
    return plan_lokr(shape, kw.pop("r", 8), 8.0, LoKrConfig(**kw))


def loha(shape=LINEAR):
    return plan_loha(shape, 8, 8.0, LoHaConfig())


def test_explicit_paths_are_kept_and_factored_needs_a_linear():
    for path in ("peft", "merged"):
        assert choose_path(path, lokr(), 512, training=True, supported=True) == path
    assert choose_path("factored", lokr(), 512, training=True, supported=True) == "factored"
    assert choose_path("factored", lokr(CONV), 512, training=True, supported=False) == "merged"  # a masked conv
    assert choose_path("factored", lokr(CONV), 512, training=True, supported=True) == "factored"
    assert choose_path("factored", lokr(), 512, training=True, supported=False) == "merged"  # e.g. LinearGeneral
    assert choose_path("auto", loha(CONV), 8, training=False, supported=False) == "merged"


def test_auto_takes_the_cheaper_of_merged_and_factored():
    # LoHa: the r² branch is cheap for a few tokens, forming ΔW is cheaper for many
    assert choose_path("auto", loha(), 1, training=False, supported=True) == "factored"
    assert choose_path("auto", loha(), 4096, training=True, supported=True) == "merged"
    # LoKr's factored product stays cheaper than forming a 4096x4096 ΔW up to thousands of tokens
    big = lokr(LayerShape("linear", 4096, 4096))
    assert choose_path("auto", big, 16, training=True, supported=True) == "factored"
    for tokens in (1, 64, 4096):
        costs = path_costs(loha(), tokens, training=True)
        expected = "factored" if costs["factored"] <= costs["merged"] else "merged"
        assert choose_path("auto", loha(), tokens, training=True, supported=True) == expected
        if tokens >= 64:  # PEFT's second matmul costs more than adding ΔW to W once tokens add up
            assert costs["peft"] > costs["merged"]


def test_cost_rule_inputs_are_checked():
    assert check_forward_path("auto") == "auto" and set(FORWARD_PATHS) == {"auto", "factored", "merged", "peft"}
    with pytest.raises(ValueError, match="forward_path: expected one of .*got 'fast'"):
        check_forward_path("fast")
    assert "factored" in path_costs(lokr(CONV), 64, training=True)  # an ungrouped conv
    grouped = LayerShape("conv2d", 64, 16, (3, 3), groups=2)
    assert "factored" not in path_costs(lokr(grouped), 64, training=True)
    assert choose_path("factored", lokr(grouped), 64, training=True, supported=True) == "merged"
    cp = plan_loha(CONV, 4, 4.0, LoHaConfig(use_effective_conv2d=True))
    assert choose_path("factored", cp, 64, training=True, supported=True) == "merged"


def test_cost_rule_weighs_the_dtype_and_the_shardings():
    plan = loha()  # 512x512, r=8: forming ΔW pays off from ~576 tokens in training (fp32, one device)
    auto = lambda tokens, **kw: choose_path("auto", plan, tokens, training=True, supported=True, **kw)  # noqa: E731
    assert auto(4096) == "merged"
    # data parallel over 8 devices: 512 tokens per device against a whole kernel on each
    assert auto(4096, split=Split(tokens=8, matmul=8)) == "factored"
    # FSDP (tokens and kernel split over one axis) or 8x8 data x tensor parallel: the unsharded balance
    assert auto(4096, split=Split(tokens=8, kernel=8, matmul=8)) == "merged"
    assert auto(4096, split=Split(tokens=8, kernel=8, matmul=64)) == "merged"
    # a kernel-sized pass moves itemsize bytes per element: bf16 halves it, the factored work stays
    fp32, bf16 = path_costs(plan, 448, training=True), path_costs(plan, 448, training=True, itemsize=2)
    assert bf16["factored"] == fp32["factored"] and bf16["merged"] < fp32["merged"]
    assert auto(448) == "factored" and auto(448, itemsize=2) == "merged"
    # per device: a split over 8 devices divides every cost by 8 (the matmul too, FSDP-style)
    whole = path_costs(plan, 4096, training=True)
    for split in (Split(8, 8, 8), Split(8, 8, 64)):
        costs = path_costs(plan, 4096, training=True, split=split)
        assert costs["merged"] == pytest.approx(whole["merged"] / 8)
        assert costs["peft"] == pytest.approx(whole["peft"] / split.matmul, rel=0.05)  # its matmul dominates


def test_the_tpu_rule_weighs_bytes_and_tiles():
    from lycoris_core.paths import TPU_LOKR_RATIO

    square = lokr(LayerShape("linear", 4096, 4096))  # a, b, c, d = 64: LoKr's blocks fill half a lane tile
    auto = lambda plan, n, training=True, **kw: choose_path(  # noqa: E731
        "auto", plan, n, training=training, supported=True, itemsize=2, platform="tpu", **kw
    )
    # few tokens: the Kronecker product's kernel-sized tiles cost more than the activations; many: the reverse
    assert auto(square, 256) == "factored" and auto(square, 8192) == "merged"
    costs = path_costs(square, 2048, training=True, platform="tpu")
    assert costs["merged"] == pytest.approx(TPU_LOKR_RATIO[0] * 4096 * 4096 * (128 / 64) ** 2)
    assert costs["factored"] == 2048 * (4096 + 64 * 128 + 4096) and costs["peft"] == float("inf")
    # LoHa: the merged path forms R Qᵀ on the matrix unit; factored only for few tokens, or wide r² in training
    wide = plan_loha(LayerShape("linear", 1024, 1024), 64, 64.0, LoHaConfig())
    assert auto(loha(LayerShape("linear", 4096, 4096)), 256, training=False) == "merged"
    assert auto(loha(LayerShape("linear", 4096, 4096)), 64) == "factored"
    assert auto(loha(LayerShape("linear", 4096, 4096)), 4096) == "merged"
    assert auto(wide, 256) == "factored" and auto(wide, 8192) == "merged"
    # data parallel over 8 chips: 1/8 of the tokens per chip against the whole kernel
    assert auto(square, 4096) == "merged" and auto(square, 4096, split=Split(tokens=8, matmul=8)) == "factored"
    # the CPU rule is unchanged by the platform argument's default
    assert path_costs(square, 512, training=True) == path_costs(square, 512, training=True, platform="cpu")
