"""CheckpointHook with tf.compat.v1 MonitoredTrainingSession (graph mode, TF 2.x)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from keras_ckpt import manifest as mf  # noqa: E402
from keras_ckpt.estimator import CheckpointHook, _chief_from_tf_config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
HELPER = os.path.join(HERE, "_mts_train.py")


def _helper():
    spec = importlib.util.spec_from_file_location("_mts_train", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _start(directory, last_step, out):
    cmd = [sys.executable, HELPER, "--dir", str(directory), "--last-step", str(last_step)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="error::UserWarning")
    return subprocess.Popen(
        [*cmd, "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _wait(proc):
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output.decode(errors="replace")[-4000:]


def _kept(directory):
    return {r.name: r.kept for r in mf.load(str(directory)).checkpoints}


def _index_files(directory):
    return sorted(n[: -len(".index")] for n in os.listdir(directory) if n.endswith(".index"))


def _train(directory, last_step, *, hook=None, **session_kwargs):
    """Train in this process (a fresh graph); returns the hook and the session's first global step."""
    helper = _helper()
    with tf.Graph().as_default():
        train_op, loss = helper.build_graph()
        hook = hook or CheckpointHook(directory, save_steps=10, max_to_keep=2, keep_best=1, monitor="loss")
        recorder = helper.Recorder(loss)
        session_kwargs.setdefault("checkpoint_dir", str(directory))
        session_kwargs.setdefault("save_checkpoint_secs", None)
        stop = tf.compat.v1.train.StopAtStepHook(last_step=last_step)
        with tf.compat.v1.train.MonitoredTrainingSession(
            hooks=[hook, recorder, stop], save_summaries_steps=None, log_step_count_steps=None,
            **session_kwargs,
        ) as sess:
            while not sess.should_stop():
                sess.run(train_op)
    return hook, int(recorder.restored["global_step"])


def test_retention_and_exact_resume_in_a_new_process(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # The uninterrupted run and the first half of the interrupted one, side by side.
    a = _start(straight, 80, tmp_path / "a.npz")
    b1 = _start(resumed, 60, tmp_path / "b1.npz")
    _wait(a)
    _wait(b1)

    # Saves at 10, 20, ..., 60; kept: the newest 2 plus the best (step 20, loss scaled down).
    assert _kept(resumed) == {
        "model.ckpt-20": ("best",),
        "model.ckpt-50": ("latest",),
        "model.ckpt-60": ("latest",),
    }
    assert _index_files(resumed) == ["model.ckpt-20", "model.ckpt-50", "model.ckpt-60"]
    record = mf.load(str(resumed)).checkpoints[-1]
    assert sorted(f.path for f in record.files) == [
        "model.ckpt-60.data-00000-of-00001", "model.ckpt-60.index", "model.ckpt-60.meta"
    ]
    assert tf.train.latest_checkpoint(str(resumed)) == str(resumed / "model.ckpt-60")
    state = tf.train.get_checkpoint_state(str(resumed))
    assert list(state.all_model_checkpoint_paths) == [str(resumed / "model.ckpt-60")]
    reader = tf.train.load_checkpoint(str(resumed / "model.ckpt-60"))
    # Read now: the restarted run rotates model.ckpt-60 away.
    saved = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}

    b2 = _start(resumed, 80, tmp_path / "b2.npz")
    _wait(b2)
    run_a, run_b1, run_b2 = (np.load(tmp_path / f) for f in ("a.npz", "b1.npz", "b2.npz"))

    # The restart restored every variable exactly: global step, weights, Adam slots, beta powers.
    restored = {k[4:]: run_b2[k] for k in run_b2.files if k.startswith("var:")}
    assert restored["global_step"] == 60
    assert {"w1/Adam", "w1/Adam_1", "beta1_power", "beta2_power"} <= set(restored)
    assert set(restored) == set(saved)
    for name, value in restored.items():
        assert np.array_equal(value, saved[name]), name

    # And training continued bitwise as if never interrupted.
    assert len(run_b1["losses"]) == 60 and len(run_b2["losses"]) == 20
    both = np.concatenate([run_b1["losses"], run_b2["losses"]])
    assert both.tobytes() == run_a["losses"].tobytes()

    assert _kept(resumed) == {
        "model.ckpt-20": ("best",),
        "model.ckpt-70": ("latest",),
        "model.ckpt-80": ("latest",),
    }
    assert _kept(straight) == _kept(resumed)


