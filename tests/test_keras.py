"""The Keras 3 front-end: drop-in behaviour, retention, full state, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import keras_ckpt  # noqa: E402
from keras_ckpt import manifest as mf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
    return model


def data(n=32):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


class Script(keras.callbacks.Callback):
    """Puts a scripted metric into the epoch logs (it runs before the checkpoint callback)."""

    def __init__(self, values, key="score"):
        super().__init__()
        self.values, self.key = values, key

    def on_epoch_end(self, epoch, logs=None):
        logs[self.key] = self.values[epoch]


def fit(model, callbacks, epochs, **kw):
    x, y = data()
    return model.fit(x, y, batch_size=8, epochs=epochs, callbacks=callbacks, verbose=0, **kw)


def names(directory, pattern="*.keras"):
    import glob

    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, pattern)))


def run_job(*args, backend=None):
    """Run keras_job.py in a new process, on ``backend`` (default: this process's backend)."""
    env = dict(os.environ, KERAS_BACKEND=backend or keras.backend.backend(), TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, os.path.join(HERE, "keras_job.py"), *map(str, args)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- exact resume -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, template",
    [("tensorflow", "ckpt-{epoch:02d}.keras"), ("torch", "ckpt-{epoch:02d}.keras"),
     ("jax", "ckpt-{epoch:02d}.keras"), ("tensorflow", "ckpt-{epoch:02d}.weights.h5"),
     ("jax", "ckpt-{epoch:02d}.weights.h5")],
)
def test_exact_resume_in_a_new_process(tmp_path, backend, template):
    """Dropout + shuffle, 4 epochs straight vs 2 + a new process resuming for 2: bit for bit."""
    pytest.importorskip(backend)  # each CI environment has some of the backends
    straight = run_job(tmp_path / "a", 4, "--template", template, "--dump", tmp_path / "a.npz",
                       backend=backend)
    first = run_job(tmp_path / "b", 2, "--template", template, backend=backend)
    second = run_job(tmp_path / "b", 4, "--resume", "--template", template, "--dump",
                     tmp_path / "b.npz", "--extra-fit", backend=backend)
    assert straight["epochs"] == [0, 1, 2, 3] and first["epochs"] == [0, 1]
    assert second["epochs"] == [2, 3], "the resumed process trains exactly the 2 missing epochs"
    assert second["restored"].endswith(template.format(epoch=2))
    assert second["extra_epochs"] == [0], "a following fit() in the same process is not skipped"
    assert second["iterations"] == straight["iterations"] == 20  # 5 batches x 4 epochs
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert set(a.files) == set(b.files) and any(k.startswith("o") for k in a.files)
    for key in a.files:  # weights, optimizer slots and iteration count, bit for bit
        assert a[key].tobytes() == b[key].tobytes(), key


# -- retention ----------------------------------------------------------------------------------


def test_retention_keeps_exactly_latest_and_best(tmp_path):
    scores = [0.5, 0.9, 0.3, 0.8, 0.2, 0.4, 0.85, 0.1, 0.6, 0.7]
    ckpt = keras_ckpt.ModelCheckpoint(str(tmp_path / "ck-{epoch:02d}.keras"), monitor="score",
                                      mode="max", max_to_keep=3, keep_best=2)
    fit(tiny_model(), [Script(scores), ckpt], 10)
    assert names(tmp_path) == ["ck-02.keras", "ck-07.keras", "ck-08.keras", "ck-09.keras",
                               "ck-10.keras"]
    assert ckpt.best == 0.9 and ckpt.best_path == str(tmp_path / "ck-02.keras")
    assert ckpt.latest_path == str(tmp_path / "ck-10.keras")
    assert [r.name for r in ckpt.checkpoints] == ["ck-02", "ck-07", "ck-08", "ck-09", "ck-10"]
    assert ckpt.checkpoints[0].kept == ("best",) and ckpt.checkpoints[-1].kept == ("latest",)
    for name in names(tmp_path):
        m = keras.models.load_model(tmp_path / name)
        assert int(m.optimizer.iterations.numpy()) == 4 * int(name[3:5])


def test_two_callbacks_sharing_a_directory_keep_their_own(tmp_path):
    scores = [0.5, 0.2, 0.4, 0.1, 0.3, 0.6]
    best = keras_ckpt.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="score", mode="min",
                                      save_best_only=True)
    last = keras_ckpt.ModelCheckpoint(str(tmp_path / "last-{epoch}.keras"), max_to_keep=2,
                                      monitor="score", mode="min")
    fit(tiny_model(), [Script(scores), best, last], 6)
    assert names(tmp_path) == ["best.keras", "last-4.keras", "last-5.keras", "last-6.keras"]
    assert best.best == 0.1 and [r.epoch for r in best.checkpoints] == [4]
    m = mf.load(str(tmp_path))
    assert set(m.series) == {"best.keras", "last-{epoch}.keras"}


