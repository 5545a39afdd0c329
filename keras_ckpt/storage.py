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
import json
import math
import mmap
import os
import secrets
import shutil
import socket
import stat as stat_mod
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Callable, NamedTuple

import xxhash

from keras_ckpt._stream import CorruptFile as CorruptFile  # raised by StreamedRead.verified
from keras_ckpt._stream import StreamedFile as StreamedFile  # a loader reading a file object
from keras_ckpt._stream import StreamedRead

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


def _pieces(fd: int, limit: int | None = None) -> Iterator[memoryview]:
    """The bytes of regular file ``fd`` from offset 0 (at most ``limit``) in one reused buffer of
    up to 16 MiB. Read with ``pread``: the descriptor's position is left alone, so one
    descriptor serves several readers in turn (:class:`HeldFile`)."""
    buf = memoryview(bytearray(_CHUNK if limit is None else min(_CHUNK, max(limit, 1))))
    at = 0
    while limit is None or at < limit:
        n = os.preadv(fd, [buf if limit is None else buf[: min(len(buf), limit - at)]], at)
        if not n:
            return
        yield buf[:n]
        at += n


def _digest(fd: int, name: str, size: int) -> tuple[str | None, str | None]:
    """(xxh3-128 of the first ``size`` bytes of ``fd``, None), or (None, why not): shorter."""
    h = xxhash.xxh3_128()
    read = 0
    for piece in _pieces(fd, size):
        h.update(piece)
        read += len(piece)
    if read != size:
        return None, f"{name} is shorter than the manifest says (truncated while read)"
    return h.hexdigest(), None


def copy_descriptor(fd: int, out: IO[bytes]) -> str:
    """Copy all of regular file ``fd`` into ``out``; returns the xxh3-128 of what was copied."""
    h = xxhash.xxh3_128()
    writer = EarlyWriteback(out)
    for piece in _pieces(fd):
        h.update(piece)
        writer.write(piece)
    return h.hexdigest()


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
_PAGE_SIZE = mmap.PAGESIZE


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
            # Up to the last whole page only: a write into a page under writeback waits for that
            # I/O to finish (stable pages), and a file written in pieces of any length (a Keras
            # file's variables between HDF5 metadata) would otherwise wait at every chunk for the
            # I/O of the page it shares with the next one.
            upto = end - end % _PAGE_SIZE
            _SYNC_FILE_RANGE(self._fd, self._started, upto - self._started, _SYNC_FILE_RANGE_WRITE)
            self._started = upto
            self._drop_behind(upto - _CACHED_CHUNKS * _WRITEBACK_CHUNK)

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
    writer then notes it and the file is hashed again after it is complete. Inside
    :meth:`hashing_behind` the hash runs on a helper thread, behind the writes.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self._raw = raw
        self._hash = xxhash.xxh3_128()
        self._pos = 0
        self._size = 0
        self.sequential = True
        self._behind = False
        self._last: Future[None] | None = None  # the newest hash update handed to the helper

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        n = self._raw.write(b)
        view = memoryview(b)
        if n is None:
            n = view.nbytes
        if self.sequential and self._pos == self._size:
            if n != view.nbytes:
                view = view.cast("B")[:n]
            if not self._behind:
                self._hash.update(view)
            elif view.nbytes >= _BEHIND_MIN_BYTES:
                self._hash_behind(view)
            elif self._last is None or self._last.done():  # nothing queued: in order inline
                self._hash.update(view)
            else:  # after what is queued; a small buffer may be its writer's to reuse: copied
                self._hash_behind(bytes(view))
        else:
            self.sequential = False
        self._pos += n
        self._size = max(self._size, self._pos)
        return n

    def _hash_behind(self, data) -> None:
        try:
            self._last = _hash_thread().submit(self._hash.update, data)
        except RuntimeError:
            # "cannot schedule new futures after interpreter shutdown": concurrent.futures refuses
            # work before the interpreter waits for an async_save writer still in flight. That
            # save must still finish: hashed here, after what is already queued.
            if self._last is not None:
                self._last.result()
            self._hash.update(data)

    @contextlib.contextmanager
    def hashing_behind(self) -> Iterator[None]:
        """Hash what is written inside the block on a helper thread, while the writes go on.

        The writing thread then spends its time on the copy into the page cache alone: the
        xxh3-128 of a 600 MB checkpoint took it 20-70 ms of a 0.4-0.5 s save on the dev VM. The
        helper hashes the large buffers themselves, in order, and the block's end waits for it
        (also when the block raises), so **every buffer of 1 MiB or more written inside must
        stay unchanged until the block ends**: a model's variables during a synchronous save, a
        snapshot's buffers, immutable ``bytes``. Smaller ones are copied or hashed at once.

        Example:

        ```python
        with writer.hashing_behind():
            for segment in segments:  # views that nothing changes meanwhile
                writer.write(segment)
        writer.digest()
        ```
        """
        self._behind = True
        try:
            yield
        finally:
            self._behind = False
            self._settle()

    def _settle(self) -> None:
        last, self._last = self._last, None
        if last is not None:
            last.result()  # one helper thread, in order: the newest done means all are

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
        if not self._raw.closed:  # close() flushes too, after the transaction closed the file
            self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def digest(self) -> str | None:
        """The checksum, or None when the writer did not write strictly sequentially."""
        self._settle()
        return self._hash.hexdigest() if self.sequential and self._pos == self._size else None

    @property
    def size(self) -> int:
        return self._size


