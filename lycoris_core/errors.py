"""The one exception type of our own; every other bad input is a plain ``ValueError``/``TypeError``.

See ``docs/ERRORS.md`` for the catalogue of bad inputs and the error each one gets.
"""

from __future__ import annotations

import os

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """An adapter file or directory that cannot be used as it is.

    The message starts with the file (or directory) at fault and names the key, module, shape,
    dtype or value that is wrong; ``path`` holds the file. Nothing was modified when it is raised.
    """

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {message}")
