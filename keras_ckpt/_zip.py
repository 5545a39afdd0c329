"""A zip archive written strictly front to back: the container of ``.keras`` and ``.pt`` files.

Both front-ends write their archives through :class:`ZipWriter`; this module knows nothing of
Keras or torch (it imports neither), only of zip. Members are stored (uncompressed). A member
whose bytes are at hand carries its CRC-32 in its local header; a large member given as
segments (a model's weights, a tensor's storage) is CRC'd piece by piece on another thread from
the same memory while the main thread writes it (the CRC releases the GIL), the main
thread taking the pieces still left once it has written them all, the parts joined with
:func:`crc32_combine`, and the CRC goes in a data descriptor after the data. So nothing is ever
seeked back over: the caller may hash the bytes as they stream, or write to a pipe.

The two front-ends' formats differ in a few header fields, each an option of :class:`ZipWriter`:
Keras's archives are Python ``zipfile``'s (DOS timestamps, Unix mode 0600, the UTF-8 flag only
on non-ASCII names, ZIP64 past 2 GiB); torch's are ``PyTorchFileWriter``'s (zero timestamps, no
creator attributes, every member UTF-8 and with a data descriptor, its data aligned by an ``FB``
extra field, ZIP64 past 4 GiB). ZIP64 records appear only where a size, an offset or the member
count needs them.
"""

from __future__ import annotations

import functools
import os
import struct
import threading
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Callable, NamedTuple

try:  # ISA-L's CRC-32 (carry-less multiply): 13-17 GB/s on the dev VM, zlib's 2.1-2.2; the same CRC
    from isal.isal_zlib import crc32
except ImportError:  # a platform without its wheels
    from zlib import crc32

__all__ = ["ZIP64_LIMIT", "ZipWriter", "crc32_combine", "member_data_offset"]

ZIP64_LIMIT = (1 << 31) - 1
"""Python zipfile's threshold for ZIP64 records: some readers treat 32-bit fields as signed."""

_MAX_16 = 0xFFFF
_MAX_32 = 0xFFFFFFFF
# One CRC thread beside the writing thread: on 2 cores a second one only takes the writer's core
# (the CRC-32 runs at 2-13 GB/s, the copy into the page cache at ~2 GB/s), and where the machine
# is busy the writer, done writing, CRCs what is left itself.
_CRC_THREADS = 1
_CRC_PIECE = 8 << 20  # the unit of work: what the writer may wait for at the end is one piece
_CRC_ASIDE = 1 << 20  # a smaller member is CRC'd inline: a hand-off would cost more

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_CENTRAL_HEADER = struct.Struct("<4s4B4HL2L5H2L")
_END_RECORD = struct.Struct("<4s4H2LH")
_END_RECORD64 = struct.Struct("<4sQ2H2L4Q")
_END_LOCATOR64 = struct.Struct("<4sLQL")
_ZIP64_EXTRA_ID = 0x0001
_ALIGN_EXTRA_ID = b"FB"  # torch's padding block: an extra field its reader skips
_FLAG_DATA_DESCRIPTOR = 0x08
_FLAG_UTF8 = 0x800
_SYSTEM_UNIX = 3
_ZIP_VERSION = 20
_ZIP64_VERSION = 45


# --- CRC-32 -----------------------------------------------------------------------------------

_CRC_POLY = 0xEDB88320  # CRC-32 (zlib, zip) polynomial, bit-reflected


def _multmodp(a: int, b: int) -> int:
    """Product of two polynomials modulo the CRC polynomial (bit-reflected, as in zlib)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


def _x_powers() -> list[int]:
    """x^(2^k) modulo the CRC polynomial for k = 0..31, so shifting by n bits is O(log n)."""
    powers = [1 << 30]  # x^1
    for _ in range(31):
        powers.append(_multmodp(powers[-1], powers[-1]))
    return powers


_X2N = _x_powers()


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` from ``crc1 = crc32(A)``, ``crc2 = crc32(B)`` and ``len2 = len(B)``.

    Python's zlib module does not expose zlib's ``crc32_combine``; this is the same algorithm
    (multiply ``crc1`` by x^(8 * len2) modulo the polynomial). It lets the parts of a zip
    member be checksummed on several cores at once. Cost: microseconds, independent of the data.

    Example:

    >>> crc32_combine(crc32(b"ab"), crc32(b"cd"), 2) == crc32(b"abcd")
    True

    Args:
        crc1: CRC-32 of the first part.
        crc2: CRC-32 of the second part.
        len2: length of the second part in bytes.
    """
    if len2 <= 0:
        return crc1
    return _multmodp(_shift(len2), crc1) ^ crc2


