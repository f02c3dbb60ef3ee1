"""Writing outputs safely: every file through a temporary one renamed into place, and one training run per folder.

A write that fails (no space left on device, read-only file system, permission denied) raises one OSError naming the
file and the cause, removes its temporary file and leaves the last good version of the file where it was. The
command lines print that error as their one-line refusal. This module imports no torch: evaluate.py uses it when only
scoring.
"""
import contextlib
import os
import socket
from pathlib import Path


class WriteError(OSError):
    """A write that failed, as one line naming the file (not its temporary one) and the cause; errno is kept."""

    def __init__(self, path, error: OSError):
        cause = error.strerror or str(error)  # strerror ("No space left on device") leaves out the temporary name
        super().__init__(f"cannot write {path}: {cause}")
        self.errno = error.errno


def write_error(path, error: OSError) -> OSError:
    """`error` as a WriteError for `path`; one already naming its file (a write nested in this one) stays as it is."""
    return error if isinstance(error, WriteError) else WriteError(path, error)


def temporary_name(path: Path) -> Path:
    """Beside `path`, hidden, unique to this process, with the same suffix (a video writer picks its format by it)."""
    return path.with_name(f".{path.stem.lstrip('.')}.{os.getpid()}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path for a writer that opens files itself; renamed to `path` when the block ends without
    an error (os.replace, atomic: readers see the old file or the new one, never half of one), removed otherwise.
    An OSError in the block is reported as a failed write of `path`, unless it already names its own file."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:  # also KeyboardInterrupt: the temporary file never outlives the write
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", **open_args):
    """Yield a file open for writing (`open`'s mode and arguments) that replaces `path` when the block ends without
    an error. It is flushed to disk before the rename, so that even a machine that goes down right after finds the
    complete new file or the complete old one."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_args) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def appending(path, **open_args):
    """Yield `path` open for appending text; when the write fails it is cut back to its length before, so that a
    full disk never leaves half a line at its end."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a", **open_args) as f:
            yield f
    except OSError as e:
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise write_error(path, e) from None


class FolderLock:
    """One run per output folder: `<folder>/.lock` holds the owner's process id and host name.

    It is created with O_CREAT | O_EXCL, which succeeds for one process only, also on a shared file system. A second
    run is refused with one line naming the first. A lock left by a run that died without releasing it (SIGKILL, a
    crash of the machine) is taken over with a one-line notice when its owner can be seen to be gone: same host,
    that process no longer exists. Released when the `with` block ends, however it ends."""

    NAME = ".lock"

    def __init__(self, folder):
        self.path = Path(folder) / self.NAME
        self.held = False

    def __enter__(self):
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(2):  # the second try follows the removal of a stale lock
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._refuse_or_remove_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return self
        raise ValueError(f"{self.path.parent} is in use: another run took its lock {self.path} just now")

    def check(self):
        """Refuse at once, writing nothing, when a run that is still going holds the folder: a cheap refusal before a
        run's costly start-up (a stale lock is left to `with`, which takes it over)."""
        if self.path.exists():
            self._refuse_or_remove_stale(remove=False)

    def __exit__(self, *exc):
        if self.held:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.held = False

    def _refuse_or_remove_stale(self, remove: bool = True):
        folder = self.path.parent
        try:
            pid, host = self.path.read_text().split()
            pid = int(pid)
            if pid <= 0:  # os.kill would ask about a process group
                raise ValueError(pid)
        except FileNotFoundError:  # released between our attempt and this read: try again
            return
        except (OSError, ValueError):  # empty or unreadable: its owner cannot be checked
            raise ValueError(f"{folder} is locked by {self.path}, which names no run; if no run is writing into "
                             f"{folder}, remove it") from None
        if host != socket.gethostname() or _alive(pid):
            raise ValueError(f"{folder} is in use by another run (pid {pid} on {host}); wait for it to end or "
                             f"give another --out (if that run is gone, remove {self.path})")
        if not remove:
            return
        # Two runs that find the same stale lock at the same instant could both take it over; the lock guards
        # against starting a second run into a folder by mistake, for which this is enough.
        print(f"taking over the lock of {folder} from pid {pid}, which is no longer running")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True
