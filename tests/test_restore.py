"""Resume reads each checkpoint once, checksumming while it loads; a corrupt one is replaced."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import xxhash

keras = pytest.importorskip("keras")

import keras_ckpt  # noqa: E402
from keras_ckpt import storage  # noqa: E402


def big_model():
    # 128 x 256 float32 kernels (128 KiB) and their Adam slots: read through the stream, not h5py.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((128,)), keras.layers.Dense(256), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


class Values(keras.callbacks.Callback):
    """Every weight and optimizer variable after each epoch, as NumPy copies."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(values(self.model))


def values(model):
    return [np.array(v.numpy()) for v in model.weights + model.optimizer.variables]


def _torch_saved_once(tmp_path, inputs: int, outputs: int, step: bool = True):
    """A torch shim run (one Adam step unless ``step=False``) saved as c-1.pt; returns
    ``build`` (the same fresh model and optimizer each call), the filepath template and the file."""
    torch = pytest.importorskip("torch")
    from keras_ckpt.torch import ModelCheckpoint as TorchCheckpoint

    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(inputs, outputs)
        return model, torch.optim.Adam(model.parameters())

    template = str(tmp_path / "c-{epoch}.pt")
    model, opt = build()
    ckpt = TorchCheckpoint(template, model=model, optimizer=opt)
    ckpt.on_train_begin()
    if step:
        model(torch.ones(2, inputs)).sum().backward()
        opt.step()
    ckpt.on_epoch_end(0)
    ckpt.on_train_end()
    return build, template, tmp_path / "c-1.pt"


def _torch_resume_refused(build, template, match: str):
    """A fresh model and optimizer after ``resume=True`` refused with ``match``."""
    from keras_ckpt.torch import ModelCheckpoint as TorchCheckpoint

    model, opt = build()
    again = TorchCheckpoint(template, model=model, optimizer=opt, resume=True)
    with pytest.raises(ValueError, match=match):
        again.on_train_begin()
    again.on_train_end()
    return model, opt


def flip_middle_byte(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


def train(template, epochs, **kw):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 128)).astype("float32")
    model = big_model()
    seen = Values()
    ckpt = keras_ckpt.ModelCheckpoint(template, monitor="loss", **kw)
    model.fit(x, x[:, :1], batch_size=8, epochs=epochs, verbose=0, callbacks=[seen, ckpt])
    return seen.epochs, ckpt


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_a_corrupt_newest_found_while_loading_gives_the_previous_one_bitwise(tmp_path, suffix):
    template = str(tmp_path / f"ck-{{epoch}}{suffix}")
    weights_only = suffix == ".weights.h5"
    seen, first = train(template, 2, save_weights_only=weights_only)
    flip_middle_byte(first.latest_path)  # its size is right: only the checksum can tell

    model = big_model()
    ckpt = keras_ckpt.ModelCheckpoint(template, monitor="loss", save_weights_only=weights_only,
                                      resume=True)
    ckpt.set_model(model)
    with pytest.warns(UserWarning, match=rf"skipping checkpoint 'ck-2'.*ck-2{suffix} does not match"):
        ckpt.on_train_begin()
    ckpt.on_train_end()
    assert ckpt.restored_path == str(tmp_path / f"ck-1{suffix}")
    for got, want in zip(values(model), seen[0]):
        np.testing.assert_array_equal(got, want)  # bitwise: nothing of ck-2 is left
    assert model._initial_epoch is None or model._initial_epoch == 1


def test_when_every_checkpoint_turns_out_corrupt_resume_refuses_to_start_fresh(tmp_path):
    template = str(tmp_path / "ck-{epoch}.keras")
    _, first = train(template, 2)
    for record in first.checkpoints:
        flip_middle_byte(tmp_path / record.path)
    ckpt = keras_ckpt.ModelCheckpoint(template, monitor="loss", resume=True)
    ckpt.set_model(big_model())
    with pytest.warns(UserWarning, match="skipping checkpoint"), pytest.raises(
        ValueError, match=r"resume: no checkpoint .* verifies \(nothing was loaded\).*resume=True"
    ):
        ckpt.on_train_begin()


