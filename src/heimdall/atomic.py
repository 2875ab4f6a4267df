"""Atomic outputs: a stage writes beside its target and renames only on success.

A killed or failed stage therefore leaves either the previous output or none, never a
half-written file that DVC would cache.

A SIGKILLed writer (``kill -9``, the OOM killer) cannot delete its own temporary, so two things
do it instead:

* a **guardian**: the first ``atomic_path`` of a process starts a tiny helper process (its own
  session, so signals aimed at the stage's process group do not reach it) and tells it the
  temporary's path; the helper blocks on a pipe from the writer and, the moment the writer dies
  for any reason, removes those of its temporaries that were never renamed. This matters under
  DVC: after a killed stage, ``dvc repro`` may restore the outputs from its run cache without
  running the stage again, so no later writer would ever come to sweep.
* a **sweep** by the next writer of the same target, for the case where the guardian itself was
  killed too.

Whether a temporary's writer is still alive is decided by a lock the writer holds on it, not by
its PID: PIDs are reused (a container's ``pid_max`` is often 32768) and a killed, unreaped process
still answers ``kill(pid, 0)``; the kernel drops the lock the moment the process dies. An
open-file-description ``fcntl`` lock is used because HDF5 takes its own ``flock`` on the file it
writes (the two kinds do not conflict on Linux) and because, unlike a classic POSIX lock, it is
not dropped when the writer's library closes another descriptor of the same file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from heimdall.errors import HeimdallError

_guardian: subprocess.Popen | None = None


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``target`` on success.

    On any exception (including KeyboardInterrupt) the temporary file is removed and the
    target is left untouched. Writers must write *into* the yielded path (open/truncate it),
    not replace it with another inode, so the liveness lock stays on the file being written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    # The guardian learns the path before the file exists: a writer killed between creating the
    # temporary and locking it leaves an unlocked file, which the guardian then removes.
    _guard(tmp)
    lock_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _try_lock(lock_fd)
        try:
            yield tmp
            with open(tmp, "rb+") as fh:  # data on disk before the rename makes it visible
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except Exception as e:  # a full disk or a read-only folder: one line naming the output, not the temporary
            reason = write_failure(e, tmp)
            if reason is None:
                raise
            raise HeimdallError(f"{target}: cannot write: {reason}; nothing written (the previous output, if any, "
                                "is intact)") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.close(lock_fd)


# errno values that mean "this output cannot be written here", whatever the file: reported as one line
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_WRITE_MESSAGES = ("No space left on device", "Disk quota exceeded", "File too large", "Read-only file system")


def write_failure(e: BaseException, path: str | Path | None = None) -> str | None:
    """Why ``e`` is a failure to write an output (full disk, quota, read-only or unwritable ``path``),
    as a short reason; None for any other exception. Libraries wrap the OS error (torch.save raises
    RuntimeError, HDF5 OSError without errno), so their messages are recognised too."""
    if isinstance(e, OSError):
        if e.errno in _WRITE_ERRNOS:
            return os.strerror(e.errno)
        if path is not None and e.filename is not None and Path(e.filename) == Path(path):
            return os.strerror(e.errno) if e.errno else " ".join(str(e).split())[:200]
    if isinstance(e, (OSError, RuntimeError)):
        text = str(e)
        for message in _WRITE_MESSAGES:
            if message in text:
                return message
    return None


@contextlib.contextmanager
def h5_create(path: str | Path):
    """``h5py.File(path, "w")`` that fails with the write error (ENOSPC, ...) instead of crashing.

    When a write fails, HDF5 keeps the dirty cache and retries it on every later close, and a close
    that keeps failing crashes the interpreter (exit 139). So on a write failure the file's descriptor
    is pointed at /dev/null (the output is deleted anyway): the close then succeeds and the original
    error propagates. Writing by name (the sec2 driver) keeps the bytes identical to ``h5py.File``.
    """
    import h5py

    f = h5py.File(path, "w")
    fd = f.id.get_vfd_handle()
    try:
        yield f
        f.flush()  # a failure here leaves every object open; a failing close would leave them half-closed
        f.close()
    except BaseException as e:
        failure = write_failure(e)
        if failure is not None:
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
        with contextlib.suppress(Exception):
            f.close()
        if failure is not None and not (isinstance(e, OSError) and e.errno in _WRITE_ERRNOS):
            err = errno.ENOSPC if failure == _WRITE_MESSAGES[0] else errno.EIO
            raise OSError(err, failure, str(path)) from None
        raise


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove temporaries of ``target`` whose writer is gone (no lock held); return them."""
    target = Path(target)
    return _remove_unlocked(target.parent.glob(f".{target.name}.tmp-*"))


