"""The other callbacks of a fit continue where they were: a resumed run behaves like a straight one.

Each test trains a tiny model straight through, and again as a fit that stops early (the
"interrupted" job) followed by a new model, new callbacks and ``fit(resume=True)`` (the restarted
job), and compares what the user sees: the epoch EarlyStopping stops at, the learning rate per
epoch, the CSV log, a custom callback's counters.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import keras_ckpt  # noqa: E402


def tiny_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def fit(model, callbacks, epochs):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 4)).astype("float32")
    return model.fit(x, x.sum(axis=1, keepdims=True), batch_size=8, epochs=epochs,
                     callbacks=callbacks, verbose=0)


class Script(keras.callbacks.Callback):
    """Puts a scripted ``score`` into the epoch logs, for the callbacks after it to monitor."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def on_epoch_end(self, epoch, logs=None):
        logs["score"] = self.values[epoch]


def weights(model):
    return [keras.ops.convert_to_numpy(v) for v in model.weights]


# -- EarlyStopping --------------------------------------------------------------------------------

# Best at epoch 2, then no improvement: with patience 3 it stops at the end of epoch 5.
STOP_SCORES = [5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 3.8, 3.9, 4.0, 4.1, 4.2, 4.3]


@pytest.mark.parametrize("order", ["ckpt-first", "ckpt-last"])
@pytest.mark.parametrize("template", ["c-{epoch}.keras", "c-{epoch}.weights.h5"])
def test_early_stopping_stops_at_the_same_epoch_after_a_resume(tmp_path, order, template):
    def run(directory, epochs, resume):
        early = keras.callbacks.EarlyStopping(monitor="score", mode="min", patience=3,
                                              restore_best_weights=True)
        ckpt = keras_ckpt.ModelCheckpoint(
            str(directory / template), save_weights_only=template.endswith(".weights.h5"),
            resume=resume)
        model = tiny_model()
        # The checkpoint callback saves its epoch's state after EarlyStopping's even when
        # listed first (it moves itself behind).
        callbacks = [Script(STOP_SCORES)] + ([ckpt, early] if order == "ckpt-first" else
                                             [early, ckpt])
        return model, early, fit(model, callbacks, epochs)

    straight, straight_early, hist = run(tmp_path / "a", 12, False)
    assert hist.epoch == [0, 1, 2, 3, 4, 5] and straight_early.stopped_epoch == 5

    run(tmp_path / "b", 5, False)  # interrupted after epoch 4: two epochs into its patience
    resumed, early, hist = run(tmp_path / "b", 12, True)
    assert hist.epoch == [5]
    assert (early.stopped_epoch, early.best_epoch, early.best) == (5, 2, 3.0)
    # restore_best_weights: both end on epoch 2's weights (kept in the checkpoint as arrays).
    for got, want in zip(weights(resumed), weights(straight)):
        assert got.tobytes() == want.tobytes()

    # The job restarted once more after EarlyStopping ended it: no further training.
    again, early, hist = run(tmp_path / "b", 12, True)
    assert hist.epoch == [] and early.stopped_epoch == 5
    for got, want in zip(weights(again), weights(straight)):
        assert got.tobytes() == want.tobytes()


# -- ReduceLROnPlateau -----------------------------------------------------------------------------

PLATEAU_SCORES = [5.0, 4.0, 4.5, 4.6, 4.7, 4.8, 4.9, 5.0, 3.0, 3.1]


@pytest.mark.parametrize("save_optimizer", [True, False])
def test_reduce_lr_on_plateau_gives_the_same_learning_rate_every_epoch(tmp_path, save_optimizer):
    def run(directory, epochs, resume):
        reduce = keras.callbacks.ReduceLROnPlateau(monitor="score", mode="min", factor=0.5,
                                                   patience=2, cooldown=1)
        ckpt = keras_ckpt.ModelCheckpoint(str(directory / "c-{epoch}.keras"), resume=resume,
                                          save_optimizer=save_optimizer)
        return fit(tiny_model(), [Script(PLATEAU_SCORES), ckpt, reduce], epochs)

    straight = run(tmp_path / "a", 10, False).history["learning_rate"]
    assert len(set(straight)) == 4  # reduced after epochs 3, 5 and 7
    # Interrupted after epoch 3 (its cooldown pending), then after epoch 4 (one epoch waited).
    first = run(tmp_path / "b", 4, False).history["learning_rate"]
    second = run(tmp_path / "b", 5, True).history["learning_rate"]
    third = run(tmp_path / "b", 10, True).history["learning_rate"]
    assert first + second + third == straight


# -- CSVLogger -------------------------------------------------------------------------------------


