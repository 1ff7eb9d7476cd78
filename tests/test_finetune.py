"""``lycoris-jax finetune`` on a tiny checkpoint and tokenizer made here: trains, saves PEFT's and
LyCORIS's files that real PEFT loads with equal logits, resumes exactly (after a save and after
Ctrl-C), runs data-parallel on 8 simulated devices to the same losses, and refuses bad input with
one line and exit 2."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lycoris_cli import cli
from lycoris_cli.finetune import load_data
from tests import readme_output
from tests.finetune_fixture import make_checkpoint, sonnets

ROOT = Path(__file__).resolve().parents[1]
#: the arguments every run here shares (small rows, a rate that moves the loss in a few steps)
COMMON = ["--seq", "64", "--batch", "8", "--lr", "1e-2", "--save-every", "3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    make_checkpoint(str(root / "model"))
    (root / "data.txt").write_text(sonnets(), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def reference(files):
    """Six uninterrupted steps on one device; its summary (``printed``: what the command printed)."""
    out = files / "reference"
    args = ["finetune", "--model", str(files / "model"), "--data", str(files / "data.txt"), "--steps", "6"]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert cli.main([*args, *COMMON, "--out", str(out)]) == 0
    return {**json.loads((out / "summary.json").read_text()), "printed": printed.getvalue()}


def test_the_readme_shows_the_summary_as_the_command_prints_it(reference):
    shown = [line for line in readme_output.shown("finetune").splitlines() if not line.startswith("finetune ")]
    assert readme_output.shape("\n".join(shown)) == readme_output.shape(reference["printed"])  # the bar: stderr


def _run(files, out, *extra, env=None, **popen):
    command = [sys.executable, "-m", "lycoris_cli", "finetune", "--model", str(files / "model"),
               "--data", str(files / "data.txt"), *COMMON, "--out", str(out), *extra]  # fmt: skip
    return subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **(env or {})}, text=True, stderr=subprocess.PIPE, **popen
    )


def test_the_run_writes_peft_and_lycoris_files_that_peft_loads_with_equal_logits(files, reference):
    import jax.numpy as jnp
    import peft
    import torch
    from transformers import AutoModelForCausalLM, FlaxAutoModelForCausalLM

    from lycoris_jax import pytree

    out = files / "reference"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter.safetensors", "loss.png"):
        assert (out / name).is_file(), name
    assert reference["steps"] == 6 and reference["tokens_seen"] == 6 * 8 * 64
    assert reference["trainable_parameters"] > 0 and reference["eval_loss"] is not None
    assert [s for s, _ in reference["evals"]] == [3, 6]
    assert reference["losses"][-1] < reference["losses"][0]

    flax_model = FlaxAutoModelForCausalLM.from_pretrained(files / "model", from_pt=True)
    adapter = pytree.from_pretrained(str(out / "adapter"), flax_model.params)
    ids = np.asarray(load_data(str(files / "data.txt"), _tokenizer(files), 64, 0.05).eval[:2])
    expected = np.asarray(flax_model(jnp.asarray(ids), params=pytree.merge(flax_model.params, adapter)).logits)
    base = np.asarray(flax_model(jnp.asarray(ids)).logits)
    torch_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files / "model"), out / "adapter")
    with torch.no_grad():
        got = torch_model.eval()(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert np.abs(expected - base).max() > 1e-3  # the adapter moved the logits
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def _tokenizer(files):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(files / "model")


def test_resume_after_a_save_continues_to_the_same_losses(files, reference):
    out = files / "resumed"
    args = ["finetune", "--model", str(files / "model"), "--data", str(files / "data.txt"), *COMMON, "--out", str(out)]
    assert cli.main([*args, "--steps", "3"]) == 0
    assert cli.main([*args, "--steps", "6", "--resume"]) == 0
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["losses"] == reference["losses"]  # bit for bit: same data order, same arithmetic
    assert resumed["evals"] == reference["evals"]


def test_ctrl_c_saves_a_checkpoint_that_resumes_to_the_same_losses(files, reference):
    out = files / "interrupted"
    process = _run(files, out, "--steps", "100000", "--save-every", "100000")
    seen = ""
    deadline = time.monotonic() + 240
    while "loss=" not in seen:  # training is under way (the bar shows a loss after a step)
        assert time.monotonic() < deadline and process.poll() is None, seen[-2000:]
        seen += process.stderr.read(1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 130, (seen + err)[-3000:]
    assert "continue with the same command and --resume" in err
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] >= 1
    args = ["finetune", "--model", str(files / "model"), "--data", str(files / "data.txt"), *COMMON, "--out", str(out)]
    assert cli.main([*args, "--steps", str(max(6, steps[-1] + 1)), "--save-every", "100000", "--resume"]) == 0
    resumed = json.loads((out / "summary.json").read_text())
    np.testing.assert_array_equal(resumed["losses"][:6], reference["losses"])


def test_eight_devices_reach_the_losses_of_one_from_flax_weights(files, reference, tmp_path):
    """Data-parallel over 8 simulated devices (its own process), from the same weights saved as a
    Flax checkpoint: the same losses as one device, to the reduction order."""
    model = make_checkpoint(str(tmp_path / "flax_model"), flax=True)
    assert os.path.isfile(os.path.join(model, "flax_model.msgpack"))
    assert not os.path.isfile(os.path.join(model, "model.safetensors"))
    command = [sys.executable, "-m", "lycoris_cli", "finetune", "--model", model, "--data", str(files / "data.txt"),
               *COMMON, "--steps", "3", "--out", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 device(s)" in result.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["devices"] == 8
    np.testing.assert_allclose(summary["losses"], reference["losses"][:3], rtol=2e-6)


def test_jsonl_documents_are_joined_by_the_end_of_sequence_token(files, tmp_path):
    tokenizer = _tokenizer(files)
    lines = ["From fairest creatures we desire increase,", "", "That thereby beauty's rose might never die,"]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) if t else "" for t in lines), encoding="utf-8")
    data = load_data(str(path), tokenizer, 4, 0.0)
    flat = np.concatenate([data.train.ravel(), data.eval.ravel()])
    first = tokenizer(lines[0], add_special_tokens=False)["input_ids"]
    assert list(flat[: len(first) + 1]) == [*first, tokenizer.eos_token_id]
    assert data.eval.shape == (0, 4) and data.train.shape[1] == 4
    held = load_data(str(path), tokenizer, 4, 0.25)
    assert len(held.eval) == int(np.ceil(0.25 * (len(held.train) + len(held.eval))))


def _no_config(t):
    (t / "m").mkdir()
    return ["--model", str(t / "m")]


def _without(name):
    def make(t, files):
        import shutil

        shutil.copytree(files / "model", t / "m")
        for f in (t / "m").iterdir():
            if f.name.startswith(name):
                f.unlink()
        return ["--model", str(t / "m")]

    return make


def _pickle_only(t, files):
    _without("model.safetensors")(t, files)
    (t / "m" / "pytorch_model.bin").write_bytes(b"not read")
    return ["--model", str(t / "m")]


def _model_type(t, files):
    _without("nothing")(t, files)
    config = json.loads((t / "m" / "config.json").read_text())
    (t / "m" / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    return ["--model", str(t / "m")]


def _data(text, suffix=".txt"):
    def make(t, files):
        (t / f"d{suffix}").write_text(text, encoding="utf-8")
        return ["--data", str(t / f"d{suffix}")]

    return make


ERRORS = {
    "no-config": (lambda t, f: _no_config(t), "config.json is missing"),
    "no-tokenizer": (_without("tokenizer"), "no tokenizer files"),
    "no-weights": (_without("model.safetensors"), "no weights: expected flax_model.msgpack or model.safetensors"),
    "pickle-weights": (_pickle_only, r"pytorch_model.bin is a pickle: never loaded"),
    "no-flax-class": (_model_type, "model_type 'qwen2' has no Flax causal-LM class"),
    "empty-data": (_data(""), "the file is empty"),
    "whitespace-data": (_data("  \n\n"), "no text"),
    "bad-jsonl": (
        _data('{"text": "a"}\n{"txt": 1}\n', ".jsonl"),
        r'd.jsonl:2: expected an object with a string "text"',
    ),
    "data-too-short": (_data("Shall I compare thee"), r"make 0 row\(s\) of --seq 64; need 1"),
    "data-suffix": (_data("text", ".csv"), "expected a .txt or a .jsonl file"),
    "seq-beyond-positions": (lambda t, f: ["--seq", "4096"], "--seq 4096: longer than the model's 128 positions"),
    "resume-nothing": (lambda t, f: ["--resume"], r"--resume: no checkpoint in"),
    "batch-zero": (lambda t, f: ["--batch", "0"], "--batch: expected a positive integer, got 0"),
    "eval-fraction": (lambda t, f: ["--eval-fraction", "1"], r"--eval-fraction: expected a fraction in \[0, 1\)"),
    "hosts-partly-named": (
        lambda t, f: ["--coordinator", "127.0.0.1:8476"],
        "give --coordinator, --num-processes and --process-id together",
    ),
    "hosts-bad-coordinator": (
        lambda t, f: ["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
        "--coordinator 'localhost': expected HOST:PORT",
    ),
    "hosts-bad-process-id": (
        lambda t, f: ["--coordinator", "127.0.0.1:8476", "--num-processes", "2", "--process-id", "2"],
        r"--process-id 2: expected 0 to 1",
    ),
    # in a process of its own: JAX joins a cluster only before its first computation
    "hosts-no-cluster": (lambda t, f: ["--distributed"], "--distributed: JAX found no cluster to join here", "own"),
    "hosts-twice": (
        lambda t, f: ["--distributed", "--coordinator", "127.0.0.1:8476"],
        "--distributed finds the processes itself: drop --coordinator",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_one_line_and_exit_2(case, files, tmp_path, capsys):
    make, message, *own = ERRORS[case]
    args = {"--model": str(files / "model"), "--data": str(files / "data.txt"), "--out": str(tmp_path / "out")}
    extra = make(tmp_path, files)
    for flag in ("--model", "--data"):
        if flag in extra:
            i = extra.index(flag)
            args[flag] = extra.pop(i + 1)
            extra.pop(i)
    argv = ["finetune", *[x for kv in args.items() for x in kv], *COMMON[:2], *extra]
    if own:
        done = subprocess.run([sys.executable, "-m", "lycoris_cli", *argv], cwd=ROOT, capture_output=True, text=True)
        code, err = done.returncode, done.stderr
    else:
        code, err = cli.main(argv), capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("lycoris-jax finetune: ")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out" / "adapter").exists()


def test_an_earlier_run_is_not_overwritten_without_resume(files, reference, capsys):
    argv = ["finetune", "--model", str(files / "model"), "--data", str(files / "data.txt"), "--out",
            str(files / "reference")]  # fmt: skip
    assert cli.main(argv) == 2
    assert "holds checkpoints of an earlier run; pass --resume" in capsys.readouterr().err


def test_resume_refuses_a_changed_run(files, reference, capsys):
    import shutil

    out = files / "changed"
    shutil.copytree(files / "reference", out)
    argv = ["finetune", "--model", str(files / "model"), "--data", str(files / "data.txt"), *COMMON, "--out", str(out)]
    assert cli.main([*argv, "--rank", "4", "--resume", "--steps", "9"]) == 2
    assert "--resume: the checkpoint at step 6 was made with rank=8, this command has 4" in capsys.readouterr().err


def test_errors_catalogue_matches_the_docs():
    import re
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "ERRORS.md").read_text()
    section = docs.split("\n## `finetune` and `plan`\n", 1)[1].split("\n## ", 1)[0]
    ids = re.findall(r"^\| `finetune-([a-z0-9-]+)` \|", section, flags=re.M)
    assert sorted(ids) == sorted(ERRORS)