def _shift(length: int) -> int:
    """x^(8 * length) modulo the CRC polynomial: what appending ``length`` bytes multiplies by."""
    shift = 1 << 31  # x^0
    n, k = length, 3  # length bytes = length * 2^3 bits
    while n:
        if n & 1:
            shift = _multmodp(_X2N[k & 31], shift)
        n >>= 1
        k += 1
    return shift


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _crc_pool() -> ThreadPoolExecutor:
    """The CRC threads, started once per process: a checkpoint has a member per variable, and
    starting threads for each cost more than its CRC on a busy machine."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_CRC_THREADS, thread_name_prefix="keras_ckpt-crc")
        return _pool


def _forget_pool() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()  # a forked child has the pool but not its threads


os.register_at_fork(after_in_child=_forget_pool)


def _crc_of(segments: list[memoryview]) -> int:
    crc = 0
    for segment in segments:
        crc = crc32(segment, crc)
    return crc


class _PieceCrcs:
    """The CRC-32 of a member given as segments, computed in pieces by whoever is free.

    :meth:`work` takes the next piece not yet taken, until none is left: the CRC threads run it
    from the start while the member is written, and :meth:`crc` runs it on the writing thread
    once the member is written, then waits for the pieces still in the threads' hands.
    """

    def __init__(self, segments: list[memoryview]) -> None:
        total = sum(len(s) for s in segments)
        self._pieces = _split(segments, -(-total // _CRC_PIECE))
        self._crcs = [0] * len(self._pieces)
        self._next = 0
        self._lock = threading.Lock()
        pool = _crc_pool()
        self._workers: list[Future[None]] = []
        try:
            for _ in range(_CRC_THREADS):
                self._workers.append(pool.submit(self.work))
        except RuntimeError:
            # "cannot schedule new futures after interpreter shutdown": concurrent.futures refuses
            # work before the interpreter waits for an async_save writer still in flight
            # (threading._shutdown runs its hooks first). That save must still finish: crc()
            # computes every piece on the writing thread.
            pass

    def work(self) -> None:
        while True:
            with self._lock:
                index = self._next
                if index >= len(self._pieces):
                    return
                self._next += 1
            self._crcs[index] = _crc_of(self._pieces[index])

    def crc(self) -> int:
        """The member's CRC-32 (call once it is written)."""
        self.work()
        self._join()
        crc, shifts = 0, {}
        for piece, part in zip(self._pieces, self._crcs):
            length = sum(len(s) for s in piece)
            if length not in shifts:  # all pieces but the last have one length
                shifts[length] = _shift(length)
            crc = _multmodp(shifts[length], crc) ^ part
        return crc

    def abandon(self) -> None:
        """Stop: the member is not written after all (returns once no thread reads it)."""
        with self._lock:
            self._next = len(self._pieces)
        self._join()

    def _join(self) -> None:
        for worker in self._workers:
            if not worker.cancel():  # still queued (another member's thread is busy): not needed
                worker.result()