def test_best_survives_a_restart(tmp_path):
    template = str(tmp_path / "ck-{epoch:02d}.keras")
    ckpt = keras_ckpt.ModelCheckpoint(template, monitor="score", mode="max", max_to_keep=1,
                                      keep_best=1)
    fit(tiny_model(), [Script([0.3, 0.9, 0.5]), ckpt], 3)
    best_bytes = (tmp_path / "ck-02.keras").read_bytes()
    resumed = keras_ckpt.ModelCheckpoint(template, monitor="score", mode="max", max_to_keep=1,
                                         keep_best=1, resume=True)
    hist = fit(tiny_model(), [Script([0, 0, 0, 0.8, 0.7, 0.6]), resumed], 6)
    assert hist.epoch == [3, 4, 5]
    assert resumed.best == 0.9 and resumed.best_path == str(tmp_path / "ck-02.keras")
    assert names(tmp_path) == ["ck-02.keras", "ck-06.keras"]
    assert (tmp_path / "ck-02.keras").read_bytes() == best_bytes


def test_save_best_only_after_restart_does_not_overwrite_a_better_best(tmp_path):
    path = str(tmp_path / "best.keras")
    a = keras_ckpt.ModelCheckpoint(path, monitor="score", mode="max", save_best_only=True)
    fit(tiny_model(), [Script([0.4, 0.9]), a], 2)
    before = (tmp_path / "best.keras").read_bytes()
    b = keras_ckpt.ModelCheckpoint(path, monitor="score", mode="max", save_best_only=True,
                                   resume=True)
    fit(tiny_model(), [Script([0, 0, 0.5, 0.6]), b], 4)
    assert (tmp_path / "best.keras").read_bytes() == before and b.best == 0.9


def test_a_new_run_without_resume_over_earlier_checkpoints_warns(tmp_path):
    template = str(tmp_path / "ck-{epoch:02d}.keras")
    first = keras_ckpt.ModelCheckpoint(template, monitor="score", mode="max", max_to_keep=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tiny_model(), [Script([0.3, 0.9, 0.5]), first], 3)
        fit(first.model, [Script([0] * 5), first], 5, initial_epoch=3)  # same run, same process
    assert not [w for w in caught if "resume=False" in str(w.message)]
    again = keras_ckpt.ModelCheckpoint(template, monitor="score", mode="max", max_to_keep=2)
    with pytest.warns(UserWarning, match=r"resume=False, but .* 3 checkpoint\(s\) .*'ck-05'"
                      r".*best score so far: 0\.9.*resume=True"):
        fit(tiny_model(), [Script([0.1]), again], 1)


def test_resume_from_a_read_only_copy_writes_elsewhere_and_carries_best(tmp_path):
    src = tmp_path / "old"
    a = keras_ckpt.ModelCheckpoint(str(src / "ck-{epoch}.keras"), monitor="score", mode="max")
    fit(tiny_model(), [Script([0.2, 0.7, 0.4]), a], 3)
    snapshot = {p.name: p.read_bytes() for p in src.iterdir()}
    os.chmod(src, 0o555)
    try:
        b = keras_ckpt.ModelCheckpoint(str(tmp_path / "new" / "ck-{epoch}.keras"), monitor="score",
                                       mode="max", save_best_only=True, resume=str(src))
        hist = fit(tiny_model(), [Script([0, 0, 0, 0.5, 0.8]), b], 5)
    finally:
        os.chmod(src, 0o755)
    assert hist.epoch == [3, 4] and b.restored_path == str(src / "ck-3.keras")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == snapshot
    # The restored checkpoint is copied into the new output (so the next job can resume from
    # it), then the improving epoch 5 is saved.
    assert names(tmp_path / "new") == ["ck-3.keras", "ck-5.keras"] and b.best == 0.8
    assert (tmp_path / "new" / "ck-3.keras").read_bytes() == snapshot["ck-3.keras"]


