"""Manifest, atomic storage and the engine's commit/prune/restore order, on real files."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from _engine_helpers import make_engine, save

from keras_ckpt import manifest as mf
from keras_ckpt.engine import Engine, in_flight, locate, verify
from keras_ckpt.policy import RetentionPolicy


def test_manifest_schema_and_files(tmp_path):
    e = make_engine(tmp_path, max_to_keep=2, keep_best=1)
    for epoch, v in enumerate([0.5, 0.2, 0.4, 0.3], start=1):
        save(e, epoch, v)
    data = json.loads((tmp_path / "checkpoints.json").read_text())
    assert data["format"] == 1 and data["writer"].startswith("keras_ckpt ")
    series = data["series"]["ck-{epoch:03d}.bin"]
    assert series["best"] == 0.2 and series["best_name"] == "ck-002" and series["mode"] == "min"
    names = [c["name"] for c in data["checkpoints"]]
    assert names == ["ck-002", "ck-003", "ck-004"]
    first = data["checkpoints"][0]
    assert first["kept"] == ["best"] and first["epoch"] == 2 and first["step"] == 20
    assert first["files"][0]["path"] == "ck-002.bin" and first["files"][0]["bytes"] == 1000
    assert len(first["files"][0]["xxh3_128"]) == 32
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "checkpoints.json", "ck-002.bin", "ck-003.bin", "ck-004.bin"]


def test_two_series_share_a_directory(tmp_path):
    a = make_engine(tmp_path, "a-{epoch}.bin", max_to_keep=1)
    b = make_engine(tmp_path, "b-{epoch}.bin", max_to_keep=2, monitor=None)
    for epoch in range(1, 5):
        save(a, epoch, 1.0 / epoch)
        save(b, epoch, 1.0)
    files = sorted(p.name for p in tmp_path.glob("*.bin"))
    assert files == ["a-4.bin", "b-3.bin", "b-4.bin"]
    m = mf.load(str(tmp_path))
    assert set(m.series) == {"a-{epoch}.bin", "b-{epoch}.bin"}


def test_foreign_files_are_never_deleted(tmp_path):
    (tmp_path / "ck-001.bin").write_bytes(b"stock keras file")
    e = make_engine(tmp_path, max_to_keep=1, monitor=None)
    for epoch in range(2, 5):
        save(e, epoch, 0.0)
    assert (tmp_path / "ck-001.bin").read_bytes() == b"stock keras file"


def test_foreign_directory_detected(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"...")
    assert Engine(str(tmp_path / "c-{epoch}.keras"), framework="t",
                  policy=RetentionPolicy()).has_foreign_checkpoints()


def test_corrupt_newest_is_skipped_with_a_warning(tmp_path):
    e = make_engine(tmp_path, max_to_keep=3)
    for epoch in range(1, 4):
        save(e, epoch, 0.1, payload=os.urandom(4096))
    with open(tmp_path / "ck-003.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    (tmp_path / "ck-002.bin").write_bytes(b"truncated")
    with pytest.warns(UserWarning) as rec:
        good = e.latest_valid()
    assert good.name == "ck-001"
    messages = [str(w.message) for w in rec]
    assert any("'ck-003'" in m and "checksum" in m for m in messages)
    assert any("'ck-002'" in m and "9 bytes" in m for m in messages)


def test_newer_format_is_refused_and_unknown_keys_tolerated(tmp_path):
    e = make_engine(tmp_path)
    save(e, 1, 0.3)
    data = json.loads((tmp_path / "checkpoints.json").read_text())
    data["future_key"] = {"x": 1}
    data["checkpoints"][0]["future_field"] = 3
    (tmp_path / "checkpoints.json").write_text(json.dumps(data))
    assert [r.name for r in mf.load(str(tmp_path)).checkpoints] == ["ck-001"]
    save(make_engine(tmp_path), 2, 0.2)
    assert json.loads((tmp_path / "checkpoints.json").read_text())["future_key"] == {"x": 1}
    data["format"] = 99
    (tmp_path / "checkpoints.json").write_text(json.dumps(data))
    with pytest.raises(mf.ManifestError, match="format 99, newer"):
        mf.load(str(tmp_path))


def test_failed_write_leaves_nothing(tmp_path):
    e = make_engine(tmp_path)
    save(e, 1, 0.3)
    with pytest.raises(RuntimeError, match="boom"):
        with e.transaction(str(tmp_path / "ck-002.bin"), epoch=2, step=0) as tx:
            with tx.open() as f:
                f.write(b"partial")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "checkpoints.json", "ck-001.bin"]
    assert [r.name for r in e.records] == ["ck-001"]


@pytest.mark.parametrize("fails", [False, True], ids=["committed", "failed"])
def test_a_save_leaves_no_file_object_for_a_finalizer_to_close(tmp_path, fails):
    # IOBase's finalizer calls close() and silently drops what it raises, a KeyboardInterrupt
    # arriving just then included: a Ctrl-C at the end of a save would be lost and training go
    # on. The transaction closes the file objects it handed out (not closed by the writer here).
    e = make_engine(tmp_path)
    handed_out = []
    with contextlib.suppress(RuntimeError):
        with e.transaction(str(tmp_path / "ck-001.bin"), epoch=1, step=0) as tx:
            handed_out.append(tx.open())
            handed_out[0].write(b"payload")
            if fails:
                raise RuntimeError("boom")
    assert handed_out[0].closed
    assert [r.name for r in e.records] == ([] if fails else ["ck-001"])


def test_replacing_a_single_file_and_best_survives_reload(tmp_path):
    e = make_engine(tmp_path, "best.bin", monitor="val_loss")
    save(e, 1, 0.5, payload=b"one")
    save(e, 2, 0.3, payload=b"two")
    assert (tmp_path / "best.bin").read_bytes() == b"two"
    assert [r.epoch for r in e.records] == [2]
    e2 = make_engine(tmp_path, "best.bin")
    assert e2.best == 0.3 and e2.best_path == str(tmp_path / "best.bin")


def test_report_attaches_metrics_and_reapplies_retention(tmp_path):
    e = make_engine(tmp_path, max_to_keep=1, keep_best=1, monitor="acc", mode="max")
    for epoch in range(1, 4):
        with e.transaction(str(tmp_path / f"ck-{epoch:03d}.bin"), epoch=epoch, step=epoch,
                           pending=True) as tx:
            with tx.open() as f:
                f.write(b"x")
    assert len(e.records) == 3  # all pending: protected
    e.report("ck-001", {"acc": 0.9})
    e.report("ck-002", {"acc": 0.5})
    e.report("ck-003", {"acc": 0.6})
    assert [r.name for r in e.records] == ["ck-001", "ck-003"]
    assert e.best == 0.9


def test_locate_reads_another_directory_without_writing(tmp_path):
    src = tmp_path / "src"
    e = make_engine(src, max_to_keep=2)
    for epoch in range(1, 4):
        save(e, epoch, 0.1)
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    os.chmod(src, 0o555)
    try:
        path, record, _ = locate(str(src))
        assert os.path.basename(path) == "ck-003.bin" and record.epoch == 3
        path, record, _ = locate(str(src / "ck-002.bin"))
        assert record.name == "ck-002" and verify(str(src), record) is None
    finally:
        os.chmod(src, 0o755)
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before


CRASH_WRITER = r"""
import os, sys
from keras_ckpt.engine import Engine
from keras_ckpt.policy import RetentionPolicy
d, template = sys.argv[1], sys.argv[2]
rotate = "{" in template
e = Engine(os.path.join(d, template), framework="t",
           policy=RetentionPolicy(max_to_keep=2 if rotate else None, keep_best=int(rotate), monitor="m"))
