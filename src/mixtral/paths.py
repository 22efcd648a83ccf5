"""Where mixtral keeps what it makes once per machine (the compiled CPU kernels, the probe of torch's kernels), and
how it writes files: whole or not at all."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """`MIXTRAL_CACHE_DIR`, else `$XDG_CACHE_HOME/mixtral`, else `~/.cache/mixtral` (not created here)."""
    if os.environ.get("MIXTRAL_CACHE_DIR"):
        return Path(os.environ["MIXTRAL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mixtral"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for a writer to fill; when the block ends without an error the file is
    flushed to disk and renamed over `path`, else removed. A full disk, a crash or a kill never leaves a half-written
    `path`: readers see the old file or the new one."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` whole or not at all (atomic_path)."""
    with atomic_path(path) as partial:
        partial.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to `path` in a single write, or nothing: on a short write (a full disk) the file is cut back
    to where it was, so a reader never meets half a line. Callers that share a file serialize their calls."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(28, f"short write ({written} of {len(data)} bytes): is the disk full?")
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)
