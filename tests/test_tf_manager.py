"""keras_ckpt.tf.CheckpointManager: TF2 eager checkpoints with latest-N + best-N retention."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import re
import shutil
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

    # Nothing is left of the saves but their files: no staging directory per save.
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".keras_ckpt-tmp")]
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

    # A new process resumes from the newest (this one stops writing first: one writer per
    # directory); the best-N state comes from the manifest: val_loss 2 displaces 3 (ckpt-2) but
    # not 1 (ckpt-4).
    del manager
    gc.collect()
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


def test_on_a_read_only_mount_it_restores_and_only_save_is_refused(tmp_path, read_only_view):
    # Harm: an evaluation job could not even construct the manager on its read-only input
    # (it takes the writer's lock), where TF's own manager restores from it.
    helper = _helper()
    checkpoint, state = helper.make_state()
    manager = CheckpointManager(checkpoint, tmp_path / "run", max_to_keep=3)
    helper.train_step(state)
    manager.save()
    w1 = state["w"].numpy()
    helper.train_step(state)
    manager.save()
    w2 = state["w"].numpy()
    manager.close()
    corrupt = tmp_path / "corrupt"  # a copy whose newest is damaged
    shutil.copytree(tmp_path / "run", corrupt)
    with open(corrupt / "ckpt-2.index", "r+b") as f:
        f.write(b"garbage!")
    view = read_only_view(tmp_path / "run")
    before = sorted(os.listdir(view))

    checkpoint, state = helper.make_state()
    with pytest.warns(UserWarning, match=r"cannot be written \(Read-only file system\).*save\(\) raises"):
        reader = CheckpointManager(checkpoint, view, max_to_keep=3)
    assert reader.latest_checkpoint == str(view / "ckpt-2")
    assert reader.checkpoints == [str(view / "ckpt-1"), str(view / "ckpt-2")]
    assert reader.restore_or_initialize() == str(view / "ckpt-2")
    assert np.array_equal(state["w"].numpy(), w2)
    counter = int(checkpoint.save_counter.numpy())
    with pytest.raises(ValueError, match=r"directory points into a directory that cannot be .*written"):
        reader.save()
    assert int(checkpoint.save_counter.numpy()) == counter  # nothing changed for the refused save
    reader.close()
    assert sorted(os.listdir(view)) == before

    checkpoint, state = helper.make_state()
    with pytest.warns(UserWarning, match="skipping checkpoint 'ckpt-2'"):
        reader = CheckpointManager(checkpoint, read_only_view(corrupt), max_to_keep=3)
    assert reader.restore_or_initialize().endswith("ckpt-1")
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
        ({"max_to_keep": 1, "checkpoint_name": "sub/ckpt"}, "Received: checkpoint_name='sub/ckpt'"),
        ({"max_to_keep": 1, "checkpoint_name": ""}, "Received: checkpoint_name=''"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    checkpoint, _ = _helper().make_state()
    escaped = message.replace("(", r"\(").replace(".", r"\.")
    with pytest.raises(ValueError, match=escaped):
        CheckpointManager(checkpoint, tmp_path, **kwargs)


def test_bad_argument_types(tmp_path):
    checkpoint, _ = _helper().make_state()
    with pytest.raises(TypeError, match="Received: directory=123"):
        CheckpointManager(checkpoint, 123, max_to_keep=1)
    with pytest.raises(TypeError, match="Received: init_fn=3"):
        CheckpointManager(checkpoint, tmp_path, max_to_keep=1, init_fn=3)


# -- drop-in compatibility with tf.train.CheckpointManager ------------------------------------


class _Clock:
    """A settable time.time(): every-N-hours is about hours, the test cannot wait for them."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _prefixes_on_disk(directory):
    return sorted(n[: -len(".index")] for n in os.listdir(directory) if n.endswith(".index"))


