"""The resume reader: a whole file read with O_DIRECT (or through the page cache where that is
refused) into an aligned image, checksummed before a loader may use a byte of it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import xxhash

from keras_ckpt import _stream, storage


def stream_of(path, size=None, digest=None):
    data = path.read_bytes()
    return _stream.StreamedRead(
        os.open(path, os.O_RDONLY), path.name, len(data) if size is None else size,
        xxhash.xxh3_128_hexdigest(data) if digest is None else digest)


@pytest.mark.parametrize("size", [0, 1, 511, 4096, _stream._PIECE - 1, _stream._PIECE,
                                  3 * _stream._PIECE + 4097])
def test_every_size_comes_back_whole_in_a_page_aligned_image(tmp_path, size):
    # Sizes around sector, page and piece boundaries: O_DIRECT reads whole sectors, and the
    # last piece asks past the end of the file.
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    with stream_of(tmp_path / "f") as stream:
        image = stream.verified()
        assert image.tobytes() == data
        assert image.ctypes.data % 4096 == 0
        assert stream.finish() is None


def test_a_view_that_is_not_64_byte_aligned_is_copied_and_an_aligned_one_is_not(tmp_path):
    data = os.urandom(1 << 20)
    (tmp_path / "f").write_bytes(data)
    with stream_of(tmp_path / "f") as stream:
        image = stream.verified()
        aligned = _stream.aligned_view(image, 4096, 1000)
        assert np.shares_memory(aligned, image)
        shifted = _stream.aligned_view(image, 4099, 1000)
        assert not np.shares_memory(shifted, image) and shifted.ctypes.data % 64 == 0
        assert shifted.tobytes() == data[4099:5099]


def test_a_flipped_byte_is_reported_by_the_checksum_and_the_image_is_refused(tmp_path):
    data = bytearray(os.urandom(20 << 20))
    digest = xxhash.xxh3_128_hexdigest(bytes(data))
    data[(17 << 20) + 5] ^= 0x10
    (tmp_path / "f").write_bytes(data)
    with stream_of(tmp_path / "f", digest=digest) as stream:
        with pytest.raises(storage.CorruptFile, match="f does not match its checksum"):
            stream.verified()
        assert stream.finish() == "f does not match its checksum"  # the same answer again


def test_a_file_shorter_than_the_manifest_says_is_reported_as_truncated(tmp_path):
    # The manifest's size was checked at open; the file lost its tail before the read got there.
    data = os.urandom(20 << 20)
    (tmp_path / "f").write_bytes(data[: 13 << 20])
    with stream_of(tmp_path / "f", size=len(data),
                   digest=xxhash.xxh3_128_hexdigest(data)) as stream:
        assert stream.finish() == "f is shorter than the manifest says (truncated while read)"
        with pytest.raises(storage.CorruptFile, match="truncated"):
            stream.verified()


def test_a_file_truncated_while_it_is_read_is_reported(tmp_path, monkeypatch):
    # Truncated for real between two pieces, through the reader's own read function.
    data = os.urandom(6 * _stream._PIECE)
    (tmp_path / "f").write_bytes(data)
    real = _stream.StreamedRead._read_piece
    cut = []

    def read_piece(self, view, start, want):
        if start >= 2 * _stream._PIECE and not cut:
            cut.append(True)
            os.truncate(tmp_path / "f", 2 * _stream._PIECE + 100)
        return real(self, view, start, want)

    monkeypatch.setattr(_stream.StreamedRead, "_read_piece", read_piece)
    with stream_of(tmp_path / "f") as stream:
        assert stream.finish() == "f is shorter than the manifest says (truncated while read)"


def test_a_loader_that_gives_up_closes_the_stream_without_waiting_for_the_rest(tmp_path):
    data = os.urandom(30 << 20)
    (tmp_path / "f").write_bytes(data)
    stream = stream_of(tmp_path / "f")
    stream.close()
    with pytest.raises(OSError):
        os.fstat(stream.fd)  # closed


@pytest.fixture(params=["tmpfs", "ramfs"])
def memory_fs(request, tmp_path):
    """A RAM filesystem mounted for the test, unmounted afterwards. ramfs refuses O_DIRECT
    (EINVAL at open); tmpfs refused it before Linux 6.6 and accepts it since."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a filesystem needs root")
    where = tmp_path / request.param
    where.mkdir()
    options = ["-o", "size=64m"] if request.param == "tmpfs" else []
    done = subprocess.run(["mount", "-t", request.param, *options, request.param, str(where)],
                          capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a {request.param} here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_on_a_ram_filesystem_the_file_is_read_whole_o_direct_or_not(memory_fs):
    data = os.urandom((20 << 20) + 7)
    (memory_fs / "f").write_bytes(data)
    try:
        os.close(os.open(memory_fs / "f", os.O_RDONLY | os.O_DIRECT))
        refused = False
    except OSError:
        refused = True
    with stream_of(memory_fs / "f") as stream:
        assert stream.verified().tobytes() == data
        if refused:  # the plain descriptor did the reading
            assert stream._direct is None
    assert memory_fs.name == "tmpfs" or refused


def test_a_filesystem_that_opens_with_o_direct_but_refuses_the_read_falls_back(tmp_path, monkeypatch):
    # Some filesystems accept O_DIRECT at open and fail the read with EINVAL.
    data = os.urandom((10 << 20) + 3)
    (tmp_path / "f").write_bytes(data)
    real = os.preadv
    direct_fds = set()

    def preadv(fd, buffers, offset):
        if fd in direct_fds:
            raise OSError(22, "Invalid argument")
        return real(fd, buffers, offset)

    real_open = _stream._open_direct

    def open_direct(fd):
        direct = real_open(fd)
        if direct is not None:
            direct_fds.add(direct)
        return direct

    monkeypatch.setattr(_stream, "_open_direct", open_direct)
    monkeypatch.setattr(_stream.os, "preadv", preadv)
    with stream_of(tmp_path / "f") as stream:
        assert stream.verified().tobytes() == data


def test_release_gives_back_only_the_pages_wholly_inside_the_range():
    page = _stream._PAGE
    raw = np.ones(8 * page, np.uint8)
    base = -raw.ctypes.data % page
    image = raw[base : base + 6 * page]
    start = image.ctypes.data
    _stream.release(start + 100, start + 4 * page + 100)  # pages 1, 2, 3 lie wholly inside
    if _stream._MADVISE is None:
        pytest.skip("no madvise here: nothing is given back")
    assert image[: page].all() and image[4 * page :].all()
    assert not image[page : 4 * page].any()


def test_a_loader_can_parse_the_bytes_that_arrived_while_the_rest_is_read(tmp_path, monkeypatch):
    # wait_for returns once its range is in the image, not at the end of the read: here piece
    # 2 is held back, and pieces before it are readable through ArrivingFile meanwhile.
    data = os.urandom(4 * _stream._PIECE)
    (tmp_path / "f").write_bytes(data)
    real, release = _stream.StreamedRead._read_piece, threading.Event()

    def read_piece(self, view, start, want):
        if start == 2 * _stream._PIECE:
            release.wait(30)
        return real(self, view, start, want)

    monkeypatch.setattr(_stream.StreamedRead, "_read_piece", read_piece)
    with stream_of(tmp_path / "f") as stream:
        arriving = _stream.ArrivingFile(stream.image, stream.wait_for)
        arriving.seek(_stream._PIECE - 10)
        assert arriving.read(20) == data[_stream._PIECE - 10 : _stream._PIECE + 10]
        assert arriving.pread(5, 4 * _stream._PIECE - 5) == data[-5:]  # the last piece: read first
        waiter = threading.Thread(target=stream.wait_for, args=(2 * _stream._PIECE, 2 * _stream._PIECE + 1))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive()  # that byte has not arrived
        release.set()
        waiter.join(30)
        assert not waiter.is_alive()
        assert stream.verified().tobytes() == data


def test_a_wait_for_bytes_the_file_no_longer_has_raises_the_truncation(tmp_path):
    data = os.urandom(3 * _stream._PIECE)
    (tmp_path / "f").write_bytes(data[: _stream._PIECE])
    with stream_of(tmp_path / "f", size=len(data), digest=xxhash.xxh3_128_hexdigest(data)) as stream:
        with pytest.raises(storage.CorruptFile, match="truncated while read"):
            stream.wait_for(2 * _stream._PIECE, 2 * _stream._PIECE + 10)


def test_prompt_handoffs_shortens_the_switch_interval_inside_and_restores_it_after():
    before = sys.getswitchinterval()
    with pytest.raises(RuntimeError):
        with _stream.prompt_handoffs():
            assert sys.getswitchinterval() <= 0.001
            with _stream.prompt_handoffs():  # nested (two loads on two threads)
                pass
            assert sys.getswitchinterval() <= 0.001
            raise RuntimeError
    assert sys.getswitchinterval() == before


def test_prompt_handoffs_keeps_a_switch_interval_another_thread_set_meanwhile():
    # Harm: the interval saved at entry was put back at exit over a value the program set on
    # another thread while a resume parsed its file (its own tuning silently undone).
    before = sys.getswitchinterval()
    try:
        with _stream.prompt_handoffs():
            setter = threading.Thread(target=sys.setswitchinterval, args=(0.02,))
            setter.start()
            setter.join()
        assert sys.getswitchinterval() == pytest.approx(0.02)
    finally:
        sys.setswitchinterval(before)



def _state_before_the_middle(monkeypatch, path) -> None:
    """``path``'s training state is read while every piece but the first and the last is held."""
    from keras_ckpt import _kerasio

    size = path.stat().st_size
    assert size > 3 * _stream._PIECE
    last = (size - 1) // _stream._PIECE * _stream._PIECE
    real, release = _stream.StreamedRead._read_piece, threading.Event()

    def read_piece(self, view, start, want):
        if start not in (0, last):
            release.wait(30)
        return real(self, view, start, want)

    monkeypatch.setattr(_stream.StreamedRead, "_read_piece", read_piece)
    with stream_of(path) as stream:
        got = []
        reader = threading.Thread(target=lambda: got.append(_kerasio.read_state(str(path), stream)))
        reader.start()
        reader.join(20)
        arrived_first = not reader.is_alive()
        release.set()
        reader.join(30)
        assert arrived_first and got == [b'{"s": 1}']
        assert stream.verified() is not None


def test_a_keras_file_with_a_boolean_mask_gives_its_state_before_the_middle_arrives(tmp_path, monkeypatch):
    # The mask's 12 MB used to lie before the next layer's metadata: the state waited for
    # piece 1 of the read. All metadata is now in piece 0 and the state in the last piece.
    keras = pytest.importorskip("keras")
    from keras_ckpt import _kerasio

    class Mask(keras.layers.Layer):
        def build(self, shape):
            self.mask = self.add_weight(shape=(12 << 20,), dtype="bool", initializer="ones",
                                        trainable=False)

        def call(self, x):
            return x

    model = keras.Sequential([keras.Input((2048,)), Mask(), keras.layers.Dense(2048)])
    path = tmp_path / "m.weights.h5"
    _kerasio.write_weights_h5(model, str(path), state=b'{"s": 1}')
    _state_before_the_middle(monkeypatch, path)


def test_a_keras_file_with_big_sibling_arrays_gives_its_state_before_the_rest_arrives(tmp_path, monkeypatch):
    # Sibling callbacks' arrays (EarlyStopping's best weights: a model's size) used to come
    # after the state, which then lay outside the last piece, read first.
    keras = pytest.importorskip("keras")
    from keras_ckpt import _kerasio

    model = keras.Sequential([keras.Input((1024,)), keras.layers.Dense(2048)])
    path = tmp_path / "m.weights.h5"
    best = {"best/0": np.ones((5 << 20,), "float32"), "best/1": np.ones((2048,), "float32")}
    _kerasio.write_weights_h5(model, str(path), state=b'{"s": 1}', arrays=best)
    _state_before_the_middle(monkeypatch, path)