def test_corrupt_newest_is_skipped_on_resume(tmp_path):
    template = str(tmp_path / "ck-{epoch}.keras")
    fit(tiny_model(), [keras_ckpt.ModelCheckpoint(template)], 3)
    with open(tmp_path / "ck-3.keras", "r+b") as f:
        f.seek(200)
        f.write(b"garbage")
    ckpt = keras_ckpt.ModelCheckpoint(template, resume=True)
    with pytest.warns(UserWarning, match="ck-3"):
        hist = fit(tiny_model(), [ckpt], 4)
    assert ckpt.restored_path == str(tmp_path / "ck-2.keras") and hist.epoch == [2, 3]


def test_resume_in_a_stock_keras_directory_warns_and_starts_fresh(tmp_path):
    model = tiny_model()
    fit(model, [keras.callbacks.ModelCheckpoint(str(tmp_path / "stock-{epoch}.keras"))], 2)
    ckpt = keras_ckpt.ModelCheckpoint(str(tmp_path / "ck-{epoch}.keras"), max_to_keep=1,
                                      resume=True)
    with pytest.warns(UserWarning, match="no checkpoints.json"):
        hist = fit(tiny_model(), [ckpt], 3)
    assert hist.epoch == [0, 1, 2] and ckpt.restored_path is None
    assert names(tmp_path) == ["ck-3.keras", "stock-1.keras", "stock-2.keras"]  # theirs untouched


def test_mid_epoch_checkpoint_resumes_at_the_next_batch(tmp_path):
    template = str(tmp_path / "ck-{epoch}-{batch}.keras")
    fit(tiny_model(), [keras_ckpt.ModelCheckpoint(template, save_freq=3)], 2)
    # 4 batches per epoch: saves after batches 3 (epoch 1), 2 (epoch 2, 6 total); newest: ck-2-2
    ckpt = keras_ckpt.ModelCheckpoint(template, save_freq=3, resume=True)
    model = tiny_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hist = fit(model, [ckpt], 3)
    assert not [w for w in caught if "batch 0" in str(w.message)]
    assert ckpt.restored_path == str(tmp_path / "ck-2-2.keras") and hist.epoch == [1, 2]
    # Epoch 2's last 2 batches, then epoch 3: 12 steps as straight, and its saves' names.
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 12
    assert names(tmp_path) == ["ck-1-3.keras", "ck-2-2.keras", "ck-3-1.keras", "ck-3-4.keras"]


# -- drop-in behaviour ------------------------------------------------------------------------


def test_dropin_templates_weights_only_and_batch_freq(tmp_path):
    model = tiny_model()
    w = keras_ckpt.ModelCheckpoint(str(tmp_path / "w-{epoch:02d}-{loss:.3f}.weights.h5"),
                                   save_weights_only=True, monitor="loss")
    b = keras_ckpt.ModelCheckpoint(str(tmp_path / "b-{epoch}-{batch}.keras"), save_freq=2)
    fit(model, [w, b], 2)
    files = names(tmp_path, "w-*.weights.h5")
    assert [f[:5] for f in files] == ["w-01-", "w-02-"]
    assert names(tmp_path, "b-*") == ["b-1-2.keras", "b-1-4.keras", "b-2-2.keras", "b-2-4.keras"]
    other = tiny_model()
    other.optimizer.build(other.trainable_variables)
    other.load_weights(tmp_path / files[-1])
    for x, y in zip(other.weights + other.optimizer.variables, model.weights + model.optimizer.variables):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_dropin_save_best_only_and_initial_value_threshold(tmp_path):
    path = tmp_path / "best.keras"
    ckpt = keras_ckpt.ModelCheckpoint(str(path), monitor="score", mode="min", save_best_only=True,
                                      initial_value_threshold=0.35)
    saved = []

    class Watch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            saved.append(path.exists() and path.stat().st_mtime_ns)

    fit(tiny_model(), [Script([0.5, 0.4, 0.3, 0.6, 0.2]), ckpt, Watch()], 5)
    assert saved[:2] == [False, False] and saved[2] and saved[3] == saved[2] and saved[4] != saved[3]
    assert ckpt.best == 0.2


