"""keras_ckpt._kerasio: the fast .keras / .weights.h5 writers, the embedded state, loading.

The Keras tests run in this process's backend; ``test_other_backend`` reruns this file under each
other installed backend in a subprocess, since Keras picks its backend once per process.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest

keras = pytest.importorskip("keras")
if int(keras.__version__.split(".")[0]) < 3:
    pytest.skip("keras_ckpt._kerasio needs Keras 3", allow_module_level=True)
h5py = pytest.importorskip("h5py")

from keras_ckpt import _kerasio, _zip  # noqa: E402

BACKENDS = ("tensorflow", "torch", "jax")
INNER = "KERAS_CKPT_KERASIO_INNER"  # set in the subprocess so it does not recurse
KINDS = ("nested_sequential", "functional_dropout")
BIG_STATE = json.dumps({"epoch": 3, "rng": "x" * 100_000}).encode()  # over the planning threshold


# --- models -----------------------------------------------------------------------------------


def make_model(kind: str) -> keras.Model:
    """A compiled model with one kernel over the planning threshold (160 x 128 float32)."""
    if kind == "nested_sequential":
        inner = keras.Sequential([keras.layers.Dense(128, activation="relu"), keras.layers.Dense(16)])
        model = keras.Sequential([keras.Input((160,)), inner, keras.layers.Dense(4)])
    else:
        inputs = keras.Input((160,))
        x = keras.layers.Dense(128, activation="relu")(inputs)
        x = keras.layers.Dropout(0.5)(x)
        model = keras.Model(inputs, keras.layers.Dense(4)(x))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return model


@functools.cache
def trained(kind: str) -> keras.Model:
    """Three Adam steps (random gradients, eager: no tracing), so moments and count are set.

    Cached: the tests only read it.
    """
    model = make_model(kind)
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = [keras.ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32"))
                 for v in model.trainable_variables]
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return model


def values(variables: list) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v) for v in variables]


def assert_same_state(expected: keras.Model, actual: keras.Model, optimizer: bool = True) -> None:
    pairs = list(zip(values(expected.weights), values(actual.weights)))
    if optimizer:
        assert int(keras.ops.convert_to_numpy(actual.optimizer.iterations)) == 3
        pairs += zip(values(expected.optimizer.variables), values(actual.optimizer.variables))
        assert len(actual.optimizer.variables) == len(expected.optimizer.variables)
    for want, got in pairs:
        assert want.dtype == got.dtype and want.shape == got.shape
        assert want.tobytes() == got.tobytes()


def h5_tree(path: str) -> dict[str, tuple]:
    """Every group and dataset with its attributes (and a dataset's dtype, shape, bytes)."""
    tree: dict[str, tuple] = {}

    def visit(name: str, obj: object) -> None:
        attrs = tuple(sorted((k, str(v)) for k, v in obj.attrs.items()))
        if isinstance(obj, h5py.Dataset):
            tree[name] = (attrs, str(obj.dtype), obj.shape, np.asarray(obj[()]).tobytes())
        else:
            tree[name] = (attrs,)

    with h5py.File(path, "r") as f:
        tree["/"] = (tuple(sorted((k, str(v)) for k, v in f.attrs.items())),)
        f.visititems(visit)
    return tree


# --- .keras -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_keras_file_opens_with_load_model(tmp_path, kind: str) -> None:
    model = trained(kind)
    path = str(tmp_path / "m.keras")
    _kerasio.write_keras(model, path, state=b'{"epoch": 3}')
    loaded = keras.models.load_model(path)
    assert_same_state(model, loaded)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        # Exactly Keras's three members: a fourth makes load_model extract the whole archive.
        assert archive.namelist() == ["metadata.json", "config.json", "model.weights.h5"]
    assert _kerasio.read_state(path) == b'{"epoch": 3}'


@pytest.mark.parametrize("kind", KINDS)
def test_keras_weights_member_matches_keras_layout(tmp_path, kind: str) -> None:
    model = trained(kind)
    ours, stock = str(tmp_path / "ours.keras"), str(tmp_path / "stock.keras")
    _kerasio.write_keras(model, ours, state=b"{}")
    model.save(stock)
    trees = []
    for path in (ours, stock):
        with zipfile.ZipFile(path) as archive:
            member = tmp_path / (os.path.basename(path) + ".h5")
            member.write_bytes(archive.read("model.weights.h5"))
        trees.append(h5_tree(str(member)))
    del trees[0][_kerasio.STATE_MEMBER], trees[0][_kerasio.STATE_GROUP]
    assert trees[0] == trees[1]


@pytest.mark.parametrize("kind", KINDS)
def test_load_into_restores_optimizer_of_a_fresh_compiled_model(tmp_path, kind: str) -> None:
    model = trained(kind)
    path = str(tmp_path / "m.keras")
    _kerasio.write_keras(model, path, state=b"{}")
    fresh = make_model(kind)  # compiled, optimizer not built: Keras's load_weights trap
    assert not fresh.optimizer.built
    _kerasio.load_into(fresh, path)
    assert_same_state(model, fresh)


def test_load_into_reads_a_stock_keras_file(tmp_path) -> None:
    model = trained("functional_dropout")
    path = str(tmp_path / "stock.keras")
    model.save(path)
    fresh = make_model("functional_dropout")
    _kerasio.load_into(fresh, path)
    assert_same_state(model, fresh)
    assert _kerasio.read_state(path) is None


def test_keras_without_optimizer(tmp_path) -> None:
    model = trained("nested_sequential")
    path = str(tmp_path / "m.keras")
    _kerasio.write_keras(model, path, state=b"{}", include_optimizer=False)
    with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as f:
        assert "optimizer" not in f and "layers" in f
    fresh = make_model("nested_sequential")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping optimizer variables" warning
        _kerasio.load_into(fresh, path)
    assert_same_state(model, fresh, optimizer=False)
    assert int(keras.ops.convert_to_numpy(fresh.optimizer.iterations)) == 0


class SequentialOnly(io.RawIOBase):
    """A write-only target that fails on any seek or read: the engine may hash as bytes stream."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray(b"prefix!")  # the archive may follow other bytes in a file

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.data += memoryview(b).cast("B")
        return len(memoryview(b).cast("B"))


def test_write_keras_to_a_sequential_file_object(tmp_path) -> None:
    model = trained("functional_dropout")
    target = SequentialOnly()
    _kerasio.write_keras(model, target, state=BIG_STATE)
    assert not target.closed
    path = tmp_path / "m.keras"
    path.write_bytes(bytes(target.data))
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    assert_same_state(model, keras.models.load_model(str(path)))
    assert _kerasio.read_state(str(path)) == BIG_STATE


def test_write_keras_to_a_buffered_file_object(tmp_path) -> None:
    model = trained("nested_sequential")
    path = tmp_path / "m.keras"
    with open(path, "wb") as f:
        _kerasio.write_keras(model, f, state=b"{}")
        assert not f.closed
    assert_same_state(model, keras.models.load_model(str(path)))


def test_loss_scale_optimizer_layout_matches_keras(tmp_path) -> None:
    model = make_model("functional_dropout")
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()), loss="mse")
    model.optimizer.build(model.trainable_variables)
    ours, stock = str(tmp_path / "ours.weights.h5"), str(tmp_path / "stock.weights.h5")
    _kerasio.write_weights_h5(model, ours, state=b"{}")
    model.save_weights(stock)
    tree = h5_tree(ours)
    del tree[_kerasio.STATE_MEMBER], tree[_kerasio.STATE_GROUP]
    assert tree == h5_tree(stock)
    for optimizer in (model.optimizer, model.optimizer.inner_optimizer):  # the walk's patch is gone
        assert "save_own_variables" not in vars(optimizer)


def test_zip64_records_when_sizes_need_them(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(_zip, "ZIP64_LIMIT", 1000)  # as if the weights were > 2 GiB
    model = trained("nested_sequential")
    path = str(tmp_path / "m.keras")
    _kerasio.write_keras(model, path, state=b'{"a": 1}')
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        info = archive.getinfo("model.weights.h5")
        assert info.file_size > 1000 and info.header_offset > 1000
    with open(path, "rb") as f:
        assert b"PK\x06\x06" in f.read()[-200:]  # ZIP64 end of central directory
    assert_same_state(model, keras.models.load_model(path))
    if shutil.which("unzip"):  # a second, independent zip reader
        out = subprocess.run(["unzip", "-t", path], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


@keras.saving.register_keras_serializable(package="keras_ckpt_tests")
class Vocab(keras.layers.Layer):
    """A layer with an asset file, like Keras's lookup layers."""

    def __init__(self, words: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.words = words

    def call(self, x):
        return x

    def save_assets(self, dir_path: str) -> None:
        with open(os.path.join(dir_path, "vocab.txt"), "w") as f:
            f.write(self.words)

    def load_assets(self, dir_path: str) -> None:
        with open(os.path.join(dir_path, "vocab.txt")) as f:
            self.words = f.read()


def test_keras_assets_round_trip(tmp_path) -> None:
    model = keras.Sequential([keras.Input((3,)), Vocab(), keras.layers.Dense(2)])
    model.layers[0].words = "alpha\nbeta"  # not in the config: only the asset carries it
    path = str(tmp_path / "m.keras")
    _kerasio.write_keras(model, path, state=b"{}")
    with zipfile.ZipFile(path) as archive:
        assert "assets/layers/vocab/vocab.txt" in archive.namelist()
    assert keras.models.load_model(path).layers[0].words == "alpha\nbeta"


# --- .weights.h5 ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_weights_h5_loads_with_stock_keras(tmp_path, kind: str) -> None:
    model = trained(kind)
    path = str(tmp_path / "m.weights.h5")
    _kerasio.write_weights_h5(model, path, state=BIG_STATE)
    fresh = make_model(kind)
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.load_weights(path)
    assert_same_state(model, fresh)
    assert _kerasio.read_state(path) == BIG_STATE


@pytest.mark.parametrize("kind", KINDS)
def test_weights_h5_layout_is_keras_save_weights_plus_state(tmp_path, kind: str) -> None:
    model = trained(kind)
    ours, stock = str(tmp_path / "ours.weights.h5"), str(tmp_path / "stock.weights.h5")
    _kerasio.write_weights_h5(model, ours, state=b'{"s": 1}')
    model.save_weights(stock)
    tree = h5_tree(ours)
    state = tree.pop(_kerasio.STATE_MEMBER)[3]
    # Padded with JSON whitespace to a slot, so the next save can keep the file's layout.
    assert state.rstrip(b" ") == b'{"s": 1}' and json.loads(state) == {"s": 1}
    assert tree.pop(_kerasio.STATE_GROUP) == ((),)
    assert tree == h5_tree(stock)


@pytest.mark.parametrize("kind", KINDS)
def test_load_into_weights_h5(tmp_path, kind: str) -> None:
    model = trained(kind)
    path = str(tmp_path / "m.weights.h5")
    _kerasio.write_weights_h5(model, path, state=b"{}")
    fresh = make_model(kind)
    _kerasio.load_into(fresh, path)
    assert_same_state(model, fresh)


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_large_datasets_start_on_64_bytes_and_load_from_a_verified_stream(tmp_path, suffix) -> None:
    # Resume hands TF views of the bytes it read, which TF takes only 64-byte aligned.
    import xxhash

    from keras_ckpt import storage

    model = trained("nested_sequential")
    path = tmp_path / f"m{suffix}"
    write = _kerasio.write_keras if suffix == ".keras" else _kerasio.write_weights_h5
    write(model, str(path), state=b"{}")
    h5_path, base = path, 0
    if suffix == ".keras":
        with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
            base = _zip.member_data_offset(f.fileno(), archive.getinfo("model.weights.h5"))
            h5_path = tmp_path / "member.h5"
            h5_path.write_bytes(archive.read("model.weights.h5"))
    starts = []
    with h5py.File(h5_path, "r") as f:
        f.visititems(lambda name, obj: starts.append(base + obj.id.get_offset())
                     if isinstance(obj, h5py.Dataset) and obj.nbytes >= 1 << 16 else None)
    assert starts and all(start % 64 == 0 for start in starts), starts

    data = path.read_bytes()
    stream, problem = storage.LocalStorage(str(tmp_path)).stream(
        path.name, len(data), xxhash.xxh3_128_hexdigest(data))
    assert problem is None
    fresh = make_model("nested_sequential")
    with stream:
        _kerasio.load_into(fresh, str(path), stream)
        assert stream.finish() is None
    assert_same_state(model, fresh)


def test_the_metadata_is_at_the_head_so_a_resume_parses_it_before_the_data_arrives(tmp_path) -> None:
    # Resume parses the file as it is read (last piece first, then from the start): metadata
    # between the datasets would make it wait for the read to get there.
    model = keras.Sequential([keras.Input((512,))] + [keras.layers.Dense(512) for _ in range(4)])
    model.compile(optimizer="adam", loss="mse")
    adam_step(model, 0)
    path = tmp_path / "m.weights.h5"
    _kerasio.write_weights_h5(model, str(path), state=b'{"s": 1}')
    data = bytearray(path.read_bytes())
    keep = 1 << 18
    assert len(data) > 40 * keep
    data[keep:-keep] = bytes(len(data) - 2 * keep)  # only the head and the tail arrived
    path.write_bytes(data)
    datasets = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: datasets.append((name, obj.shape, obj.dtype))
                     if isinstance(obj, h5py.Dataset) else None)
    assert len(datasets) == 4 * 2 + 2 + 4 * 2 * 2 + 1  # weights, Adam's counters and moments, state
    assert _kerasio.read_state(str(path)) == b'{"s": 1}'


class Mask(keras.layers.Layer):
    """A large boolean variable: no plannable dtype, its bytes are copied into the plan."""

    def build(self, shape):
        self.mask = self.add_weight(shape=(400_000,), dtype="bool", initializer="ones",
                                    trainable=False)

    def call(self, x):
        return x


def test_a_large_boolean_variable_does_not_put_the_metadata_after_it(tmp_path) -> None:
    # Its storage was allocated as Keras's walk created it: the 400 KB came before every
    # object header created after it, and a resume waited for the middle of the file.
    def build() -> keras.Model:
        model = keras.Sequential([keras.Input((300,)), Mask()]
                                 + [keras.layers.Dense(300) for _ in range(4)])
        model.compile(optimizer="adam", loss="mse")
        return model

    model = build()
    adam_step(model, 0)
    mask = model.layers[0].mask
    mask.assign(np.random.default_rng(0).random(400_000) < 0.5)
    path = tmp_path / "m.weights.h5"
    _kerasio.write_weights_h5(model, str(path), state=b'{"s": 1}')
    headers, storage = [], []
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            headers.append(h5py.h5o.get_info(obj.id).addr)
            if isinstance(obj, h5py.Dataset) and obj.id.get_offset() is not None:
                storage.append(obj.id.get_offset())
        f.visititems(visit)
        assert f["layers/mask/vars/0"][()].tobytes() == keras.ops.convert_to_numpy(mask).tobytes()
    assert max(headers) < min(storage)
    stock = build()
    stock.load_weights(str(path))
    for want, got in zip(values(model.weights), values(stock.weights)):
        assert want.dtype == got.dtype and want.tobytes() == got.tobytes()
    data = bytearray(path.read_bytes())
    data[min(storage):-(1 << 16)] = b"\xab" * (len(data) - (1 << 16) - min(storage))  # not arrived
    path.write_bytes(data)
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: obj.attrs.keys())
    assert _kerasio.read_state(str(path)) == b'{"s": 1}'