def _remove_unlocked(paths) -> list[Path]:
    removed = []
    for stale in map(Path, paths):
        try:
            fd = os.open(stale, os.O_RDWR)
        except OSError:
            continue  # already renamed or removed, or not ours to touch
        try:
            _try_lock(fd)
        except OSError:
            continue  # a live writer holds it
        else:
            with contextlib.suppress(OSError):
                stale.unlink()
                removed.append(stale)
        finally:
            os.close(fd)
    return removed


# how long the guardian keeps retrying a temporary that is still locked when the writer's pipe closes
GUARDIAN_RETRY_S = 10.0


def _try_lock(fd: int) -> None:
    """Take an exclusive whole-file lock without waiting; raise OSError if another holds it."""
    ofd_setlk = getattr(fcntl, "F_OFD_SETLK", None)
    if ofd_setlk is None:  # not Linux: classic POSIX lock
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    # struct flock {short l_type, l_whence; off_t l_start, l_len; pid_t l_pid (0 for OFD)}
    fcntl.fcntl(fd, ofd_setlk, struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))


def _guard(tmp: Path) -> None:
    """Tell this process's guardian about ``tmp`` (best effort: the sweep is the fallback)."""
    global _guardian
    try:
        if _guardian is None or _guardian.poll() is not None:
            _guardian = subprocess.Popen(
                [sys.executable, "-m", "heimdall.atomic"], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                    str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))})
        _guardian.stdin.write(f"{tmp.resolve()}\n".encode())
        _guardian.stdin.flush()
    except OSError:
        pass


def _guardian_main() -> None:
    """Read temporaries' paths until the writer's end of the pipe closes, then remove leftovers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    paths = sys.stdin.buffer.read().decode(errors="replace").splitlines()
    # The kernel may close the dead writer's end of the pipe before the temporary's lock: a file still
    # locked at end-of-file is retried for a while (measured: 14 of 30 SIGKILLed h5py writers left
    # their temporary behind without the retry, 0 of 30 with it).
    pending, deadline = sorted(set(paths)), time.monotonic() + GUARDIAN_RETRY_S
    while pending:
        _remove_unlocked(pending)
        pending = [p for p in pending if os.path.exists(p)]
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)



def write_json(path: str | Path, obj) -> None:
    """``obj`` as sorted, indented JSON at ``path``, atomically (non-finite numbers are refused:
    they are not JSON, and no stage may report them)."""
    import json

    try:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
    except ValueError:  # NaN / ±Inf somewhere: name it, write nothing (the stage exits 1)
        raise HeimdallError(f"{path}: refusing to write non-finite numbers "
                            f"({', '.join(non_finite_keys(obj)[:3])}); nothing written") from None
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def non_finite_keys(obj, key: str = "") -> list[str]:
    """Dotted keys (``a.b[2]``) of the NaN / ±Inf floats in a JSON-like tree."""
    import math

    if isinstance(obj, dict):
        return [b for k, v in obj.items() for b in non_finite_keys(v, f"{key}.{k}" if key else str(k))]
    if isinstance(obj, (list, tuple)):
        return [b for i, v in enumerate(obj) for b in non_finite_keys(v, f"{key}[{i}]")]
    return [key or "(value)"] if isinstance(obj, float) and not math.isfinite(obj) else []


def md5_file(path: str | Path) -> str:
    """md5 of a file's bytes (the digest DVC records), read in 1 MiB chunks."""
    import hashlib

    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """``rows`` (dicts with the same keys) as CSV with a header, atomically."""
    import csv

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def save_figure(fig, path: str | Path) -> Path:
    """A matplotlib figure as PNG, atomically, then closed. No Software/date metadata: identical
    figures give byte-identical files (DVC records their md5)."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return Path(path)


if __name__ == "__main__":
    _guardian_main()