def test_dropin_unknown_mode_warns_like_keras(tmp_path):
    with pytest.warns(UserWarning, match="ModelCheckpoint mode 'upward' is unknown, fallback to auto"):
        keras_ckpt.ModelCheckpoint(str(tmp_path / "m.keras"), mode="upward")


def test_dropin_missing_monitor_warns_like_keras(tmp_path):
    ckpt = keras_ckpt.ModelCheckpoint(str(tmp_path / "m.keras"), monitor="val_loss",
                                      save_best_only=True)
    with pytest.warns(UserWarning, match="Can save best model only with val_loss available"):
        fit(tiny_model(), [ckpt], 1)
    assert (tmp_path / "m.keras").exists()  # Keras saves anyway


def test_keras_file_opens_with_load_model_including_optimizer(tmp_path):
    model = tiny_model()
    ckpt = keras_ckpt.ModelCheckpoint(str(tmp_path / "m.keras"))
    fit(model, [ckpt], 2)
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert int(loaded.optimizer.iterations.numpy()) == 8
    for x, y in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_epoch_only_checkpoint_lets_keras_dispatch_batches_async(tmp_path):
    from keras.src.callbacks.callback_list import CallbackList

    epochly = keras_ckpt.ModelCheckpoint(str(tmp_path / "a.keras"))
    batchly = keras_ckpt.ModelCheckpoint(str(tmp_path / "b.keras"), save_freq=5)
    assert CallbackList([epochly])._async_train == CallbackList([])._async_train
    assert CallbackList([batchly])._async_train is False


def test_presets_fill_in_only_missing_arguments(tmp_path):
    ckpt = keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}.keras"), preset="short")
    fit(tiny_model(), [Script([0.5, 0.1, 0.4, 0.3], key="val_loss"), ckpt], 4)
    assert names(tmp_path) == ["c-2.keras", "c-4.keras"]
    assert ckpt.checkpoints[0].kept == ("best",)
    keep_all = keras_ckpt.ModelCheckpoint(str(tmp_path / "d-{epoch}.keras"), preset="normal",
                                          max_to_keep=None)
    assert keep_all._core.policy.max_to_keep is None and keep_all._core.policy.keep_best == 1


# -- bad input fails before training -----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_to_keep": -1}, r"max_to_keep.*Received: max_to_keep=-1"),
        ({"keep_best": -3}, r"Received: keep_best=-3"),
        ({"keep_every_n_epochs": 0}, r"Received: keep_every_n_epochs=0"),
        ({"save_every_n_seconds": -5}, r"Received: save_every_n_seconds=-5"),
        ({"preset": "forever"}, r"Received: preset='forever'"),
        ({"save_freq": 0}, r"Received: save_freq=0"),
        ({"resume": 3}, r"Received: resume=3"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}.keras"), **kwargs)


def test_bad_filepaths_raise_value_error_naming_filepath(tmp_path):
    with pytest.raises(ValueError, match=r"filepath=.*m\.keras"):
        keras_ckpt.ModelCheckpoint(str(tmp_path / "m.keras"), save_weights_only=True)
    with pytest.raises(ValueError, match=r"filepath=.*m\.weights\.h5"):
        keras_ckpt.ModelCheckpoint(str(tmp_path / "m.weights.h5"))
    with pytest.raises(ValueError, match=r"no \{epoch\} or \{batch\}.*filepath=.*m\.keras"):
        keras_ckpt.ModelCheckpoint(str(tmp_path / "m.keras"), max_to_keep=3)
    with pytest.raises(ValueError, match=r"filepath=.*m\.keras"):
        keras_ckpt.ModelCheckpoint(str(tmp_path / "m.keras"), keep_best=1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"save_weights_only": "no"}, TypeError, r"Received: save_weights_only='no'"),
        ({"save_optimizer": "no"}, TypeError, r"Received: save_optimizer='no'"),
        ({"filepath": 123}, TypeError, r"Received: filepath=123"),
    ],
)
def test_non_bool_flags_and_non_path_filepaths_fail_at_construction(tmp_path, kwargs, error, match):
    kwargs = {"filepath": str(tmp_path / "c-{epoch}.keras"), **kwargs}
    with pytest.raises(error, match=match):
        keras_ckpt.ModelCheckpoint(**kwargs)


