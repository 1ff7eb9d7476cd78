"""Crash-safe writes: a reader sees the old files or the new ones, never a mix.

``atomic_write``: one file, via a synced temp file beside it and ``os.replace``.
``replace_files``: several files of one directory tree at once. The new tree is staged in a temp
directory beside it (everything else the directory holds is hard-linked in, the new files are
written and synced), then the two directories are swapped in one ``renameat2(RENAME_EXCHANGE)``
(Linux; elsewhere two renames, between which the directory is briefly absent but never mixed).
Where the directory itself cannot be renamed (a mount point, a read-only parent, a filesystem
without hard links) the files are replaced in place under an ``INCOMPLETE_MARKER`` file that
our loaders refuse, so only a hard crash in the middle of those renames leaves it, and it says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping

__all__ = ["INCOMPLETE_MARKER", "atomic_write", "atomic_write_text", "replace_files"]

#: Present only while (or after a hard crash during) an in-place save; loaders refuse such a directory.
INCOMPLETE_MARKER = ".lycoris-incomplete-save"

# errno values meaning "this directory cannot be swapped here", not "the save failed".
_CANNOT_SWAP = {errno.EBUSY, errno.EXDEV, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTSUP, errno.EMLINK}


def _fsync(path: str) -> None:
    """Flush a file or directory entry to disk (directories: best effort, not every filesystem can)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def _write_new(path: str, data: bytes) -> None:
    """Create ``path`` (it must not exist) holding ``data``, synced to disk."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _new_file_mode(path: str) -> int:
    """The mode ``path`` has (if it exists), else what ``open`` would give it under the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the synced result onto ``path``; no half-written file remains."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode(path))  # mkstemp makes 0600; a file we replace keeps its mode
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync(directory)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def replace_files(directory: str | os.PathLike, files: Mapping[str, bytes]) -> None:
    """Make ``directory`` hold ``files`` (``{relative path: bytes}``, subdirectories allowed) in one
    step, keeping everything else it holds. On any error or interrupt before the swap, the
    directory is exactly as it was and the staged copy is removed. Not for concurrent writers."""
    directory = os.path.realpath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(errno.ENOTDIR, "expected a directory to save into", directory)
    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    if not _swappable(directory, files):
        return _replace_in_place(directory, files)
    try:
        staged = _new_sibling(parent, f".{base}.saving-")
    except PermissionError:
        return _replace_in_place(directory, files)
    old = f"{staged}.old"
    try:
        try:
            _stage(directory, files, staged)
            _swap(staged, directory, old)
        except shutil.Error:  # copytree collects failed hard links (e.g. a filesystem without them)
            shutil.rmtree(staged, ignore_errors=True)
            return _replace_in_place(directory, files)
        except OSError as err:
            if err.errno not in _CANNOT_SWAP:
                raise
            shutil.rmtree(staged, ignore_errors=True)
            return _replace_in_place(directory, files)
    finally:
        # Before the swap ``staged`` holds the new tree, after an exchange the previous one; ``old``
        # holds the previous tree after two renames, and is kept if restoring it failed.
        if os.path.isdir(staged):
            shutil.rmtree(staged, ignore_errors=True)
        if os.path.isdir(old) and os.path.isdir(directory):
            shutil.rmtree(old, ignore_errors=True)
    _fsync(parent)


def _swappable(directory: str, files: Mapping[str, bytes]) -> bool:
    """Whether the directory may be replaced by a new one: not a mount point, not this process's
    working directory (or above it), no symlinked subdirectory on the way to a file we write."""
    try:
        cwd = os.path.realpath(os.getcwd())
    except FileNotFoundError:
        cwd = None
    if cwd is not None and os.path.commonpath([cwd, directory]) == directory:
        return False
    if not os.path.isdir(directory):
        return True
    if os.stat(directory).st_dev != os.stat(os.path.dirname(directory)).st_dev:
        return False
    for rel in files:
        parts = os.path.normpath(rel).split(os.sep)[:-1]
        if any(os.path.islink(os.path.join(directory, *parts[: i + 1])) for i in range(len(parts))):
            return False
    return True


def _new_sibling(parent: str, prefix: str) -> str:
    """A new empty directory in ``parent`` with the permissions ``os.makedirs`` would give it."""
    while True:
        path = os.path.join(parent, prefix + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o777)  # the umask applies, as for the directory it will become
            return path
        except FileExistsError:
            continue


def _stage(directory: str, files: Mapping[str, bytes], staged: str) -> None:
    """Fill ``staged`` with hard links to ``directory``'s contents, then the new ``files``."""
    if os.path.isdir(directory):
        shutil.copytree(directory, staged, symlinks=True, copy_function=os.link, dirs_exist_ok=True)
    marker = os.path.join(staged, INCOMPLETE_MARKER)
    if os.path.lexists(marker):
        os.remove(marker)
    for rel, data in files.items():
        path = os.path.join(staged, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sub_marker = os.path.join(os.path.dirname(path), INCOMPLETE_MARKER)
        if os.path.lexists(sub_marker):
            os.remove(sub_marker)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)  # a hard link to the old file: never write through it
        _write_new(path, data)
    for root, _, _ in os.walk(staged, topdown=False):
        _fsync(root)


def _swap(staged: str, directory: str, old: str) -> None:
    """Put the staged tree at ``directory``; the previous tree (if any) ends up at ``staged``."""
    if not os.path.lexists(directory):
        os.rename(staged, directory)
        return
    if _exchange(staged, directory):
        return
    os.rename(directory, old)
    try:
        os.rename(staged, directory)
    except BaseException:
        os.rename(old, directory)
        raise


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths (Linux ``renameat2``); ``False`` where that is unavailable."""
    libc = _libc()
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def _replace_in_place(directory: str, files: Mapping[str, bytes]) -> None:
    """Write every file beside its target, then rename them all, each directory touched carrying
    ``INCOMPLETE_MARKER`` meanwhile (a hard crash leaves it there, and loaders refuse it)."""
    os.makedirs(directory, exist_ok=True)
    token = os.urandom(4).hex()
    pending: list[tuple[str, str]] = []
    touched = sorted({os.path.dirname(os.path.join(directory, rel)) for rel in files})
    markers: list[str] = []
    try:
        for rel, data in files.items():
            path = os.path.join(directory, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{token}"
            _write_new(tmp, data)
            pending.append((tmp, path))
        for d in touched:
            marker = os.path.join(d, INCOMPLETE_MARKER)
            with contextlib.suppress(FileExistsError):
                _write_new(marker, b"an interrupted save left this directory with a mix of old and new files\n")
            markers.append(marker)
            _fsync(d)
    except BaseException:
        for tmp, _ in pending:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        for marker in markers:
            with contextlib.suppress(OSError):
                os.remove(marker)
        raise
    done = 0
    try:
        for tmp, path in pending:
            os.replace(tmp, path)
            done += 1
    except BaseException:
        # An interrupt mid-way: finish the (fast, local) renames; the markers stay if one fails.
        complete = True
        for tmp, path in pending[done:]:
            try:
                os.replace(tmp, path)
            except FileNotFoundError:
                pass  # renamed just before the interrupt
            except OSError:
                complete = False
        if complete:
            _finish_in_place(touched, markers)
        raise
    _finish_in_place(touched, markers)


def _finish_in_place(touched: list[str], markers: list[str]) -> None:
    for d in touched:
        _fsync(d)
    for marker in markers:
        os.remove(marker)
    for d in touched:
        _fsync(d)
