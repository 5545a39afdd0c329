"""Where bytes go: atomic local files with checksums.

Every final path is reached by ``rename`` from a temporary file in the same directory after the
data is fsynced, and the directory is fsynced after the rename, so a file is either complete or
absent whatever instant the process dies. Temporary names start with ``.keras_ckpt-tmp`` so a
crash's leftovers are recognisable and swept at the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import IO, Callable

import xxhash

TMP_PREFIX = ".keras_ckpt-tmp"
LOCK_NAME = ".checkpoints.lock"
_CHUNK = 16 << 20


def fsync_dir(directory: str) -> None:
    """Persist a rename; Windows cannot open a directory, so it is skipped there."""
    if sys.platform == "win32":
        return
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_file(path: str) -> tuple[str, int]:
    """The xxh3-128 hex digest and size of a file."""
    h = xxhash.xxh3_128()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
    return h.hexdigest(), size


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's ``sync_file_range`` (Python has no wrapper), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
_SYNC_FILE_RANGE_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP}
_WRITEBACK_CHUNK = 16 << 20
_CACHED_CHUNKS = 2  # chunks kept in the page cache behind the one being written


class EarlyWriteback:
    """A binary file written in chunks, each handed to the disk as soon as it is written.

    Two things make a plain ``write`` + ``fsync`` of a large checkpoint slow:

    - The kernel holds the bytes in the page cache until the caller's fsync, and only then does
      the disk start: write time plus disk time. ``sync_file_range(WRITE)`` starts the disk on
      each chunk right away (no durability promise: the caller's fsync still gives that), so
      the disk runs while the next chunks are serialized and checksummed.
    - Every byte written needs a free page-cache page, and a checkpoint is written while the
      previous ones still exist. On VMs whose host reclaims the guest's idle free memory
      (free page reporting, ballooning: Firecracker, many cloud VMs), touching fresh pages
      costs a host page fault each: on the dev VM a 600 MB write into fresh pages takes 2 s
      instead of 0.16 s, longer than the disk needs. So once a chunk is two chunks behind, this
      waits for its writeback (long done, normally) and drops its pages; the next chunks reuse
      those same warm pages. The cache holds about 48 MB of a checkpoint at any time, and
      saving no longer evicts the training data from the cache.

    Measured on the dev VM, 600 MB, a new file while older ones exist, a few seconds after the
    last save: plain write + fsync 2.0-2.6 s, writeback started per chunk 1.8-2.9 s, this
    0.41-0.59 s (``benchmarks/cold_pages.py`` and ``benchmarks/save_throughput.py`` time it
    beside raw writes). A writeback error met on the way raises ``OSError``. Targets without a
    file descriptor (or off Linux) are just written. Every front-end's writer streams through
    it; checksums are taken as the bytes stream (see :class:`HashingWriter`), not read back.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._fd: int | None = None
        self._started = 0  # file offset up to which the disk has been started
        self._dropped = 0  # file offset below which the pages are on disk and out of the cache
        self._drop = True
        if _SYNC_FILE_RANGE is not None:
            try:
                self._fd = out.fileno()
                self._started = self._dropped = os.lseek(self._fd, 0, os.SEEK_CUR)
            except (OSError, AttributeError, io.UnsupportedOperation):
                self._fd = None

    def write(self, data: bytes | memoryview) -> int:
        """Write all of ``data``; returns its length."""
        view = memoryview(data)
        for start in range(0, len(view), _WRITEBACK_CHUNK):
            piece = view[start : start + _WRITEBACK_CHUNK]
            while piece:  # a raw file may write less than asked
                piece = piece[self._out.write(piece) :]
            self._start_writeback()
        return len(view)

    def flush(self) -> None:
        self._out.flush()

    def _start_writeback(self) -> None:
        if self._fd is None:
            return
        end = os.lseek(self._fd, 0, os.SEEK_CUR)  # where the bytes reached the OS
        if end < self._started:  # the caller moved backwards: follow it
            self._started = end
            self._dropped = min(self._dropped, end)
        elif end - self._started >= _WRITEBACK_CHUNK:
            _SYNC_FILE_RANGE(self._fd, self._started, end - self._started, _SYNC_FILE_RANGE_WRITE)
            self._started = end
            self._drop_behind(end - _CACHED_CHUNKS * _WRITEBACK_CHUNK)

    def _drop_behind(self, upto: int) -> None:
        if not self._drop or upto <= self._dropped:
            return
        length = upto - self._dropped
        flags = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
        # Dropping pages still being written back would be a no-op: wait for them first.
        if _SYNC_FILE_RANGE(self._fd, self._dropped, length, flags) != 0:  # type: ignore[misc]
            err = ctypes.get_errno()
            if err not in _SYNC_FILE_RANGE_UNSUPPORTED:
                # The wait consumed the file's writeback error: the caller's fsync would then
                # succeed over bytes that never reached the disk. Fail the save here instead.
                raise OSError(err, f"writing the checkpoint failed: {os.strerror(err)}")
            self._drop = False  # a file that cannot do this: leave the cache alone
            return
        try:
            os.posix_fadvise(self._fd, self._dropped, length, os.POSIX_FADV_DONTNEED)  # type: ignore[arg-type]
        except OSError:
            self._drop = False
            return
        self._dropped = upto


class HashingWriter(io.RawIOBase):
    """A write-only file object that checksums bytes as they stream out.

    Writers that seek back and rewrite (zip headers, h5py) invalidate the running hash; the
    writer then notes it and the file is hashed again after it is complete.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self._raw = raw
        self._hash = xxhash.xxh3_128()
        self._pos = 0
        self._size = 0
        self.sequential = True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        n = self._raw.write(b)
        if n is None:
            n = len(b)
        if self.sequential and self._pos == self._size:
            self._hash.update(memoryview(b)[:n] if n != len(b) else b)
        else:
            self.sequential = False
        self._pos += n
        self._size = max(self._size, self._pos)
        return n

    def read(self, size: int = -1) -> bytes:  # h5py's fileobj driver reads what it wrote
        data = self._raw.read(size)
        self._pos += len(data)
        return data

    def readinto(self, b) -> int:  # type: ignore[override]
        n = self._raw.readinto(b)
        self._pos += n or 0
        return n or 0

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = self._raw.seek(offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        self.sequential = False
        return self._raw.truncate(size)

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def digest(self) -> str | None:
        """The checksum, or None when the writer did not write strictly sequentially."""
        return self._hash.hexdigest() if self.sequential and self._pos == self._size else None

    @property
    def size(self) -> int:
        return self._size


# A writer's identity in its temporary names: kernel boot, pid namespace, pid and the pid's
# start time. A pid alone misleads a sweep: a restarted container often gets its predecessor's
# pid, a pid seen from another pid namespace (another container of the same pod) or another
# host means nothing here, and pids get reused. Only a writer of this boot and this pid
# namespace can be checked for life; any other writer's leftovers go once untouched for a day.
_FOREIGN_STALE_SECONDS = 24 * 3600
_identities: dict[int, str] = {}
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_identities.clear)  # a child inheriting its parent's


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (Linux: clock ticks since boot), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 2 (the command) may hold spaces and parentheses: count from its closing one. The
    # first field after it is field 3; start time is field 22.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def _kernel_tag() -> str:
    """This boot of this machine (Linux's random boot id; elsewhere the host name)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            token = f.read().strip()
    except OSError:
        token = socket.gethostname().encode()
    try:
        token += os.readlink("/proc/self/ns/pid").encode()
    except OSError:
        pass
    return xxhash.xxh3_64_hexdigest(token)[:12]


def writer_identity(pid: int | None = None) -> str:
    """The identity a writer's temporary names carry: this process's, or ``pid``'s as seen here."""
    if pid is not None:
        return f"{_kernel_tag()}.{pid}.{_start_ticks(pid) or 0}"
    own = os.getpid()
    if own not in _identities:
        _identities[own] = writer_identity(own)
    return _identities[own]


def _prefix() -> str:
    return f"{TMP_PREFIX}-{writer_identity()}-"


def temp_path(directory: str, final_name: str) -> str:
    # Ending in the final name keeps its extension for writers that dispatch on it (Keras).
    fd, path = tempfile.mkstemp(prefix=_prefix(), suffix=f"-{final_name}", dir=directory)
    os.close(fd)
    return path


def temp_dir(directory: str) -> str:
    return tempfile.mkdtemp(prefix=_prefix(), dir=directory)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(path) or "."
    tmp = temp_path(directory, os.path.basename(path))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(directory)


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def sweep_temporaries(directory: str) -> None:
    """Remove the temporary files that writers which have since died left behind.

    A writer of this boot and pid namespace is dead when its pid is gone or now belongs to a
    process that started later. Anyone else's leftovers (another container, another host on a
    shared filesystem, a previous boot) go once untouched for a day.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    mine, here = writer_identity(), _kernel_tag()
    for name in names:
        if not name.startswith(TMP_PREFIX + "-"):
            continue
        identity = name[len(TMP_PREFIX) + 1 :].split("-", 1)[0]
        path = os.path.join(directory, name)
        if identity == mine or not _is_leftover(identity, here, path):
            continue
        remove_quietly(path)


def _is_leftover(identity: str, here: str, path: str) -> bool:
    parts = identity.split(".")
    if len(parts) == 3 and parts[0] == here and parts[1].isdigit() and parts[2].isdigit():
        pid, ticks = int(parts[1]), int(parts[2])
        if not _pid_alive(pid):
            return True
        now = _start_ticks(pid)
        return ticks != 0 and now is not None and now != ticks
    return time.time() - _last_modified(path) > _FOREIGN_STALE_SECONDS


def _last_modified(path: str) -> float:
    """The newest mtime of ``path`` and, for a directory, of everything in it."""
    newest = 0.0
    with contextlib.suppress(FileNotFoundError):
        newest = os.stat(path).st_mtime
        for root, _, files in os.walk(path):
            for f in files:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.stat(os.path.join(root, f)).st_mtime)
    return newest


def ensure_directory(directory: str, argname: str, value: str) -> None:
    """Create ``directory`` or raise a ValueError naming the argument that led to it."""
    try:
        os.makedirs(directory or ".", exist_ok=True)
        probe = temp_path(directory or ".", "probe")
        os.remove(probe)
    except OSError as e:
        raise ValueError(
            f"{argname} points into a directory that cannot be created or written "
            f"({directory!r}: {e.strerror or e}). Received: {argname}={value!r}"
        ) from e


_process_locks: dict[str, threading.Lock] = {}
_process_locks_guard = threading.Lock()


@contextlib.contextmanager
def directory_lock(directory: str) -> Iterator[None]:
    """Serialise manifest read-modify-write among threads and processes sharing ``directory``."""
    key = os.path.realpath(directory)
    with _process_locks_guard:
        lock = _process_locks.setdefault(key, threading.Lock())
    with lock:
        try:
            import fcntl
        except ImportError:  # Windows: the in-process lock is what we can offer
            yield
            return
        fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
