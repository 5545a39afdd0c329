"""CheckpointHook with tf.estimator (TF <= 2.15 + tensorflow-estimator: the second CI environment)."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.estimator

tf = pytest.importorskip("tensorflow")
try:
    tf.estimator.Estimator  # noqa: B018 (TF >= 2.16 has no tf.estimator)
except AttributeError:
    pytest.skip("tf.estimator needs TensorFlow <= 2.15 with tensorflow-estimator", allow_module_level=True)

from keras_ckpt import manifest as mf  # noqa: E402
from keras_ckpt.estimator import CheckpointHook  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
HELPER = os.path.join(HERE, "_estimator_loop.py")
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "tf_estimator_mnist_cnn.py")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def _helper():
    spec = importlib.util.spec_from_file_location("_estimator_loop", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kept(directory):
    return {r.name: r.kept for r in mf.load(str(directory)).checkpoints}


def _index_files(directory):
    return sorted(n[: -len(".index")] for n in os.listdir(directory) if n.endswith(".index"))


class _Capture(tf.compat.v1.train.SessionRunHook):
    """The values of all global variables right after the session was created (restored)."""

    def after_create_session(self, session, coord):
        variables = tf.compat.v1.global_variables()
        self.values = dict(zip((v.op.name for v in variables), session.run(variables)))


class _Listener(tf.compat.v1.train.CheckpointSaverListener):
    def __init__(self):
        self.saved = []

    def after_save(self, session, global_step_value):
        self.saved.append(int(global_step_value))


def test_import_needs_no_keras_3():
    import keras_ckpt.estimator

    assert issubclass(keras_ckpt.estimator.CheckpointHook, tf.compat.v1.train.CheckpointSaverHook)
    assert "keras_ckpt.keras" not in sys.modules
    keras = sys.modules.get("keras")
    assert keras is None or keras.__version__.startswith("2.")


def test_retention_resume_and_no_estimator_saver(tmp_path):
    helper = _helper()
    model_dir = str(tmp_path / "model")
    # RunConfig's own saving would leave model.ckpt-0, -7, -14, ...: Estimator must not add its
    # saver when given a CheckpointSaverHook.
    config = tf.estimator.RunConfig(
        tf_random_seed=1, save_checkpoints_steps=7, keep_checkpoint_max=1, log_step_count_steps=None
    )
    estimator = tf.estimator.Estimator(helper.regression_model_fn, model_dir=model_dir, config=config)
    hook = CheckpointHook(model_dir, save_steps=10, max_to_keep=2, keep_best=1, monitor="loss")
    estimator.train(helper.regression_input_fn, steps=60, hooks=[hook])

    assert _kept(model_dir) == {
        "model.ckpt-20": ("best",), "model.ckpt-50": ("latest",), "model.ckpt-60": ("latest",)
    }
    assert _index_files(model_dir) == ["model.ckpt-20", "model.ckpt-50", "model.ckpt-60"]
    assert tf.train.latest_checkpoint(model_dir) == os.path.join(model_dir, "model.ckpt-60")
    assert estimator.latest_checkpoint() == os.path.join(model_dir, "model.ckpt-60")
    state = tf.train.get_checkpoint_state(model_dir)
    assert list(state.all_model_checkpoint_paths) == [os.path.join(model_dir, "model.ckpt-60")]
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "model.ckpt-60"))
    saved = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    assert {"w", "w/Adam", "w/Adam_1", "beta1_power", "beta2_power", "global_step"} <= set(saved)

    # A second train() continues from global step 60 with every variable restored exactly.
    capture, listener = _Capture(), _Listener()
    hook = CheckpointHook(model_dir, save_steps=10, max_to_keep=2, keep_best=1, monitor="loss")
    estimator.train(
        helper.regression_input_fn, steps=20, hooks=[hook, capture], saving_listeners=[listener]
    )
    assert set(capture.values) == set(saved)
    for name, value in capture.values.items():
        assert np.array_equal(value, saved[name]), name
    assert estimator.get_variable_value("global_step") == 80
    assert listener.saved == [70, 80]  # Estimator hands its saving listeners to the hook
    assert _kept(model_dir) == {
        "model.ckpt-20": ("best",), "model.ckpt-70": ("latest",), "model.ckpt-80": ("latest",)
    }
    assert _index_files(model_dir) == ["model.ckpt-20", "model.ckpt-70", "model.ckpt-80"]


def test_evaluate_report_loop_keeps_the_best_across_a_restart(tmp_path):
    model_dir = str(tmp_path / "model")
    # Epoch 1 learns the labels; epochs 2 and 3 train on flipped labels and ruin the accuracy.
    accuracies = _helper().run_epochs(model_dir, [False, True, True])
    assert accuracies[0] == 1.0 and max(accuracies[1:]) < 0.5
    assert _kept(model_dir) == {"model.ckpt-10": ("best",), "model.ckpt-30": ("latest",)}
    assert not any(r.pending for r in mf.load(model_dir).checkpoints)

    # A new process continues the loop; a worse epoch never displaces the best from before.
    cmd = [sys.executable, HELPER, "--dir", model_dir, "--flips", "1,0"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    later = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(later) == 2
    records = mf.load(model_dir).checkpoints
    series = mf.load(model_dir).series["model.ckpt"]
    assert series.best == 1.0 and series.best_name == "model.ckpt-10"
    assert [r.name for r in records] == ["model.ckpt-10", "model.ckpt-50"]
    assert records[0].metrics["accuracy"] == 1.0
    assert _index_files(model_dir) == ["model.ckpt-10", "model.ckpt-50"]


def _tree_digest(directory):
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = (f.read(), os.stat(path).st_mtime_ns)
    return out


def test_example_resumes_from_a_read_only_copy(tmp_path):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    args = [sys.executable, EXAMPLE, "--epochs", "2", "--steps-per-epoch", "15"]
    done = subprocess.run([*args, "--output", first], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    for root, dirs, files in os.walk(first):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), stat.S_IREAD | stat.S_IEXEC)
    os.chmod(first, stat.S_IREAD | stat.S_IEXEC)
    before = _tree_digest(first)
    try:
        done = subprocess.run(
            [*args[:2], "--epochs", "3", "--steps-per-epoch", "15", "--output", second,
             "--resume-from", first],
            env=ENV, capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        assert _tree_digest(first) == before  # never written into
    finally:
        for root, dirs, files in os.walk(first):
            for name in dirs + files:
                os.chmod(os.path.join(root, name), stat.S_IRWXU)
        os.chmod(first, stat.S_IRWXU)
    assert "resumed from" in done.stdout and "global step 30" in done.stdout
    records = mf.load(second).checkpoints
    assert records[-1].name == "model.ckpt-45" and "accuracy" in records[-1].metrics
    assert tf.train.latest_checkpoint(second) == os.path.join(second, "model.ckpt-45")
