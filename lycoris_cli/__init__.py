"""The ``lycoris-jax`` command (``python -m lycoris_cli``): demo, finetune, plan, convert, check, inspect.

Kept apart from ``lycoris_jax`` because it uses ``lycoris_torch`` and ``parity_tests`` too.
"""

from __future__ import annotations

import json
import os


def read_model_config(path: str, expected: str) -> dict:
    """The JSON object in ``--model`` directory ``path``'s ``config.json``; a ``ValueError`` naming the
    directory or the file when it is not a directory, has no ``config.json``, or that file is not a
    readable JSON object (``expected``: what ``--model`` takes, for the message)."""
    if not os.path.isdir(path):
        what = "a file" if os.path.exists(path) else "no such directory"
        raise ValueError(f"--model {path!r}: expected {expected}, got {what}")
    name = os.path.join(path, "config.json")
    if not os.path.isfile(name):
        raise ValueError(f"--model {path!r}: config.json is missing (expected {expected})")
    try:
        with open(name, encoding="utf-8") as fh:
            config = json.load(fh)
    except (ValueError, OSError) as err:  # not JSON, not UTF-8, unreadable
        raise ValueError(f"--model {name!r}: cannot read it: {type(err).__name__}: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--model {name!r}: expected a JSON object")
    return config