_BEHIND_MIN_BYTES = 1 << 20  # smaller writes: a hand-off to the helper costs more than the hash
_hash_pool: ThreadPoolExecutor | None = None
_hash_pool_lock = threading.Lock()


def _hash_thread() -> ThreadPoolExecutor:
    """The one helper thread of :meth:`HashingWriter.hashing_behind`, started once per process.

    One thread keeps a file's updates in order; xxh3 releases the GIL, so it runs beside the
    writing thread's ``write`` calls.
    """
    global _hash_pool
    with _hash_pool_lock:
        if _hash_pool is None:
            _hash_pool = ThreadPoolExecutor(1, thread_name_prefix="keras_ckpt-hash")
        return _hash_pool


def _forget_hash_thread() -> None:
    global _hash_pool, _hash_pool_lock
    _hash_pool, _hash_pool_lock = None, threading.Lock()  # a forked child lacks the thread


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_hash_thread)


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


_NAME_MAX = 255


def _new_name(directory: str, final_name: str) -> str:
    # Ending in the final name keeps its extension for writers that dispatch on it (Keras). A
    # name near the file system's limit is shortened in the middle, its extension kept.
    head = f"{_prefix()}{secrets.token_hex(4)}-"
    room = _NAME_MAX - len(head.encode())
    tail = final_name
    if len(tail.encode()) > room:
        ext = final_name[len(final_name.split(".", 1)[0]):][-32:]
        keep = room - len(ext.encode()) - 1
        tail = final_name.encode()[:max(keep, 0)].decode("utf-8", "ignore") + "~" + ext
    return os.path.join(directory, head + tail)


def temp_path(directory: str, final_name: str) -> str:
    """Create an empty temporary file beside ``final_name``, with the mode the umask gives.

    ``tempfile.mkstemp`` would create it 0600, and a rename keeps the mode: colleagues on a
    shared filesystem could not read the checkpoints.
    """
    while True:
        path = _new_name(directory, final_name)
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            continue


def temp_dir(directory: str) -> str:
    """Create a temporary directory (a staging area for writers that name their own files)."""
    while True:
        path = _new_name(directory, "staging")
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[IO[bytes]]:
    """A file written through the block that appears at ``path`` complete or not at all.

    Readers see the old bytes or the new, never a mix: temp file beside it, fsync, rename, fsync
    of the directory; an exception in the block removes the temp file and leaves ``path`` alone.
    """
    directory = os.path.dirname(path) or "."
    tmp = temp_path(directory, os.path.basename(path))
    try:
        with open(tmp, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(directory)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data)