def test_corrupt_newest_is_skipped_and_state_file_is_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _train("run", 30)
    assert open("run/checkpoint").read().splitlines()[0] == 'model_checkpoint_path: "model.ckpt-30"'
    with open("run/model.ckpt-30.data-00000-of-00001", "r+b") as f:
        f.write(b"\xff\xff\xff\xff")

    with pytest.warns(UserWarning, match="skipping checkpoint 'model.ckpt-30'"):
        hook, first_step = _train("run", 35)
    # The session restored the previous good checkpoint, not the corrupt one.
    assert first_step == 20
    assert [r.name for r in hook.records][-1] == "model.ckpt-35"  # saved by end()
    assert tf.train.latest_checkpoint("run") == os.path.join("run", "model.ckpt-35")
    # Relative paths: a copied directory resolves to its own files.
    assert 'model_checkpoint_path: "model.ckpt-35"' in open("run/checkpoint").read()
    assert hook.latest_checkpoint == os.path.join("run", "model.ckpt-35")
    assert os.path.exists("run/graph.pbtxt")


def test_no_save_right_after_restore(tmp_path):
    _train(tmp_path, 20)
    saved_at = mf.load(str(tmp_path)).checkpoints[-1].time
    hook, first_step = _train(tmp_path, 25)
    assert first_step == 20
    # TF's own hook would have rewritten model.ckpt-20 when the session started; this one saves
    # next at 30 or, as here, at the end.
    assert [(r.name, r.time == saved_at) for r in hook.records][-2:] == [
        ("model.ckpt-20", True), ("model.ckpt-25", False)
    ]


class _Listener(tf.compat.v1.train.CheckpointSaverListener):
    def __init__(self):
        self.saved = []

    def after_save(self, session, global_step_value):
        self.saved.append(int(global_step_value))


def test_save_secs_saves_on_the_clock_and_at_the_end(tmp_path):
    listener = _Listener()
    hook = CheckpointHook(tmp_path, save_secs=3600, listeners=[listener])
    _train(tmp_path, 5, hook=hook)
    # The hour has not passed: only end() saved, and the listener heard of it.
    assert listener.saved == [5] and [r.name for r in hook.records] == ["model.ckpt-5"]


def test_warns_about_monitored_training_sessions_own_saver(tmp_path):
    with pytest.warns(UserWarning, match="model.ckpt-0.*save_checkpoint_secs=None"):
        _train(tmp_path, 10, save_checkpoint_secs=600)


def test_warns_when_the_session_did_not_restore(tmp_path):
    _train(tmp_path, 10)
    with pytest.warns(UserWarning, match="did not restore from this directory"):
        _train(tmp_path, 5, checkpoint_dir=None)