def test_last_checkpoint_step_starts_the_interval_and_follows_saves(tmp_path):
    checkpoint, state = _helper().make_state()
    state["step"].assign(1)
    manager = CheckpointManager(
        checkpoint, tmp_path, None, step_counter=state["step"], checkpoint_interval=2,
        last_checkpoint_step=1,
    )
    assert manager.last_checkpoint_step == 1
    assert manager.save() is None  # step 1: the step of the last checkpoint
    state["step"].assign(2)
    assert manager.save() is None  # one step after it: the interval is 2
    state["step"].assign(3)
    assert manager.save() == str(tmp_path / "ckpt-1")
    assert manager.last_checkpoint_step == 3
    state["step"].assign(10)
    reopened = CheckpointManager(
        checkpoint, tmp_path, None, step_counter=state["step"], checkpoint_interval=2
    )
    assert reopened.last_checkpoint_step is None
    assert reopened.restore_or_initialize() == str(tmp_path / "ckpt-1")
    assert reopened.last_checkpoint_step == 3  # the restored step_counter
    with pytest.raises(TypeError, match="Received: last_checkpoint_step='3'"):
        CheckpointManager(checkpoint, tmp_path, None, last_checkpoint_step="3")


def test_adopts_the_checkpoints_of_tfs_own_manager_and_rotates_them(tmp_path):
    helper = _helper()
    checkpoint, state = helper.make_state()
    stock = tf.train.CheckpointManager(checkpoint, str(tmp_path), max_to_keep=5)
    weights = {}
    for _ in range(3):
        helper.train_step(state)
        weights[stock.save()] = state["w"].numpy()
    tf.train.Checkpoint(v=tf.Variable(1.0)).save(str(tmp_path / "other"))  # not ours: another name

    checkpoint, state = helper.make_state()
    with pytest.warns(UserWarning, match=r"does not list \(other-1\)"):
        with pytest.warns(UserWarning, match=r"adopted 3 TensorFlow checkpoint\(s\).*ckpt-1, ckpt-2, ckpt-3"):
            manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=2)
    newest = str(tmp_path / "ckpt-3")
    assert manager.latest_checkpoint == newest
    assert manager.checkpoints == [str(tmp_path / f"ckpt-{n}") for n in (1, 2, 3)]
    assert manager.restore_or_initialize() == newest
    assert np.array_equal(state["w"].numpy(), weights[newest])
    assert int(checkpoint.save_counter.numpy()) == 3
    records = mf.load(str(tmp_path)).checkpoints
    assert [r.name for r in records] == ["ckpt-1", "ckpt-2", "ckpt-3"]
    assert all(len(r.files) == 2 and r.files[0].path.endswith(".index") for r in records)

    helper.train_step(state)
    assert manager.save() == str(tmp_path / "ckpt-4")  # the job continues its numbering
    # Retention now manages the adopted ones; the other name is never touched.
    assert _prefixes_on_disk(tmp_path) == ["ckpt-3", "ckpt-4", "other-1"]
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-4")


def test_adopts_checkpoint_save_output_of_its_name_only(tmp_path):
    v = tf.Variable(0.0)
    checkpoint = tf.train.Checkpoint(v=v)
    for value in (1.0, 2.0):
        v.assign(value)
        checkpoint.save(str(tmp_path / "ckpt"))
    # An incomplete checkpoint (a data shard missing) is not adopted either.
    open(tmp_path / "ckpt-7.index", "wb").close()
    v.assign(0.0)
    with pytest.warns(UserWarning, match=r"does not list \(ckpt-7\)"):
        with pytest.warns(UserWarning, match="adopted 2 TensorFlow"):
            manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=1)
    assert manager.restore_or_initialize() == str(tmp_path / "ckpt-2") and v.numpy() == 2.0
    manager.save()
    assert _prefixes_on_disk(tmp_path) == ["ckpt-3", "ckpt-7"]


