"""The private Keras APIs keras_ckpt uses exist on this Keras, and the public fallbacks work."""

from __future__ import annotations

import warnings
import zipfile

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import keras_ckpt  # noqa: E402
from keras_ckpt import _compat, _kerasio  # noqa: E402


@pytest.mark.parametrize("api", _compat.KERAS, ids=lambda api: api.name)
def test_each_private_keras_api_exists_with_the_parameters_we_pass(api):
    _compat.check(api)
    assert _compat.available(api)


def test_fit_still_starts_at_model_initial_epoch():
    # What resume relies on: fit() reads the attribute, so it must still be a per-model setting.
    model = _model()
    assert "_initial_epoch" in vars(model)
    model._initial_epoch = 2
    x, y = _data()
    assert model.fit(x, y, epochs=4, verbose=0).epoch == [2, 3]


def test_format_names_match_keras():
    assert (_kerasio._WEIGHTS_MEMBER, _kerasio._CONFIG_MEMBER, _kerasio._METADATA_MEMBER,
            _kerasio._ASSETS_DIR) == ("model.weights.h5", "config.json", "metadata.json", "assets")


def _model():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def _data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 4)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def _values(model):
    return [keras.ops.convert_to_numpy(v) for v in model.weights + model.optimizer.variables]


class _Probe(keras.callbacks.Callback):
    """Records the model's values right after the checkpoint callback restored them."""

    def on_train_begin(self, logs=None):
        self.restored = _values(self.model)


@pytest.fixture
def no_private_keras(monkeypatch):
    real = _compat.available
    monkeypatch.setattr(_compat, "available", lambda api: api.framework != "keras" and real(api))
    assert not _kerasio.fast_write_available() and not _kerasio.fast_read_available()


@pytest.mark.parametrize(
    "template, kwargs",
    [("c-{epoch}.keras", {}), ("c-{epoch}.weights.h5", {"save_weights_only": True}),
     ("c-{epoch}.keras", {"save_optimizer": False})],
    ids=["keras", "weights.h5", "keras-no-optimizer"],
)
def test_save_and_resume_through_keras_public_writers_are_exact(
    tmp_path, no_private_keras, template, kwargs
):
    x, y = _data()
    path = str(tmp_path / template)
    first = _model()
    first.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[keras_ckpt.ModelCheckpoint(path, **kwargs)])
    saved = _values(first)
    if template.endswith(".keras"):  # written by Keras's zipfile writer, not the streaming one
        with zipfile.ZipFile(tmp_path / "c-2.keras") as archive:
            assert not archive.getinfo("model.weights.h5").flag_bits & 0x08
        with warnings.catch_warnings():  # without the optimizer, Keras says it starts fresh
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            loaded = keras.models.load_model(tmp_path / "c-2.keras")  # still a stock Keras file
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), first.predict(x, verbose=0))

    resumed, probe = _model(), _Probe()
    ckpt = keras_ckpt.ModelCheckpoint(path, resume=True, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*optimizer", category=UserWarning)
        hist = resumed.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0,
                           callbacks=[ckpt, probe])
    assert ckpt.restored_path == str(tmp_path / template.format(epoch=2))
    assert hist.epoch == [2, 3]
    n_weights = len(first.weights)
    expected = saved if kwargs.get("save_optimizer", True) else saved[:n_weights]
    for got, want in zip(probe.restored, expected):
        assert got.tobytes() == want.tobytes()
    if kwargs.get("save_optimizer", True):
        first.fit(x, y, batch_size=8, epochs=4, initial_epoch=2, shuffle=False, verbose=0)
        for got, want in zip(_values(resumed), _values(first)):  # and it trains on identically
            assert got.tobytes() == want.tobytes()
    else:
        assert int(keras.ops.convert_to_numpy(resumed.optimizer.iterations)) == 8  # fresh + 8


def test_without_keras_saveable_walk_resume_loads_after_the_checksum_and_is_exact(tmp_path, monkeypatch):
    # The held-back loading walk (the TF backend's resume) needs Keras's saveable walk to see
    # which loaders only assign; without it the variables load after the checksum, as before.
    real = _compat.available
    monkeypatch.setattr(_compat, "available",
                        lambda api: api is not _compat.KERAS_WALK_SAVEABLE and real(api))
    x, y = _data()
    path = str(tmp_path / "c-{epoch}.weights.h5")
    first = _model()
    first.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[keras_ckpt.ModelCheckpoint(path, save_weights_only=True)])
    resumed, probe = _model(), _Probe()
    resumed.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[
        keras_ckpt.ModelCheckpoint(path, save_weights_only=True, resume=True), probe])
    for got, want in zip(probe.restored, _values(first)):
        assert got.tobytes() == want.tobytes()


