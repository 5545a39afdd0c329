"""A real full filesystem (an 8 MB tmpfs): a failed save raises OSError and changes nothing."""

from __future__ import annotations

import os

import pytest

from keras_ckpt import manifest as mf
from keras_ckpt.engine import Engine, verify
from keras_ckpt.policy import RetentionPolicy


def engine_in(directory, template="ck-{epoch}.bin"):
    e = Engine(os.path.join(directory, template), framework="t",
               policy=RetentionPolicy(max_to_keep=2, keep_best=1, monitor="m"))
    e.open()
    return e


def save(e, epoch, nbytes, value):
    with e.transaction(os.path.join(e.directory, e.series.format(epoch=epoch)), epoch=epoch, step=epoch,
                       metrics={"m": value}) as tx:
        f = tx.open()
        chunk = bytes([epoch]) * (1 << 16)
        left = nbytes
        while left:
            left -= f.write(chunk[: min(left, len(chunk))])


def state_of(e, directory):
    files = {n: open(os.path.join(directory, n), "rb").read() for n in os.listdir(directory)
             if n != ".checkpoints.lock"}
    return files, e.records, e.best, e.best_path


def assert_failed_cleanly(e, directory, before, err):
    assert err.value.errno is not None and "No space left" in str(err.value)
    assert str(directory) in str(err.value)
    assert state_of(e, directory) == before  # no file, manifest byte or in-memory value changed
    assert not [n for n in os.listdir(directory) if n.startswith(".keras_ckpt-tmp")]
    for r in mf.load(str(directory)).checkpoints:
        assert verify(str(directory), r) is None


def test_data_write_hits_enospc(small_disk):
    e = engine_in(small_disk)
    save(e, 1, 1 << 20, 0.5)
    before = state_of(e, small_disk)
    with pytest.raises(OSError) as err:
        save(e, 2, 9 << 20, 0.1)  # does not fit
    assert_failed_cleanly(e, small_disk, before, err)
    assert "ck-2.bin" in str(err.value)
    save(e, 3, 1 << 20, 0.4)  # and the next save that fits works
    assert [r.name for r in e.records] == ["ck-1", "ck-3"]


def test_manifest_write_hits_enospc(small_disk):
    e = engine_in(small_disk)
    save(e, 1, 1 << 20, 0.5)
    before = state_of(e, small_disk)
    # Fill the disk so the checkpoint's bytes fit exactly and the manifest write cannot.
    st = os.statvfs(small_disk)
    free = st.f_bavail * st.f_frsize
    with pytest.raises(OSError) as err:
        save(e, 2, free, 0.1)
    assert_failed_cleanly(e, small_disk, before, err)
    assert "checkpoints.json" in str(err.value)
    assert e.best == 0.5 and e.best_path.endswith("ck-1.bin")


def test_keras_save_on_a_full_disk_raises_oserror_and_keeps_the_committed_checkpoint(small_disk):
    keras = pytest.importorskip("keras")
    import numpy as np

    import keras_ckpt

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(64), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    x, y = np.ones((8, 4), "float32"), np.ones((8, 1), "float32")
    template = str(small_disk / "ck-{epoch}.keras")
    model.fit(x, y, epochs=1, verbose=0, callbacks=[keras_ckpt.ModelCheckpoint(template, max_to_keep=3)])
    committed = (small_disk / "ck-1.keras").read_bytes()
    st = os.statvfs(small_disk)
    with open(small_disk / "filler", "wb") as f:  # leave less room than one checkpoint needs
        f.write(b"\0" * (st.f_bavail * st.f_frsize - len(committed) // 2))
    ckpt = keras_ckpt.ModelCheckpoint(template, max_to_keep=3, resume=True)
    with pytest.raises(OSError, match="No space left on device") as err:
        model.fit(x, y, epochs=3, verbose=0, callbacks=[ckpt])
    assert "ck-2.keras" in str(err.value)
    assert (small_disk / "ck-1.keras").read_bytes() == committed
    assert not [n for n in os.listdir(small_disk) if n.startswith(".keras_ckpt-tmp")]
    assert [r.name for r in mf.load(str(small_disk)).checkpoints] == ["ck-1"]
    assert verify(str(small_disk), mf.load(str(small_disk)).checkpoints[0]) is None
    os.remove(small_disk / "filler")
    again = keras_ckpt.ModelCheckpoint(template, max_to_keep=3, resume=True)
    assert model.fit(x, y, epochs=2, verbose=0, callbacks=[again]).epoch == [1]  # the same process goes on
