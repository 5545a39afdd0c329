"""Mid-epoch resume without replay, the unlucky cases: a damaged or older mid-epoch checkpoint,
a fit() that raises inside the resumed epoch, steps_per_execution's short last group."""

from __future__ import annotations

import json
import os
import zipfile

import h5py
import keras
import numpy as np
import pytest

import keras_ckpt
from keras_ckpt import _kerasio
from keras_ckpt import manifest as mf


class Crash(Exception):
    pass


def _data(n=96):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype("float32")
    return x, (x[:, 0] + x[:, 1] > 0).astype("int32")


def _model(steps_per_execution=1):
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dropout(0.3), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], steps_per_execution=steps_per_execution)
    return model


def _iterations(model):
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


class Steps(keras.callbacks.Callback):
    """Records the optimizer's step after each batch; raises after step ``crash_at``."""

    def __init__(self, crash_at=None):
        super().__init__()
        self.crash_at, self.seen = crash_at, []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append((batch, _iterations(self.model)))
        if self.seen[-1][1] == self.crash_at:
            raise Crash


def _fit(directory, *, resume=False, crash_at=None, model=None, epochs=3, callbacks=(), **fit):
    """save_freq=3 over 5 batches an epoch: saves after steps 3, 6, 9, ... (mid-epoch)."""
    x, y = _data()
    model = model or _model()
    ckpt = keras_ckpt.ModelCheckpoint(
        os.path.join(directory, "c-{epoch:02d}-{batch:02d}.keras"), monitor="loss", save_freq=3,
        max_to_keep=None, resume=resume,
    )
    steps = Steps(crash_at)
    fit = {"batch_size": 16, "validation_split": 0.25, "shuffle": True, "verbose": 0, **fit}
    try:
        model.fit(x, y, epochs=epochs, callbacks=[ckpt, steps, *callbacks], **fit)
    except Crash:
        pass
    return model, ckpt, steps


def _newest(directory):
    records = mf.load(str(directory)).checkpoints
    return os.path.join(str(directory), max(records, key=lambda r: r.seq).path)


def _craft(src, dst, mutate):
    """A copy of the .keras checkpoint ``src`` whose embedded training state ``mutate`` edited,
    as a damaged file or an older keras_ckpt would have it (a bare file: no checksum to pass)."""
    with zipfile.ZipFile(src) as z:
        members = {name: z.read(name) for name in z.namelist()}
    weights = str(dst) + ".h5"
    with open(weights, "wb") as f:
        f.write(members["model.weights.h5"])
    with h5py.File(weights, "r+") as h:
        state = json.loads(bytes(h[_kerasio.STATE_MEMBER][()]).decode())
        mutate(state)
        del h[_kerasio.STATE_MEMBER]
        h.create_dataset(_kerasio.STATE_MEMBER,
                         data=np.frombuffer(json.dumps(state).encode(), dtype=np.uint8))
    with open(weights, "rb") as f:
        members["model.weights.h5"] = f.read()
    os.remove(weights)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return str(dst)


@pytest.fixture(scope="module")
def mid_epoch_checkpoint(tmp_path_factory):
    """The newest checkpoint of a run killed after step 13: saved after step 12, mid-epoch 3."""
    d = tmp_path_factory.mktemp("killed")
    _fit(d, crash_at=13)
    return _newest(d)


@pytest.mark.parametrize("batch", [-5, 1.5, float("nan"), "3", [1], True])
def test_a_damaged_batch_number_is_refused_before_training(tmp_path, mid_epoch_checkpoint, batch):
    bare = _craft(mid_epoch_checkpoint, tmp_path / "bare.keras",
                  lambda s: s.update(batch=batch))
    model = _model()
    with pytest.raises(ValueError, match="batch must be a non-negative integer"):
        _fit(tmp_path / "c", resume=bare, model=model)
    assert _iterations(model) == 0  # refused before anything was loaded, nothing trained


@pytest.mark.parametrize("epoch_rng", ["garbage", [1, 2], {"rng": "x"},
                                       {"rng": {"numpy": {"keys": [1, 2, 3]}}},
                                       {"rng": {"python": {"version": 3, "state": [1]}}}])
