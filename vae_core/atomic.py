"""Atomic file writes: the one place that writes a file through a temporary sibling.

A reader (DVC hashing an output, a resumed trainer, MLflow logging an artifact) must never see
half a file, and a crash must leave the previous version in place. Every writer in vae_core
goes through ``atomic_write``: write a temporary file in the same folder (so the rename never
crosses file systems), flush and fsync it, then ``os.replace`` it over the target; on any
failure the temporary file is removed and the target is untouched.

Standard library only: the data stages import this without torch, so ``atomic_torch_save``
imports torch when called.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def default_mode(directory: bool = False) -> int:
    """The permissions a plain ``open`` / ``mkdir`` would give (mkstemp and mkdtemp use 0600
    and 0700, which would make outputs unreadable to other users)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any], *, fsync: bool = True
) -> None:
    """Call ``write`` on a temporary sibling of ``path`` opened for binary writing, then
    rename it over ``path``; missing parent folders are created.

    ``fsync`` makes the content durable before the rename, so a power loss cannot leave an
    empty file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, default_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary siblings `atomic_write` leaves behind for ``path`` when its process
    is killed mid-write (the final file is untouched by such a write); returns what it removed.
    Only for a file one process writes at a time: a live writer's temporary would go too."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically, UTF-8 encoded (the same bytes on every machine)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically: a crash mid-save never leaves a corrupt checkpoint.

    torch.save writes to the open file object, so the archive's internal folder is always
    ``archive/`` whatever the file is called: identical content gives identical bytes.
    """
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))