e.open()
epoch = len(e.records) and e.records[-1].epoch
while True:
    epoch += 1
    payload = bytes([epoch % 251]) * (3 << 20)
    with e.transaction(os.path.join(d, template.format(epoch=epoch)), epoch=epoch, step=epoch,
                       metrics={"m": (epoch * 7919) % 13}) as tx:
        with tx.open() as f:
            for i in range(0, len(payload), 1 << 20):
                f.write(payload[i:i + (1 << 20)])
    print(epoch, flush=True)
"""


@pytest.mark.parametrize("template", ["ck-{epoch:05d}.bin", "model.bin"])
def test_sigkill_at_random_instants_never_breaks_committed_state(tmp_path, template):
    """Rotation (many names) and in-place overwrite (one name) both survive kill -9 anywhere."""
    script = tmp_path / "writer.py"
    script.write_text(CRASH_WRITER)
    d = tmp_path / "ckpts"
    d.mkdir()
    import random

    rnd = random.Random(1234)
    last_epoch = 0
    for _ in range(8):
        p = subprocess.Popen([sys.executable, str(script), str(d), template], stdout=subprocess.PIPE)
        time.sleep(0.4 + rnd.random() * 0.6)
        p.send_signal(signal.SIGKILL)
        p.wait()
        m = mf.load(str(d))
        assert m.checkpoints, "at least one checkpoint committed"
        for r in m.checkpoints:  # what a reader sees before anyone finishes the commit
            assert verify(str(d), r, in_flight(m)) is None, r.name
        e = Engine(str(d / template), framework="t", policy=RetentionPolicy(monitor="m"))
        e.open()  # finishes or rolls back what the kill interrupted
        e.close()
        m = mf.load(str(d))
        assert m.intent is None
        for r in m.checkpoints:
            assert verify(str(d), r) is None, r.name
            assert (d / r.path).read_bytes()[0] == r.epoch % 251
        on_disk = {p.name for p in d.iterdir()} - {"checkpoints.json", ".checkpoints.lock"}
        assert on_disk == m.listed_files(), "after the next open only listed files remain"
        newest = max(r.epoch for r in m.checkpoints)
        assert newest >= last_epoch
        last_epoch = newest
        assert len(m.checkpoints) <= 3  # latest 2 + best 1


CRASH_AT = r"""
import os, sys
from keras_ckpt import storage
from keras_ckpt.engine import Engine
from keras_ckpt.policy import RetentionPolicy
d, template, what, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
calls = {"rename": 0, "write_atomic": 0, "delete": 0}
for name in calls:
    original = getattr(storage.LocalStorage, name)
    def patched(self, *a, _name=name, _orig=original):
        calls[_name] += 1
        if _name == what and calls[_name] == n:
            os._exit(9)  # dies exactly here, like kill -9
        return _orig(self, *a)
    setattr(storage.LocalStorage, name, patched)
