"""The README's shown command output, compared by shape with what the command prints."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def shown(command: str) -> str:
    """The output under ``$ lycoris-jax COMMAND ...`` in the README's ``text`` block."""
    block = re.search(rf"```text\n\$ lycoris-jax {command} [^\n]*\n(.*?)```", README.read_text(), re.S)
    assert block, f"README.md: no lycoris-jax {command} block"
    return block[1]


def shape(text: str) -> list[str]:
    """The non-blank lines with every quoted string or path a ``P``, every figure (``1,024``, ``~4``,
    ``8.03B``) a ``#``, MiB as GiB and runs of spaces one: what stays is what the command writes."""
    text = re.sub(r"(?<!\S)/\S+|\S+/\S*[./]\S*", "P", re.sub(r"'[^']*'", "P", text))  # not tokens/s
    figures = r"~?>?=?[0-9][0-9,.]*(?:[kMB](?![a-z]))?"
    return [
        " ".join(re.sub(figures, "#", line).replace("MiB", "GiB").split()) for line in text.splitlines() if line.strip()
    ]
