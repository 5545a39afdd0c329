"""The output path every front-end's writer streams through: bytes, checksum, page-cache use."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from keras_ckpt import storage

MB = 1 << 20


def _filesystem_type(path: str) -> str:
    best, fstype = "", ""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, mountpoint, kind = line.split()[:3]
            if os.path.realpath(path).startswith(mountpoint) and len(mountpoint) > len(best):
                best, fstype = mountpoint, kind
    return fstype


def _resident_bytes(path: str) -> int:
    """How much of ``path`` the page cache holds (mincore over a read-only mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            vec = (ctypes.c_ubyte * pages)()
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


def _payload(size: int) -> np.ndarray:
    return np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)


def test_streamed_checkpoint_is_exact_and_hashed_as_written(tmp_path):
    data = _payload(40 * MB + 12345)  # not a whole number of chunks or pages
    path = tmp_path / "ck.bin"
    with open(path, "w+b") as raw:
        hashing = storage.HashingWriter(raw)
        out = storage.EarlyWriteback(hashing)
        for start in range(0, data.size, 3 * MB + 7):  # writes that straddle chunk borders
            out.write(memoryview(data)[start : start + 3 * MB + 7])
        out.flush()
        os.fsync(raw.fileno())
    assert path.read_bytes() == data.tobytes()
    assert hashing.size == data.size
    assert (hashing.digest(), None) == storage.LocalStorage(str(tmp_path)).hash("ck.bin", data.size)


def test_writer_that_seeks_back_still_gets_its_bytes(tmp_path):
    data = _payload(50 * MB)
    path = tmp_path / "ck.bin"
    with open(path, "w+b") as raw:
        hashing = storage.HashingWriter(raw)
        out = storage.EarlyWriteback(hashing)
        out.write(data)  # the early part is on disk and out of the cache by now
        hashing.seek(4096)
        out.write(b"header rewritten")
        hashing.seek(0, os.SEEK_END)
        out.write(b"tail")
        out.flush()
    expected = bytearray(data.tobytes())
    expected[4096 : 4096 + 16] = b"header rewritten"
    assert path.read_bytes() == bytes(expected) + b"tail"
    assert hashing.digest() is None  # the engine hashes such a file again after it is written


def _write_mixed(out, reused: bytearray) -> bytes:
    """Large views (a 2-D float array, bytes) and small pieces from a buffer the writer reuses
    at once, as a buffered writer does; returns what the file must hold."""
    weights = np.random.default_rng(0).standard_normal((1024, 1536), dtype=np.float32)  # 6 MiB
    expected = []
    for i in range(3):
        reused[:] = bytes([i]) * len(reused)
        out.write(reused)
        expected.append(bytes(reused))
        reused[:] = b"\xff" * len(reused)  # changed right after the write returned
        out.write(memoryview(weights))
        expected.append(weights.tobytes())
        big = _payload(17 * MB + i).tobytes()
        out.write(big)
        expected.append(big)
    return b"".join(expected)


def test_hashing_behind_the_writes_gives_the_file_s_checksum(tmp_path):
    path = tmp_path / "ck.bin"
    with open(path, "w+b") as raw:
        hashing = storage.HashingWriter(raw)
        with hashing.hashing_behind():
            expected = _write_mixed(storage.EarlyWriteback(hashing), bytearray(4096))
        raw.flush()
    assert path.read_bytes() == expected
    assert hashing.size == len(expected)
    assert (hashing.digest(), None) == storage.LocalStorage(str(tmp_path)).hash("ck.bin", len(expected))


def test_hashing_behind_a_write_that_fails_raises_that_error(small_disk, tmp_path):
    with open(small_disk / "ck.bin", "w+b", buffering=0) as raw:
        hashing = storage.HashingWriter(raw)
        with pytest.raises(OSError) as failed, hashing.hashing_behind():
            for _ in range(8):  # 16 MiB into an 8 MB filesystem
                hashing.write(_payload(2 * MB))
    assert failed.value.errno == errno.ENOSPC
    test_hashing_behind_the_writes_gives_the_file_s_checksum(tmp_path)  # the helper still serves