def test_report_protects_pending_checkpoints_until_evaluated(tmp_path):
    hook = CheckpointHook(
        tmp_path, save_steps=10, max_to_keep=1, keep_best=1, monitor="accuracy",
        monitor_reduce="report", mode="max",
    )
    _train(tmp_path, 30, hook=hook)
    # Nothing is reported yet: all three wait, protected from rotation.
    assert [(r.name, r.pending) for r in hook.records] == [
        ("model.ckpt-10", True), ("model.ckpt-20", True), ("model.ckpt-30", True)
    ]
    record = hook.report({"global_step": np.int64(30), "accuracy": np.float32(0.5), "loss": 1.0})
    assert record.metrics == {"accuracy": 0.5, "loss": 1.0}
    # The earlier ones will never be evaluated: released, and rotated away.
    assert [r.name for r in hook.records] == ["model.ckpt-30"]
    _train(tmp_path, 50, hook=hook)
    hook.report({"global_step": 50, "accuracy": 0.25})
    assert _kept(tmp_path) == {"model.ckpt-30": ("best",), "model.ckpt-50": ("latest",)}
    assert hook.best == 0.5 and hook.best_checkpoint == str(tmp_path / "model.ckpt-30")

    with pytest.warns(UserWarning, match="no checkpoint of global step 44"):
        assert hook.report({"global_step": 44, "accuracy": 1.0}) is None
    with pytest.raises(ValueError, match="'global_step'"):
        hook.report({"accuracy": 1.0})


def test_mean_and_last_reductions(tmp_path):
    for reduce in ("mean", "last"):
        directory = tmp_path / reduce
        hook = CheckpointHook(directory, save_steps=10, monitor="loss:0", monitor_reduce=reduce)
        _train(directory, 20, hook=hook)
        assert set(hook.records[0].metrics) == {"loss"}
        # Reported metrics are recorded, but the ranked value stays the tensor's.
        record = hook.report({"global_step": 20, "loss": 99.0, "accuracy": 0.75})
        assert record.metrics["accuracy"] == 0.75 and record.metrics["loss"] < 0.1
    mean = mf.load(str(tmp_path / "mean")).checkpoints[1].metrics["loss"]
    last = mf.load(str(tmp_path / "last")).checkpoints[1].metrics["loss"]
    # Steps 10-19 are scaled down 1000x: their mean is small, the last one too, and they differ.
    assert mean < 0.1 and last < 0.1 and mean != last


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "Pass exactly one of save_steps and save_secs. Received: save_steps=None, save_secs=None"),
        ({"save_steps": 1, "save_secs": 1}, "Received: save_steps=1, save_secs=1"),
        ({"save_steps": 0}, "Received: save_steps=0"),
        ({"save_secs": -5}, "Received: save_secs=-5"),
        ({"save_steps": 1, "max_to_keep": -1},
         "max_to_keep must be an integer >= 0 or None. Received: max_to_keep=-1"),
        ({"save_steps": 1, "keep_best": -1, "monitor": "loss"}, "Received: keep_best=-1"),
        ({"save_steps": 1, "keep_every_n_hours": -1}, "Received: keep_every_n_hours=-1"),
        ({"save_steps": 1, "keep_best": 1}, "pass monitor=... as well"),
        ({"save_steps": 1, "monitor": "loss", "monitor_reduce": "median"},
         "Received: monitor_reduce='median'"),
        ({"save_steps": 1, "monitor_reduce": "report"}, "Received: monitor=None"),
        ({"save_steps": 1, "monitor": "loss", "mode": "bigger"}, "Received: mode='bigger'"),
        ({"save_steps": 1, "monitor": "gradient_norm"}, "Pass mode='min' or mode='max'"),
        ({"save_steps": "10"}, "Received: save_steps='10'"),
        ({"save_steps": 10.0}, "Received: save_steps=10.0"),
        ({"save_secs": "5"}, "Received: save_secs='5'"),
        ({"save_steps": 1, "max_to_keep": "3"}, "Received: max_to_keep='3'"),
        ({"save_steps": 1, "keep_best": "1", "monitor": "loss"}, "Received: keep_best='1'"),
        ({"save_steps": 1, "keep_every_n_hours": "2"}, "Received: keep_every_n_hours='2'"),
        ({"save_steps": 1, "monitor": "loss", "monitor_reduce": ["mean"]},
         "Received: monitor_reduce=['mean']"),
        ({"save_steps": 1, "monitor": 3}, "Received: monitor=3"),
        ({"save_steps": 1, "checkpoint_basename": ""}, "Received: checkpoint_basename=''"),
        ({"save_steps": 1, "checkpoint_basename": "sub/model.ckpt"},
         "Received: checkpoint_basename='sub/model.ckpt'"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.").replace("[", r"\[")):
        CheckpointHook(tmp_path, **kwargs)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((None,), {"save_steps": 1, "is_chief": "yes"}, "Received: is_chief='yes'"),
        ((None,), {"save_steps": 1, "listeners": 3}, "Received: listeners=3"),
        ((None,), {"save_steps": 1, "listeners": [object]}, "CheckpointSaverListener objects"),
        ((123,), {"save_steps": 1}, "Received: checkpoint_dir=123"),
    ],
)
def test_bad_argument_types(tmp_path, args, kwargs, message):
    directory = tmp_path if args[0] is None else args[0]
    with pytest.raises(TypeError, match=message):
        CheckpointHook(directory, **kwargs)


def test_unknown_monitor_tensor_fails_at_begin_naming_close_matches(tmp_path):
    hook = CheckpointHook(tmp_path, save_steps=1, monitor="los", mode="min")
    with tf.Graph().as_default():
        _helper().build_graph()
        with pytest.raises(ValueError, match=r"monitor='los' is not a tensor.*Close matches: 'loss'"):
            hook.begin()
    hook = CheckpointHook(tmp_path, save_steps=1, monitor="w1", mode="min")
    with tf.Graph().as_default():
        _helper().build_graph()
        with pytest.raises(ValueError, match="numeric scalar tensor"):
            hook.begin()
    assert not os.listdir(tmp_path)  # failed before touching the directory


def _tf_config(monkeypatch, cluster, kind, index=0):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}}))