def test_torch_corrupt_newest_found_while_loading_gives_the_previous_one_bitwise(tmp_path):
    torch = pytest.importorskip("torch")
    from keras_ckpt.torch import ModelCheckpoint as TorchCheckpoint

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 1))
        return model, torch.optim.Adam(model.parameters(), lr=0.01)

    template = str(tmp_path / "c-{epoch}.pt")
    model, opt = build()
    ckpt = TorchCheckpoint(template, model=model, optimizer=opt)
    ckpt.on_train_begin()
    saved = []
    for epoch in range(2):
        model(torch.ones(4, 256)).sum().backward()
        opt.step()
        opt.zero_grad()
        ckpt.on_epoch_end(epoch)
        slots = opt.state_dict()["state"]
        saved.append(({k: v.clone() for k, v in model.state_dict().items()},
                      {i: {k: v.clone() for k, v in s.items()} for i, s in slots.items()}))
    ckpt.on_train_end()
    flip_middle_byte(ckpt.latest_path)

    model2, opt2 = build()
    again = TorchCheckpoint(template, model=model2, optimizer=opt2, resume=True)
    with pytest.warns(UserWarning, match=r"skipping checkpoint 'c-2'.*does not match"):
        assert again.on_train_begin() == 1
    again.on_train_end()
    weights, state = saved[0]
    for key, value in model2.state_dict().items():
        assert torch.equal(value, weights[key]), key
    for i, slots in opt2.state_dict()["state"].items():
        for k, v in slots.items():
            assert torch.equal(v, state[i][k]), (i, k)


def test_a_corrupt_newest_whose_optimizer_state_was_loaded_is_not_left_under_one_without(tmp_path):
    """ck-1 holds no optimizer state (save_optimizer=False), ck-2 does and turns out corrupt.
    Nothing of ck-2 is assigned before its checksum is known, so resume falls back to ck-1 and
    the optimizer keeps its fresh state, exactly as resume='ck-1.keras' would leave it."""
    template = str(tmp_path / "ck-{epoch}.keras")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 128)).astype("float32")
    model = big_model()
    model.fit(x, x[:, :1], batch_size=8, epochs=1, verbose=0, callbacks=[
        keras_ckpt.ModelCheckpoint(template, monitor="loss", save_optimizer=False)])
    ck1 = values(model)[: len(model.weights)]
    second = keras_ckpt.ModelCheckpoint(template, monitor="loss", resume=True)
    model.fit(x, x[:, :1], batch_size=8, epochs=2, verbose=0, callbacks=[second])
    flip_middle_byte(second.latest_path)

    for resume in (True, str(tmp_path / "ck-1.keras")):
        again = big_model()
        ckpt = keras_ckpt.ModelCheckpoint(template, monitor="loss", resume=resume)
        ckpt.set_model(again)
        if resume is True:
            with pytest.warns(UserWarning, match="skipping checkpoint 'ck-2'"):
                ckpt.on_train_begin()
        else:
            ckpt.on_train_begin()
        ckpt.on_train_end()
        assert ckpt.restored_path == str(tmp_path / "ck-1.keras")
        assert int(again.optimizer.iterations.numpy()) == 0
        assert not any(np.any(v.numpy()) for v in again.optimizer.variables[2:])  # Adam's slots
        for got, want in zip(values(again), ck1):
            np.testing.assert_array_equal(got, want)