@pytest.mark.parametrize("kind", ["text named .keras", "torch .pt", "keras archive named .h5"])
def test_resume_from_a_file_of_another_format_fails_at_train_begin_naming_it(tmp_path, kind):
    if kind == "text named .keras":
        bad = tmp_path / "notes.keras"
        bad.write_text("not a checkpoint")
    elif kind == "torch .pt":
        torch = pytest.importorskip("torch")
        bad = tmp_path / "model.pt"
        torch.save({"w": torch.zeros(3)}, bad)
    else:
        fit(tiny_model(), [keras_ckpt.ModelCheckpoint(str(tmp_path / "a.keras"))], 1)
        bad = tmp_path / "renamed.h5"
        os.rename(tmp_path / "a.keras", bad)
    ckpt = keras_ckpt.ModelCheckpoint(str(tmp_path / "out" / "c-{epoch}.keras"), resume=str(bad))
    seen = Epochs()
    with pytest.raises(ValueError, match=rf"resume: '{bad}' is not a Keras checkpoint.*"
                                         rf"Received: resume='{bad}'"):
        fit(tiny_model(), [ckpt, seen], 2)
    assert seen.seen == []


class Epochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(epoch)


def test_uncreatable_directory_fails_at_train_begin(tmp_path):
    (tmp_path / "file").write_text("a regular file")
    ckpt = keras_ckpt.ModelCheckpoint(str(tmp_path / "file" / "sub" / "c-{epoch}.keras"))
    seen = Epochs()
    with pytest.raises(ValueError, match=r"cannot be created.*Received: filepath="):
        fit(tiny_model(), [ckpt, seen], 2)
    assert seen.seen == []


def test_auto_mode_that_cannot_be_inferred_fails_at_train_begin(tmp_path):
    ckpt = keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}.keras"), monitor="val_custom",
                                      keep_best=1)
    seen = Epochs()
    with pytest.raises(ValueError, match=r"mode='auto'.*val_custom"):
        fit(tiny_model(), [ckpt, seen], 2)
    assert seen.seen == []
    # A compiled metric's own direction is used, as Keras does.
    ok = keras_ckpt.ModelCheckpoint(str(tmp_path / "d-{epoch}.keras"), monitor="val_mae",
                                    keep_best=1)
    fit(tiny_model(), [ok], 1, validation_split=0.25)
    assert ok._core.policy.mode == "min"


def test_import_pulls_in_no_framework():
    code = ("import sys, keras_ckpt; from keras_ckpt import policy, manifest, engine, storage, "
            "checkpointer; bad = [m for m in ('tensorflow', 'keras', 'torch') if m in sys.modules];"
            " print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_restore_rebuilds_optimizer_so_users_never_meet_the_keras_trap(tmp_path):
    model = tiny_model()
    fit(model, [keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}.weights.h5"),
                                           save_weights_only=True)], 2)
    fresh = tiny_model()  # compiled, optimizer not built
    ckpt = keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}.weights.h5"),
                                      save_weights_only=True, resume=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(fresh, [ckpt], 2)
    assert not [w for w in caught if "optimizer" in str(w.message).lower()]
    assert int(fresh.optimizer.iterations.numpy()) == 8