def test_datasets_over_the_same_bytes_do_not_get_views_that_share_memory() -> None:
    # A crafted file may point two datasets at one range: only the first gets a view.
    store = object.__new__(_kerasio._ReadStore)
    store._lent = []
    assert not store._overlaps_lent(100, 200)
    assert not store._overlaps_lent(300, 400) and not store._overlaps_lent(200, 300)
    assert store._overlaps_lent(150, 160) and store._overlaps_lent(399, 500)
    assert store._overlaps_lent(0, 101) and not store._overlaps_lent(0, 100)
    assert store._lent == [(0, 100), (100, 200), (200, 300), (300, 400)]


def test_read_state_of_stock_files_is_none(tmp_path) -> None:
    model = trained("nested_sequential")
    model.save_weights(str(tmp_path / "s.weights.h5"))
    assert _kerasio.read_state(str(tmp_path / "s.weights.h5")) is None


def test_bfloat16_variables(tmp_path) -> None:
    model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(256, dtype="bfloat16")])
    model.compile(optimizer="adam", loss="mse")
    path = str(tmp_path / "m.weights.h5")
    _kerasio.write_weights_h5(model, path, state=b"{}")
    with h5py.File(path) as f:
        assert f["layers/dense/vars/0"].attrs["dtype"] == "bfloat16"  # 128 KiB: planned
    fresh = keras.Sequential([keras.Input((256,)), keras.layers.Dense(256, dtype="bfloat16")])
    fresh.load_weights(path)
    for want, got in zip(values(model.weights), values(fresh.weights)):
        assert want.dtype == got.dtype and want.tobytes() == got.tobytes()


