"""Writing dump files safely: folders created exclusively, files never written through a link.

A dump folder is often shared (a team's scratch directory, ``/tmp``), and its names are
predictable (``graph_001_<digest>``). So a graph's folder is created by this process alone
(``mkdir`` fails on anything already there, a symbolic link included, and the next free name is
taken), mode 0700, and every file is opened with ``O_NOFOLLOW``: a symbolic link planted where a
file goes is refused with an error naming it, never followed.
"""

from __future__ import annotations

import os
import pathlib

#: names tried for a new folder before giving up (``stem``, ``stem_2``, ...)
_ATTEMPTS = 1000


class UnsafePathError(OSError):
    """A dump path is a symbolic link (or cannot be created exclusively)."""


def exclusive_folder(root: str | os.PathLike, stem: str) -> pathlib.Path:
    """A new folder ``root/stem`` (or ``root/stem_N``, the first free name), created by this
    call alone with mode 0700; ``root`` is created if missing."""
    base = pathlib.Path(root)
    base.mkdir(parents=True, exist_ok=True)
    for i in range(_ATTEMPTS):
        path = base / (stem if i == 0 else f"{stem}_{i + 1}")
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return path
    raise UnsafePathError(f"attncc: no free folder name for {base / stem} after {_ATTEMPTS} tries")


def write_file(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` (created 0644, or truncated), refusing a symbolic link there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if os.path.islink(path):
            raise UnsafePathError(f"attncc: refusing to write through the symbolic link {path}") from e
        raise
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` to ``dst`` with :func:`write_file`."""
    write_file(dst, pathlib.Path(src).read_bytes())
