"""Each planted bug of ``parity_tests.mutants`` is caught by the quick cells it names (and the patch is
undone afterwards). ``python -m parity_tests --mutants`` runs the whole quick matrix per mutant."""

from __future__ import annotations

import pkgutil

import pytest
import torch

from parity_tests.cases import FRONTS, QUICK
from parity_tests.mutants import MUTANTS, planted
from parity_tests.runner import OPERATIONS, run_case

_QUICK = {c.id: c for c in QUICK}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _case_of(cell_id: str):
    for front in FRONTS[1:]:
        if cell_id.endswith(f"-{front}") and cell_id.removesuffix(f"-{front}") in _QUICK:
            return _QUICK[cell_id.removesuffix(f"-{front}")]
    return _QUICK[cell_id]


def test_mutants_are_one_table_of_resolvable_targets():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names)) >= 14
    for mutant in MUTANTS:
        assert mutant.what and mutant.cells, mutant.name
        for target in mutant.targets:
            pkgutil.resolve_name(target)  # a moved function fails here, naming the target
        for cell_id, op in mutant.cells:
            assert op in OPERATIONS and _case_of(cell_id), (mutant.name, cell_id)


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_is_caught_by_its_quick_cells(mutant):
    originals = {t: pkgutil.resolve_name(t) for t in mutant.targets}
    with planted(mutant):
        for cell_id, op in mutant.cells:
            cells = run_case(_case_of(cell_id), (op,))
            cell = next(c for c in cells if c.case == cell_id and c.op == op)
            assert not cell.passed, f"{mutant.name}: {cell_id} / {op} did not catch it"
    assert {t: pkgutil.resolve_name(t) for t in mutant.targets} == originals