def test_hashing_behind_works_in_a_forked_child(tmp_path):
    with open(tmp_path / "warm.bin", "w+b") as raw:  # the parent's helper thread exists
        hashing = storage.HashingWriter(raw)
        with hashing.hashing_behind():
            hashing.write(_payload(2 * MB))
    pid = os.fork()
    if pid == 0:  # the child has the parent's pool object but not its thread
        status = 1
        try:
            signal.alarm(60)  # a hung helper must fail the test, not hang it
            path = tmp_path / "child.bin"
            with open(path, "w+b") as raw:
                hashing = storage.HashingWriter(raw)
                with hashing.hashing_behind():
                    data = _write_mixed(hashing, bytearray(100))
                raw.flush()
            store = storage.LocalStorage(str(tmp_path))
            status = 0 if store.hash("child.bin", len(data)) == (hashing.digest(), None) else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or storage._SYNC_FILE_RANGE is None,
    reason="sync_file_range and mincore are Linux's",
)
@pytest.mark.parametrize("piece", [None, 16 * MB + 2050], ids=["one-write", "odd-pieces"])
def test_a_saved_checkpoint_does_not_stay_in_the_page_cache(tmp_path, piece):
    # odd-pieces: a Keras file's variables between HDF5 metadata; the writeback then starts up
    # to a page boundary only, and the pages behind must still be dropped.
    if _filesystem_type(str(tmp_path)) in ("tmpfs", "ramfs"):
        pytest.skip("a RAM filesystem's pages are the file itself")
    data = _payload(160 * MB)
    plain, streamed = tmp_path / "plain.bin", tmp_path / "streamed.bin"
    with open(plain, "wb", buffering=0) as f:
        f.write(data)
        os.fsync(f.fileno())
    with open(streamed, "wb", buffering=0) as f:
        out = storage.EarlyWriteback(f)
        for start in range(0, data.size, piece or data.size):
            out.write(memoryview(data)[start : start + (piece or data.size)])
        os.fsync(f.fileno())
    if _resident_bytes(str(plain)) < 120 * MB:
        pytest.skip("this machine evicts freshly written pages by itself (memory pressure)")
    # At most the chunks behind the one being written stay cached (2 x 16 MiB, plus the last).
    assert _resident_bytes(str(streamed)) <= 3 * 16 * MB
    assert streamed.read_bytes() == plain.read_bytes()


def _leftover(directory, identity: str, *, age_days: float = 0) -> str:
    path = os.path.join(directory, f"{storage.TMP_PREFIX}-{identity}-x1y2-ck-001.keras")
    with open(path, "wb") as f:
        f.write(b"half a checkpoint")
    if age_days:
        then = time.time() - age_days * 86400
        os.utime(path, (then, then))
    return os.path.basename(path)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="start times come from /proc")
def test_sweep_tells_dead_writers_from_live_ones(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    try:
        here, me, ticks = storage.writer_identity(os.getpid()).split(".")
        names = {
            "mine": _leftover(tmp_path, storage.writer_identity()),
            "live writer": _leftover(tmp_path, storage.writer_identity(live.pid)),
            "dead writer": _leftover(tmp_path, storage.writer_identity(done.pid)),
            # A container restarted after preemption: its predecessor had the same pid.
            "my pid's predecessor": _leftover(tmp_path, f"{here}.{me}.{int(ticks) - 100}"),
            # Another host, container (pid namespace) or boot: nothing here says if it lives.
            "elsewhere, in flight": _leftover(tmp_path, f"0123456789ab.{me}.{ticks}"),
            "elsewhere, 2 days old": _leftover(tmp_path, f"0123456789ab.{me}.{ticks}x",
                                               age_days=2),
        }
        storage.sweep_temporaries(str(tmp_path))
        left = set(os.listdir(tmp_path))
        kept = {k for k, name in names.items() if name in left}
        assert kept == {"mine", "live writer", "elsewhere, in flight"}
        live.kill()
        live.wait()
        storage.sweep_temporaries(str(tmp_path))
        assert names["live writer"] not in os.listdir(tmp_path)
    finally:
        live.kill()


@pytest.fixture
def failing_disk(tmp_path):
    """A loop device over a file on a full tmpfs whose MiB 16-24 is a hole: writeback fails there."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    device = None
    try:
        backing = mnt / "backing"
        with open(backing, "wb") as f:
            f.write(b"\1" * 16 * MB)
            f.seek(24 * MB)  # a hole: its blocks need tmpfs space when written back
            f.write(b"\1" * 72 * MB)
        out = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                             text=True)
        if out.returncode:
            pytest.skip(f"no loop device: {out.stderr.strip()}")
        device = out.stdout.strip()
        with open(mnt / "filler", "wb") as f:  # leave the tmpfs no room at all
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * MB)
                    f.flush()
        yield device
    finally:
        if device:
            subprocess.run(["losetup", "-d", device], capture_output=True)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_bytes_that_never_reach_the_disk_fail_the_save(failing_disk):
    # Once drop-behind waited on the failed writeback, the error is consumed: a final fsync
    # would report success. The writer itself must raise.
    data = _payload(96 * MB)
    with open(failing_disk, "r+b") as raw:
        with pytest.raises(OSError):
            out = storage.EarlyWriteback(storage.HashingWriter(raw))
            out.write(data)
            out.flush()
            os.fsync(raw.fileno())
