"""keras_ckpt.tf.CheckpointManager: TF2 eager checkpoints with latest-N + best-N retention."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from keras_ckpt import manifest as mf  # noqa: E402
from keras_ckpt.tf import CheckpointManager  # noqa: E402

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_tf2_manager_run.py")


def _helper():
    spec = importlib.util.spec_from_file_location("_tf2_manager_run", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_helper(directory, *val_losses):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="error::UserWarning")
    cmd = [sys.executable, HELPER, "--dir", str(directory), "--val-losses", *map(str, val_losses)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _kept(directory):
    return {r.name: r.kept for r in mf.load(str(directory)).checkpoints}


def test_best_and_latest_retention_and_restore_after_restart(tmp_path):
    helper = _helper()
    checkpoint, state = helper.make_state()
    manager = helper.make_manager(checkpoint, state, str(tmp_path))
    assert manager.restore_or_initialize() is None
    values_at = {}
    for val_loss in [5, 3, 4, 1, 6, 7, 8]:
        helper.train_step(state)
        path = manager.save(metrics={"val_loss": val_loss})
        values_at[path] = {k: v.numpy().tolist() for k, v in state.items()}

    prefix = lambda n: str(tmp_path / f"ckpt-{n}")  # noqa: E731
    # Latest 2 (6, 7) plus best 2 (val_loss 1 and 3); the rest deleted.
    assert _kept(tmp_path) == {
        "ckpt-2": ("best",), "ckpt-4": ("best",), "ckpt-6": ("latest",), "ckpt-7": ("latest",)
    }
    assert manager.checkpoints == [prefix(2), prefix(4), prefix(6), prefix(7)]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt-")) == [
        f"ckpt-{n}.{ext}" for n in (2, 4, 6, 7) for ext in ("data-00000-of-00001", "index")
    ]
    assert manager.latest_checkpoint == tf.train.latest_checkpoint(str(tmp_path)) == prefix(7)
    assert manager.best == 1.0 and manager.best_checkpoint == prefix(4)
    assert [r.step for r in manager.records] == [2, 4, 6, 7]  # from step_counter
    reader = tf.train.load_checkpoint(prefix(4))
    assert np.array_equal(reader.get_tensor("w/.ATTRIBUTES/VARIABLE_VALUE"), values_at[prefix(4)]["w"])

    # A new process resumes from the newest; the best-N state comes from the manifest: val_loss 2
    # displaces 3 (ckpt-2) but not 1 (ckpt-4).
    out = _run_helper(tmp_path, 2.0)
    assert out["restored"] == prefix(7)
    assert out["values"] == {**values_at[prefix(7)], "save_counter": 7}
    assert out["checkpoints"] == [prefix(4), prefix(7), prefix(8)]
    assert _kept(tmp_path) == {"ckpt-4": ("best",), "ckpt-7": ("latest",), "ckpt-8": ("latest", "best")}


def test_init_fn_runs_when_there_is_nothing_to_restore(tmp_path):
    calls = []
    checkpoint, _ = _helper().make_state()
    manager = CheckpointManager(checkpoint, tmp_path / "new", None, init_fn=lambda: calls.append(1))
    assert manager.restore_or_initialize() is None and calls == [1]
    assert manager.latest_checkpoint is None and manager.checkpoints == []


def test_corrupt_newest_is_skipped_for_the_previous_one(tmp_path):
    helper = _helper()
    checkpoint, state = helper.make_state()
    manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=3)
    helper.train_step(state)
    manager.save()
    w1 = state["w"].numpy()
    helper.train_step(state)
    manager.save()
    with open(tmp_path / "ckpt-2.index", "r+b") as f:
        f.write(b"garbage!")

    checkpoint, state = helper.make_state()
    with pytest.warns(UserWarning, match="skipping checkpoint 'ckpt-2'"):
        manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=3)
    assert manager.latest_checkpoint == tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-1")
    assert manager.restore_or_initialize() == str(tmp_path / "ckpt-1")
    assert np.array_equal(state["w"].numpy(), w1)


def test_checkpoint_interval_numbers_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    helper = _helper()
    checkpoint, state = helper.make_state()
    manager = CheckpointManager(
        checkpoint, "rel", max_to_keep=None, step_counter=state["step"], checkpoint_interval=3
    )
    saved = []
    for _ in range(7):
        helper.train_step(state)
        saved.append(manager.save())
    # Steps 1..7: saves at 1, 4 and 7 (every 3 steps); TF numbers them by save_counter.
    assert saved == ["rel/ckpt-1", None, None, "rel/ckpt-2", None, None, "rel/ckpt-3"]
    assert manager.save() is None  # same step again
    assert manager.save(checkpoint_number=100, check_interval=False) is None  # still the same step
    helper.train_step(state)
    assert manager.save(checkpoint_number=100, check_interval=False) == "rel/ckpt-100"
    assert int(checkpoint.save_counter.numpy()) == 4  # TF increments it for numbered saves too
    assert tf.train.latest_checkpoint("rel") == "rel/ckpt-100"
    assert 'model_checkpoint_path: "ckpt-100"' in open("rel/checkpoint").read()


def test_missing_monitor_warns_and_counts_as_unscored(tmp_path):
    checkpoint, _ = _helper().make_state()
    manager = CheckpointManager(checkpoint, tmp_path, 1, keep_best=1, monitor="val_accuracy")
    with pytest.warns(UserWarning, match="Can save best model only with val_accuracy available"):
        manager.save(metrics={"loss": 1.0})
    manager.save(metrics={"val_accuracy": 0.5})
    manager.save(metrics={"val_accuracy": 0.25})
    assert _kept(tmp_path) == {"ckpt-2": ("best",), "ckpt-3": ("latest",)}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_to_keep": -1}, "max_to_keep must be an integer >= 0 or None. Received: max_to_keep=-1"),
        ({"max_to_keep": 1, "keep_best": -2, "monitor": "val_loss"}, "Received: keep_best=-2"),
        ({"max_to_keep": 1, "keep_checkpoint_every_n_hours": -1},
         "Received: keep_checkpoint_every_n_hours=-1"),
        ({"max_to_keep": 1, "checkpoint_interval": 5}, "Received: checkpoint_interval=5, step_counter=None"),
        ({"max_to_keep": 1, "checkpoint_interval": 0}, "Received: checkpoint_interval=0"),
        ({"max_to_keep": 1, "keep_best": 1}, "pass monitor=... as well"),
        ({"max_to_keep": 1, "monitor": "val_loss", "mode": "up"}, "Received: mode='up'"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    checkpoint, _ = _helper().make_state()
    escaped = message.replace("(", r"\(").replace(".", r"\.")
    with pytest.raises(ValueError, match=escaped):
        CheckpointManager(checkpoint, tmp_path, **kwargs)
