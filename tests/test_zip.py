"""keras_ckpt._zip: the streaming zip writer both front-ends write their archives with.

Every archive is read back by Python's zipfile (and, where installed, Info-ZIP's ``unzip -t``,
a second, independent reader): the members, their bytes, their CRC-32s.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import time
import zipfile
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_ckpt import _zip, storage


def write(path: str, members: list[tuple[str, object]], **options) -> None:
    """Write ``members`` (name, bytes: added whole; list of bytes: streamed) into ``path``."""
    with open(path, "wb") as f:
        archive = _zip.ZipWriter(storage.EarlyWriteback(f), **options)
        for name, data in members:
            if isinstance(data, list):
                archive.add_streamed(name, [memoryview(part) for part in data])
            else:
                archive.add(name, data)
        archive.finish()


def read_back(
    path: str, members: list[tuple[str, object]], prefixed: bool = False
) -> list[zipfile.ZipInfo]:
    """Assert zipfile finds exactly ``members``, CRCs right, and return their infos."""
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        infos = archive.infolist()
        assert [info.filename for info in infos] == [name for name, _ in members]
        for info, (_, data) in zip(infos, members):
            whole = b"".join(data) if isinstance(data, list) else data
            assert archive.read(info) == whole
            assert info.CRC == zlib.crc32(whole)
            assert info.compress_type == zipfile.ZIP_STORED
    if shutil.which("unzip"):
        out = subprocess.run(["unzip", "-tq", path], capture_output=True, text=True)
        # unzip warns (status 1) about data before the archive, then checks it all the same.
        assert out.returncode == (1 if prefixed else 0), out.stdout + out.stderr
        assert "No errors detected" in out.stdout, out.stdout
    return infos


# --- CRC-32 -----------------------------------------------------------------------------------


@given(st.binary(max_size=4096), st.binary(max_size=4096))
def test_crc32_combine_of_two_parts_is_crc_of_whole(a: bytes, b: bytes) -> None:
    assert _zip.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_crc32_combine_at_random_split_points_of_a_large_buffer() -> None:
    rng = random.Random(0)
    data = rng.randbytes(3 << 20)
    for _ in range(20):
        cut = rng.randrange(len(data) + 1)
        crc = _zip.crc32_combine(zlib.crc32(data[:cut]), zlib.crc32(data[cut:]), len(data) - cut)
        assert crc == zlib.crc32(data), cut


@settings(max_examples=50)
@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(1, 4))
def test_split_runs_checksum_like_the_stream(chunks: list[bytes], parts: int) -> None:
    runs = _zip._split([memoryview(c) for c in chunks], parts)
    assert 1 <= len(runs) <= parts
    assert b"".join(bytes(s) for run in runs for s in run) == b"".join(chunks)
    crc = 0
    for run in runs:
        crc = _zip.crc32_combine(crc, _zip._crc_of(run), sum(len(s) for s in run))
    assert crc == zlib.crc32(b"".join(chunks))


# --- archives ---------------------------------------------------------------------------------


def test_small_members_read_back_with_their_names_times_and_modes(tmp_path) -> None:
    members = [("config.json", b'{"a": 1}'), ("empty", b""), ("assets/caf\u00e9.txt", b"x" * 999)]
    path = str(tmp_path / "small.zip")
    now = time.mktime((2024, 5, 6, 7, 8, 10, 0, 0, -1))
    write(path, members, timestamp=now, unix_mode=0o600)
    infos = read_back(path, members)
    for info in infos:
        assert info.date_time == (2024, 5, 6, 7, 8, 10)
        assert info.external_attr >> 16 == 0o600
        assert info.create_system == 3  # Unix
        assert info.flag_bits & 0x08 == 0  # CRC in the local header, no data descriptor
    assert infos[2].flag_bits & 0x800 and not infos[0].flag_bits & 0x800  # UTF-8 only if needed


def test_streamed_members_are_crc_d_beside_the_write(tmp_path) -> None:
    rng = random.Random(1)
    big = [rng.randbytes(n) for n in (5, 3 << 20, 0, 12345, 1 << 20)]  # threaded CRC path
    members = [("a", b"head"), ("weights.h5", big), ("tiny", [b"ab", b"", b"cd"]), ("none", [])]
    path = str(tmp_path / "streamed.zip")
    write(path, members)
    infos = read_back(path, members)
    assert all(info.flag_bits & 0x08 for info in infos[1:])  # data descriptors
    for info in infos:  # no timestamp, no creator attributes asked for
        assert info.date_time == (1980, 0, 0, 0, 0, 0) and info.external_attr == 0


def test_a_member_of_many_pieces_gets_the_crc_of_all_its_bytes(tmp_path) -> None:
    rng = random.Random(2)
    # 8 MiB pieces cut across segments of odd sizes; the last piece is shorter.
    big = [rng.randbytes(n) for n in (7 << 20, 3, (9 << 20) + 17, 0, 5 << 20)]
    members = [("model.weights.h5", big), ("after", b"tail")]
    path = str(tmp_path / "pieces.zip")
    write(path, members)
    read_back(path, members)


def test_a_member_that_cannot_be_written_raises_its_error(small_disk) -> None:
    with open(small_disk / "full.zip", "wb", buffering=0) as f, pytest.raises(OSError) as failed:
        archive = _zip.ZipWriter(storage.EarlyWriteback(f))
        archive.add_streamed("weights", [memoryview(random.Random(3).randbytes(12 << 20))])
    assert failed.value.errno == errno.ENOSPC
    members = [("after", [random.Random(4).randbytes(20 << 20)])]  # the CRC thread still serves
    write(str(small_disk.parent / "after.zip"), members)
    read_back(str(small_disk.parent / "after.zip"), members)


def test_torch_style_options_set_the_utf8_flag_everywhere_and_no_attributes(tmp_path) -> None:
    members = [("archive/data.pkl", [b"p" * 100]), ("archive/version", [b"3\n"])]
    path = str(tmp_path / "torch.zip")
    write(path, members, always_utf8=True)
    for info in read_back(path, members):
        assert info.flag_bits == 0x808 and info.create_system == 0 and info.external_attr == 0


@pytest.mark.parametrize("align", [1, 64, 4096])
def test_aligned_members_start_their_data_at_multiples_of_align(tmp_path, align) -> None:
    rng = random.Random(align)
    path = str(tmp_path / "aligned.zip")
    members = [(f"archive/data/{i}", rng.randbytes(rng.randrange(1, 3000))) for i in range(12)]
    members.append(("archive/data/big", [rng.randbytes(2 << 20)]))
    with open(path, "wb") as f:
        f.write(b"prefix!")  # offsets count from the archive's start, not the file's
        archive = _zip.ZipWriter(storage.EarlyWriteback(f))
        for i, (name, data) in enumerate(members):
            if i % 2:  # both kinds of member, interleaved
                archive.add(name, data, align=align)
            else:
                parts = data if isinstance(data, list) else [data]
                archive.add_streamed(name, [memoryview(d) for d in parts], align=align)
        archive.finish()
    infos = read_back(path, members, prefixed=True)
    with open(path, "rb") as f:
        fd = f.fileno()
        starts = [_zip.member_data_offset(fd, info) for info in infos]
        for info, start, (_, data) in zip(infos, starts, members):
            assert (start - len(b"prefix!")) % align == 0, info.filename
            whole = b"".join(data) if isinstance(data, list) else data
            assert os.pread(fd, len(whole), start) == whole


def test_many_members_get_zip64_end_records_past_65535(tmp_path) -> None:
    members = [(f"m/{i}", b"%d" % i) for i in range(65_600)]
    path = str(tmp_path / "many.zip")
    write(path, members)
    with open(path, "rb") as f:
        tail = f.read()[-98:]
    assert tail[:4] == b"PK\x06\x06"  # ZIP64 end record, then locator, then the classic one
    assert struct.unpack("<H", tail[-22 + 10 : -22 + 12])[0] == 0xFFFF  # count capped
    read_back(path, members)


@pytest.mark.parametrize("sentinels", [False, True])
def test_forced_zip64_sizes_and_offsets_read_back(tmp_path, sentinels) -> None:
    """The ZIP64 fields, reached with small data by lowering the limit where they start."""
    rng = random.Random(2)
    members = [
        ("small", b"s" * 10),
        ("whole", rng.randbytes(3000)),  # size past the limit, CRC in the local header
        ("streamed", [rng.randbytes(1500), rng.randbytes(1500)]),  # past it, data descriptor
        ("late", b"offset past the limit"),
    ]
    path = str(tmp_path / "zip64.zip")
    write(path, members, zip64_limit=1000, zip64_end_sentinels=sentinels)
    infos = read_back(path, members)
    assert infos[1].file_size > 1000 and infos[3].header_offset > 1000
    with open(path, "rb") as f:
        data = f.read()
    assert data[-98:-94] == b"PK\x06\x06"
    classic = struct.unpack("<HLL", data[-22 + 10 : -22 + 20])  # count, size, offset
    if sentinels:
        assert classic == (0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    else:  # each value capped at its field's maximum, as zipfile writes them
        assert classic[0] == len(members) and 1000 < classic[2] < 0xFFFFFFFF


def test_writes_are_strictly_sequential_into_a_non_seekable_sink() -> None:
    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            self.data += b
            return len(memoryview(b).cast("B"))

    pipe = Pipe()
    archive = _zip.ZipWriter(pipe)
    archive.add_streamed("w", [memoryview(b"x" * (2 << 20))])
    archive.finish()
    assert archive.position == len(pipe.data)
    with zipfile.ZipFile(io.BytesIO(bytes(pipe.data))) as z:
        assert z.testzip() is None and z.read("w") == b"x" * (2 << 20)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"unix_mode": 0o10000}, "unix_mode=4096"),
        ({"zip64_limit": 0}, "zip64_limit=0"),
        ({"zip64_limit": 1 << 32}, f"zip64_limit={1 << 32}"),
    ],
)
def test_bad_options_name_the_argument(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        _zip.ZipWriter(io.BytesIO(), **options)


def test_bad_align_names_the_argument() -> None:
    archive = _zip.ZipWriter(io.BytesIO())
    with pytest.raises(ValueError, match="align=0"):
        archive.add("a", b"", align=0)


def test_the_zip_module_imports_no_framework() -> None:
    """Both front-ends share it: a PyTorch user must not pay for importing Keras, and back."""
    code = (
        "import sys, keras_ckpt._zip; "
        "print(sorted({'keras', 'tensorflow', 'torch', 'h5py', 'numpy'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_without_isal_the_crcs_come_from_zlib_and_every_reader_accepts_them(tmp_path):
    # isal (ISA-L's CRC-32) is a dependency only where it has wheels; elsewhere zlib's runs.
    members = [("a", os.urandom(1000)), ("big", [os.urandom(3 << 20), os.urandom(9 << 20)])]
    with open(tmp_path / "members.pkl", "wb") as f:
        pickle.dump(members, f)
    script = (
        "import pickle, sys\n"
        "sys.modules['isal'] = None\n"  # an import of isal now fails
        "from keras_ckpt import _zip\n"
        "assert _zip.crc32.__module__ == 'zlib', _zip.crc32\n"
        "members = pickle.load(open(sys.argv[2], 'rb'))\n"
        "with open(sys.argv[1], 'wb') as f:\n"
        "    archive = _zip.ZipWriter(f)\n"
        "    for name, data in members:\n"
        "        if isinstance(data, list):\n"
        "            archive.add_streamed(name, [memoryview(part) for part in data])\n"
        "        else:\n"
        "            archive.add(name, data)\n"
        "    archive.finish()\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "z.zip"), str(tmp_path / "members.pkl")],
                   check=True, env=dict(os.environ, PYTHONPATH=root))
    read_back(str(tmp_path / "z.zip"), members)