def test_callback_list_calls_set_model_from_its_own_method_and_dispatches_its_callbacks_list():
    # What _callbacks.Siblings relies on: the caller of a callback's set_model is the
    # CallbackList (its frame's self), whose .callbacks holds the callbacks, and a list assigned
    # to .callbacks is the order the events go out in.
    import inspect

    seen, calls = [], []

    class Spy(keras.callbacks.Callback):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def set_model(self, model):
            super().set_model(model)
            seen.append(inspect.currentframe().f_back.f_locals.get("self"))

        def on_epoch_end(self, epoch, logs=None):
            calls.append(self.name)

    a, b = Spy("a"), Spy("b")
    callbacks = keras.callbacks.CallbackList([a, b], model=_model())
    assert all(holder is callbacks for holder in seen) and len(seen) == 2
    assert callbacks.callbacks[:2] == [a, b]
    callbacks.callbacks = [b, a]
    callbacks.on_epoch_end(0, {})
    assert calls == ["b", "a"]


def test_without_the_callback_list_other_callbacks_start_fresh_with_one_warning(
    tmp_path, monkeypatch
):
    real = _compat.available
    monkeypatch.setattr(
        _compat, "available", lambda api: api is not _compat.KERAS_CALLBACK_LIST and real(api)
    )
    x, y = _data()
    path = str(tmp_path / "c-{epoch}.keras")

    def run(epochs, resume):
        early = keras.callbacks.EarlyStopping(monitor="loss", patience=50)
        ckpt = keras_ckpt.ModelCheckpoint(path, monitor="loss", resume=resume)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hist = _model().fit(x, y, batch_size=8, epochs=epochs, verbose=0,
                                callbacks=[ckpt, early])
        found = [w for w in caught if "cannot find the other callbacks" in str(w.message)]
        return hist, early, found

    _, _, found = run(2, False)
    assert len(found) == 1
    hist, early, found = run(3, True)  # the model resumes; EarlyStopping starts over
    assert hist.epoch == [2] and len(found) == 1
    assert early.best_epoch == 2 and early.wait == 0


def test_fit_iterates_its_epoch_iterator_through_enumerate_iterator_each_epoch():
    # What _fastforward relies on: in on_epoch_begin, fit's frame (above the CallbackList's)
    # has a local `epoch_iterator` whose `_enumerate_iterator` generator, looked up on the
    # instance, yields (begin_step, end_step, iterator-or-data) for that epoch's batches.
    import inspect

    from keras_ckpt import _fastforward

    found, steps = [], []

    class Spy(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            it = _fastforward._epoch_iterator(inspect.currentframe())
            found.append(it)
            if epoch == 1:
                original = it._enumerate_iterator

                def spying():
                    del it._enumerate_iterator
                    for begin, end, data in original():
                        steps.append((begin, end))
                        yield begin, end, data

                it._enumerate_iterator = spying

        def on_train_batch_begin(self, batch, logs=None):
            steps.append(batch)

    x, y = _data()
    _model().fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[Spy()])
    assert found[0] is not None and found[0] is found[1] is found[2]
    batches = len(x) // 8
    assert steps[batches:3 * batches] == [s for b in range(batches) for s in ((b, b), b)]


def test_without_the_epoch_iterator_a_mid_epoch_resume_replays_that_epoch_with_a_warning(
    tmp_path, monkeypatch
):
    x, y = _data()
    path = str(tmp_path / "c-{epoch}-{batch}.keras")
    keras_ckpt_args = {"monitor": "loss", "save_freq": 3, "max_to_keep": None}
    _model().fit(x, y, batch_size=8, epochs=1, verbose=0,
                 callbacks=[keras_ckpt.ModelCheckpoint(path, **keras_ckpt_args)])
    real = _compat.available
    monkeypatch.setattr(
        _compat, "available", lambda api: api is not _compat.KERAS_EPOCH_ITERATOR and real(api)
    )
    ckpt = keras_ckpt.ModelCheckpoint(path, resume=True, **keras_ckpt_args)
    model = _model()
    with pytest.warns(UserWarning, match="restarts at batch 0"):
        hist = model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ckpt])
    assert hist.epoch == [0] and ckpt.restored_path is not None
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 3 + len(x) // 8