def test_load_into_refuses_an_unbuilt_model(tmp_path) -> None:
    path = str(tmp_path / "m.weights.h5")
    _kerasio.write_weights_h5(trained("nested_sequential"), path, state=b"{}")
    with pytest.raises(ValueError, match="built model"):
        _kerasio.load_into(keras.Sequential([keras.layers.Dense(4)]), path)


# --- reusing the last file's layout -----------------------------------------------------------


def adam_step(model: keras.Model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    grads = [keras.ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32"))
             for v in model.trainable_variables]
    model.optimizer.apply_gradients(zip(grads, model.trainable_variables))


def weights_bytes(planned: _kerasio.Planned, path: str) -> bytes:
    """The HDF5 weights a plan writes (a ``.keras`` archive's member: its zip timestamp is the
    time of planning)."""
    planned.write(path)
    if not path.endswith(".keras"):
        with open(path, "rb") as f:
            return f.read()
    with zipfile.ZipFile(path) as archive:
        return archive.read("model.weights.h5")


@pytest.fixture
def walks(monkeypatch) -> list[int]:
    """Counts the plans that walked the model (each builds a new layout)."""
    count = [0]
    build = _kerasio._layout

    def counted(*args, **kwargs):
        count[0] += 1
        return build(*args, **kwargs)

    monkeypatch.setattr(_kerasio, "_layout", counted)
    return count


PLANS = {".weights.h5": _kerasio.plan_weights_h5, ".keras": _kerasio.plan_keras}


@pytest.mark.parametrize("suffix", PLANS)
def test_a_reused_layout_writes_the_current_weights(tmp_path, walks, suffix: str) -> None:
    model = make_model("functional_dropout")
    adam_step(model, 0)
    plan, layouts = PLANS[suffix], _kerasio.Layouts()
    first = weights_bytes(plan(model, state=b'{"n": 1}', layouts=layouts), str(tmp_path / f"a{suffix}"))
    for seed in (1, 2):
        adam_step(model, seed)  # every variable changes, the iteration count too
    path = str(tmp_path / f"b{suffix}")
    reused = weights_bytes(plan(model, state=b'{"n": 22}', layouts=layouts), path)
    assert walks[0] == 1  # the second plan did not walk the model
    fresh = weights_bytes(plan(model, state=b'{"n": 22}'), str(tmp_path / f"c{suffix}"))
    assert reused == fresh and reused != first
    assert _kerasio.read_state(path) == b'{"n": 22}'
    loaded = make_model("functional_dropout")
    _kerasio.load_into(loaded, path)
    assert_same_state(model, loaded)  # the third step's weights, moments and count


def _new_optimizer(model: keras.Model) -> dict:
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return {}


def _new_layer(model: keras.Model) -> dict:
    model.add(keras.layers.Dense(3))
    model.build((None, 160))
    return {}


CHANGES = {
    "a new optimizer": _new_optimizer,
    "a new layer": _new_layer,
    "a state over its slot": lambda model: {"state": b'{"s": "' + b"x" * 5000 + b'"}'},
    "arrays of another shape": lambda model: {"arrays": {"a": np.arange(6.0)}},
    "no optimizer": lambda model: {"include_optimizer": False},
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_changed_model_is_walked_again(tmp_path, walks, change: str) -> None:
    model = keras.Sequential([keras.Input((160,)), keras.layers.Dense(128), keras.layers.Dense(4)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    adam_step(model, 0)
    layouts = _kerasio.Layouts()
    kwargs = {"state": b'{"s": 1}', "arrays": {"a": np.arange(4.0)}, "include_optimizer": True}
    _kerasio.plan_weights_h5(model, layouts=layouts, **kwargs)
    adam_step(model, 1)
    kwargs.update(CHANGES[change](model))
    path = str(tmp_path / "b.weights.h5")
    reused = weights_bytes(_kerasio.plan_weights_h5(model, layouts=layouts, **kwargs), path)
    assert walks[0] == 2
    assert reused == weights_bytes(_kerasio.plan_weights_h5(model, **kwargs), str(tmp_path / "c.h5"))
    assert _kerasio.read_state(path) == kwargs["state"]
    assert _kerasio.read_arrays(path)["a"].tobytes() == kwargs["arrays"]["a"].tobytes()


class Counting(keras.layers.Layer):
    """A user's layer that saves a value of its own, not a variable."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def call(self, x):
        return x

    def save_own_variables(self, store):
        store["0"] = np.array([self.calls], dtype="int64")

    def load_own_variables(self, store):
        self.calls = int(store["0"][0])


def test_a_layer_saving_its_own_values_is_walked_every_save(tmp_path, walks) -> None:
    counting = Counting()
    model = keras.Sequential([keras.Input((4,)), counting, keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    layouts = _kerasio.Layouts()
    for calls in (1, 7):
        counting.calls = calls
        path = str(tmp_path / f"{calls}.weights.h5")
        _kerasio.plan_weights_h5(model, state=b"{}", layouts=layouts).write(path)
        with h5py.File(path) as f:
            assert f["layers/counting/vars/0"][0] == calls
    assert walks[0] == 2


class Choosing(keras.layers.Layer):
    """A user's layer whose saver picks which of its variables to save."""

    def build(self, input_shape):
        self.a = self.add_weight(shape=(2,), initializer="zeros")
        self.b = self.add_weight(shape=(2,), initializer="ones")
        self.saves_b = False

    def call(self, x):
        return x

    def save_own_variables(self, store):
        store["0"] = self.b if self.saves_b else self.a


def test_a_users_own_saver_is_walked_every_save(tmp_path, walks) -> None:
    model = keras.Sequential([keras.Input((4,)), Choosing(name="choosing")])
    layouts = _kerasio.Layouts()
    _kerasio.plan_weights_h5(model, state=b"{}", layouts=layouts)
    model.layers[0].saves_b = True  # the same variables, another file
    path = str(tmp_path / "m.weights.h5")
    _kerasio.plan_weights_h5(model, state=b"{}", layouts=layouts).write(path)
    with h5py.File(path) as f:
        assert f["layers/choosing/vars/0"][()].tolist() == [1.0, 1.0]
    assert walks[0] == 2


def test_a_lora_kernel_is_walked_every_save(tmp_path, walks) -> None:
    # Dense saves its kernel merged with the LoRA factors: a computed value, not a variable.
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8)])
    model.compile(optimizer="adam", loss="mse")
    dense = model.layers[0]
    dense.enable_lora(2)
    layouts = _kerasio.Layouts()
    _kerasio.plan_weights_h5(model, state=b"{}", layouts=layouts)
    dense.lora_kernel_b.assign(np.ones(dense.lora_kernel_b.shape, "float32"))
    path = str(tmp_path / "m.weights.h5")
    _kerasio.plan_weights_h5(model, state=b"{}", layouts=layouts).write(path)
    assert walks[0] == 2
    with h5py.File(path) as f:
        assert f["layers/dense/vars/0"][()].tobytes() == values([dense.kernel])[0].tobytes()


# --- the other backend ------------------------------------------------------------------------


@pytest.mark.skipif(bool(os.environ.get(INNER)), reason="already the inner run")
@pytest.mark.parametrize("backend", BACKENDS)
def test_other_backend(backend: str) -> None:
    if backend == keras.backend.backend():
        pytest.skip("this process runs this backend's tests itself")
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", **{INNER: "1"})
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]


