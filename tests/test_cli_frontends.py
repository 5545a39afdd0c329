"""keras-ckpt ls / verify / export / diff on directories the real front-ends wrote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from keras_ckpt import _export, storage
from keras_ckpt import manifest as mf

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _cli_dirs  # noqa: E402

FRONTENDS = {"keras": _cli_dirs.keras_dir, "torch": _cli_dirs.torch_dir, "tf": _cli_dirs.tf_dir}
NEEDS = {"keras": "keras", "torch": "torch", "tf": "tensorflow"}


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "keras_ckpt", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=240)


def cli_json(*args):
    out = cli(*args, "--json")
    return out.returncode, json.loads(out.stdout)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """frontend -> a directory it wrote (built once per module, copied by tests that alter it)."""
    made = {}

    def get(frontend):
        pytest.importorskip(NEEDS[frontend])
        if frontend not in made:
            d = tmp_path_factory.mktemp(frontend)
            FRONTENDS[frontend](str(d))
            made[frontend] = str(d)
        return made[frontend]

    return get


@pytest.fixture
def copy_of(written, tmp_path):
    def get(frontend):
        d = tmp_path / f"{frontend}-copy"
        shutil.copytree(written(frontend), d)
        return str(d)

    return get


def only_best(listing, series=None):
    best = [c for c in listing["checkpoints"] if c["best"] and (series is None or c["series"] == series)]
    assert len(best) == 1, best
    return best[0]


# -- ls ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_ls_json_matches_the_files_on_disk(written, frontend):
    d = written(frontend)
    rc, listing = cli_json("ls", d)
    assert rc == 0
    assert listing["directory"] == os.path.abspath(d) and listing["format"] == 1
    on_disk = {n for n in os.listdir(d) if n not in (mf.FILENAME, "checkpoint", storage.LOCK_NAME)}
    assert {f["path"] for c in listing["checkpoints"] for f in c["files"]} == on_disk
    for c in listing["checkpoints"]:
        assert c["bytes"] == sum(os.path.getsize(os.path.join(d, f["path"])) for f in c["files"])
        assert c["kept"] and set(c["kept"]) <= {"latest", "best"}
        assert set(c) >= {"name", "series", "seq", "run", "epoch", "step", "time", "metrics", "files"}
    assert [c["seq"] for c in listing["checkpoints"]] == sorted(c["seq"] for c in listing["checkpoints"])
    for name, series in listing["series"].items():
        if series["monitor"]:
            best = only_best(listing, name)
            assert best["name"] == series["best_name"]
            assert best["metrics"][series["monitor"]] == series["best"]


def test_ls_values_are_what_training_logged(written):
    rc, listing = cli_json("ls", written("keras"))
    keras_series = "ck-{epoch:02d}.keras"
    assert {c["name"] for c in listing["checkpoints"] if c["series"] == keras_series} == {
        "ck-02", "ck-04", "ck-05"}  # latest-2 + best-1, across the resumed fit
    best = only_best(listing, keras_series)
    assert best["epoch"] == 2 and best["metrics"]["val_loss"] == _cli_dirs.VAL_LOSSES[1]
    assert best["step"] == 8  # 32 samples / batch 8 = 4 steps an epoch
    assert listing["series"][keras_series]["framework"] == "keras"


def test_ls_piped_is_plain_text_one_row_per_checkpoint(written):
    d = written("keras")
    out = cli("ls", d)
    assert out.returncode == 0, out.stderr
    assert "\x1b[" not in out.stdout  # no colour codes in a pipe
    rows = {ln.split()[1 if ln.startswith("*") else 0]: ln for ln in out.stdout.splitlines()
            if ln.strip().startswith(("*", "ck-", "w-"))}
    listing = json.loads(cli("ls", d, "--json").stdout)
    assert set(rows) == {c["name"] for c in listing["checkpoints"]}
    assert {n for n, ln in rows.items() if ln.startswith("*")} == {
        c["name"] for c in listing["checkpoints"] if c["best"]}
    assert all(ln == ln.rstrip() for ln in out.stdout.splitlines())


def test_ls_in_a_terminal_uses_rich(written):
    """Under a pseudo-terminal: a rich table (box rules), the best row styled."""
    import pty

    d = written("torch")
    pid, fd = pty.fork()
    if pid == 0:  # the child: keras-ckpt ls on the terminal
        os.execv(sys.executable, [sys.executable, "-m", "keras_ckpt", "ls", d])
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode()
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "━" in text or "─" in text  # rich's table rules
    assert "\x1b[" in text and "ck-02" in text


def test_no_manifest_and_newer_format_are_refused_clearly(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"PK")
    for command in (["ls"], ["verify"], ["export", "--latest", "out.keras"], ["plot", "-o", "x.png"]):
        args = [command[0], tmp_path, *command[1:]]
        out = cli(*args)
        assert out.returncode == 2 and "has no checkpoints.json" in out.stderr, (command, out.stderr)
    newer = '{"format": 99, "writer": "keras_ckpt 9.0", "checkpoints": []}'
    (tmp_path / "checkpoints.json").write_text(newer)
    out = cli("ls", tmp_path, "--json")
    assert out.returncode == 2 and "newer than this keras_ckpt understands" in out.stderr
    assert out.stdout == ""
    out = cli("ls", tmp_path / "nowhere")
    assert out.returncode == 2 and "is not a directory" in out.stderr


def test_the_cli_imports_no_framework(written):
    d = written("keras")
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        import keras_ckpt.cli
        with contextlib.redirect_stdout(io.StringIO()):
            for args in (["ls", {d!r}], ["ls", {d!r}, "--json"], ["verify", {d!r}, "--json"]):
                assert keras_ckpt.cli.main(args) == 0
        print(json.dumps(sorted(m for m in ("tensorflow", "keras", "torch", "jax", "h5py", "matplotlib")
                                if m in sys.modules)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


# -- verify --------------------------------------------------------------------------------------


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_verify_catches_a_flipped_byte_a_truncated_file_and_an_unlisted_file(copy_of, frontend):
    d = copy_of(frontend)
    rc, report = cli_json("verify", d)
    assert rc == 0 and report["ok"] and report["unlisted"] == []
    assert all(c["ok"] for c in report["checkpoints"])
    records = sorted(mf.load(d).checkpoints, key=lambda r: r.seq)
    flipped, truncated = records[0], records[-1]
    big = lambda r: max(r.files, key=lambda f: f.bytes).path  # noqa: E731
    path = os.path.join(d, big(flipped))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    path = os.path.join(d, big(truncated))
    os.truncate(path, os.path.getsize(path) - 7)
    stray = os.path.basename(big(flipped)).replace(flipped.name, "stray")
    shutil.copy(os.path.join(d, big(records[1])), os.path.join(d, stray))

    rc, report = cli_json("verify", d)
    assert rc == 1 and not report["ok"]
    status = {c["name"]: c for c in report["checkpoints"]}
    assert not status[flipped.name]["ok"] and "checksum" in status[flipped.name]["problem"]
    assert not status[truncated.name]["ok"] and "bytes" in status[truncated.name]["problem"]
    assert [n for n, c in status.items() if c["ok"]] == [
        r.name for r in records if r.name not in (flipped.name, truncated.name)]
    assert report["unlisted"] == [stray]


# -- export --------------------------------------------------------------------------------------


def keras_weights(path):
    """The model's weights as Keras loads them (keras.models.load_model ignores our state)."""
    import keras

    return [np.asarray(w) for w in keras.models.load_model(path, compile=False).get_weights()]


