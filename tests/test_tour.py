"""docs/guide/tour.md (the API tour, once README's sections) runs as written: the "Use" section's
``python`` blocks in order, in one directory, then the ``bash`` parity check on what they saved; the
LyCORIS section's blocks each on its own; the ``--quick`` claim matches ``parity_tests --help``."""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pytest

from parity_tests.__main__ import main as parity_main

TOUR = Path(__file__).resolve().parents[1] / "docs" / "guide" / "tour.md"


def blocks(language: str, section: str = "Use") -> list[str]:
    use = TOUR.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", use, flags=re.S)


def test_the_use_section_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    python = blocks("python")
    assert len(python) >= 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notices for its Flax classes
        for i, code in enumerate(python):
            try:
                exec(compile(code, f"tour.md python block {i + 1}", "exec"), {"__name__": f"readme_{i}"})
            except Exception as err:  # pragma: no cover - the message says which block
                pytest.fail(f"tour.md python block {i + 1} failed: {type(err).__name__}: {err}")
    for command in blocks("bash"):
        args = shlex.split(command.strip())
        assert args[:4] == ["python", "-m", "parity_tests", "check"]
        assert parity_main(args[3:]) == 0
    assert "['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj']" in capsys.readouterr().out


def test_the_lycoris_files_section_runs_as_written(tmp_path, monkeypatch, capsys):
    from lycoris_cli.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    scopes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, code in enumerate(blocks("python", "LyCORIS and kohya files")):
            scopes.append({"__name__": f"readme_lycoris_{i}"})  # each block on its own, as a user pastes it
            exec(compile(code, f"tour.md LyCORIS block {i + 1}", "exec"), scopes[-1])
    assert next(scope["error"] for scope in scopes if "error" in scope) < 1e-5
    for line in blocks("bash", "LyCORIS and kohya files")[0].strip().splitlines():
        args = shlex.split(line)
        assert args[0] == "lycoris-jax"
        assert cli_main(args[1:]) == 0, line
    out = capsys.readouterr().out
    assert "lycoris_model_layers_0_self_attn_q_proj" in out and "0 disagree" in out


def test_the_quick_parity_run_is_described_alike_in_readme_and_help(capsys):
    from parity_tests.cases import QUICK

    readme = " ".join(TOUR.read_text().split())
    with pytest.raises(SystemExit):
        parity_main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    claim = f"({len(QUICK)} cases) in about 2 minutes on 2 CPU cores"  # measured: 98 to 127 s
    assert f"`--quick` runs a subset {claim}" in readme and claim in help_text