def test_is_chief_from_tf_config(tmp_path, monkeypatch):
    cluster = {"chief": ["h:1"], "worker": ["h:2", "h:3"]}
    _tf_config(monkeypatch, cluster, "worker")
    assert not _chief_from_tf_config()
    directory = tmp_path / "run"
    hook = CheckpointHook(directory, save_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(directory, 3, hook=hook, checkpoint_dir=None)
    assert not directory.exists()  # a non-chief task writes nothing
    _tf_config(monkeypatch, cluster, "chief")
    assert _chief_from_tf_config()
    _tf_config(monkeypatch, {"worker": ["a", "b"]}, "worker")  # no chief: worker 0 is
    assert _chief_from_tf_config()
    _tf_config(monkeypatch, {"worker": ["a", "b"]}, "worker", 1)
    assert not _chief_from_tf_config()
    monkeypatch.delenv("TF_CONFIG")
    assert _chief_from_tf_config()


def test_full_disk_raises_an_oserror_naming_the_checkpoint(small_disk):
    """~3 MB per checkpoint: two fit in 8 MB; TF's Saver fails on the third (ENOSPC)."""
    with tf.Graph().as_default():
        gs = tf.compat.v1.train.get_or_create_global_step()
        big = tf.compat.v1.get_variable("big", [750_000], initializer=tf.compat.v1.zeros_initializer())
        train_op = tf.group(big.assign_add(tf.ones_like(big)), gs.assign_add(1))
        hook = CheckpointHook(small_disk, save_steps=1, max_to_keep=None)
        with pytest.raises(OSError, match="No space left on device") as err:
            with tf.compat.v1.train.MonitoredTrainingSession(
                checkpoint_dir=str(small_disk), hooks=[hook], save_checkpoint_secs=None,
                save_summaries_steps=None, log_step_count_steps=None,
            ) as sess:
                for _ in range(5):
                    sess.run(train_op)
    committed = [r.name for r in mf.load(str(small_disk)).checkpoints]
    assert len(committed) == 2
    failed = f"model.ckpt-{int(committed[-1].split('-')[-1]) + 1}.index"
    assert err.value.filename == str(small_disk / failed), err.value
    assert not [n for n in os.listdir(small_disk) if n.startswith(".keras_ckpt-tmp")]
