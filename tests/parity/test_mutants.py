"""Each planted bug of ``parity_tests.mutants`` is caught by the quick cells it names, on a value or a
dtype (not by an exception), through a patch the library really calls (and undone afterwards).
``python -m parity_tests --mutants`` runs the whole quick matrix per mutant."""

from __future__ import annotations

import inspect
import pkgutil
import sys

import pytest
import torch

from parity_tests.cases import FRONTS, QUICK
from parity_tests.mutants import LIBRARY, MUTANTS, bindings, caught_by_value, planted
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
    assert len(names) == len(set(names)) >= 16
    for mutant in MUTANTS:
        assert mutant.what and mutant.cells, mutant.name
        for target in mutant.targets:
            assert target.startswith(LIBRARY), (mutant.name, target)
            pkgutil.resolve_name(target)  # a moved function fails here, naming the target
        for cell_id, op in mutant.cells:
            assert op in OPERATIONS and _case_of(cell_id), (mutant.name, cell_id)


def test_a_function_imported_by_name_is_patched_where_it_is_called():
    """``from lycoris_jax.adapted import adapted_call`` binds the function in the NNX layer and the Linen
    transform: the patch goes there too, so the function the front ends call is the mutant."""
    assert set(bindings("lycoris_jax.adapted.adapted_call")) >= {
        "lycoris_jax.adapted.adapted_call",
        "lycoris_jax.layer.adapted_call",
        "lycoris_jax.linen.adapted_call",
    }
    mutant = next(m for m in MUTANTS if m.name == "adapted_call_output_dtype")
    with planted(mutant):
        assert sys.modules["lycoris_jax.layer"].adapted_call is sys.modules["lycoris_jax.linen"].adapted_call
        assert sys.modules["lycoris_jax.layer"].adapted_call is sys.modules["lycoris_jax.adapted"].adapted_call


def test_a_patched_method_is_not_overridden_by_a_subclass():
    """A subclass's own method would escape a patch of its base class's."""
    for mutant in MUTANTS:
        for target in mutant.targets:
            owner_name, _, attr = target.rpartition(".")
            owner = pkgutil.resolve_name(owner_name)
            if inspect.ismodule(owner):
                continue
            for name, module in list(sys.modules.items()):
                if not name.startswith(LIBRARY) or module is None:
                    continue
                for value in vars(module).values():
                    if inspect.isclass(value) and value is not owner and issubclass(value, owner):
                        assert attr not in vars(value), f"{mutant.name}: {value.__qualname__} overrides {target}"


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_is_caught_by_its_quick_cells(mutant):
    originals = {name: pkgutil.resolve_name(name) for target in mutant.targets for name in bindings(target)}
    with planted(mutant) as calls:
        for cell_id, op in mutant.cells:
            cells = run_case(_case_of(cell_id), (op,))
            cell = next(c for c in cells if c.case == cell_id and c.op == op)
            assert not cell.passed, f"{mutant.name}: {cell_id} / {op} did not catch it"
            assert caught_by_value(cell), f"{mutant.name}: {cell_id} / {op} only raised: {cell.problems()}"
    assert all(calls.values()), f"{mutant.name}: never called (the patch changed nothing): {dict(calls)}"
    assert {name: pkgutil.resolve_name(name) for name in originals} == originals