def test_torch_corrupt_newest_leaves_nothing_in_objects_the_previous_one_does_not_hold(tmp_path):
    """The torch file is read whole before anything is assigned: after a corrupt ck-2, ck-1 (no
    optimizer state; strict=False) leaves the optimizer as it was, not with ck-2's slots."""
    torch = pytest.importorskip("torch")
    from keras_ckpt.torch import ModelCheckpoint as TorchCheckpoint

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 1))
        return model, torch.optim.Adam(model.parameters(), lr=0.01)

    def step(model, opt):
        model(torch.ones(4, 256)).sum().backward()
        opt.step()
        opt.zero_grad()

    template = str(tmp_path / "c-{epoch}.pt")
    model, opt = build()
    first = TorchCheckpoint(template, model=model)
    first.on_train_begin()
    step(model, opt)
    first.on_epoch_end(0)
    first.on_train_end()
    ck1 = {k: v.clone() for k, v in model.state_dict().items()}
    second = TorchCheckpoint(template, model=model, optimizer=opt, resume=True, strict=False)
    with pytest.warns(UserWarning, match="missing from the checkpoint: .*optimizer"):
        second.on_train_begin()
    step(model, opt)
    second.on_epoch_end(1)
    second.on_train_end()
    flip_middle_byte(second.latest_path)

    model2, opt2 = build()
    again = TorchCheckpoint(template, model=model2, optimizer=opt2, resume=True, strict=False)
    with pytest.warns(UserWarning, match=r"skipping checkpoint 'c-2'.*does not match"):
        assert again.on_train_begin() == 1
    again.on_train_end()
    assert opt2.state_dict()["state"] == {}
    for key, value in model2.state_dict().items():
        assert torch.equal(value, ck1[key]), key


def test_a_stream_gives_the_files_bytes_only_once_they_match_and_names_a_mismatch(tmp_path):
    data = bytearray(os.urandom((40 << 20) + 123))  # not a whole number of pieces or sectors
    (tmp_path / "f.bin").write_bytes(data)
    store = storage.LocalStorage(str(tmp_path))
    original = xxhash.xxh3_128_hexdigest(bytes(data))
    stream, problem = store.stream("f.bin", len(data), original)
    assert problem is None
    with stream:
        image = stream.verified()
        assert image.tobytes() == bytes(data)
        assert stream.finish() is None
    data[31 << 20] ^= 1  # a flipped byte, the size unchanged: only the checksum can tell
    (tmp_path / "f.bin").write_bytes(data)
    stream, _ = store.stream("f.bin", len(data), original)
    with stream:
        with pytest.raises(storage.CorruptFile, match="f.bin does not match its checksum"):
            stream.verified()
        assert stream.finish() == "f.bin does not match its checksum"
    assert store.stream("f.bin", len(data) + 1, "0" * 32) == (
        None, f"f.bin has {len(data)} bytes, the manifest says {len(data) + 1}")


def _keras_resume_refused(template: str, match: str) -> None:
    """``resume=True`` of a ``.weights.h5`` series into a fresh model refused with ``match``,
    nothing of the file in the model or its optimizer."""
    model = big_model()
    before = values(model)
    ckpt = keras_ckpt.ModelCheckpoint(template, monitor="loss", save_weights_only=True, resume=True)
    ckpt.set_model(model)
    with pytest.raises(ValueError, match=match):
        ckpt.on_train_begin()
    ckpt.on_train_end()
    for got, want in zip(values(model), before):
        np.testing.assert_array_equal(got, want)  # nothing of the file reached the model


def vouch_for(directory, name):
    """Record ``name``'s current size and checksum in the manifest, as a hostile one would."""
    path = os.path.join(directory, "checkpoints.json")
    with open(path) as f:
        data = json.load(f)
    with open(os.path.join(directory, name), "rb") as f:
        blob = f.read()
    for record in data["checkpoints"]:
        for entry in record["files"]:
            if entry["path"] == name:
                entry["bytes"], entry["xxh3_128"] = len(blob), xxhash.xxh3_128_hexdigest(blob)
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.mark.parametrize("state", [b"\x9c not utf-8", b"{not json", b"[1, 2]", b'{"epoch": -3}'])
def test_a_damaged_training_state_the_manifest_vouches_for_is_refused_before_any_weight(tmp_path, state):
    # Harm: a .weights.h5 whose state bytes were not JSON (checksum recorded for them) loaded
    # every weight into the model, then failed with a bare UnicodeDecodeError naming no file.
    import h5py

    template = str(tmp_path / "ck-{epoch}.weights.h5")
    train(template, 1, save_weights_only=True)
    with h5py.File(tmp_path / "ck-1.weights.h5", "r+") as f:
        del f["keras_ckpt/state.json"]
        f["keras_ckpt/state.json"] = np.frombuffer(state, np.uint8)
    vouch_for(str(tmp_path), "ck-1.weights.h5")
    _keras_resume_refused(template, r"ck-1\.weights\.h5 holds a damaged training state")


