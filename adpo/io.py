"""The one place adpo writes files: a file or a directory appears complete under its final name, or not at all.

Everything adpo writes (encoders, model directories, dataset shards, reports, plots, configs, markers, the world's
caches) goes through these helpers, so a run killed at any moment, or a machine that loses power, leaves either the
previous complete output or none — never a half-written one: what is published is flushed to disk first (fsync)
and the rename is then made durable. Outputs get the permissions an ordinary write would give them (the umask).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_default_permissions(path: Path) -> None:
    """mkstemp/mkdtemp create owner-only modes; give outputs the modes an ordinary write would have."""
    mask = _umask()
    targets = [path, *path.rglob("*")] if path.is_dir() else [path]
    for target in targets:
        target.chmod((0o777 if target.is_dir() else 0o666) & ~mask)


def _flush(path: Path) -> None:
    """Flush ``path``'s content (a file, or every file below a directory) to disk."""
    for file in ([p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]):
        with open(file, "rb") as stream:
            os.fsync(stream.fileno())


def _flush_directory_entry(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a staging directory beside ``out_dir``; on success it replaces ``out_dir`` in one rename.

    With ``overwrite=False`` an existing ``out_dir`` is an error (named, with the fix). On any exception
    the staging directory is removed and ``out_dir`` is untouched.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output directory or allow overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
        apply_default_permissions(staging)
        _flush(staging)
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, retired / out.name)
            os.replace(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
        _flush_directory_entry(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it replaces ``path`` in one rename.

    The temporary name is ``.<name>.<random>.tmp``, so a run killed meanwhile leaves only a hidden ``*.tmp``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        apply_default_permissions(Path(temporary))
        _flush(Path(temporary))  # on disk before the rename publishes it
        os.replace(temporary, path)
        _flush_directory_entry(path.parent)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, content: Any) -> Path:
    return write_text_atomic(path, json.dumps(content, indent=2, default=str) + "\n")


def write_yaml_atomic(path: str | os.PathLike, content: Any) -> Path:
    return write_text_atomic(path, yaml.safe_dump(content, sort_keys=False))


def check_writable(path: str | os.PathLike, key: str) -> None:
    """Raise :class:`adpo.errors.UsageError` naming ``key`` unless ``path`` can be written: by trying to create a
    temporary file in it, or in its nearest existing parent when it does not exist yet (which is where it would be
    created). Run before any model loads, so a read-only or misplaced output fails in a second, not after training."""
    from adpo.errors import UsageError

    target = Path(path).expanduser()
    parent = target
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{key}={os.fspath(path)!r} cannot be created: {parent} is a file, not a directory; "
                         "choose another location")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise UsageError(f"{key}={os.fspath(path)!r} is not writable ({error.strerror or error} in {parent}); choose "
                         "a writable location or fix its permissions") from None