def _split(segments: list[memoryview], parts: int) -> list[list[memoryview]]:
    """Cut a byte stream given as segments into ``parts`` runs of about equal length."""
    total = sum(len(s) for s in segments)
    target = -(-total // parts)
    runs: list[list[memoryview]] = [[]]
    room = target
    for segment in segments:
        while len(segment) > room and len(runs) < parts:
            runs[-1].append(segment[:room])
            segment = segment[room:]
            runs.append([])
            room = target
        runs[-1].append(segment)
        room -= len(segment)
    return runs


# --- Writing ----------------------------------------------------------------------------------


def _dos_time(now: float) -> tuple[int, int]:
    """Zip's MS-DOS time and date fields for ``now`` (local time, as zipfile records it)."""
    t = time.localtime(now)
    dos_time = (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2)
    dos_date = ((max(t.tm_year, 1980) - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday
    return dos_time, dos_date


class _Entry(NamedTuple):
    name: bytes
    flags: int
    crc: int
    size: int
    offset: int


class ZipWriter:
    """A zip archive written strictly front to back, members stored (uncompressed).

    Offsets count from where the archive starts, so it may follow other data in the file (zip
    readers allow a prefix). Nothing is flushed or closed: the caller owns ``out``.

    Example:

    ```python
    with open("a.zip", "wb") as f:
        archive = ZipWriter(f, timestamp=time.time(), unix_mode=0o600)
        archive.add("config.json", b"{}")
        archive.add_streamed("weights.bin", [memoryview(buffer)], align=64)
        archive.finish()
    ```

    Args:
        out: where the bytes go; its ``write`` must write all of a buffer and return its
            length (a buffered file, ``keras_ckpt.storage.EarlyWriteback``).
        timestamp: the members' modification time (seconds since the epoch), recorded as DOS
            time and date; None records zeros (torch's writer).
        unix_mode: permission bits the central directory records for every member, made by
            Unix (zipfile records 0600 for ``ZipFile.open(name, "w")``); None records no
            creator system and no attributes (torch's writer).
        always_utf8: set the UTF-8 name flag on every member (torch's writer), not only on
            names that are not ASCII (zipfile).
        zip64_limit: sizes and offsets above it get ZIP64 fields; None: :data:`ZIP64_LIMIT`.
            torch's writer switches at 4 GiB; tests lower it to reach the ZIP64 paths.
        zip64_end_sentinels: where ZIP64 end records are written, put 0xFFFF / 0xFFFFFFFF in
            all of the classic end record's count, size and offset fields (as
            ``keras_ckpt.torch`` always has), instead of each value capped at its field's
            maximum (zipfile).
    """

    def __init__(
        self,
        out: IO[bytes],
        *,
        timestamp: float | None = None,
        unix_mode: int | None = None,
        always_utf8: bool = False,
        zip64_limit: int | None = None,
        zip64_end_sentinels: bool = False,
    ) -> None:
        if unix_mode is not None and not 0 <= unix_mode <= 0o7777:
            raise ValueError(
                f"unix_mode must be permission bits (0..0o7777). Received: unix_mode={unix_mode!r}"
            )
        limit = ZIP64_LIMIT if zip64_limit is None else zip64_limit
        if not 0 < limit <= _MAX_32:
            raise ValueError(f"zip64_limit must be in 1..{_MAX_32}. Received: zip64_limit={zip64_limit!r}")
        self._out = out
        self._pos = 0
        self._entries: list[_Entry] = []
        self._time, self._date = (0, 0) if timestamp is None else _dos_time(timestamp)
        self._system, self._attributes = (
            (0, 0) if unix_mode is None else (_SYSTEM_UNIX, unix_mode << 16)
        )
        self._always_utf8 = always_utf8
        self._limit = limit
        self._end_sentinels = zip64_end_sentinels

    @property
    def position(self) -> int:
        """Bytes written so far."""
        return self._pos

    def _emit(self, data: bytes | memoryview) -> None:
        self._pos += self._out.write(data)

    def _encode(self, name: str) -> tuple[bytes, int]:
        if name.isascii() and not self._always_utf8:
            return name.encode("ascii"), 0
        return name.encode("utf-8"), _FLAG_UTF8

    def _local_header(self, name: bytes, flags: int, crc: int, size: int, align: int | None) -> None:
        # A data-descriptor member's sizes are zero in its local header (as zipfile writes).
        listed = 0 if flags & _FLAG_DATA_DESCRIPTOR else size
        extra = b""
        version = _ZIP_VERSION
        if size > self._limit:
            extra = struct.pack("<HHQQ", _ZIP64_EXTRA_ID, 16, listed, listed)
            listed, version = _MAX_32, _ZIP64_VERSION
        if align is not None:
            data_start = self._pos + _LOCAL_HEADER.size + len(name) + len(extra) + 4
            pad = -data_start % align
            extra += _ALIGN_EXTRA_ID + struct.pack("<H", pad) + b"Z" * pad
        self._emit(
            _LOCAL_HEADER.pack(
                b"PK\x03\x04", version, 0, flags, zipfile.ZIP_STORED,
                self._time, self._date, crc, listed, listed, len(name), len(extra),
            )
            + name
            + extra
        )

    @staticmethod
    def _check_align(align: int | None) -> None:
        if align is not None and not 1 <= align <= 0xFFFF - 4:
            raise ValueError(f"align must be None or in 1..65531. Received: align={align!r}")

    def add(self, name: str, data: bytes | memoryview, *, align: int | None = None) -> None:
        """Add a member whose bytes are at hand (its CRC goes in the local header).

        Args:
            name: the member's path in the archive.
            data: its bytes.
            align: start the data at a multiple of this many bytes from the archive's start
                (padding the local header's extra field with an ``FB`` block); None: no padding.
        """
        self._check_align(align)
        encoded, flags = self._encode(name)
        view = memoryview(data).cast("B")
        offset, crc = self._pos, crc32(view)
        self._local_header(encoded, flags, crc, len(view), align)
        self._emit(view)
        self._entries.append(_Entry(encoded, flags, crc, len(view), offset))

    def add_streamed(
        self, name: str, segments: list[memoryview], *, align: int | None = None
    ) -> None:
        """Add a member given as byte segments, CRC'd on another thread while it is written.

        The CRC is known only at the end, so it goes in a data descriptor after the data
        instead of being patched into the local header: no seek back.

        Args:
            name: the member's path in the archive.
            segments: byte views (format ``"B"``) that concatenate to the member's data; they
                are read twice at once (written, checksummed), so must not change meanwhile.
            align: as for :meth:`add`.
        """
        self._check_align(align)
        encoded, flags = self._encode(name)
        flags |= _FLAG_DATA_DESCRIPTOR
        size = sum(len(s) for s in segments)
        offset = self._pos
        self._local_header(encoded, flags, 0, size, align)
        if size < _CRC_ASIDE:
            crc = _crc_of(segments)
            for segment in segments:
                self._emit(segment)
        else:
            pieces = _PieceCrcs(segments)
            try:
                for segment in segments:
                    self._emit(segment)
            except BaseException:
                pieces.abandon()  # the threads read the segments: done before this raises
                raise
            crc = pieces.crc()
        if size > self._limit:
            self._emit(struct.pack("<4sLQQ", b"PK\x07\x08", crc, size, size))
        else:
            self._emit(struct.pack("<4sLLL", b"PK\x07\x08", crc, size, size))
        self._entries.append(_Entry(encoded, flags, crc, size, offset))

    def finish(self) -> None:
        """Write the central directory and the end records (ZIP64 ones where needed)."""
        start = self._pos
        for entry in self._entries:
            fields = []
            listed_size, listed_offset = entry.size, entry.offset
            if entry.size > self._limit:
                fields += [entry.size, entry.size]
                listed_size = _MAX_32
            if entry.offset > self._limit:
                fields.append(entry.offset)
                listed_offset = _MAX_32
            extra = b""
            version = _ZIP_VERSION
            if fields:
                extra = struct.pack(f"<HH{len(fields)}Q", _ZIP64_EXTRA_ID, 8 * len(fields), *fields)
                version = _ZIP64_VERSION
            self._emit(
                _CENTRAL_HEADER.pack(
                    b"PK\x01\x02", version, self._system, version, 0, entry.flags,
                    zipfile.ZIP_STORED, self._time, self._date, entry.crc, listed_size,
                    listed_size, len(entry.name), len(extra), 0, 0, 0, self._attributes,
                    listed_offset,
                )
                + entry.name
                + extra
            )
        count, cd_size = len(self._entries), self._pos - start
        if count > _MAX_16 or cd_size > self._limit or start > self._limit:
            record = self._pos
            self._emit(
                _END_RECORD64.pack(
                    b"PK\x06\x06", _END_RECORD64.size - 12, _ZIP64_VERSION, _ZIP64_VERSION,
                    0, 0, count, count, cd_size, start,
                )
            )
            self._emit(_END_LOCATOR64.pack(b"PK\x06\x07", 0, record, 1))
            if self._end_sentinels:
                count, cd_size, start = _MAX_16, _MAX_32, _MAX_32  # see the ZIP64 records
            else:
                count, cd_size, start = min(count, _MAX_16), min(cd_size, _MAX_32), min(start, _MAX_32)
        self._emit(_END_RECORD.pack(b"PK\x05\x06", 0, 0, count, count, cd_size, start, 0))


# --- Reading ----------------------------------------------------------------------------------


def member_data_offset(fd: int | Callable[[int, int], bytes], info: zipfile.ZipInfo) -> int:
    """Where the data of member ``info`` starts in the zip file open as ``fd``.

    Read from the member's local header, whose extra field (alignment padding) may differ in
    length from the central directory's: zipfile does not say.

    Args:
        fd: an open file descriptor of the archive (read with ``pread``: no position moves), or
            a ``pread(nbytes, offset)`` function over the archive's bytes.
        info: the member, from ``zipfile.ZipFile(...).getinfo``.
    """
    pread = functools.partial(os.pread, fd) if isinstance(fd, int) else fd
    header = pread(_LOCAL_HEADER.size, info.header_offset)
    if len(header) != _LOCAL_HEADER.size:
        raise zipfile.BadZipFile(f"bad local header for {info.filename!r}")
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename!r}")
    return info.header_offset + _LOCAL_HEADER.size + fields[10] + fields[11]
