"""The parity harness under pytest: the quick cases (one test per case x operation), the case
table's invariants, the report writer and the checkpoint ``check`` command."""

from __future__ import annotations

import json

import pytest

import lycoris_torch as lt
from parity_tests.__main__ import main
from parity_tests.cases import CASES, QUICK, SKIPPED
from parity_tests.compare import Cell, ParityError, assert_cell, measure
from parity_tests.runner import OPERATIONS, run_case
from parity_tests.tolerances import TOLERANCES

_results: dict[str, list[Cell]] = {}


def _cells(case_id: str) -> list[Cell]:
    if case_id not in _results:
        _results[case_id] = run_case(next(c for c in QUICK if c.id == case_id))
    return _results[case_id]


@pytest.mark.parametrize("case_id", [c.id for c in QUICK])
def test_quick_case(case_id):
    cells = _cells(case_id)
    assert {c.op for c in cells} >= set(OPERATIONS) - {"init"}
    for cell in cells:
        assert_cell(cell)


def test_case_table_is_large_readable_and_explains_skips():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) * (len(OPERATIONS) - 1) >= 300
    assert "lokr-conv2d_3x5-bf16-r1" in ids and "loha-conv2d_grouped-fp32-effconv" in ids
    assert all(reason for _, reason in SKIPPED)
    assert {c.dtype for c in CASES} == {"fp32", "bf16", "fp16"}
    for case in CASES:
        for op in OPERATIONS:
            key = (case.tolerance_key, op)
            assert key in TOLERANCES and TOLERANCES[key].why


def test_assertion_helper_names_case_operation_and_location():
    cell = Cell("loha-linear-fp32-plain", "forward", "fp32")
    measure(cell, "jax-torch", [0.0, 1.0, 2.5], [0.0, 1.0, 2.0])
    with pytest.raises(
        ParityError,
        match=r"loha-linear-fp32-plain / forward: max abs err 5.000e-01, max rel err 2.500e-01 \(jax-torch at \(2,\)\)",
    ):
        assert_cell(cell)


def test_module_entry_point_writes_report_and_fails_on_mismatch(tmp_path, monkeypatch, capsys):
    assert main(["--quick", "-k", "loha-linear-fp32-patterns", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "parity_report.json").read_text())
    assert report["passed"] and len(report["cells"]) == len(OPERATIONS) - 1
    assert "| loha-linear-fp32-patterns | forward |" in (tmp_path / "parity_report.md").read_text()

    import parity_tests.runner as runner

    def broken(fw, cell):
        measure(cell, "jax-torch", [1.0], [2.0])

    monkeypatch.setattr(runner, "op_forward", broken)
    assert main(["--quick", "-k", "loha-linear-fp32-patterns", "--out", str(tmp_path)]) == 1
    assert f"parity: {len(OPERATIONS) - 2} passed, 1 failed" in capsys.readouterr().out


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