def test_torch_a_record_name_that_is_not_utf8_is_a_damaged_file_naming_it(tmp_path):
    # Harm: a .pt whose central directory (checksum vouched for) named a record in bytes that
    # are not UTF-8 failed with a bare UnicodeDecodeError naming no file.
    build, template, path = _torch_saved_once(tmp_path, 8, 1, step=False)
    blob = bytearray(path.read_bytes())
    blob[blob.rindex(b"data.pkl")] = 0x90  # in the central directory, flagged UTF-8 by torch
    path.write_bytes(bytes(blob))
    vouch_for(str(tmp_path), "c-1.pt")
    _torch_resume_refused(build, template, r"c-1\.pt is a damaged torch\.save file")


def test_a_dataset_address_past_the_end_is_refused_before_any_weight(tmp_path):
    # Harm: a .weights.h5 (checksum vouched for) whose last optimizer variable's data address
    # lay past the end of the file loaded every layer before it, then failed: a partly loaded
    # model, and an error naming no file.
    import struct

    import h5py

    template = str(tmp_path / "ck-{epoch}.weights.h5")
    train(template, 1, save_weights_only=True)
    path = tmp_path / "ck-1.weights.h5"
    with h5py.File(path, "r") as f:
        last = sorted(f["optimizer/vars"], key=int)[-1]
        address = f["optimizer/vars"][last].id.get_offset()
    blob = bytearray(path.read_bytes())
    at = blob.index(struct.pack("<Q", address))  # the dataset's layout message
    blob[at : at + 8] = struct.pack("<Q", len(blob) + 4096)
    path.write_bytes(bytes(blob))
    vouch_for(str(tmp_path), "ck-1.weights.h5")
    _keras_resume_refused(template, r"ck-1\.weights\.h5 is a damaged HDF5 file")


def test_an_hdf5_file_cut_short_that_the_manifest_vouches_for_is_a_value_error_naming_it(tmp_path):
    # Harm: h5py's bare OSError ("truncated file: eof = ...") naming no file.
    template = str(tmp_path / "ck-{epoch}.weights.h5")
    train(template, 1, save_weights_only=True)
    path = tmp_path / "ck-1.weights.h5"
    path.write_bytes(path.read_bytes()[:-1])
    vouch_for(str(tmp_path), "ck-1.weights.h5")
    _keras_resume_refused(template, r"ck-1\.weights\.h5 is a damaged HDF5 file")


def test_torch_records_that_overlap_are_refused_not_shared_by_two_optimizer_slots(tmp_path):
    # Harm: a .pt (checksum vouched for) whose central directory pointed exp_avg_sq's record at
    # exp_avg's bytes loaded both slots as views of the same memory: every Adam step then wrote
    # one over the other (stock torch.load reads each record into a storage of its own).
    import struct
    import zipfile

    build, template, path = _torch_saved_once(tmp_path, 256, 256)
    with zipfile.ZipFile(path) as z:
        weight, first, second = sorted(
            (i for i in z.infolist() if i.file_size == 256 * 256 * 4), key=lambda i: i.header_offset)
    blob = bytearray(path.read_bytes())
    entry = blob.rindex(second.filename.encode()) - 46  # its central directory entry
    blob[entry + 42 : entry + 46] = struct.pack("<I", first.header_offset)
    path.write_bytes(bytes(blob))
    vouch_for(str(tmp_path), "c-1.pt")
    _, opt = _torch_resume_refused(build, template, r"c-1\.pt is a damaged torch\.save file")
    assert not opt.state  # nothing loaded


