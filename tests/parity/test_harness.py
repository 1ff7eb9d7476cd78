"""The parity harness under pytest: the quick cases (one test per case, every front end and
operation), the case and tolerance tables' invariants, the comparison rule and report, and the
checkpoint ``check`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lycoris_torch as lt
from lycoris_core import LayerShape, plan_lokr
from parity_tests.__main__ import main
from parity_tests.cases import CASES, EXPECTED_FAILURES, FRONT_SKIPS, PATH_MODES, QUICK, SKIPPED, TABLE, front_ops
from parity_tests.compare import Cell, ParityError, assert_cell, measure
from parity_tests.runner import OPERATIONS, run_case
from parity_tests.tolerances import TOLERANCES, tolerance


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One torch thread (tiny tensors; one summation order on every machine), as ``python -m parity_tests``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", QUICK, ids=[c.id for c in QUICK])
def test_quick_case(case):
    cells = run_case(case)
    for front in case.fronts:
        expected = set(front_ops(case, front, OPERATIONS)) - ({"init"} - set(case.extra_ops))
        cell_id = case.id if front == "nnx" else f"{case.id}-{front}"
        assert {c.op for c in cells if c.case == cell_id} == expected, (cell_id, front)
    for cell in cells:
        assert cell.checks or cell.failures, f"{cell.case} / {cell.op} compared nothing"
        assert_cell(cell)


def _lokr_factor_shapes(case) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(W1, W2)`` shapes of a LoKr case (W2 as the 2-D product where it is one)."""
    spec = case.layer
    cfg = lt.LoKrConfig(**case.config_kwargs())
    plan = plan_lokr(
        LayerShape(spec.kind, spec.out_ch, spec.in_ch // spec.groups, spec.kernel, spec.groups), cfg.r, cfg.alpha, cfg
    )
    f = plan.factor_shapes
    w1 = f["lokr_w1"] if "lokr_w1" in f else (f["lokr_w1_a"][0], f["lokr_w1_b"][1])
    w2 = f.get("lokr_w2") or ((f["lokr_w2_a"][0], f["lokr_w2_b"][1]) if "lokr_t2" not in f else (0,))
    return tuple(w1), tuple(w2)


def test_case_table_is_large_readable_and_explains_skips():
    for suite in {c.suite for c in TABLE}:  # ids are unique within a suite (a jit case repeats an oracle case)
        ids = [c.id for c in TABLE if c.suite == suite]
        assert len(ids) == len(set(ids)), suite
    ids = [c.id for c in CASES]
    assert len(CASES) * (len(OPERATIONS) - 1) >= 300
    assert "lokr-conv2d_3x5-bf16-r1" in ids and "loha-conv2d_grouped-fp32-effconv" in ids
    assert all(reason for _, reason in SKIPPED)
    assert all(reason for *_, reason in FRONT_SKIPS) and all(note for *_, note in EXPECTED_FAILURES)
    assert {c.dtype for c in CASES} == {"fp32", "bf16", "fp16"}
    for case in CASES:
        for op in OPERATIONS:
            assert tolerance(case.tolerance_key, op, "f64").why
    assert all(t.why and t.k >= 0 and t.floor >= 0 for t in TOLERANCES.values())


def test_every_path_and_dtype_has_large_magnitude_inputs():
    arange = {(c.dtype, c.mode) for c in CASES if c.inputs == "arange"}
    for dtype in ("fp32", "bf16", "fp16"):
        assert {(dtype, m) for m in ("", *PATH_MODES)} <= arange, dtype
    assert {("bf16", "branch_base"), ("fp16", "branch_base")} <= arange


def test_lokr_cases_with_equal_and_square_factor_shapes_exist():
    """A swapped Kronecker order or a transposed factor changes only values when W1 and W2 have equal
    (square) shapes: the matrix must hold such cases, in the quick set too."""
    equal = [c for c in CASES if c.algo == "lokr" and len(set(_lokr_factor_shapes(c))) == 1]
    square = [c for c in equal if len(set(_lokr_factor_shapes(c)[0])) == 1]
    assert len(equal) >= 10 and square
    assert {c.id for c in equal} & {c.id for c in QUICK}


def test_every_case_runs_on_every_front_end_it_can():
    for case in CASES:
        assert case.fronts[:2] == ("nnx", "linen"), case.id
        assert ("pytree" in case.fronts) == (case.mode == ""), case.id


def test_a_cell_reports_its_worst_relative_error_not_the_pair_with_the_largest_absolute_one():
    cell = Cell("loha-linear-fp32-plain", "forward", "fp32")
    measure(cell, "big", [100.0 + 1e-4, 1.0], [100.0, 1.0])  # abs 1e-4, rel 1e-6
    measure(cell, "small", [1.0 + 1e-5, 0.0], [1.0, 0.0])  # abs 1e-5, rel 1e-5
    assert cell.max_rel == pytest.approx(1e-5) and cell.where.startswith("small")
    assert cell.max_abs == pytest.approx(1e-4)


def test_the_bound_scales_with_pefts_own_error_against_float64():
    row = tolerance("fp32", "grad", "f64")
    ref = np.array([1.0, 2.0])
    cell = Cell("c", "grad", "fp32")
    err = 2 * row.floor  # above the floor alone ...
    off = np.array([0.0, 2 * err])
    measure(cell, "ours", ref + off, ref, peft=ref + off / row.k)  # ... within k x PEFT's
    assert cell.passed
    cell = Cell("c", "grad", "fp32")
    measure(cell, "worse", ref + off, ref, peft=ref)  # PEFT exact: only the floor remains
    assert not cell.passed


def test_assertion_helper_names_case_operation_and_location():
    cell = Cell("loha-linear-fp32-plain", "forward", "fp32")
    measure(cell, "forward jax", [0.0, 1.0, 2.5], [0.0, 1.0, 2.0], peft=[0.0, 1.0, 2.0])
    with pytest.raises(
        ParityError,
        match=r"loha-linear-fp32-plain / forward: worst rel err 2\.500e-01 \(forward jax at \(2,\)\).*PEFT's own 0\.000e\+00",
    ):
        assert_cell(cell)


def test_an_expected_failure_must_keep_failing():
    cell = Cell("c", "forward", "fp32", xfail=("dtype", "known bug"))
    cell.failures.append("forward linen: dtype float32, PEFT bfloat16")
    assert cell.passed and cell.expected_failure
    fixed = Cell("c", "forward", "fp32", xfail=("dtype", "known bug"))
    assert not fixed.passed and "remove the EXPECTED_FAILURES entry" in fixed.problems()[0]


def test_module_entry_point_writes_report_and_fails_on_mismatch(tmp_path, monkeypatch, capsys):
    assert main(["--quick", "-k", "loha-linear-fp32-patterns", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "parity_report.json").read_text())
    n_cells = len(report["cells"])
    assert report["passed"] and {c["case"] for c in report["cells"]} == {
        "loha-linear-fp32-patterns",
        "loha-linear-fp32-patterns-linen",
        "loha-linear-fp32-patterns-pytree",
    }
    assert "| loha-linear-fp32-patterns | forward |" in (tmp_path / "parity_report.md").read_text()

    import parity_tests.runner as runner

    def broken(run, cells):
        for cell in cells.values():
            measure(cell, "forward", [1.0], [2.0])

    monkeypatch.setattr(runner, "op_forward", broken)
    assert main(["--quick", "-k", "loha-linear-fp32-patterns", "--out", str(tmp_path)]) == 1
    assert f"parity: {n_cells - 3} passed, 3 failed" in capsys.readouterr().out


def test_shards_partition_the_matrix():
    from parity_tests.cases import shard

    parts = [shard(CASES, i, 4) for i in range(1, 5)]
    assert sorted(c.id for part in parts for c in part) == sorted(c.id for c in CASES)
    assert all({c.layer.name for c in part} == {c.layer.name for c in CASES} for part in parts)
    with pytest.raises(ValueError, match="1 <= I <= N"):
        shard(CASES, 5, 4)


@pytest.mark.parametrize(
    "tuner_cls, cfg",
    [
        (lt.LoHaModel, lt.LoHaConfig(r=2, target_modules=["q", "conv"], init_weights=False, use_effective_conv2d=True)),
        (
            lt.LoKrModel,
            lt.LoKrConfig(
                r=2,
                target_modules=["q", "conv", "conv1"],
                init_weights=False,
                decompose_both=True,
                rank_pattern={"conv1": 8},
                alpha_pattern={"q": 3},
            ),
        ),
    ],
)
def test_check_command_validates_an_adapter_directory(tmp_path, capsys, tuner_cls, cfg):
    from tests.torch.models import net

    tuner_cls(net(), cfg).save_pretrained(tmp_path)
    assert main(["check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layers.0.q" in out and "conv" in out and "disagree" in out and ", 0 disagree" in out


def test_check_command_reports_bad_directories(tmp_path, capsys):
    assert main(["check", str(tmp_path)]) == 2
    assert "no adapter_config.json found" in capsys.readouterr().err
    lt.LoKrConfig(target_modules=["q"]).save_pretrained(tmp_path)
    assert main(["check", str(tmp_path)]) == 2
    assert "no adapter_model.safetensors found" in capsys.readouterr().err