class Interrupted(keras.layers.Layer):
    """Its saver gets a real SIGINT (Ctrl-C) while the save's HDF5 image is open."""

    def call(self, x):
        return x

    def save_own_variables(self, store):
        self.finished = False
        signal.raise_signal(signal.SIGINT)
        self.finished = True


def test_a_ctrl_c_while_the_hdf5_image_is_open_is_a_keyboard_interrupt_after_it_closes() -> None:
    # h5py calls the image's methods from C and replaces a KeyboardInterrupt raised in one of
    # them by an AttributeError ("'_SparseImage' object has no attribute 'flush'"): a Ctrl-C
    # during a real save loop ended a run so, 2 in 15. It is held until the image is closed.
    layer = Interrupted()
    model = keras.Sequential([keras.Input((4,)), layer, keras.layers.Dense(2)])
    with pytest.raises(KeyboardInterrupt):
        _kerasio.plan_weights_h5(model, state=b"{}")
    assert layer.finished  # the walk went on to the end, the interrupt came after
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class TwoHeads(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.actor = keras.layers.Dense(8)
        self.critic = keras.layers.Dense(8)
        self.blocks = [keras.layers.Dense(8), keras.layers.Dense(8)]

    def call(self, x):
        return self.blocks[1](self.blocks[0](self.critic(self.actor(x))))


@pytest.mark.parametrize("swap", ["attributes", "list items"])
def test_layers_swapped_between_places_are_walked_again(tmp_path, walks, swap: str) -> None:
    # The same variables in the same order, but Keras names a layer's group by where it is
    # held (the attribute, for those it reaches before the model's ``layers``): two networks
    # swapped (actor and critic, online and target) make another file.
    model = TwoHeads()
    model(np.zeros((1, 8), "float32"))
    model.compile(optimizer="adam", loss="mse")
    adam_step(model, 0)
    layouts = _kerasio.Layouts()
    _kerasio.plan_weights_h5(model, state=b"{}", layouts=layouts)
    if swap == "attributes":
        model.actor, model.critic = model.critic, model.actor
    else:
        model.blocks[0], model.blocks[1] = model.blocks[1], model.blocks[0]
    path = str(tmp_path / "m.weights.h5")
    reused = weights_bytes(_kerasio.plan_weights_h5(model, state=b"{}", layouts=layouts), path)
    assert walks[0] == 2
    assert reused == weights_bytes(_kerasio.plan_weights_h5(model, state=b"{}"), str(tmp_path / "c.h5"))
    loaded = TwoHeads()
    loaded(np.zeros((1, 8), "float32"))
    loaded.load_weights(path)
    for a, b in ((loaded.actor, model.actor), (loaded.blocks[0], model.blocks[0])):
        assert a.kernel.numpy().tobytes() == b.kernel.numpy().tobytes()
