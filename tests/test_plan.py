"""``lycoris-jax plan``: the fine-tuning step compiled for a TPU slice with libtpu (deviceless), never run.

A tiny preset and a tiny config.json compile in seconds. Checked: memory is read and grows with the
batch, the exit code follows the fit (0 fits, 1 does not), and unusable input is one line and exit 2.
Not a timing test: the step time is the compiler's estimate.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from lycoris_cli import cli, plan
from tests import readme_output

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu (jax[tpu]) compiles for TPU topologies on this CPU"
)


def _plan(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@needs_libtpu
def test_a_run_that_fits_exits_0_and_memory_grows_with_the_batch(capsys):
    code, out, _ = _plan(capsys, "--model", "tiny", "--topology", "v5e:2x2", "--seq", "128", "--batch", "2", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["fits"] and result["chips"] == 4 and result["mesh"] == {"fsdp": 4, "tp": 1}
    frozen, lokr, full = result["variants"]
    assert [frozen["trainable"], lokr["trainable"] > 0, full["trainable"] > lokr["trainable"]] == [0, True, True]
    for row in (frozen, lokr, full):
        assert row["fits"] and row["seconds"] > 0 and row["tokens_per_second"] > 0
        assert row["largest_batch"] >= 4
    by_batch = {int(b): t for b, t in frozen["total_by_batch"].items()}
    assert by_batch[4] > by_batch[2] > 0  # the batch and its double: bytes per sequence
    # the adapter's largest batch was compiled and fits; memory grows with the batch
    assert lokr["largest_batch_compiled"] and lokr["total_by_batch"][str(lokr["largest_batch"])] > lokr["total"]
    # the adapter's factors and Adam's moments are arguments the frozen step does not hold; full's are all weights
    assert frozen["argument"] < lokr["argument"] < full["argument"]
    assert lokr["seconds"] > frozen["seconds"]
    # the README shows the table as the command prints it (the figures differ: another model)
    assert readme_output.shape(plan._table(result, "tiny"))[1:] == readme_output.shape(readme_output.shown("plan"))[1:]


@needs_libtpu
def test_a_run_that_does_not_fit_exits_1_and_says_which_batch_would(capsys, tmp_path):
    config = dict(
        model_type="llama",
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1024,
        num_hidden_layers=2,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    argv = ["--model", str(tmp_path), "--topology", "v5e:2x2", "--method", "loha", "--rank", "4"]
    code, out, _ = _plan(capsys, *argv, "--seq", "1024", "--batch", "512", "--targets", "q_proj,v_proj")
    assert code == 1, out
    assert "does not fit: loha (auto, r=4) at batch 512" in out
    largest = int(out.split("; batch ")[1].split()[0])
    assert 1 <= largest < 512  # compiled: it fits (the plan lowers a prediction until one does)


def _bad(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    real = importlib.util.find_spec
    no_libtpu = lambda: monkeypatch.setattr(  # noqa: E731
        importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
    )
    return {
        "no-config": ([f"--model={tmp_path / 'empty'}"], "config.json is missing", None),
        "not-a-model": (["--model=llama9"], "got no such directory", None),
        "seq-beyond-positions": ([f"--model={tmp_path / 'short'}", "--seq=1024"], "longer than the model's 512", None),
        "unknown-generation": (["--topology=v9x:2x2"], "generations: v5e, v6e, v5p", None),
        "topology-libtpu-refuses": (["--topology=v5e:3x3"], "libtpu refuses it", "libtpu"),
        "bad-mesh": (["--mesh=tp"], "expected fsdp, fsdp,tp or fsdp,tp=N", None),
        "tp-does-not-divide": (["--mesh=fsdp,tp=3"], "does not divide the 4 chips", "libtpu"),
        "bad-target": (["--targets=lm_head"], "each block's Linear layers are q_proj", None),
        "zero-batch": (["--batch=0"], "--batch 0: must be a positive integer", None),
        "no-libtpu": ([], r'needs libtpu, which is not installed: pip install "jax\[tpu\]==', no_libtpu),
    }


CASES = (
    "no-config",
    "not-a-model",
    "seq-beyond-positions",
    "unknown-generation",
    "topology-libtpu-refuses",
    "bad-mesh",
    "tp-does-not-divide",
    "bad-target",
    "zero-batch",
    "no-libtpu",
)


@pytest.mark.parametrize("case", CASES)
def test_unusable_input_is_one_line_and_exit_2(case, capsys, tmp_path, monkeypatch):
    import re

    argv, message, needs = _bad(tmp_path, monkeypatch)[case]
    if needs == "libtpu" and importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu judges this topology")
    if callable(needs):
        needs()
    base = {"--model": "tiny", "--topology": "v5e:2x2", "--seq": "128"}
    for arg in argv:
        base.pop(arg.split("=")[0], None)
    code, out, err = _plan(capsys, *[f"{k}={v}" for k, v in base.items()], *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("lycoris-jax plan: "), err
    assert re.search(message, err), err


def test_errors_catalogue_matches_the_docs():
    import re
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "ERRORS.md").read_text()
    section = docs.split("\n## `finetune` and `plan`\n", 1)[1].split("\n## ", 1)[0]
    ids = re.findall(r"^\| `plan-([a-z0-9-]+)` \|", section, flags=re.M)
    assert sorted(ids) == sorted(CASES)


@needs_libtpu
def test_the_tpu_module_docstring_plans_a_users_own_model(capsys):
    import textwrap

    from lycoris_jax import tpu

    doc = tpu.__doc__.split("Your own model and step (an NNX model here; any jittable step works)::\n", 1)[1]
    code = textwrap.dedent(doc.split("\n``compile_step`` returns", 1)[0])
    scope = {"__name__": "tpu_docstring"}
    exec(compile(code, "lycoris_jax.tpu docstring", "exec"), scope)
    fig = scope["fig"]
    assert fig is not None and fig.total > 0 and fig.seconds > 0 and fig.argument > 0
    assert "MiB per chip; step" in capsys.readouterr().out