def test_keep_every_n_epochs_and_time_based_saves(tmp_path):
    ckpt = keras_ckpt.ModelCheckpoint(str(tmp_path / "e-{epoch}.keras"), max_to_keep=1,
                                      keep_every_n_epochs=2, monitor="loss")
    fit(tiny_model(), [ckpt], 5)
    # epoch 1 is the best loss-wise only if training diverged; the newest and every 2nd stay
    kept = {r.name: r.kept for r in ckpt.checkpoints}
    assert {"e-2", "e-4", "e-5"} <= set(kept) and kept["e-2"] == ("every_n_epochs",)
    assert set(kept) - {"e-2", "e-4", "e-5"} <= {ckpt.checkpoints[0].name}  # at most the best
    timed = keras_ckpt.ModelCheckpoint(str(tmp_path / "t-{epoch}-{batch}.keras"), save_freq=1000,
                                       save_every_n_seconds=1e-9)
    fit(tiny_model(), [timed], 1)  # 4 batches, none by count: the clock is due at each batch end
    assert names(tmp_path, "t-*") == ["t-1-1.keras", "t-1-2.keras", "t-1-3.keras", "t-1-4.keras"]


def test_save_optimizer_false_keeps_the_bookkeeping(tmp_path):
    model = tiny_model()
    template = str(tmp_path / "c-{epoch}.keras")
    fit(model, [keras_ckpt.ModelCheckpoint(template, save_optimizer=False)], 2)
    import zipfile

    import h5py

    with zipfile.ZipFile(tmp_path / "c-2.keras") as archive:
        (tmp_path / "w.h5").write_bytes(archive.read("model.weights.h5"))
    with h5py.File(tmp_path / "w.h5") as f:
        assert "optimizer" not in f and "keras_ckpt" in f
    fresh = tiny_model()
    ckpt = keras_ckpt.ModelCheckpoint(template, save_optimizer=False, resume=True)
    hist = fit(fresh, [ckpt], 2)
    assert hist.epoch == []  # the epoch came back even without the optimizer: nothing left to do
    for x, y in zip(fresh.weights, model.weights):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert int(fresh.optimizer.iterations.numpy()) == 0  # not saved, so not restored


def test_resume_from_a_single_file(tmp_path):
    fit(tiny_model(), [keras_ckpt.ModelCheckpoint(str(tmp_path / "a" / "c-{epoch}.keras"))], 3)
    import shutil

    shutil.copy(tmp_path / "a" / "c-2.keras", tmp_path / "loose.keras")  # no manifest beside it
    ckpt = keras_ckpt.ModelCheckpoint(str(tmp_path / "b" / "c-{epoch}.keras"),
                                      resume=str(tmp_path / "loose.keras"))
    hist = fit(tiny_model(), [ckpt], 4)
    assert hist.epoch == [2, 3] and ckpt.restored_path == str(tmp_path / "loose.keras")
    # The loose file is copied in under the series' name for its epoch, then training goes on.
    assert names(tmp_path / "b") == ["c-2.keras", "c-3.keras", "c-4.keras"]


def test_a_fit_that_raises_after_resume_does_not_shorten_the_next_fit(tmp_path):
    template = str(tmp_path / "c-{epoch}.keras")
    fit(tiny_model(), [keras_ckpt.ModelCheckpoint(template)], 3)

    class Boom(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("boom")

    model = tiny_model()
    with pytest.raises(RuntimeError, match="boom"):
        fit(model, [keras_ckpt.ModelCheckpoint(template, resume=True), Boom()], 5)
    assert fit(model, [], 2).epoch == [0, 1], "the crashed resume's start epoch leaked"


@pytest.mark.parametrize("writers", ["fast", "keras's own"])
def test_files_are_created_with_the_umask_not_0600(tmp_path, monkeypatch, writers):
    if writers != "fast":
        from keras_ckpt import _compat

        real = _compat.available
        monkeypatch.setattr(_compat, "available", lambda api: api.framework != "keras" and real(api))
    old = os.umask(0o022)
    try:
        model = tiny_model()
        for template, kw in [("a-{epoch}.keras", {}), ("b-{epoch}.weights.h5",
                             {"save_weights_only": True}), ("c-{epoch}.h5", {})]:
            fit(model, [keras_ckpt.ModelCheckpoint(str(tmp_path / template), **kw)], 1)
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir() if p.is_file()}
    assert {"a-1.keras", "b-1.weights.h5", "c-1.h5", "checkpoints.json"} <= set(modes)
    assert set(modes.values()) == {"0o644"}, modes