def is_plain_name(name: object) -> bool:
    """Whether ``name`` is a plain file name: no directory part, nothing that climbs out."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and name not in (".", "..")
        and not any(c in name for c in ("/", "\\", "\0"))
        and not (len(name) > 1 and name[1] == ":")  # a Windows drive
    )


def is_temp_name(name: object) -> bool:
    """A temporary of ours: ``.keras_ckpt-tmp-…`` or one file inside such a staging directory."""
    if not isinstance(name, str):
        return False
    parts = name.split("/")
    return (
        len(parts) in (1, 2)
        and all(is_plain_name(p) for p in parts)
        and parts[0].startswith(TMP_PREFIX + "-")
    )


def sweep_temporaries(directory: str, keep: Iterable[str] = ()) -> None:
    """Remove the temporary files that writers which have since died left behind.

    A writer of this boot and pid namespace is dead when its pid is gone or now belongs to a
    process that started later. Anyone else's leftovers (another container, another host on a
    shared filesystem, a previous boot) go once untouched for a day. Names in ``keep`` (the
    temporaries an interrupted commit still needs) stay.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    mine, here = writer_identity(), _kernel_tag()
    keep = {k.split("/")[0] for k in keep}
    for name in names:
        if not name.startswith(TMP_PREFIX + "-") or name in keep:
            continue
        identity = name[len(TMP_PREFIX) + 1 :].split("-", 1)[0]
        path = os.path.join(directory, name)
        if identity == mine or not _is_leftover(identity, here, path):
            continue
        _remove_temporary(path)


