"""B6's measuring tool (``benchmarks/tpu_aot.py``) reads what the TPU compiler reports, deviceless.

A tiny decoder compiles for one v5e chip when libtpu is installed (``pip install -e ".[tpu]"``; CI
installs it): memory and the estimate are read, and the layout custom-call correction is applied.
Not a timing test: the compiler's estimate is a number it computes, not a run.
"""

from __future__ import annotations

import types

import pytest

pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) compiles for TPU topologies on this CPU machine")

from benchmarks import tpu_aot


class _Compiled:
    """A compiled program's reports, as ``figures`` reads them."""

    def __init__(self, seconds: float, text: str) -> None:
        self._cost, self._text = {"optimal_seconds": seconds, "flops": 10.0, "bytes accessed": 20.0}, text

    def cost_analysis(self):
        return [self._cost]

    def as_text(self) -> str:
        return self._text

    def memory_analysis(self):
        return types.SimpleNamespace(
            argument_size_in_bytes=100, output_size_in_bytes=10, temp_size_in_bytes=50, alias_size_in_bytes=5
        )


def test_each_layout_custom_call_gets_its_second_back():
    call = 'x = f32[8] custom-call(y), custom_call_target="ConcatBitcast"\n'
    f = tpu_aot.figures(_Compiled(-3.0 + 0.004, call * 3))
    assert f.layout_calls == 3 and f.kernels == 0
    assert f.seconds == pytest.approx(0.004)
    assert f.total == 100 + 10 + 50 - 5


def test_a_tiny_decoder_compiles_for_a_v5e_chip_and_reports_memory_and_time():
    mesh, hbm = tpu_aot.devices("v5e", "1")
    assert hbm == 16 * 2**30 and mesh.devices.size == 1
    frozen, _ = tpu_aot.compile_variant(tpu_aot.MODELS["tiny"], tpu_aot.Variant.parse("frozen"), mesh, 128)
    train, forward = tpu_aot.compile_variant(
        tpu_aot.MODELS["tiny"], tpu_aot.Variant.parse("lokr:factored:r8"), mesh, 128
    )
    for f in (frozen, train, forward):
        assert f.seconds > 0 and f.flops > 0 and f.bytes > 0 and f.argument > 0 and f.temp > 0
    # the adapter step does more than the frozen one: it differentiates and updates the factors
    assert train.flops > frozen.flops
    assert train.argument > frozen.argument  # factors and Adam's moments are arguments


def test_variants_parse_and_refuse_what_is_not_one():
    v = tpu_aot.Variant.parse("loha:merged:r64:base")
    assert (v.kind, v.path, v.r, v.branch, v.name) == ("loha", "merged", 64, "base", "loha:merged:r64:base")
    assert tpu_aot.Variant.parse("frozen").name == "frozen"
    for bad in ("lora", "lokr:fast"):
        with pytest.raises(ValueError, match=bad.split(":")[-1]):
            tpu_aot.Variant.parse(bad)


def test_a_scanned_stack_is_timed_from_one_and_two_unrolled_layers():
    """The cost model counts a loop's body once: time comes from unrolled layers, memory from the scan."""

    def fig(seconds: float, flops: float, temp: int) -> tpu_aot.Figures:
        return tpu_aot.Figures(seconds, 2, 0, flops, 10 * flops, 100, 10, temp, 0)

    full = tpu_aot.extrapolated(fig(0.010, 5.0, 1), fig(0.016, 8.0, 2), 32, fig(0.007, 3.0, 999))
    assert full.seconds == pytest.approx(0.010 + 31 * 0.006)
    assert full.flops == pytest.approx(5.0 + 31 * 3.0) and full.bytes == pytest.approx(10 * full.flops)
    assert full.temp == 999 and full.layout_calls == 2  # memory as the scanned program has it