rotate = "{" in template
e = Engine(os.path.join(d, template), framework="t",
           policy=RetentionPolicy(max_to_keep=1 if rotate else None, monitor="m"))
e.open()
epoch = max([r.epoch for r in e.records], default=0)
for _ in range(3):
    epoch += 1
    with e.transaction(os.path.join(d, template.format(epoch=epoch)), epoch=epoch, step=epoch,
                       metrics={"m": 1.0 / epoch}) as tx:
        with tx.open() as f:
            f.write(bytes([epoch]) * 5000)
"""


@pytest.mark.parametrize("template", ["ck-{epoch}.bin", "model.bin"])
@pytest.mark.parametrize("what,n", [
    ("write_atomic", 1), ("write_atomic", 2), ("write_atomic", 3), ("write_atomic", 4),
    ("rename", 1), ("rename", 2), ("delete", 1),
])
def test_killed_at_each_step_of_the_commit(tmp_path, template, what, n):
    """Death before the intent, between intent and rename, rename and commit, commit and delete."""
    script = tmp_path / "writer.py"
    script.write_text(CRASH_AT)
    d = tmp_path / "ckpts"
    d.mkdir()
    r = subprocess.run([sys.executable, str(script), str(d), template, what, str(n)])
    assert r.returncode in (0, 9)
    e = Engine(str(d / template), framework="t", policy=RetentionPolicy(monitor="m"))
    e.open()
    m = mf.load(str(d))
    assert m.intent is None
    for rec in m.checkpoints:
        assert verify(str(d), rec) is None
        assert (d / rec.path).read_bytes() == bytes([rec.epoch]) * 5000
    on_disk = {p.name for p in d.iterdir()} - {"checkpoints.json", ".checkpoints.lock"}
    assert on_disk == m.listed_files()
    # And it goes on: the next save commits on top of whatever was recovered.
    save(e, 9, 0.01, template=template)
    assert e.records[-1].epoch == 9 and verify(str(d), e.records[-1]) is None


def test_multi_file_overwrite_cut_short_is_corrupt_for_readers(tmp_path):
    import xxhash

    from keras_ckpt.manifest import FileEntry

    e = make_engine(tmp_path, "m.index")
    with e.transaction(str(tmp_path / "m.index"), epoch=1, step=1) as tx:
        for name in ("m.index", "m.data-00000-of-00001"):
            with tx.open(name) as f:
                f.write(b"old " + name.encode())
    new = {n: b"new " + n.encode() for n in ("m.index", "m.data-00000-of-00001")}
    incoming = {n: FileEntry(n, len(b), xxhash.xxh3_128_hexdigest(b)) for n, b in new.items()}
    record = mf.load(str(tmp_path)).checkpoints[0]
    assert verify(str(tmp_path), record, incoming) is None  # all old
    (tmp_path / "m.index").write_bytes(new["m.index"])  # killed after the first rename
    assert "mix two saves" in verify(str(tmp_path), record, incoming)
    (tmp_path / "m.data-00000-of-00001").write_bytes(new["m.data-00000-of-00001"])
    assert verify(str(tmp_path), record, incoming) is None  # all new
