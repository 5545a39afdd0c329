"""The front-end-neutral lifecycle, driven by hand with a byte payload (no framework)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from keras_ckpt.checkpointer import Checkpointer as _Checkpointer
from keras_ckpt.checkpointer import Payload
from keras_ckpt.config import CheckpointConfig


def Checkpointer(filepath, *, framework, **arguments):  # noqa: N802 -- reads as the class it builds
    """The front-ends' construction: validated arguments, then the lifecycle."""
    return _Checkpointer(CheckpointConfig(filepath, **arguments), framework=framework)


def write_epoch(tag):
    def capture(path, state, snapshot):
        def write(tx):
            with tx.open() as f:
                f.write(tag.encode())
        return Payload(write, detached=True)  # the tag is immutable: a snapshot already
    return capture


def run(ck, values, batches_per_epoch=0):
    ck.begin()
    for epoch, value in enumerate(values):
        ck.on_epoch_begin(epoch)
        for batch in range(batches_per_epoch):
            ck.step += 1
            if ck.batch_due(batch):
                ck.save(epoch, batch, {"val_loss": value}, write_epoch(f"{epoch}-{batch}"))
        ck.step += 1
        if ck.epoch_due(epoch):
            ck.save(epoch, None, {"val_loss": value}, write_epoch(f"{epoch}"))


def test_nan_never_overwrites_the_best_with_save_best_only(tmp_path):
    ck = Checkpointer(str(tmp_path / "best.bin"), framework="t", save_best_only=True)
    run(ck, [0.5, math.nan, 0.7])
    assert (tmp_path / "best.bin").read_bytes() == b"0"
    assert ck.best == 0.5 and ck.best_path == str(tmp_path / "best.bin")


def test_overwriting_the_best_with_a_worse_save_forgets_its_path(tmp_path):
    ck = Checkpointer(str(tmp_path / "model.bin"), framework="t")
    run(ck, [0.5, 0.9])
    assert ck.best == 0.5 and ck.best_path is None  # no file holds the 0.5 model any more


def test_initial_value_threshold_is_checked_and_numpy_scalars_work(tmp_path):
    with pytest.raises(ValueError, match="Received: initial_value_threshold='0.1x'"):
        Checkpointer(str(tmp_path / "m.bin"), framework="t", initial_value_threshold="0.1x")
    ck = Checkpointer(str(tmp_path / "m.bin"), framework="t", save_best_only=True,
                      initial_value_threshold=np.float32(0.6))
    run(ck, [0.7, 0.55])
    assert [r.epoch for r in ck.checkpoints] == [2] and ck.best == 0.55


def test_every_n_epochs_keeps_the_end_of_epoch_save_despite_mid_epoch_saves(tmp_path):
    ck = Checkpointer(str(tmp_path / "c-{epoch:02d}-{tag}.bin"), framework="t", max_to_keep=1,
                      keep_every_n_epochs=2, save_every_n_seconds=1e-9, monitor="val_loss")
    ck.begin()
    for epoch in range(4):
        ck.on_epoch_begin(epoch)
        for batch in range(3):  # the clock is due at every batch end: mid-epoch saves
            if ck.batch_due(batch):
                ck.save(epoch, batch, {"tag": batch + 1}, write_epoch(f"{epoch}-{batch}"))
        if ck.epoch_due(epoch):
            ck.save(epoch, None, {"tag": 0}, write_epoch(f"{epoch}"))
    kept = {r.name: r.kept for r in ck.checkpoints}
    # c-03-* are saves in the middle of the 3rd epoch: 2 epochs done, like c-02-0's end of epoch 2
    assert kept["c-02-0"] == ("every_n_epochs",) and kept["c-04-0"] == ("latest", "every_n_epochs")
    assert set(kept) == {"c-02-0", "c-04-0"}


def test_a_batch_template_with_epoch_end_saves_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"\{batch\}.*save_freq='epoch'.*Received: filepath=.*c-"):
        Checkpointer(str(tmp_path / "c-{epoch}-{batch:03d}.bin"), framework="t")


def test_an_epoch_end_save_under_a_batch_template_is_named_after_the_last_batch(tmp_path):
    # A preemption at an epoch's end saves with no batch: the name is the epoch's last batch's.
    ck = Checkpointer(str(tmp_path / "c-{epoch}-{batch}.bin"), framework="t", save_freq=100,
                      max_to_keep=None)
    ck.begin()
    ck.on_epoch_begin(0)
    for batch in range(5):
        ck.step += 1
        assert not ck.batch_due(batch)
    ck.save(0, None, {"loss": 0.5}, write_epoch("end"))
    assert (tmp_path / "c-1-5.bin").read_bytes() == b"end"
    assert [r.name for r in ck.checkpoints] == ["c-1-5"]