def test_csv_logger_has_every_epoch_once_after_a_resume(tmp_path):
    def run(directory, epochs, resume, log):
        ckpt = keras_ckpt.ModelCheckpoint(str(directory / "c-{epoch}.keras"), resume=resume)
        # Listed before the checkpoint callback: CSVLogger opens its file first.
        fit(tiny_model(), [keras.callbacks.CSVLogger(str(log)), ckpt], epochs)

    run(tmp_path / "a", 6, False, tmp_path / "a.csv")
    run(tmp_path / "b", 3, False, tmp_path / "b.csv")
    # The job died after logging epoch 3 but before its checkpoint: that row is logged again.
    with open(tmp_path / "b.csv", "a") as f:
        f.write("3,0.5\n")
    run(tmp_path / "b", 6, True, tmp_path / "b.csv")
    text = (tmp_path / "b.csv").read_text()
    assert [line.split(",")[0] for line in text.splitlines()] == ["epoch", "0", "1", "2", "3",
                                                                  "4", "5"]
    assert text == (tmp_path / "a.csv").read_text()  # exact resume: the same numbers too

    # resume=True with no checkpoint yet is a fresh start: the old log is overwritten.
    run(tmp_path / "c", 2, True, tmp_path / "b.csv")
    assert [line.split(",")[0] for line in (tmp_path / "b.csv").read_text().splitlines()] == [
        "epoch", "0", "1"]


# -- any callback with state_dict() / load_state_dict() ----------------------------------------


class BatchCounter(keras.callbacks.Callback):
    """Counts the batches seen and keeps every epoch's loss: its state is a dict with an array."""

    def __init__(self):
        super().__init__()
        self.batches, self.losses = 0, np.zeros(0)

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1

    def on_epoch_end(self, epoch, logs=None):
        self.losses = np.append(self.losses, logs["loss"])

    def state_dict(self):
        return {"batches": self.batches, "losses": self.losses}

    def load_state_dict(self, state):
        self.batches, self.losses = state["batches"], state["losses"]


def test_a_callback_with_state_dict_is_restored(tmp_path):
    def run(directory, epochs, resume):
        counter = BatchCounter()
        ckpt = keras_ckpt.ModelCheckpoint(str(directory / "c-{epoch}.keras"), resume=resume)
        fit(tiny_model(), [ckpt, counter], epochs)
        return counter

    straight = run(tmp_path / "a", 4, False)
    run(tmp_path / "b", 2, False)
    resumed = run(tmp_path / "b", 4, True)
    assert resumed.batches == straight.batches == 16
    assert resumed.losses.tobytes() == straight.losses.tobytes()


def test_a_state_dict_that_is_not_data_is_a_type_error_naming_the_callback(tmp_path):
    class Opaque(keras.callbacks.Callback):
        def state_dict(self):
            return {"handle": object()}

        def load_state_dict(self, state):
            pass

    ckpt = keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}.keras"))
    with pytest.raises(TypeError, match="callback Opaque"):
        fit(tiny_model(), [ckpt, Opaque()], 1)


def test_a_checkpoint_without_a_callbacks_state_warns_and_starts_it_fresh(tmp_path):
    path = str(tmp_path / "c-{epoch}.keras")
    fit(tiny_model(), [keras_ckpt.ModelCheckpoint(path)], 2)
    counter = BatchCounter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tiny_model(), [keras_ckpt.ModelCheckpoint(path, resume=True), counter], 3)
    assert any("no state for callback(s) BatchCounter" in str(w.message) for w in caught)
    assert counter.batches == 4


# -- the torch shim: the same through ``extra`` ---------------------------------------------------


def test_torch_extra_round_trips_a_grad_scaler_an_ema_and_a_sampler(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from keras_ckpt.torch import ModelCheckpoint

    class EpochSampler(torch.utils.data.Sampler):
        def __init__(self, n, seed=0):
            self.n, self.seed, self.epoch = n, seed, 0

        def __iter__(self):
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            return iter(torch.randperm(self.n, generator=g).tolist())

        def __len__(self):
            return self.n

        def state_dict(self):
            return {"seed": self.seed, "epoch": self.epoch}

        def load_state_dict(self, state):
            self.seed, self.epoch = state["seed"], state["epoch"]

    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g),
                                          torch.randn(32, 1, generator=g))

    def run(directory, epochs, resume):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=3)
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        sampler = EpochSampler(len(data), seed=7)
        ckpt = ModelCheckpoint(str(directory / "c-{epoch}.pt"), model=model, optimizer=opt,
                               extra={"scaler": scaler, "ema": ema, "sampler": sampler},
                               resume=resume)
        for epoch in range(ckpt.on_train_begin(), epochs):
            sampler.epoch = epoch
            for x, y in torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler):
                opt.zero_grad()
                scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
                scaler.step(opt)
                scaler.update()
                ema.update_parameters(model)
            ckpt.on_epoch_end(epoch, logs={"val_loss": 1.0})
        ckpt.on_train_end()
        return scaler, ema, sampler

    straight = run(tmp_path / "a", 4, False)
    run(tmp_path / "b", 2, False)
    scaler, ema, sampler = run(tmp_path / "b", 4, True)
    assert scaler.get_scale() == straight[0].get_scale() > 2.0**4  # it grew: its tracker came back
    assert sampler.epoch == straight[2].epoch == 3
    assert int(ema.n_averaged) == int(straight[1].n_averaged) == 16
    for got, want in zip(ema.parameters(), straight[1].parameters()):
        assert torch.equal(got, want)