def test_adoption_never_blocks_on_a_fifo_or_follows_a_symlink(tmp_path):
    import threading

    v = tf.Variable(0.0)
    checkpoint = tf.train.Checkpoint(v=v)
    for value in (1.0, 2.0, 3.0):
        v.assign(value)
        checkpoint.save(str(tmp_path / "ckpt"))
    shard = "ckpt-{}.data-00000-of-00001"
    os.remove(tmp_path / shard.format(2))
    os.mkfifo(tmp_path / shard.format(2))  # reading it would block the manager's construction
    os.remove(tmp_path / shard.format(3))
    os.symlink("/dev/zero", tmp_path / shard.format(3))  # would stream forever
    made = []
    t = threading.Thread(target=lambda: made.append(CheckpointManager(checkpoint, tmp_path, max_to_keep=5)),
                         daemon=True)
    with pytest.warns(UserWarning) as caught:
        t.start()
        t.join(60)
    assert made, "the manager's construction hung"
    messages = " ".join(str(w.message) for w in caught)
    assert "not adopting ckpt-2" in messages and "not adopting ckpt-3" in messages
    assert [r.name for r in made[0].records] == ["ckpt-1"]


def test_unmanaged_checkpoint_named_by_tfs_state_file_is_restored_never_deleted(tmp_path):
    v = tf.Variable(5.0)
    tf.train.Checkpoint(v=v).save(str(tmp_path / "pretrained"))
    v.assign(0.0)
    checkpoint = tf.train.Checkpoint(v=v)
    with pytest.warns(UserWarning, match="does not list"):
        manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=1)
    assert manager.latest_checkpoint == str(tmp_path / "pretrained-1") and manager.checkpoints == []
    manager.restore_or_initialize()
    assert v.numpy() == 5.0
    manager.save()
    manager.save()
    assert _prefixes_on_disk(tmp_path) == ["ckpt-3", "pretrained-1"]


def _hourly_run(manager_class, directory, clock, schedule, checkpoint=None, **kwargs):
    """Create a manager at clock time ``schedule[0]``, then save at each later time."""
    clock.now = schedule[0]
    manager = manager_class(checkpoint or tf.train.Checkpoint(), str(directory), **kwargs)
    for when in schedule[1:]:
        clock.now = when
        manager.save()
    return manager


# Hours after creation at 1000 s: first saves within the first hour, then one save every 40 minutes.
_SCHEDULE = [1000.0, 1010.0, 1020.0] + [1020.0 + 2400.0 * i for i in range(1, 8)]


@pytest.mark.parametrize("n_hours", [1.0, 1.5])
def test_every_n_hours_measures_from_creation_as_tf_does(tmp_path, monkeypatch, n_hours):
    clock = _Clock(0.0)
    monkeypatch.setattr("time.time", clock)
    kwargs = {"max_to_keep": 2, "keep_checkpoint_every_n_hours": n_hours}
    stock = _hourly_run(tf.train.CheckpointManager, tmp_path / "tf", clock, _SCHEDULE, **kwargs)
    ours = _hourly_run(CheckpointManager, tmp_path / "ours", clock, _SCHEDULE, **kwargs)
    # The first checkpoint (10 s after the manager's creation) is not kept: TF counts N hours
    # from the creation, so the first preserved one is the first that rotates out N hours later.
    assert "ckpt-1" not in _prefixes_on_disk(tmp_path / "tf")
    assert _prefixes_on_disk(tmp_path / "ours") == _prefixes_on_disk(tmp_path / "tf")
    assert [os.path.basename(p) for p in ours.checkpoints] == [
        os.path.basename(p) for p in stock.checkpoints
    ]
    hourly = [r.name for r in ours.records if r.kept == ("every_n_hours",)]
    assert hourly and set(hourly) <= set(_prefixes_on_disk(tmp_path / "ours"))