def _remove_temporary(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


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


class ReadOnlyDirectory(ValueError):
    """The directory exists but this process may not write in it (a read-only mount, no write
    permission): :func:`ensure_directory`'s refusal, which a reader may take as a read-only view."""


def ensure_directory(directory: str, argname: str, value: str) -> None:
    """Create ``directory`` or raise a ValueError naming the argument that led to it
    (:class:`ReadOnlyDirectory` where it exists but cannot be written)."""
    try:
        os.makedirs(directory or ".", exist_ok=True)
        os.remove(temp_path(directory or ".", "probe"))
    except OSError as e:
        read_only = e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and os.path.isdir(directory or ".")
        raise (ReadOnlyDirectory if read_only else ValueError)(
            f"{argname} points into a directory that cannot be created or written "
            f"({directory!r}: {e.strerror or e}). Received: {argname}={value!r}"
        ) from e


_process_locks: dict[str, threading.RLock] = {}
_process_locks_guard = threading.Lock()


@contextlib.contextmanager
def directory_lock(directory: str) -> Iterator[None]:
    """Serialise manifest read-modify-write among this process's threads sharing ``directory``.

    Other processes are kept out by the directory's writer lock (:class:`WriterLock`).
    """
    key = os.path.realpath(directory)
    with _process_locks_guard:
        lock = _process_locks.setdefault(key, threading.RLock())
    with lock:
        yield


# -- one writer process per directory ------------------------------------------------------------

_HEARTBEAT_SECONDS = 15.0
# A holder on another host or in another container cannot be asked whether it lives, and flock
# is not coherent on every shared filesystem: it counts as alive while it keeps touching the lock
# file. Generous against clock skew between hosts; a lost node's lock is taken over after this.
STALE_LOCK_SECONDS = 120.0


class DirectoryLocked(RuntimeError):
    """Another live process is writing checkpoints to this directory."""


class _Held:
    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path, self.count = fd, path, 0


_held: dict[str, _Held] = {}
_held_guard = threading.Lock()
_heartbeat: threading.Thread | None = None


def _forget_locks_in_child() -> None:
    # A forked child (a DataLoader worker) shares the parent's flock through the inherited
    # descriptor: closing the child's copy keeps the parent's lock, and lets it go when the
    # parent releases it even while the child lives on.
    global _heartbeat
    for held in _held.values():
        with contextlib.suppress(OSError):
            os.close(held.fd)
    _held.clear()
    _heartbeat = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def _beat() -> None:
    while True:
        time.sleep(_HEARTBEAT_SECONDS)
        with _held_guard:
            paths = [h.path for h in _held.values()]
        for path in paths:
            with contextlib.suppress(OSError):
                os.utime(path)


def _describe(holder: dict, path: str) -> str:
    since = holder.get("since")
    when = "?"
    if isinstance(since, (int, float)) and math.isfinite(since):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    try:
        age = time.time() - os.stat(path).st_mtime
        seen = f", last seen {age:.0f} s ago"
    except OSError:
        seen = ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')!s}, since {when}{seen}"


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def acquire_writer(directory: str) -> None:
    """Make this process the directory's one writer, or raise :class:`DirectoryLocked`.

    Re-entrant within a process (two callbacks sharing a directory, an Estimator's repeated
    ``train`` calls). A lock left by a dead process of this host is taken over at once; one left
    on another host (or container) once it has not been refreshed for ``STALE_LOCK_SECONDS``.
    """
    global _heartbeat
    key = os.path.realpath(directory)
    with _held_guard:
        held = _held.get(key)
        if held is not None:
            held.count += 1
            return
        path = os.path.join(directory, LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _NONBLOCK, 0o666)
        except OSError as e:
            raise DirectoryLocked(
                f"the writer lock {path} cannot be opened ({e.strerror or e}): it must be a regular "
                "file (a symlink is never followed); remove it if nothing writes to this directory."
            ) from None
        try:
            if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
                raise DirectoryLocked(
                    f"the writer lock {path} is not a regular file; remove it if nothing writes to "
                    "this directory."
                )
            _take(fd, path, directory)
        except BaseException:
            os.close(fd)
            raise
        held = _held[key] = _Held(fd, path)
        held.count = 1
        if _heartbeat is None:
            _heartbeat = threading.Thread(target=_beat, name="keras_ckpt-lock-heartbeat", daemon=True)
            _heartbeat.start()


def _take(fd: int, path: str, directory: str) -> None:
    holder = _read_holder(fd)
    try:
        import fcntl
    except ImportError:  # Windows: only the heartbeat speaks for a holder
        fcntl = None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryLocked(
                f"another process is writing checkpoints to {directory}: {_describe(holder, path)}. "
                "Two writers would rotate away each other's checkpoints; stop that process or "
                "write to another directory."
            ) from None
    identity = holder.get("identity")
    if holder and identity != writer_identity():
        local = isinstance(identity, str) and identity.split(".")[0] == _kernel_tag()
        try:
            age = time.time() - os.fstat(fd).st_mtime
        except OSError:
            age = float("inf")
        if (not local or fcntl is None) and age < STALE_LOCK_SECONDS:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            raise DirectoryLocked(
                f"another process is writing checkpoints to {directory}: {_describe(holder, path)}. "
                f"If that process is gone (a lost node), its lock is taken over once it is "
                f"{STALE_LOCK_SECONDS:.0f} s old, or delete {path}."
            )
        if not local:  # a dead local holder is certain (flock); a silent remote one is a guess
            warnings.warn(
                f"keras_ckpt: took over the writer lock of {directory} from "
                f"{_describe(holder, path)}, which stopped refreshing it.",
                stacklevel=4,
            )
    me = {"pid": os.getpid(), "host": socket.gethostname(), "identity": writer_identity(),
          "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)


def release_writer(directory: str) -> None:
    """Undo one :func:`acquire_writer`; the last one lets other processes write here."""
    key = os.path.realpath(directory)
    with _held_guard:
        held = _held.get(key)
        if held is None:
            return
        held.count -= 1
        if held.count > 0:
            return
        del _held[key]
        with contextlib.suppress(OSError):
            os.ftruncate(held.fd, 0)
        os.close(held.fd)  # closing the last descriptor releases the flock


def holds_writer(directory: str) -> bool:
    return os.path.realpath(directory) in _held


# -- one directory, behind one small interface ------------------------------------------------------


class HeldFile:
    """A checkpoint file of another directory, kept open from the moment its checksum matched.

    That directory's writer may go on saving and rotate the file away meanwhile: the descriptor
    still reads the bytes that were verified, so loading and copying them (``resume=<dir>``
    while the job that writes there still runs) see the one file that was checked, never a
    missing or a newer one. Our writers never change a committed file in place.

    Args:
        fd: an open descriptor of the verified regular file (this object closes it).
        path: its path, for messages.
        size: its size.
        digest: its xxh3-128, as verified.
    """

    def __init__(self, fd: int, path: str, size: int, digest: str) -> None:
        self.fd, self.path, self.size, self.digest = fd, path, size, digest

    def stream(self) -> StreamedRead:
        """A :class:`StreamedRead` of the held file (on a descriptor of its own), for a loader."""
        return StreamedRead(os.dup(self.fd), os.path.basename(self.path), self.size, self.digest)

    def copy_to(self, out: IO[bytes]) -> str:
        """Copy the held file into ``out``; returns the xxh3-128 of what was copied."""
        return copy_descriptor(self.fd, out)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class FileState(NamedTuple):
    kind: str  # "file", "missing" or "other" (a directory, FIFO, device, symlink)
    size: int
    mtime: float = 0.0


def _lstat_mode(path: str) -> int:
    try:
        return os.lstat(path).st_mode
    except OSError:
        return 0


def path_kind(path: str) -> str:
    """What is at ``path`` (symlinks followed): "dir", "file", "missing" or "other"."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    if stat_mod.S_ISDIR(st.st_mode):
        return "dir"
    return "file" if stat_mod.S_ISREG(st.st_mode) else "other"


class LocalStorage:
    """A checkpoint directory on a local or mounted filesystem, addressed by plain file names.

    The engine reaches files only through this interface (so a remote backend can implement it
    next): temporaries are created beside their final names, made durable, renamed into place,
    and the directory is fsynced. Every name is checked to be a plain name inside the directory
    (or one of our temporaries), so nothing read from a manifest can address a file elsewhere;
    only regular files are read or deleted, and reads are bounded by the size the caller expects.
    """

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(os.fspath(directory))

    def path(self, name: str) -> str:
        if not (is_plain_name(name) or is_temp_name(name)):
            raise ValueError(f"not a plain file name inside {self.directory}: {name!r}")
        parts = name.split("/")
        if len(parts) == 2 and not stat_mod.S_ISDIR(_lstat_mode(os.path.join(self.directory, parts[0]))):
            # A staging directory must be one (a symlink to elsewhere would carry renames out).
            raise ValueError(f"not a staging directory of keras_ckpt in {self.directory}: {parts[0]!r}")
        return os.path.join(self.directory, *parts)

    def name_of(self, path: str) -> str:
        """The name of ``path`` relative to this directory (a temporary in a staging dir too)."""
        rel = os.path.relpath(os.path.abspath(path), self.directory).replace(os.sep, "/")
        self.path(rel)  # validates
        return rel

    # -- looking ------------------------------------------------------------------------------

    def is_dir(self) -> bool:
        return os.path.isdir(self.directory)

    def list(self) -> list[str]:
        try:
            return sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []

    def stat(self, name: str) -> FileState:
        try:
            st = os.lstat(self.path(name))
        except FileNotFoundError:
            return FileState("missing", 0)
        return FileState("file" if stat_mod.S_ISREG(st.st_mode) else "other", st.st_size, st.st_mtime)

    def read(self, name: str, limit: int) -> bytes | None:
        """The bytes of ``name`` (None if it does not exist); ValueError past ``limit`` bytes."""
        try:
            fd = os.open(self.path(name), os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ValueError(f"{self.path(name)} cannot be read: {e.strerror or e}") from e
        if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ValueError(f"{self.path(name)} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"{self.path(name)} is larger than {limit} bytes")
        return data

    def _open_checked(self, name: str, expected_size: int) -> tuple[int | None, str | None]:
        """(descriptor, None) of regular file ``name`` of ``expected_size`` bytes, or (None, why not).

        Never follows a symlink, never blocks on a FIFO, and compares the size before a byte is read.
        """
        path = self.path(name)
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
        except FileNotFoundError:
            return None, f"{name} is missing"
        except OSError as e:
            if e.errno == errno.ELOOP:
                return None, f"{name} is a symbolic link, not a checkpoint file"
            return None, f"{name} cannot be read ({e.strerror or e})"
        st = os.fstat(fd)
        problem = None
        if not stat_mod.S_ISREG(st.st_mode):
            problem = f"{name} is not a regular file"
        elif st.st_size != expected_size:
            problem = f"{name} has {st.st_size} bytes, the manifest says {expected_size}"
        if problem is not None:
            os.close(fd)
            return None, problem
        return fd, None

    def check(self, name: str, expected_size: int) -> str | None:
        """Why ``name`` cannot be the file the manifest lists (missing, special, wrong size), or
        None; reads no byte of it (the checksum is :meth:`hash`'s or :meth:`stream`'s)."""
        fd, problem = self._open_checked(name, expected_size)
        if fd is not None:
            os.close(fd)
        return problem

    def stream(self, name: str, expected_size: int, digest: str) -> tuple[StreamedRead | None, str | None]:
        """(a :class:`StreamedRead` of ``name`` checked against ``digest``, None), or (None, why not).

        The same checks as :meth:`hash` come first; the file is then read once and checksummed,
        on background threads, while the caller prepares (see :mod:`keras_ckpt._stream`).
        """
        fd, problem = self._open_checked(name, expected_size)
        if fd is None:
            return None, problem
        return StreamedRead(fd, name, expected_size, digest), None

    def hash(self, name: str, expected_size: int) -> tuple[str | None, str | None]:
        """(xxh3-128 digest, None), or (None, why not): a missing or special file, a wrong size.

        The size is compared before a byte is read; a FIFO or device never blocks or streams.
        """
        fd, problem = self._open_checked(name, expected_size)
        if fd is None:
            return None, problem
        try:
            return _digest(fd, name, expected_size)
        finally:
            os.close(fd)

    def hold(
        self, name: str, expected_size: int, digests: Iterable[str]
    ) -> tuple[HeldFile | None, str | None]:
        """(``name`` held open, None) if it is a regular file of ``expected_size`` bytes whose
        xxh3-128 is one of ``digests``; else (None, why not). See :class:`HeldFile`."""
        fd, problem = self._open_checked(name, expected_size)
        if fd is None:
            return None, problem
        try:
            digest, problem = _digest(fd, name, expected_size)
        except BaseException:
            os.close(fd)
            raise
        if digest is None or digest not in set(digests):
            os.close(fd)
            return None, problem or f"{name} does not match its checksum"
        return HeldFile(fd, self.path(name), expected_size, digest), None

    def copy_to(self, name: str, out: IO[bytes], expected_size: int | None) -> str:
        """Stream ``name`` into ``out``; returns the xxh3-128 of what was copied.

        A regular file only, and exactly ``expected_size`` bytes where given (ValueError else).
        """
        path = self.path(name)
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode) or (
                expected_size is not None and st.st_size != expected_size
            ):
                raise ValueError(
                    f"{path} is not a regular file of the {expected_size} bytes its manifest says"
                )
            return copy_descriptor(fd, out)
        finally:
            os.close(fd)

    # -- writing ------------------------------------------------------------------------------

    def ensure(self, argname: str, value: str) -> None:
        ensure_directory(self.directory, argname, value)

    def new_temp(self, final_name: str) -> str:
        """Create an empty temporary for ``final_name``; returns its name."""
        self.path(final_name)
        return self.name_of(temp_path(self.directory, final_name))

    def open_temp(self, final_name: str) -> tuple[str, IO[bytes]]:
        """A new temporary for ``final_name``, open for writing (and reading back: h5py)."""
        name = self.new_temp(final_name)
        return name, open(self.path(name), "r+b")  # noqa: SIM115 -- the caller closes it

    def write_temp(self, final_name: str, data: bytes) -> str:
        """A new temporary for ``final_name`` holding ``data``, durable; returns its name."""
        name, f = self.open_temp(final_name)
        with f:
            f.write(data)
            self.finish(f)
        return name

    @staticmethod
    def finish(f: IO[bytes]) -> None:
        """Make what was written to ``f`` durable (the rename that publishes it comes later)."""
        f.flush()
        os.fsync(f.fileno())

    def new_staging_dir(self) -> str:
        return self.name_of(temp_dir(self.directory))

    def sync_file(self, name: str) -> None:
        fsync_path(self.path(name))

    def rename(self, src: str, dst: str) -> None:
        os.replace(self.path(src), self.path(dst))

    def sync(self) -> None:
        """Make the renames and deletions so far durable."""
        fsync_dir(self.directory)

    def write_atomic(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.path(name), data)

    def delete(self, name: str) -> bool:
        """Delete a regular file (never a directory, never what a symlink points to)."""
        path = self.path(name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not (stat_mod.S_ISREG(st.st_mode) or stat_mod.S_ISLNK(st.st_mode)):
            return False
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return True

    def remove_temp(self, name: str) -> None:
        """Remove one of our temporaries (a staging directory with what it holds, too)."""
        if not is_temp_name(name):
            raise ValueError(f"not a keras_ckpt temporary: {name!r}")
        _remove_temporary(self.path(name))

    def sweep(self, keep: Iterable[str] = ()) -> None:
        sweep_temporaries(self.directory, keep)

    # -- the one writer -----------------------------------------------------------------------

    def acquire(self) -> None:
        acquire_writer(self.directory)

    def release(self) -> None:
        release_writer(self.directory)

    def holds(self) -> bool:
        return holds_writer(self.directory)


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