def test_a_damaged_epoch_rng_warns_and_the_epoch_resumes(tmp_path, mid_epoch_checkpoint, epoch_rng):
    bare = _craft(mid_epoch_checkpoint, tmp_path / "bare.keras",
                  lambda s: s.update(epoch_rng=epoch_rng))
    with pytest.warns(UserWarning, match="epoch_rng.*damaged.*drawn anew"):
        model, ckpt, steps = _fit(tmp_path / "c", resume=bare)
    # Batches 3..5 of the interrupted epoch, then epoch 3 (15 steps in all, each trained once).
    assert [s for _, s in steps.seen] == list(range(13, 16))
    # Its later saves carry no damaged state on.
    state = json.loads(_kerasio.read_state(_newest(tmp_path / "c")))
    assert "epoch_rng" not in state


def test_an_older_mid_epoch_checkpoint_resumes_with_warnings(tmp_path, mid_epoch_checkpoint):
    def older(state):
        del state["epoch_rng"], state["keras"]["fit_metrics"]

    bare = _craft(mid_epoch_checkpoint, tmp_path / "bare.keras", older)
    with pytest.warns(UserWarning) as caught:
        _, _, steps = _fit(tmp_path / "c", resume=bare)
    messages = " ".join(str(w.message) for w in caught)
    assert "no epoch-begin RNG state" in messages and "no running metrics" in messages
    assert [s for _, s in steps.seen] == list(range(13, 16))


@pytest.mark.parametrize("fit_metrics", ["x", "dict", "strings", "ragged", "huge"])
def test_damaged_running_metrics_warn_and_the_epoch_resumes(tmp_path, mid_epoch_checkpoint,
                                                            fit_metrics):
    def damage(state):
        n = len(state["keras"]["fit_metrics"])
        values = {"dict": {"a": 1}, "strings": ["a"] * n, "ragged": [[1, [2]]] * n,
                  "huge": [10**400] * n}
        state["keras"]["fit_metrics"] = values.get(fit_metrics, fit_metrics)

    bare = _craft(mid_epoch_checkpoint, tmp_path / "bare.keras", damage)
    with pytest.warns(UserWarning, match="running metrics that do not fit this model"):
        _, _, steps = _fit(tmp_path / "c", resume=bare)
    assert [s for _, s in steps.seen] == list(range(13, 16))


class Boom(Exception):
    pass


class RaiseAtFirstBatchBegin(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.armed = True

    def on_train_batch_begin(self, batch, logs=None):
        if self.armed:
            self.armed = False
            raise Boom


def test_a_fit_that_raises_before_the_replayed_step_leaves_the_next_fit_training(tmp_path):
    # Saved after the epoch's last batch (step 15): the resumed fit steps through that batch once
    # without training. If fit raises just before that step, the next fit's first step trains.
    d = tmp_path / "run"
    _fit(d, crash_at=15)
    model = _model()
    with pytest.raises(Boom):
        _fit(d, resume=True, model=model, callbacks=[RaiseAtFirstBatchBegin()])
    assert _iterations(model) == 15
    _, _, steps = _fit(d, model=model, epochs=1)
    assert [s for _, s in steps.seen] == list(range(16, 21))


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="steps_per_execution is 1 there")
def test_saved_after_a_short_last_group_of_steps_per_execution_resumes(tmp_path):
    # steps_per_execution=2 over 5 batches: the groups are (0, 1), (2, 3), (4, 5) and Keras calls
    # the batch end of the last one (one batch) 5. The save after step 10 is "after batch 5".
    d = tmp_path / "run"
    _fit(d, model=_model(2), epochs=2)
    newest = mf.load(str(d)).checkpoints[-1]
    assert newest.step == 10 and newest.name.endswith("02-06")
    model, _, steps = _fit(d, resume=True, model=_model(2), epochs=3)
    # The saved group is stepped through without training, then epoch 3 trains.
    assert steps.seen == [(5, 10), (1, 12), (3, 14), (5, 15)]
    assert _iterations(model) == 15

