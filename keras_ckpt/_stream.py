"""Reading a checkpoint file once, at the disk's speed, checksumming it before anything uses it.

Resume reads the whole file into one buffer of its own (the *image*, a private anonymous
mapping) and hashes it there; loaders then take the variables' bytes out of the image only
after the checksum matched (:meth:`StreamedRead.verified`), so a corrupt file never puts a byte
into the model or optimizer, whatever an older checkpoint it falls back to holds. The variables
can adopt slices of the image without a copy (TF through DLPack, torch's optimizer state as
tensor views), so the image is the memory they keep.

How it keeps up with a plain cold read of the same file:

- The file is read with ``O_DIRECT`` on two threads, 8 MiB pieces alternating between them, so
  the disk always has the next request while a piece completes, and no page-cache page is
  allocated, filled and copied out of (nor evicts the training data). The image is page-aligned
  and mirrors the file's offsets, so each piece is read straight into its place: no bounce
  buffer. Where ``O_DIRECT`` is refused (tmpfs, ramfs: EINVAL at open or at the first read) the
  same threads read through the page cache.
- Fresh memory costs a page fault per page when first written; inside an ``O_DIRECT`` read
  those faults run one by one before the disk is asked, which on the dev VM doubled the read
  (0.52-0.65 s instead of 0.29 s for 604 MB). A fourth thread faults the image in, piece by
  piece, ahead of the readers, so the faults overlap the disk's work; and the image is a NumPy
  array, whose large allocations NumPy backs with transparent huge pages (faulting 604 MB took
  0.08-0.12 s so, 0.26-0.30 s as a plain anonymous mapping). Measured alone, read + hash of
  604 MB this way took 0.28 s against 0.26-0.27 s for a plain cold read.
- A third thread hashes the pieces in file order as they complete (xxh3-128, the manifest's).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import xxhash

from keras_ckpt._fileobj import Positioned

_PIECE = 8 << 20  # a multiple of every sector size O_DIRECT may require (512 B, 4 KiB)
_READERS = 2
_PAGE = mmap.PAGESIZE
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_ALIGN = 64  # TF's CPU kernels require this alignment of the buffers they are handed


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A new uint8 array of ``nbytes`` whose data starts on a 64-byte boundary."""
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes]


def aligned_view(image: np.ndarray, offset: int, nbytes: int) -> np.ndarray:
    """``image[offset : offset + nbytes]``, copied only if it does not start on 64 bytes."""
    view = image[offset : offset + nbytes]
    if view.ctypes.data % _ALIGN == 0:
        return view
    copy = aligned_buffer(nbytes)
    copy[:] = view
    return copy


def _load_madvise() -> Any:
    if not hasattr(os, "posix_fadvise"):  # not Linux/Unix: nothing to give back with
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_MADVISE = _load_madvise()
_MADV_DONTNEED = 4


def release(start: int, stop: int) -> None:
    """Give back to the OS the memory pages lying wholly inside addresses ``[start, stop)`` of an
    image (they read as zeros afterwards); pages shared with the bytes around are kept.

    For the part of an image that was copied elsewhere while other parts stay in use as views:
    otherwise those views keep the whole image's memory for as long as they live."""
    first, last = -(-start // _PAGE) * _PAGE, stop // _PAGE * _PAGE
    if _MADVISE is not None and last > first:
        _MADVISE(first, last - first, _MADV_DONTNEED)


_handoffs = threading.Lock()
_handoff_users = 0
_saved_interval = 0.0
_set_interval = 0.0  # what prompt_handoffs set, as sys.getswitchinterval() reports it


@contextlib.contextmanager
def prompt_handoffs(interval: float = 0.001) -> Iterator[None]:
    """Python hands the GIL between threads every ``interval`` seconds at most, inside.

    For the thread that parses a file while a :class:`StreamedRead` reads it: the read's threads
    need the GIL for a moment after each piece, and with Python's default 5 ms a busy parser
    kept them waiting (604 MB took 0.32-0.35 s against 0.26-0.27 s with the parser asleep;
    0.28-0.30 s at 1 ms)."""
    global _handoff_users, _saved_interval, _set_interval
    with _handoffs:
        if not _handoff_users:
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, _saved_interval))
            _set_interval = sys.getswitchinterval()
        _handoff_users += 1
    try:
        yield
    finally:
        with _handoffs:
            _handoff_users -= 1
            # A value the program set meanwhile (another thread) is its own: kept.
            if not _handoff_users and sys.getswitchinterval() == _set_interval:
                sys.setswitchinterval(_saved_interval)


class CorruptFile(OSError):
    """The file read is not the one the manifest lists (checksum, truncation, a read error)."""