@pytest.mark.parametrize("state", [[1, 2], {"epoch": -3}])
def test_torch_a_damaged_training_state_is_refused_before_any_tensor(tmp_path, state):
    # Harm: the model and optimizer were loaded from the file, then the state was refused.
    torch = pytest.importorskip("torch")
    build, template, path = _torch_saved_once(tmp_path, 8, 1)
    payload = torch.load(path, weights_only=True)
    payload["training_state"] = state
    torch.save(payload, path)
    vouch_for(str(tmp_path), "c-1.pt")
    model, opt = _torch_resume_refused(build, template, r"c-1\.pt holds a damaged training state")
    fresh = build()[0].state_dict()  # build() seeds: the model as it was before the resume
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())
    assert not opt.state


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_a_checkpoint_that_does_not_fit_the_model_loads_nothing_and_names_the_file(tmp_path, suffix):
    # Harm: the layers before the first one that did not fit were loaded, then Keras's error
    # ("A total of 1 objects could not be loaded") named no file: a half-loaded model.
    template = str(tmp_path / f"ck-{{epoch}}{suffix}")
    weights_only = suffix == ".weights.h5"
    train(template, 1, save_weights_only=weights_only)

    keras.utils.set_random_seed(1)
    wider = keras.Sequential([keras.Input((128,)), keras.layers.Dense(256), keras.layers.Dense(2)])
    wider.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    wider.optimizer.build(wider.trainable_variables)
    before = values(wider)
    ckpt = keras_ckpt.ModelCheckpoint(template, monitor="loss", save_weights_only=weights_only,
                                      resume=True)
    ckpt.set_model(wider)
    if keras.backend.backend() == "tensorflow":
        match = rf"ck-1{suffix} could not be loaded into the model \(nothing was loaded\)"
    else:  # the walk assigns as it goes there (docs/robustness.md)
        match = rf"ck-1{suffix} could not be loaded into the model"
    with pytest.raises(ValueError, match=match):
        ckpt.on_train_begin()
    ckpt.on_train_end()
    if keras.backend.backend() == "tensorflow":
        for got, want in zip(values(wider), before):
            np.testing.assert_array_equal(got, want)


