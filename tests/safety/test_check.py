"""An honest ``python -m parity_tests check DIR``: validate like a loader, then compare frameworks.

Exit 0: every module agrees; 1: the frameworks disagree; 2: the directory is unusable (one line
on stderr, never a traceback). Every damaged directory of the error catalogue that both twins
refuse to load is unusable for ``check`` too, but for the rows that need the model to decide.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import lycoris_jax as lj
from parity_tests.__main__ import main
from tests.safety.files import edit_config, edit_tensors, key
from tests.safety.test_errors import FILE_CASES
from tests.safety.twins import JAX, TORCH

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: Rows a model is needed to decide; check sees only the directory (reason each).
NEEDS_MODEL = {
    "config-no-targets": "with target_modules null the targets are PEFT's defaults for the model's type, which only the model tells",
    "shape-wrong": "head.lokr_w1 (4, 2) with lokr_w2 (4, 4) is a valid adapter for a 8->16 layer; only the model says 16->8",
}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    TORCH.tuner(config=TORCH.lokr()).save_pretrained(d)
    return d


def copy(good, tmp_path):
    d = tmp_path / "adapter"
    shutil.copytree(good, d)
    return d


def test_agreement_exits_0(good, capsys):
    assert main(["check", str(good)]) == 0
    assert ", 0 disagree" in capsys.readouterr().out


def test_a_real_disagreement_exits_1(good, capsys, monkeypatch):
    real = lj.lokr.delta_weight
    monkeypatch.setattr(lj.lokr, "delta_weight", lambda f, s, shape: real(f, s, shape) * 1.001)
    assert main(["check", str(good)]) == 1
    out = capsys.readouterr().out
    assert "NO" in out and "3 disagree" in out


@pytest.mark.parametrize("case", [c for c in FILE_CASES if c.id not in NEEDS_MODEL], ids=lambda c: c.id)
def test_every_directory_the_twins_refuse_is_unusable_input(good, tmp_path, capsys, case):
    d = tmp_path / "adapter"
    shutil.copytree(good, d)
    case.mutate(d)
    assert main(["check", str(d)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("parity_tests check: unusable input: ")
    assert "agree" not in captured.out and "Traceback" not in captured.err


@pytest.mark.parametrize("case", [c for c in FILE_CASES if c.id in NEEDS_MODEL], ids=lambda c: c.id)
def test_rows_that_need_the_model(good, tmp_path, case):
    d = tmp_path / "adapter"
    shutil.copytree(good, d)
    case.mutate(d)
    assert main(["check", str(d)]) == 0, NEEDS_MODEL[case.id]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: edit_config(d, lambda c: c.__setitem__("r", 3)), "fit no layer under this config (r=3)"),
        (
            lambda d: edit_config(d, lambda c: c.__setitem__("decompose_factor", 2)),
            "fit no layer under this config",
        ),
        (
            lambda d: edit_tensors(d, lambda t: {k: v for k, v in t.items() if not k.endswith("lokr_w2_b")}),
            "not a complete LOKR set",
        ),
        (
            lambda d: edit_tensors(
                d, lambda t: t | {key("layers.1", "lokr_w2_b"): t[key("layers.1", "lokr_w2_b")].T.contiguous()}
            ),
            "fit no layer under this config",
        ),
        (
            lambda d: edit_tensors(d, lambda t: t | {key("head", "lokr_w1"): t[key("head", "lokr_w1")] * float("nan")}),
            "bad data: non-finite values (NaN or inf) in ['base_model.model.head.lokr_w1']",
        ),
        (
            lambda d: edit_tensors(
                d, lambda t: t | {k: t[k] * 1e20 for k in (key("head", "lokr_w1"), key("head", "lokr_w2"))}
            ),
            "bad data: head: ΔW overflows float32",
        ),
    ],
    ids=["rank-mismatch", "decompose-mismatch", "incomplete-set", "transposed-factor", "nan-is-bad-data", "overflow"],
)
def test_factor_sets_and_shapes_are_checked_against_the_config(good, tmp_path, capsys, mutate, message):
    d = copy(good, tmp_path)
    mutate(d)
    assert main(["check", str(d)]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_modules_to_save_weights_are_listed_not_compared(tmp_path, capsys):
    import torch

    from lycoris_torch import LoKrConfig, LoKrModel

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    LoKrModel(model, LoKrConfig(r=2, target_modules=["0"], modules_to_save=["1"], init_weights=False)).save_pretrained(
        tmp_path
    )
    assert main(["check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (
        "not compared (modules_to_save weights, no factors): ['base_model.model.1.bias', 'base_model.model.1.weight']"
        in out
    )


def test_command_line_exit_code_and_no_traceback(good, tmp_path):
    d = copy(good, tmp_path)
    (d / "adapter_model.safetensors").write_bytes(b"garbage!")
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    for args, code in [([str(d)], 2), ([str(good)], 0), ([str(tmp_path / "missing")], 2), ([], 2)]:
        proc = subprocess.run(
            [sys.executable, "-m", "parity_tests", "check", *args], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert proc.returncode == code, proc.stderr
        assert "Traceback" not in proc.stderr


def test_loha_cp_and_conv_directories_validate(tmp_path, capsys):
    """Plans are inferred from factors alone: CP (Tucker) convs and plain convs with flattened kernels."""
    from tests.torch.models import net

    for i, (cls, cfg) in enumerate(
        [
            (
                TORCH.lib.LoHaModel,
                TORCH.lib.LoHaConfig(
                    r=2, target_modules=["q", "conv", "conv1"], use_effective_conv2d=True, init_weights=False
                ),
            ),
            (
                TORCH.lib.LoKrModel,
                TORCH.lib.LoKrConfig(
                    r=1, target_modules=["conv", "conv1"], use_effective_conv2d=True, init_weights=False
                ),
            ),
            (
                TORCH.lib.LoKrModel,
                TORCH.lib.LoKrConfig(
                    r=1, target_modules=["conv", "conv1", "q"], decompose_both=True, init_weights=False
                ),
            ),
        ]
    ):
        cls(net(), cfg).save_pretrained(tmp_path / str(i))
        assert main(["check", str(tmp_path / str(i))]) == 0, capsys.readouterr()
    assert "conv1: no PEFT comparison: PEFT raises RuntimeError" in capsys.readouterr().out  # deviation i


def test_jax_saved_directories_check_too(tmp_path):
    JAX.tuner(config=JAX.loha()).save_pretrained(tmp_path)
    assert main(["check", str(tmp_path)]) == 0


def test_nested_modules_to_save_weights_are_listed(tmp_path, capsys):
    """``classifier.dense.weight`` belongs to ``modules_to_save=["classifier"]`` (RoBERTa-style heads)."""
    import torch

    from lycoris_torch import LoKrConfig, LoKrModel

    model = torch.nn.Sequential()
    model.body = torch.nn.Linear(8, 8)
    model.classifier = torch.nn.Sequential()
    model.classifier.dense = torch.nn.Linear(8, 8)
    model.classifier.out_proj = torch.nn.Linear(8, 2)
    cfg = LoKrConfig(r=2, target_modules=["body"], modules_to_save=["classifier"], init_weights=False)
    LoKrModel(model, cfg).save_pretrained(tmp_path)
    assert main(["check", str(tmp_path)]) == 0, capsys.readouterr().err
    assert "base_model.model.classifier.dense.weight" in capsys.readouterr().out