def _open_direct(fd: int) -> int | None:
    """A second descriptor of ``fd``'s file opened with ``O_DIRECT``, or None where refused."""
    if not _O_DIRECT:
        return None
    try:  # the same open file, not a path that may have been replaced since
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | _O_DIRECT)
    except OSError:
        return None


class StreamedRead:
    """One checkpoint file read whole into an image of its own and checksummed, on background
    threads that start at once.

    :meth:`verified` waits for the read and the checksum and returns the image, or raises
    :class:`CorruptFile`; :meth:`finish` says why the file is not the manifest's (None if it
    is). Use as a context manager: :meth:`close` stops the threads and closes the descriptors
    (the image stays valid while anything refers to it).

    Args:
        fd: an open descriptor of the regular file (this object closes it).
        name: the file's name, for messages.
        size: its size (already checked against the manifest).
        digest: the xxh3-128 hex digest the manifest records for it.
    """

    def __init__(self, fd: int, name: str, size: int, digest: str) -> None:
        self.fd, self.name, self.size = fd, name, size
        self._digest = digest
        self._count = -(-size // _PIECE)
        # The last piece first: the archive's directory and HDF5's last-written metadata lie at
        # the end, and a loader that parses as the bytes arrive (see :meth:`wait_for`) needs
        # them before the data they describe.
        self._order = [self._count - 1, *range(self._count - 1)] if self._count > 1 else [0]
        # Whole pieces: O_DIRECT reads whole sectors, the last one past the end of the file.
        # NumPy asks for transparent huge pages for large arrays (a plain anonymous mapping
        # faulted 604 MB in 0.26-0.30 s on the dev VM, a NumPy array in 0.08-0.12 s).
        raw = np.empty(max(self._count, 1) * _PIECE + _PAGE, np.uint8)
        start = -raw.ctypes.data % _PAGE
        self._image = raw[start : start + max(self._count, 1) * _PIECE]
        self._touched = 0  # pieces of _order whose pages the toucher has faulted in
        self._direct = _open_direct(fd)
        self._refused: int | None = None  # an O_DIRECT descriptor whose reads were refused
        self._got: dict[int, int] = {}  # piece -> bytes read into it
        self._error: BaseException | None = None
        self._stop = False
        self._closed = False
        self._hashed = 0  # pieces hashed, in file order
        self._problem: str | None = None
        self._finished = False
        self._cond = threading.Condition()
        self._hash = xxhash.xxh3_128()
        self._threads = [
            threading.Thread(target=self._guard, args=(self._read, k), daemon=True,
                             name=f"keras_ckpt-restore-read-{k}")
            for k in range(_READERS)
        ] + [threading.Thread(target=self._guard, args=(self._hash_all,), daemon=True,
                              name="keras_ckpt-restore-hash"),
             threading.Thread(target=self._guard, args=(self._touch,), daemon=True,
                              name="keras_ckpt-restore-touch")]
        for thread in self._threads:
            thread.start()

    # -- the threads --------------------------------------------------------------------------

    def _guard(self, work: Any, *args: Any) -> None:
        try:
            work(*args)
        except BaseException as e:  # handed to the loader's thread
            with self._cond:
                if self._error is None:
                    self._error = e
                self._stop = True
                self._cond.notify_all()

    def _touch(self) -> None:
        """Fault the image's pages in, piece by piece, ahead of the readers."""
        for done, piece in enumerate(self._order, 1):
            if self._stop:
                return
            self._image[piece * _PIECE : (piece + 1) * _PIECE : _PAGE] = 0
            with self._cond:
                self._touched = done
                self._cond.notify_all()

    def _read(self, first: int) -> None:
        view = memoryview(self._image)
        for at in range(first, self._count, _READERS):
            piece = self._order[at]
            with self._cond:
                while self._touched <= at and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
            start = piece * _PIECE
            want = min(_PIECE, self.size - start)
            done = self._read_piece(view, start, want)
            if done < want:
                raise CorruptFile(f"{self.name} is shorter than the manifest says (truncated while read)")
            with self._cond:
                self._got[piece] = want
                self._cond.notify_all()

    def _read_piece(self, view: memoryview, start: int, want: int) -> int:
        """Bytes of ``[start, start + want)`` read into the image (fewer: the file ended)."""
        done = 0
        while done < want:
            direct = self._direct
            at = start + done
            # O_DIRECT reads whole sectors: ask for the rest of the piece (its end is aligned).
            target = view[at : start + _PIECE] if direct is not None else view[at : start + want]
            try:
                n = os.preadv(self.fd if direct is None else direct, [target], at)
            except OSError as e:
                if direct is None or e.errno != errno.EINVAL:
                    raise
                self._refuse_direct(direct)  # the filesystem opened it but will not read so
                continue
            if not n:
                break
            done += n
            if direct is not None and n % 512:
                break  # a partial sector: the end of the file
        return min(done, want)

    def _refuse_direct(self, direct: int) -> None:
        # Closed only by close(): the other reader may be about to use it (a number reused by
        # another open would read another file).
        with self._cond:
            if self._direct == direct:
                self._direct = None
                self._refused = direct

    def _hash_all(self) -> None:
        view = memoryview(self._image)
        for piece in range(self._count):
            with self._cond:
                while piece not in self._got and not self._stop:
                    self._cond.wait()
                if piece not in self._got:
                    return
                want = self._got[piece]
            start = piece * _PIECE
            self._hash.update(view[start : start + want])
            self._hashed = piece + 1

    # -- the loader's side --------------------------------------------------------------------

    def finish(self) -> str | None:
        """Wait for the read and the checksum: None if the file is the one the manifest lists,
        else why not."""
        if not self._finished:
            for thread in self._threads:
                thread.join()
            self._finished = True
            self._problem = self._verdict()
        return self._problem

    def _verdict(self) -> str | None:
        error = self._error
        if isinstance(error, CorruptFile):
            return str(error)
        if isinstance(error, OSError):
            return f"{self.name} could not be read: {error.strerror or error}"
        if error is not None:
            raise error
        if self._hashed < self._count:
            return f"{self.name} could not be read to the end"
        if self._hash.hexdigest() != self._digest:
            return f"{self.name} does not match its checksum"
        return None

    @property
    def image(self) -> np.ndarray:
        """The file's bytes as they are being read: a range is final once :meth:`wait_for` it
        returned, but vouched for only once :meth:`verified` returned."""
        return self._image[: self.size]

    def wait_for(self, start: int, stop: int) -> None:
        """Return once bytes ``[start, stop)`` of the file are in :attr:`image`, so a loader can
        parse them while the rest is read; :class:`CorruptFile` if the read failed first. What
        a loader makes of such bytes must not reach the model before :meth:`verified`."""
        stop = min(stop, self.size)
        pieces = range(start // _PIECE, -(-stop // _PIECE)) if stop > start else range(0)
        with self._cond:
            while any(piece not in self._got for piece in pieces):
                if self._stop:
                    break
                self._cond.wait()
            else:
                return
        raise CorruptFile(self.finish() or f"{self.name} was closed while it was read")

    def verified(self) -> np.ndarray:
        """The file's bytes once they match the manifest's checksum (a uint8 array over the
        image: the caller may keep views of it); :class:`CorruptFile` if they do not."""
        problem = self.finish()
        if problem is not None:
            raise CorruptFile(problem)
        return self._image[: self.size]

    def close(self) -> None:
        """Stop reading (a loader that failed) and close the descriptors, once."""
        with self._cond:
            if self._closed:
                return
            self._closed = self._stop = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        for fd in (self._direct, self._refused, self.fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._direct = self._refused = None

    def __enter__(self) -> StreamedRead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemoryFile(Positioned):
    """A read-only, seekable binary file over a uint8 array (a verified image), for readers
    that take a file object (h5py, zipfile, torch's zip reader). Reads copy only what is read."""

    def __init__(self, data: np.ndarray) -> None:
        super().__init__()
        self._data, self._pos = data, 0

    def _end(self) -> int:
        return len(self._data)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), len(self._data) - self._pos))
        view[:n] = self._data[self._pos : self._pos + n].data
        self._pos += n
        return n

    def pread(self, nbytes: int, offset: int) -> bytes:
        """``nbytes`` from ``offset`` (fewer at the end), without moving the position."""
        return self._data[offset : offset + nbytes].tobytes()


class ArrivingFile(MemoryFile):
    """Bytes being read (a :class:`StreamedRead`'s :attr:`~StreamedRead.image`, or a slice of
    it) as a read-only, seekable file: each read first waits for its bytes (``wait_for(start,
    stop)``, offsets into ``data``), not for the checksum. For a loader that parses the file as
    it arrives and applies nothing before :meth:`StreamedRead.verified`."""

    def __init__(self, data: np.ndarray, wait_for: Callable[[int, int], None]) -> None:
        super().__init__(data)
        self._wait_for = wait_for

    def readinto(self, buffer: Any) -> int:
        self._wait_for(self._pos, self._pos + memoryview(buffer).nbytes)
        return super().readinto(buffer)

    def pread(self, nbytes: int, offset: int) -> bytes:
        self._wait_for(offset, offset + nbytes)
        return super().pread(nbytes, offset)


class StreamedFile(MemoryFile):
    """A :class:`StreamedRead`'s bytes as a read-only, seekable file, for a loader that reads
    through a file object; :class:`CorruptFile` at once if they do not match the checksum."""

    def __init__(self, source: StreamedRead) -> None:
        super().__init__(source.verified())
