"""Files: atomic writes, files shipped inside installed packages, and effir's cache folder."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .utils import EffirError


def cache_dir() -> Path:
    """effir's cache: ``$EFFIR_CACHE``, else ``$XDG_CACHE_HOME/effir``, else ``~/.cache/effir``."""
    if os.environ.get("EFFIR_CACHE"):
        return Path(os.environ["EFFIR_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "effir"


def package_file(package: str, relpath: str, install: str, what: str | None = None) -> Path:
    """A file shipped inside an installed package, found without importing the package.

    Raises:
        EffirError: the package is not installed or lacks the file; the message names ``what`` (default: the
            package) and the ``install`` command.
    """
    what = what or f"package {package!r}"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EffirError(f"{what} is not installed; install it with: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.exists():
        raise EffirError(f"{path} is missing from package {package!r}; reinstall it with: {install}")
    return path


def temporary_sibling(path: Path) -> Path:
    """``path``'s temporary name while it is written: per process, so concurrent writers never share one."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Write a file or folder under a temporary name that replaces ``path`` when the block succeeds.

    Yields the temporary path (nothing exists there yet; the parent folder does). On success an existing
    ``path`` (file or folder) is replaced at once, so an interrupted run never leaves a half-written result that
    looks complete; on an exception the temporary file or folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)  # os.replace cannot replace a non-empty folder
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