def test_reopened_without_every_n_hours_keeps_what_was_kept_hourly(tmp_path, monkeypatch):
    clock = _Clock(0.0)
    monkeypatch.setattr("time.time", clock)
    checkpoint = tf.train.Checkpoint()
    first = _hourly_run(CheckpointManager, tmp_path, clock, _SCHEDULE, checkpoint, max_to_keep=2,
                        keep_checkpoint_every_n_hours=1.0)
    hourly = sorted(r.name for r in first.records if r.kept == ("every_n_hours",))
    assert len(hourly) >= 2
    # A new run of the job, without keep_checkpoint_every_n_hours: rotation keeps 2 of its own
    # and never deletes what the earlier run preserved (as TF's manager, which no longer lists them).
    later = [_SCHEDULE[-1] + 60.0 * i for i in range(5)]
    second = _hourly_run(CheckpointManager, tmp_path, clock, later, checkpoint, max_to_keep=2)
    assert second.checkpoints == [str(tmp_path / f"ckpt-{n}") for n in (12, 13)]
    assert _prefixes_on_disk(tmp_path) == sorted(hourly + ["ckpt-12", "ckpt-13"])


def test_clock_gone_backwards_warns_and_deletes_nothing_that_existed(tmp_path, monkeypatch):
    clock = _Clock(0.0)
    monkeypatch.setattr("time.time", clock)
    checkpoint = tf.train.Checkpoint()
    _hourly_run(CheckpointManager, tmp_path, clock, [10000.0, 10000.0, 13600.0, 17200.0],
                checkpoint, max_to_keep=1, keep_checkpoint_every_n_hours=1.0)
    assert _prefixes_on_disk(tmp_path) == ["ckpt-2", "ckpt-3"]  # ckpt-2 kept hourly
    clock.now = 5000.0  # the clock was set back
    with pytest.warns(UserWarning, match="behind the last preserved checkpoint timestamp"):
        manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=1)
    assert manager.latest_checkpoint == str(tmp_path / "ckpt-3") and manager.checkpoints == []
    for _ in range(3):
        clock.now += 10.0
        manager.save()
    assert _prefixes_on_disk(tmp_path) == ["ckpt-2", "ckpt-3", "ckpt-6"]
    assert manager.checkpoints == [str(tmp_path / "ckpt-6")]
    assert tf.train.get_checkpoint_state(str(tmp_path)).last_preserved_timestamp == 5000.0


def test_a_directory_that_cannot_be_created_names_the_directory_as_given(tmp_path):
    """Was: ``Received: directory='<directory>/ckpt'``, a value the caller never passed."""
    (tmp_path / "a-file").write_text("")
    checkpoint, _ = _helper().make_state()
    bad = str(tmp_path / "a-file" / "run")
    with pytest.raises(ValueError, match=f"cannot be created or written.*Received: directory='{bad}'$"):
        CheckpointManager(checkpoint, bad, max_to_keep=1)


@pytest.mark.parametrize("value", ["runs/a", None, {"w": 1}])
def test_checkpoint_must_be_a_checkpoint_before_anything_is_written(tmp_path, value):
    """Was: an ``AttributeError`` about ``save_counter`` at the first ``save``, after the
    manager had taken the directory."""
    message = f"checkpoint must be a tf.train.Checkpoint.*Received: checkpoint={re.escape(repr(value))}"
    with pytest.raises(TypeError, match=message):
        CheckpointManager(value, tmp_path / "run", max_to_keep=1)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"checkpoint_number": "x"}, "Received: checkpoint_number='x'"),
        ({"checkpoint_number": True}, "Received: checkpoint_number=True"),
        ({"checkpoint_number": tf.Variable("s")}, "Received: checkpoint_number=<tf.Variable"),
        ({"metrics": 3}, "Received: metrics=3"),
        ({"options": "fast"}, "Received: options='fast'"),
    ],
)
def test_bad_save_arguments_fail_before_anything_changes(tmp_path, kwargs, message):
    """Was: a ValueError from ``int()`` or an AttributeError naming no argument, raised after
    ``save_counter`` was incremented."""
    checkpoint, _ = _helper().make_state()
    manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=1)
    with pytest.raises(TypeError, match=re.escape(message)):
        manager.save(**kwargs)
    assert int(checkpoint.save_counter.numpy()) == 0
    assert manager.checkpoints == [] and not [n for n in os.listdir(tmp_path) if "ckpt" in n]
    assert manager.save() == os.path.join(str(tmp_path), "ckpt-1")
