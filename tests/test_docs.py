"""The documentation site (``mkdocs.yml``, ``docs/``): every guide page's Python blocks run as written
(in order, one directory per page), and every public name of the packages the API reference
documents has a docstring. ``mkdocs build --strict`` itself runs in ``.ci/run``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import warnings
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
GUIDE = sorted(p for p in (DOCS / "guide").glob("*.md") if p.stem != "tour")  # tour.md: tests/test_tour.py
#: the modules the API reference pages render (docs/api/*.md)
REFERENCE = (
    "lycoris_jax",
    "lycoris_jax.pytree",
    "lycoris_jax.linen",
    "lycoris_jax.tpu",
    "lycoris_torch",
    "lycoris_core",
)


def test_the_reference_pages_render_the_documented_modules():
    rendered = {m for page in (DOCS / "api").glob("*.md") for m in re.findall(r"^::: (\S+)$", page.read_text(), re.M)}
    assert rendered == set(REFERENCE)


@pytest.mark.parametrize("page", GUIDE, ids=lambda p: p.stem)
def test_every_python_block_of_a_guide_page_runs(page, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    if page.stem == "tpu" and importlib.util.find_spec("libtpu") is None:
        pytest.skip("the page compiles for a TPU topology: libtpu (jax[tpu])")
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": f"docs_{page.stem}"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notices for its Flax classes
        for i, code in enumerate(blocks):
            try:
                exec(compile(code, f"{page.name} python block {i + 1}", "exec"), scope)
            except Exception as err:  # pragma: no cover - the message says which block
                pytest.fail(f"{page.name} python block {i + 1} failed: {type(err).__name__}: {err}")


def _public(module):
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
        ]
    return names


@pytest.mark.parametrize("name", REFERENCE)
def test_every_public_name_in_the_reference_has_a_docstring(name):
    module = importlib.import_module(name)
    assert inspect.getdoc(module), f"{name} has no module docstring"
    missing = []
    for attr in _public(module):
        value = getattr(module, attr)
        if inspect.ismodule(value) or not (inspect.isclass(value) or inspect.isfunction(value)):
            continue
        if not (value.__doc__ or "").strip():
            missing.append(attr)
        if inspect.isclass(value):
            for meth, member in vars(value).items():
                if meth.startswith("_") or not inspect.isfunction(member):
                    continue
                if not (member.__doc__ or "").strip():
                    missing.append(f"{attr}.{meth}")
    assert not missing, f"{name}: public names without a docstring: {missing}"


def test_the_readme_example_runs(tmp_path, monkeypatch):
    readme = (DOCS.parent / "README.md").read_text()
    section = readme.split("## A first example\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(code.strip().splitlines()) <= 25  # the front page's one short example
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "README.md example", "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "llama_adapter" / "adapter_config.json").is_file()


def test_every_command_in_the_guide_is_one_the_cli_takes():
    """Shell blocks name placeholder paths (``my-llama``), so they are parsed, not run: every
    ``lycoris-jax`` line must be a subcommand with flags its parser accepts (the commands themselves
    run in tests/test_finetune.py, tests/test_plan.py and tests/test_cli.py)."""
    import shlex

    from lycoris_cli.cli import _parser

    commands = [
        line.split("#")[0].strip()
        for page in sorted((DOCS / "guide").glob("*.md"))
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)
        for line in block.splitlines()
        if line.strip().startswith("lycoris-jax ")
    ]
    assert len(commands) >= 8
    for command in commands:
        try:
            _parser().parse_args(shlex.split(command)[1:])
        except SystemExit:  # pragma: no cover - argparse printed why
            pytest.fail(f"the guide's command does not parse: {command}")
