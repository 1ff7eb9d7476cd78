"""``lycoris-jax`` subcommands: help, exit codes 0/1/2, convert both ways, check, inspect."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import lycoris_torch as lt
from lycoris_cli.cli import main
from lycoris_core import kohya, resolve_rank_alpha
from tests.kohya.models import CONV1D, network, torch_model

NAMES = [n for n, _ in torch_model().named_modules()]
ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "ERRORS.md"


@pytest.fixture(scope="module")
def lycoris_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "lokr.safetensors"
    network(torch_model(), "lokr", {"linear_dim": 2, "linear_alpha": 3.0}, CONV1D).save_weights(
        str(path), torch.float32, None
    )
    return path


@pytest.mark.parametrize("command", [[], ["demo"], ["convert"], ["check"], ["inspect"]])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: lycoris-jax" in capsys.readouterr().out


def test_demo_help_names_every_architecture_model_takes(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "Llama, Gemma or Mistral checkpoint directory" in " ".join(capsys.readouterr().out.split())


def test_bad_usage_exits_2(capsys):
    for argv in (["bogus"], ["convert", "only-one"], ["inspect"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2


def test_inspect_a_lycoris_file_and_a_peft_directory(lycoris_file, tmp_path, capsys):
    assert main(["inspect", str(lycoris_file)]) == 0
    table = capsys.readouterr().out
    assert "lycoris_mlp_layers_0" in table and "LoKr" in table and "total:" in table
    assert main(["inspect", str(lycoris_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "lycoris" and len(info["modules"]) == 5
    row = next(r for r in info["modules"] if r["module"] == "lycoris_mlp_layers_1")
    assert (row["r"], row["alpha"], row["scale"], row["dtypes"]) == (2, 3.0, 1.5, ["F32"])
    assert row["params"] == sum(int(np.prod(s)) for s in row["factors"].values()) and row["bytes"] == 4 * row["params"]
    tuner = lt.LoHaModel(torch_model(), lt.LoHaConfig(r=2, alpha=4, target_modules=["head"]))
    tuner.save_pretrained(tmp_path / "peft")
    assert main(["inspect", str(tmp_path / "peft"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["method"], info["modules"][0]["module"]) == ("peft", "LoHa", "mlp.head")


def test_inspect_shows_the_rank_and_alpha_a_load_uses(lycoris_file, tmp_path, capsys):
    tensors = load_file(lycoris_file)
    del tensors["lycoris_mlp_layers_0.alpha"]  # no alpha: alpha = r
    tensors["lycoris_mlp_layers_1.alpha"] = torch.tensor(0.0)  # zero: alpha = r
    path = tmp_path / "edited.safetensors"
    save_file(tensors, path)
    assert main(["inspect", str(path), "--json"]) == 0
    rows = {row["module"]: row for row in json.loads(capsys.readouterr().out)["modules"]}
    assert main(["inspect", str(path)]) == 0
    table = {line.split()[0]: line.split()[2:5] for line in capsys.readouterr().out.splitlines()[2:-1]}
    source = kohya.read_lycoris(path)
    config, _ = kohya.lycoris_to_peft(source, NAMES)
    names = kohya.resolve_names(source.modules, NAMES)
    assert any(m.full for m in source.modules.values())  # W1 and W2 full: the file's alpha is ignored
    for name, row in rows.items():
        r, alpha = resolve_rank_alpha(config, names[name])  # what a load of the file uses
        assert (row["r"], row["alpha"], row["scale"]) == (r, alpha, alpha / r), name
        assert table[name] == [str(r), f"{alpha:g}", f"{alpha / r:.4g}"], name
    assert (rows["lycoris_mlp_layers_0"]["alpha"], rows["lycoris_mlp_layers_1"]["alpha"]) == (2, 2)
    assert (rows["lycoris_mlp_head"]["r"], rows["lycoris_mlp_head"]["alpha"]) == (4, 4)  # not "-" and 2


def test_inspect_stops_quietly_when_the_reader_goes_away(lycoris_file):
    read, write = os.pipe()
    os.close(read)  # as ``| head -1`` once head has exited: every write fails with EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", "lycoris_cli", "inspect", str(lycoris_file)],
            cwd=ROOT,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ | {"JAX_PLATFORMS": "cpu"},
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


def test_convert_both_ways_and_check(lycoris_file, tmp_path, capsys):
    names = tmp_path / "modules.txt"
    names.write_text("\n".join(NAMES))
    peft_dir, back = tmp_path / "peft", tmp_path / "back.safetensors"
    assert main(["convert", str(lycoris_file), str(peft_dir), "--model", str(names)]) == 0
    assert main(["convert", str(peft_dir), str(back)]) == 0
    a, b = kohya.read_lycoris(lycoris_file), kohya.read_lycoris(back)
    for name, m in a.modules.items():
        assert b.modules[name].scale == m.scale  # a full LoKr module keeps scale 1 (its alpha is ignored)
        for k, v in m.factors.items():
            np.testing.assert_array_equal(b.modules[name].factors[k], v)
    capsys.readouterr()
    assert main(["check", str(lycoris_file)]) == 0
    assert "5 agree, 0 disagree" in capsys.readouterr().out
    assert main(["check", str(peft_dir)]) == 0


def test_unusable_input_exits_2_with_one_line(lycoris_file, tmp_path, capsys):
    assert main(["convert", str(lycoris_file), str(tmp_path / "out")]) == 2  # needs --model
    assert "--model is needed" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    bad = tmp_path / "names.txt"
    bad.write_text("something.else\n")
    assert main(["convert", str(lycoris_file), str(tmp_path / "out"), "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "lycoris_conv_c2" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_model_may_be_a_transformers_directory(tmp_path):
    from tests.jax.llama import CONFIG, build_llama

    model = build_llama()[0]()
    net = network(model, "loha", {"linear_dim": 2, "linear_alpha": 2.0}, ["lm_head"])
    path = tmp_path / "llama.safetensors"
    net.save_weights(str(path), torch.float32, None)
    config = copy.deepcopy(CONFIG)
    config.architectures = ["LlamaForCausalLM"]  # as a saved model's config.json has
    config.save_pretrained(tmp_path / "llama")
    assert main(["convert", str(path), str(tmp_path / "peft"), "--model", str(tmp_path / "llama")]) == 0
    config = kohya.read_peft(tmp_path / "peft")[0]
    assert "model.layers.1.mlp.down_proj" in config.target_modules and len(config.target_modules) == 14


def test_a_model_directory_runs_no_code_and_flax_names_map_to_torch(tmp_path):
    from lycoris_cli.cli import model_modules
    from tests.jax.llama import CONFIG

    remote = copy.deepcopy(CONFIG)
    remote.architectures = ["LlamaForCausalLM"]
    remote.auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    remote.save_pretrained(tmp_path / "remote")
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (tmp_path / "remote" / name).write_text("raise SystemExit('ran code from the model directory')\n")
    assert "model.layers.0.self_attn.q_proj" in model_modules(str(tmp_path / "remote"))  # and ran nothing
    flax = copy.deepcopy(CONFIG)
    flax.architectures = ["FlaxLlamaForCausalLM"]
    flax.save_pretrained(tmp_path / "flax")
    assert "model.layers.0.self_attn.q_proj" in model_modules(str(tmp_path / "flax"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    with pytest.raises(ValueError, match="cannot build a transformers model"):
        model_modules(str(tmp_path / "broken"))


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _peft_dir(tmp: Path) -> tuple[Path, Path]:
    """``tmp/peft`` (a PEFT directory converted from ``tmp/lokr.safetensors``) and the module list."""
    names = tmp / "modules.txt"
    names.write_text("\n".join(NAMES))
    assert main(["convert", str(tmp / "lokr.safetensors"), str(tmp / "peft"), "--model", str(names)]) == 0
    return tmp / "peft", names


def _poison(path: Path, key: str, value: float) -> None:
    tensors = load_file(path)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    save_file(tensors, path)


def _exists_directory(t: Path) -> list[str]:
    peft, names = _peft_dir(t)
    return ["convert", str(t / "lokr.safetensors"), str(peft), "--model", str(names)]


def _exists_file(t: Path) -> list[str]:
    peft, _ = _peft_dir(t)
    (t / "out.safetensors").write_bytes(b"someone's file")
    return ["convert", str(peft), str(t / "out.safetensors")]


def _inside(t: Path) -> list[str]:
    peft, _ = _peft_dir(t)
    return ["convert", str(peft), str(peft / "adapter_model.safetensors"), "--force"]


def _holds(t: Path) -> list[str]:
    peft, names = _peft_dir(t)
    shutil.copy(t / "lokr.safetensors", peft / "adapter_model.safetensors.bak")
    return ["convert", str(peft / "adapter_model.safetensors.bak"), str(peft), "--model", str(names), "--force"]


def _nonfinite_lycoris(command: str) -> Callable[[Path], list[str]]:
    def setup(t: Path) -> list[str]:
        (t / "modules.txt").write_text("\n".join(NAMES))
        _poison(t / "lokr.safetensors", "lycoris_mlp_head.lokr_w1", float("nan"))
        if command == "check":
            return ["check", str(t / "lokr.safetensors")]
        return ["convert", str(t / "lokr.safetensors"), str(t / "out"), "--model", str(t / "modules.txt")]

    return setup


def _nonfinite_peft(t: Path) -> list[str]:
    peft, _ = _peft_dir(t)
    _poison(peft / "adapter_model.safetensors", "base_model.model.mlp.head.lokr_w1", float("inf"))
    return ["convert", str(peft), str(t / "out.safetensors")]


def _demo(*args: str) -> Callable[[Path], list[str]]:
    return lambda t: ["demo", *args, "--out", str(t / "out")]


def _model_dir(config: str | None) -> Callable[[Path], list[str]]:
    def setup(t: Path) -> list[str]:
        (t / "mpt").mkdir()  # a folder name transformers would read as a model type
        (t / "mpt" / "model.safetensors").write_bytes(b"")
        if config is not None:
            (t / "mpt" / "config.json").write_text(config)
        return ["demo", "--model", str(t / "mpt"), "--out", str(t / "out")]

    return setup


def _out_is_a_file(t: Path) -> list[str]:
    (t / "out").write_text("results")
    return ["demo", "--out", str(t / "out")]


@dataclass(frozen=True)
class CliCase:
    """``setup(tmp)`` makes the files and returns the argv; the command must exit 2 with ``match`` on
    one line of stderr and leave every file as it was."""

    id: str
    setup: Callable[[Path], list[str]]
    match: str


CLI_CASES = [
    CliCase("demo-steps-not-positive", _demo("--steps", "0"), "--steps: expected a positive integer, got 0"),
    CliCase("demo-rank-not-positive", _demo("--rank", "0"), "--rank: expected a positive integer, got 0"),
    CliCase(
        "demo-lr-not-positive", _demo("--lr", "-0.01"), "--lr: expected a positive finite learning rate, got -0.01"
    ),
    CliCase("demo-lr-not-finite", _demo("--lr", "nan"), "--lr: expected a positive finite learning rate, got nan"),
    CliCase("demo-seed-negative", _demo("--seed", "-1"), "--seed: expected a non-negative integer, got -1"),
    CliCase("demo-out-not-a-directory", _out_is_a_file, "out': exists and is not a directory"),
    CliCase(
        "demo-model-missing",
        _demo("--model", "no-such-checkpoint"),
        "--model 'no-such-checkpoint': expected a local transformers Llama, Gemma or Mistral checkpoint directory, "
        "got no such directory",
    ),
    CliCase("demo-model-no-config", _model_dir(None), "mpt': config.json is missing"),
    CliCase("demo-model-config-not-json", _model_dir("{"), r"mpt/config.json': cannot read it: JSONDecodeError"),
    CliCase(
        "demo-model-other-type",
        _model_dir('{"model_type": "gpt2"}'),
        "mpt': expected a Llama, Gemma or Mistral checkpoint, got model_type 'gpt2' in config.json",
    ),
    CliCase("convert-destination-exists-directory", _exists_directory, r"peft': exists \(a directory\); pass --force"),
    CliCase("convert-destination-exists-file", _exists_file, r"out.safetensors': exists \(a file\); pass --force"),
    CliCase(
        "convert-destination-is-source",
        lambda t: ["convert", str(t / "lokr.safetensors"), str(t / "lokr.safetensors"), "--force"],
        "lokr.safetensors': is the source itself; choose another destination",
    ),
    CliCase("convert-destination-inside-source", _inside, "adapter_model.safetensors': lies inside the source"),
    CliCase("convert-destination-holds-source", _holds, "peft': holds the source"),
    CliCase(
        "convert-nonfinite-lycoris",
        _nonfinite_lycoris("convert"),
        r"lokr.safetensors: non-finite values \(NaN or inf\) in \['lycoris_mlp_head.lokr_w1'\]; .* repair",
    ),
    CliCase(
        "convert-nonfinite-peft",
        _nonfinite_peft,
        r"peft/adapter_model.safetensors: non-finite values \(NaN or inf\) in \['base_model.model.mlp.head.lokr_w1'\]",
    ),
    CliCase(
        "check-nonfinite-lycoris",
        _nonfinite_lycoris("check"),
        r"lokr.safetensors: non-finite values \(NaN or inf\) in \['lycoris_mlp_head.lokr_w1'\]",
    ),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_cli_errors(case, lycoris_file, tmp_path, capsys):
    shutil.copy(lycoris_file, tmp_path / "lokr.safetensors")
    argv = case.setup(tmp_path)
    before = _digest(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(case.match, err), err
    assert err.startswith(f"lycoris-jax {argv[0]}: ")
    assert _digest(tmp_path) == before


def test_cli_catalogue_matches_the_docs():
    section = DOCS.read_text().split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    ids = re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.M)
    assert len(ids) == len(set(ids)), "duplicate rows in docs/ERRORS.md, 'Command line'"
    assert set(ids) == {c.id for c in CLI_CASES}


def test_convert_force_replaces_and_an_empty_directory_is_fine(lycoris_file, tmp_path):
    shutil.copy(lycoris_file, tmp_path / "lokr.safetensors")
    peft, names = _peft_dir(tmp_path)
    (peft / "README.md").write_text("kept")
    assert main(["convert", str(tmp_path / "lokr.safetensors"), str(peft), "--model", str(names), "--force"]) == 0
    assert (peft / "README.md").read_text() == "kept" and kohya.read_peft(peft)[0].peft_type == "LOKR"
    (tmp_path / "out.safetensors").write_bytes(b"old")
    assert main(["convert", str(peft), str(tmp_path / "out.safetensors"), "--force"]) == 0
    assert len(kohya.read_lycoris(tmp_path / "out.safetensors").modules) == 5
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "lokr.safetensors"), str(tmp_path / "empty"), "--model", str(names)]) == 0