class Derived(keras.layers.Layer):
    """A layer whose own loader keeps a value derived from its weight, as preprocessing layers do."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.loaded = []

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w

    def load_own_variables(self, store):
        super().load_own_variables(store)
        self.loaded.append(np.array(self.w.numpy()))


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_a_loader_of_the_users_own_never_sees_a_corrupt_newest(tmp_path, suffix):
    # A user's load_own_variables acts on what it is handed at once: it must be called only
    # with a file that matched its checksum, here once, with ck-1's values.
    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), Derived(), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse")
        return model

    template = str(tmp_path / f"ck-{{epoch}}{suffix}")
    weights_only = suffix == ".weights.h5"
    model, seen = build(), Values()
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    model.fit(x, x[:, :1], epochs=2, verbose=0, callbacks=[seen, keras_ckpt.ModelCheckpoint(
        template, monitor="loss", save_weights_only=weights_only)])
    flip_middle_byte(tmp_path / f"ck-2{suffix}")

    again = build()
    ckpt = keras_ckpt.ModelCheckpoint(template, monitor="loss", save_weights_only=weights_only,
                                      resume=True)
    ckpt.set_model(again)
    with pytest.warns(UserWarning, match="skipping checkpoint 'ck-2'"):
        ckpt.on_train_begin()
    ckpt.on_train_end()
    derived = again.layers[0]
    assert len(derived.loaded) == 1
    np.testing.assert_array_equal(derived.loaded[0], seen.epochs[0][0])


def test_a_small_models_keras_archive_whose_weights_start_at_4096_resumes(tmp_path):
    # Harm: the format sniffer looked for HDF5's signature at 0, 512, ... 4096 before asking
    # whether the file is a zip, and the archive's stored weights member began at byte 4096:
    # "it is an HDF5 file, but its name calls for a .keras zip archive", no resume possible.
    import zipfile

    def build():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
                                  keras.layers.BatchNormalization(), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        return model

    template = str(tmp_path / "ck-{epoch}.keras")
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    model, seen = build(), Values()
    model.fit(x, x[:, :1], batch_size=8, epochs=1, verbose=0,
              callbacks=[seen, keras_ckpt.ModelCheckpoint(template, monitor="loss")])
    with open(tmp_path / "ck-1.keras", "rb") as f, zipfile.ZipFile(f) as archive:
        from keras_ckpt import _zip
        info = archive.getinfo("model.weights.h5")
        assert _zip.member_data_offset(f.fileno(), info) in (512, 1024, 2048, 4096)
    again = build()
    ckpt = keras_ckpt.ModelCheckpoint(template, monitor="loss", resume=True)
    ckpt.set_model(again)
    ckpt.on_train_begin()
    ckpt.on_train_end()
    for got, want in zip(values(again), seen.epochs[0]):
        np.testing.assert_array_equal(got, want)


def test_a_corrupt_legacy_h5_puts_nothing_into_the_model(tmp_path):
    # Harm: a legacy .h5 was loaded by name before its checksum was looked at, so with no good
    # predecessor resume said "nothing was loaded" over a model holding the corrupt file's
    # weights (and with one, the corrupt file had been assigned and then overwritten).
    import h5py

    def build():  # Keras's legacy loader cannot deserialize loss="mse" (Keras 3.15)
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((128,)), keras.layers.Dense(256), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.MeanSquaredError())
        return model

    template = str(tmp_path / "ck-{epoch}.h5")
    x = np.random.default_rng(0).normal(size=(32, 128)).astype("float32")
    build().fit(x, x[:, :1], batch_size=8, epochs=1, verbose=0,
                callbacks=[keras_ckpt.ModelCheckpoint(template, monitor="loss")])

    with h5py.File(tmp_path / "ck-1.h5", "r") as f:  # a byte of the first kernel's values
        kernels = []
        f.visititems(lambda name, obj: kernels.append(obj.id.get_offset())
                     if isinstance(obj, h5py.Dataset) and obj.shape == (128, 256) else None)
    with open(tmp_path / "ck-1.h5", "r+b") as f:
        f.seek(kernels[0] + 100)
        byte = f.read(1)
        f.seek(kernels[0] + 100)
        f.write(bytes([byte[0] ^ 0x40]))

    model = build()
    model.optimizer.build(model.trainable_variables)
    before = values(model)
    ckpt = keras_ckpt.ModelCheckpoint(template, monitor="loss", resume=True)
    ckpt.set_model(model)
    with pytest.warns(UserWarning, match="skipping checkpoint 'ck-1'"), pytest.raises(
        ValueError, match=r"verifies \(nothing was loaded\)"
    ):
        ckpt.on_train_begin()
    for got, want in zip(values(model), before):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5", ".h5"])
def test_a_checkpoint_of_another_optimizer_loads_nothing_and_names_the_file(tmp_path, suffix):
    # Harm: Adam's checkpoint resumed under SGD(momentum) loaded the weights, skipped the
    # optimizer with only Keras's warning and went on at the next epoch with a fresh optimizer
    # (iterations back at 0, a learning-rate schedule restarted): a half-loaded run.
    template = str(tmp_path / f"ck-{{epoch}}{suffix}")
    weights_only = suffix == ".weights.h5"
    train(template, 1, save_weights_only=weights_only)

    model = big_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
    model.optimizer.build(model.trainable_variables)
    before = values(model)
    ckpt = keras_ckpt.ModelCheckpoint(template, monitor="loss", save_weights_only=weights_only,
                                      resume=True)
    ckpt.set_model(model)
    with pytest.raises(ValueError, match=rf"ck-1{suffix} could not be loaded into the model "
                       r"\(nothing was loaded\): its optimizer has 10 variables, .*SGD has 6"):
        ckpt.on_train_begin()
    ckpt.on_train_end()
    for got, want in zip(values(model), before):
        np.testing.assert_array_equal(got, want)


def test_a_legacy_h5_of_a_model_compiled_with_loss_mse_resumes_with_its_optimizer(tmp_path):
    # Harm: resume loaded legacy .h5 files with keras.models.load_model(compile=True), whose
    # compile step cannot deserialize loss="mse" (Keras 3.15): every resume failed with
    # "Could not deserialize 'keras.metrics.mse'", naming no file.
    template = str(tmp_path / "ck-{epoch}.h5")
    seen, _ = train(template, 1)
    model = big_model()
    ckpt = keras_ckpt.ModelCheckpoint(template, monitor="loss", resume=True)
    ckpt.set_model(model)
    ckpt.on_train_begin()
    ckpt.on_train_end()
    for got, want in zip(values(model), seen[0]):
        np.testing.assert_array_equal(got, want)
    assert int(model.optimizer.iterations.numpy()) == 4