def test_export_keras_best_loads_without_keras_ckpt(written, tmp_path):
    d = written("keras")
    out = tmp_path / "serve" / "model.keras"
    done = cli("export", d, "--best", "--series", "ck-{epoch:02d}.keras", out)
    assert done.returncode == 0, done.stderr
    assert "ck-02" in done.stdout and os.path.isfile(out)
    assert os.listdir(out.parent) == ["model.keras"]  # no temporaries left
    # A process that never imports keras_ckpt loads it with plain Keras.
    code = textwrap.dedent(f"""
        import sys
        import keras, numpy as np
        model = keras.models.load_model({str(out)!r})
        np.savez({str(tmp_path / "w.npz")!r}, *model.get_weights())
        assert "keras_ckpt" not in sys.modules, "keras_ckpt was imported"
        print(model.optimizer.__class__.__name__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=240)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split()[-1] == "Adam"
    exported = np.load(tmp_path / "w.npz")
    expected = keras_weights(os.path.join(d, "ck-02.keras"))
    assert len(exported.files) == len(expected)
    for i, w in enumerate(expected):
        np.testing.assert_array_equal(exported[f"arr_{i}"], w)
    import h5py

    with _export._zip_member(str(out), _export.WEIGHTS_MEMBER) as f, h5py.File(f, "r") as h5:
        assert _export.STATE_GROUP not in h5 and "optimizer" in h5
    with _export._zip_member(os.path.join(d, "ck-02.keras"), _export.WEIGHTS_MEMBER) as f, \
            h5py.File(f, "r") as h5:
        assert _export.STATE_GROUP in h5


def test_export_weights_h5_from_either_series_round_trips(written, tmp_path):
    import h5py
    import keras

    d = written("keras")
    cases = [("ck-{epoch:02d}.keras", "ck-04", ["--name", "ck-04"]),
             ("w-{epoch:02d}.weights.h5", "w-05", ["--latest", "--no-optimizer"])]
    for series, name, how in cases:
        out = tmp_path / f"{name}.weights.h5"
        done = cli("export", d, *how, "--series", series, out)
        assert done.returncode == 0, done.stderr
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(1)])
        model.load_weights(out)
        if name == "ck-04":
            expected = keras_weights(os.path.join(d, "ck-04.keras"))
        else:
            reference = keras.models.clone_model(model)
            reference.load_weights(os.path.join(d, "w-05.weights.h5"))
            expected = reference.get_weights()
        for got, want in zip(model.get_weights(), expected):
            np.testing.assert_array_equal(got, want)
        with h5py.File(out, "r") as h5:
            assert _export.STATE_GROUP not in h5
            assert ("optimizer" in h5) == ("--no-optimizer" not in how)


def test_export_never_overwrites_without_force_and_refuses_a_corrupt_checkpoint(copy_of, tmp_path):
    d = copy_of("torch")
    out = tmp_path / "model.pt"
    out.write_bytes(b"mine")
    done = cli("export", d, "--best", out)
    assert done.returncode == 2 and "--force" in done.stderr and out.read_bytes() == b"mine"
    assert cli("export", d, "--best", out, "--force").returncode == 0
    assert out.read_bytes() != b"mine"
    done = cli("export", d, "--latest", tmp_path / "model.keras")
    assert done.returncode == 2 and "OUT must end in .pt" in done.stderr
    best = next(r for r in mf.load(d).checkpoints if r.kept and "best" in r.kept)
    path = os.path.join(d, best.path)
    os.truncate(path, os.path.getsize(path) - 1)
    fresh = tmp_path / "fresh" / "model.pt"
    done = cli("export", d, "--best", fresh)
    assert done.returncode == 2 and "corrupt" in done.stderr and not fresh.parent.exists()
    done = cli("export", d, "--name", "ck-99", fresh)
    assert done.returncode == 2 and "no such checkpoint" in done.stderr


def test_export_torch_is_the_models_state_dict_only(written, tmp_path):
    import torch

    d = written("torch")
    out = tmp_path / "model.pt"
    assert cli("export", d, "--latest", out).returncode == 0
    latest = max(mf.load(d).checkpoints, key=lambda r: r.seq)
    state = torch.load(out, weights_only=True)
    saved = torch.load(os.path.join(d, latest.path), weights_only=True)
    assert set(state) == set(saved["model"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for k, v in saved["model"].items():
        assert torch.equal(state[k], v)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    model.load_state_dict(state)  # strict: nothing missing, nothing extra


def test_export_tf_copies_the_prefix(written, tmp_path):
    import tensorflow as tf

    d = written("tf")
    prefix = tmp_path / "export" / "best"
    done = cli("export", d, "--best", prefix)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(prefix.parent)) == ["best.data-00000-of-00001", "best.index"]
    got, want = tf.train.load_checkpoint(str(prefix)), tf.train.load_checkpoint(os.path.join(d, "ckpt-2"))
    keys = set(want.get_variable_to_shape_map())
    assert set(got.get_variable_to_shape_map()) == keys and any(k.startswith("w/") for k in keys)
    for k in keys:
        np.testing.assert_array_equal(got.get_tensor(k), want.get_tensor(k))
    w = tf.Variable([0.0, 0.0, 0.0])
    tf.train.Checkpoint(w=w).restore(str(prefix)).expect_partial()
    np.testing.assert_allclose(w.numpy(), np.array([0.5, -1.0, 2.0]) * 0.9 ** 2, rtol=1e-6)


def test_export_names_the_choice_it_needs(written, tmp_path):
    d = written("keras")
    done = cli("export", d, "--best", tmp_path / "m.keras")
    assert done.returncode == 2 and "several series" in done.stderr and "--series" in done.stderr
    done = cli("export", d, "--best", "--series", "nope", tmp_path / "m.keras")
    assert done.returncode == 2 and "'nope'" in done.stderr
    done = cli("export", d, "--name", "w-05", tmp_path / "m.keras")
    assert done.returncode == 2 and "OUT must end in .weights.h5" in done.stderr


def test_the_state_names_match_the_writers():
    pytest.importorskip("keras")
    from keras_ckpt import _kerasio

    assert _export.STATE_GROUP == _kerasio.STATE_GROUP
    assert _export.WEIGHTS_MEMBER == _kerasio._WEIGHTS_MEMBER


# -- diff ----------------------------------------------------------------------------------------


def test_diff_reports_changed_tensors_by_how_much(written):
    d = written("keras")
    rc, same = cli_json("diff", d, "ck-04", "ck-04")
    assert rc == 0 and same["tensors"] and {t["status"] for t in same["tensors"]} == {"same"}
    assert not any(t["name"].startswith(_export.STATE_GROUP) for t in same["tensors"])
    rc, report = cli_json("diff", d, "ck-02", "ck-05")
    assert rc == 0
    a, b = keras_weights(os.path.join(d, "ck-02.keras")), keras_weights(os.path.join(d, "ck-05.keras"))
    layer_rows = [t for t in report["tensors"] if t["name"].startswith("layers/")]
    assert len(layer_rows) == len(a) == 4
    expected = sorted(float(np.max(np.abs(y - x))) for x, y in zip(a, b))
    assert sorted(t["max_abs_diff"] for t in layer_rows) == pytest.approx(expected)
    assert all(t["status"] == "changed" and t["rel_l2"] > 0 for t in layer_rows)
    out = cli("diff", d, "ck-02", "ck-05")
    assert out.returncode == 0 and "changed" in out.stdout.splitlines()[-1]


def test_diff_of_torch_and_tf_checkpoints(written):
    rc, report = cli_json("diff", written("torch"), "ck-01", "ck-02")
    assert rc == 0 and {t["name"] for t in report["tensors"]} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(t["status"] == "changed" for t in report["tensors"])
    rc, report = cli_json("diff", written("tf"), "ckpt-4", "ckpt-5")
    rows = {t["name"].split("/")[0]: t for t in report["tensors"]}
    assert rc == 0 and rows["w"]["status"] == "changed" and rows["step"]["status"] == "changed"
    assert rows["w"]["rel_l2"] == pytest.approx(0.1, rel=1e-5)  # w shrinks by 10% per save
