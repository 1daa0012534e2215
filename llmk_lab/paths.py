"""Where the package finds its own files, and how it writes and shares files safely: atomic writes (a reader,
or a job killed mid-write, never leaves half a file where a whole one is expected) and inter-process locks
(two runs or sweeps on one machine, or on machines sharing a home directory over a file system with POSIX
locks, produce a cache entry once)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional


def config_dir() -> str:
    """The config tree: the copy shipped inside the installed package (`pip install .` puts `conf/` there
    as `llmk_lab/conf`), else `conf/` of the checkout the package is imported from (editable install).
    The shipped copy comes first, so a `conf/` folder that happens to sit next to an installed package
    (site-packages) is never taken for ours."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    return str(package.parent / "conf")


FULL_DISK_BYTES = 1 << 20  # less free space than this after a failed write: the file system was full


def write_atomically(path: Path | str, write: Callable[[Path], None]) -> None:
    """`write(temporary_path)` then rename onto `path`: the old file (or none) stays until the new one is whole.
    The temporary file sits in the same folder (a rename across file systems would copy); on any failure,
    a full disk included, it is removed and `path` is untouched."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as err:
        # Some writers report a full file system only as a broken stream (torch.save: "unexpected pos"):
        # measured while the temporary file still fills it, the free space says which it was.
        full = isinstance(err, Exception) and shutil.disk_usage(path.parent).free < FULL_DISK_BYTES
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if full and not (isinstance(err, OSError) and err.errno == errno.ENOSPC):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise


def write_text_atomically(path: Path | str, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def file_lock(path: Path | str, wait: bool = True) -> Iterator[Optional[int]]:
    """An exclusive `flock` on `path` (created if missing) for the `with` block. The kernel releases it when
    the holder dies, `kill -9` included, so a crashed run never leaves a stale lock behind. With
    `wait=False` the block gets None instead of waiting when another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as err:
            if wait or err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            yield None
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")  # who holds it, for the message of the one refused
            handle.flush()
            yield os.getpid()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_holder(path: Path | str) -> str:
    """The process id written into a lock file by its holder, or '?'."""
    with contextlib.suppress(OSError):
        return Path(path).read_text().strip() or "?"
    return "?"
