"""``keras_ckpt.tf.CheckpointManager(async_save=True)``: snapshot on the training thread, TF's own
checkpoint format written, checksummed, committed and rotated on the background writer.

A save is held in flight deterministically as in tests/test_async_save.py: the writer takes
``keras_ckpt.storage.directory_lock`` to commit, so a test holding it lets the writer write and
fsync the files and then wait.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from _tf_training import TFLoop  # noqa: E402
from tensorflow.python.checkpoint import tensor_callable  # noqa: E402

from keras_ckpt import manifest as mf  # noqa: E402
from keras_ckpt import storage  # noqa: E402
from keras_ckpt.engine import verify  # noqa: E402
from keras_ckpt.tf import CheckpointManager  # noqa: E402

JOB = os.path.join(os.path.dirname(__file__), "async_job.py")
TMP_PREFIX = ".keras_ckpt-tmp"


def names(manager) -> list[str]:
    return [os.path.basename(p) for p in manager.checkpoints]


def committed_on_disk(directory) -> list[str]:
    records = mf.load(str(directory)).checkpoints
    assert all(verify(str(directory), r) is None for r in records)
    return [r.name for r in records]


def temporaries(directory) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(TMP_PREFIX)]


def state_file_names(directory) -> str | None:
    latest = tf.train.latest_checkpoint(str(directory))
    return None if latest is None else os.path.basename(latest)


def prefix_files(directory, name: str) -> dict[str, bytes]:
    """The bytes of each file of checkpoint ``name`` (``.index``, every ``.data-*`` shard)."""
    return {n: (directory / n).read_bytes() for n in os.listdir(directory)
            if n.startswith(name + ".")}


def restored_values(prefix: str, **loop_kwargs) -> tuple[list[np.ndarray], np.ndarray]:
    """The variables a fresh loop holds after restoring ``prefix``, and its iterator's next batch."""
    fresh = TFLoop(seed=1, **loop_kwargs)
    fresh.checkpoint().restore(prefix).assert_existing_objects_matched()
    return fresh.values(), next(fresh.iterator)[0].numpy()


def assert_all_equal(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("value", ["yes", 2, None])
def test_async_save_must_be_a_bool(tmp_path, value):
    with pytest.raises(TypeError, match=f"Received: async_save={value!r}"):
        CheckpointManager(TFLoop().checkpoint(), tmp_path, max_to_keep=1, async_save=value)
    assert not os.path.exists(tmp_path / "checkpoints.json")


def test_sync_and_async_checkpoints_are_byte_identical_and_restore_the_same(tmp_path):
    """Two managers save the same training state each step, one synchronously, one not: the
    files are the same bytes, and restoring the async one gives the values at its save."""
    loop = TFLoop()
    sync = CheckpointManager(loop.checkpoint(), tmp_path / "sync", max_to_keep=2)
    background = CheckpointManager(loop.checkpoint(), tmp_path / "async", max_to_keep=2,
                                   async_save=True)
    at_save = {}
    for _ in range(3):
        loop.train()
        sync.save()
        prefix = background.save()
        at_save[os.path.basename(prefix)] = (loop.values(), next(loop.iterator))
    # restore_or_initialize waits for the save in flight, so it restores the newest.
    assert background.restore_or_initialize() == str(tmp_path / "async" / "ckpt-3")
    assert names(background) == names(sync) == ["ckpt-2", "ckpt-3"]
    assert committed_on_disk(tmp_path / "async") == ["ckpt-2", "ckpt-3"]
    assert state_file_names(tmp_path / "async") == "ckpt-3"
    for n in (2, 3):
        files = prefix_files(tmp_path / "sync", f"ckpt-{n}")
        assert sorted(files) == [f"ckpt-{n}.data-00000-of-00001", f"ckpt-{n}.index"]
        assert prefix_files(tmp_path / "async", f"ckpt-{n}") == files
    # The iterator was advanced once after each save (reading at_save's batch): the restored
    # iterator yields that batch again.
    values, batch = restored_values(str(tmp_path / "async" / "ckpt-2"))
    expected_values, expected_batch = at_save["ckpt-2"]
    assert_all_equal(values, expected_values)
    np.testing.assert_array_equal(batch, expected_batch[0].numpy())


def test_variables_changed_after_async_save_do_not_leak(tmp_path):
    """Right after save() returns every variable is overwritten, last-saved first, and training
    goes on; the checkpoint holds the values at the save. While the commit is held, nothing of
    it is listed or visible, and retention deleted nothing for it."""
    loop = TFLoop(inputs=1024, width=1024)  # ~2.1M parameters: ~25 MB with Adam's slots
    manager = CheckpointManager(loop.checkpoint(), tmp_path, max_to_keep=1, async_save=True)
    loop.train()
    manager.save()
    manager.sync()
    loop.train()
    at_save = loop.values()
    with storage.directory_lock(str(tmp_path)):
        manager.save()
        for v in reversed(loop.variables()):
            v.assign(tf.fill(v.shape, tf.constant(7, dtype=v.dtype)))
        loop.train()
        assert names(manager) == ["ckpt-1"]
        assert manager.latest_checkpoint == str(tmp_path / "ckpt-1")
        assert [r.name for r in manager.records] == ["ckpt-1"]
        assert committed_on_disk(tmp_path) == ["ckpt-1"]
        assert state_file_names(tmp_path) == "ckpt-1"
        assert not [n for n in os.listdir(tmp_path) if n.startswith("ckpt-2")]
    manager.sync()
    assert names(manager) == ["ckpt-2"] and manager.latest_checkpoint == str(tmp_path / "ckpt-2")
    assert not [n for n in os.listdir(tmp_path) if n.startswith("ckpt-1")]
    values, _ = restored_values(str(tmp_path / "ckpt-2"), inputs=1024, width=1024)
    assert_all_equal(values, at_save)
    assert not np.array_equal(loop.values()[0], at_save[0])


class Probe(tf.__internal__.tracking.Trackable):
    """A trackable whose checkpointed value a callable reads when the checkpoint is written, as a
    variable's is; it notes the thread that reads it."""

    def __init__(self, value) -> None:
        self.value = tf.constant(value)
        self.readers: list[threading.Thread] = []

    def _serialize_to_tensors(self):
        def read():
            self.readers.append(threading.current_thread())
            return tf.identity(self.value)

        return {"value": tensor_callable.Callable(read, dtype=self.value.dtype, device="/cpu:0")}

    def _restore_from_tensors(self, restored_tensors):
        self.value = restored_tensors["value"]


def test_every_value_is_read_before_save_returns_whatever_its_dtype(tmp_path):
    """float32 and int64 go through the snapshot buffers; bfloat16 (which numpy cannot hand to
    TF through DLPack), bool and string values are kept as TF read them. Each is read on the
    calling thread before save() returns, and changing the variables right after it does not
    reach the files: they are those of a synchronous save of the state."""
    probes = {f"probe_{dtype.name}": Probe(tf.cast(tf.range(4), dtype) if dtype != tf.string
                                           else "text") for dtype in (tf.float32, tf.bfloat16,
                                                                      tf.string)}
    variables = {
        "w": tf.Variable(tf.random.stateless_normal([64, 32], seed=[1, 2])),
        "half": tf.Variable(tf.random.stateless_normal([16], seed=[3, 4], dtype=tf.bfloat16)),
        "flags": tf.Variable([True, False, True]),
        "name": tf.Variable("epoch one"),
        "count": tf.Variable(41, dtype=tf.int64),
    }
    sync = CheckpointManager(tf.train.Checkpoint(**variables, **probes), tmp_path / "sync",
                             max_to_keep=None)
    background = CheckpointManager(tf.train.Checkpoint(**variables, **probes), tmp_path / "async",
                                   max_to_keep=None, async_save=True)
    sync.save()
    for probe in probes.values():
        probe.readers.clear()
    with storage.directory_lock(str(tmp_path / "async")):
        background.save()
        for name, probe in probes.items():
            assert probe.readers == [threading.current_thread()], name
        variables["w"].assign(tf.zeros([64, 32]))
        variables["half"].assign(tf.ones([16], dtype=tf.bfloat16))
        variables["flags"].assign([False, False, False])
        variables["name"].assign("changed")
        variables["count"].assign_add(1)
    background.sync()
    # The probes' device ("/cpu:0", not the variables' full name) makes a second shard.
    files = prefix_files(tmp_path / "sync", "ckpt-1")
    assert len(files) == 3 and prefix_files(tmp_path / "async", "ckpt-1") == files
    reader = tf.train.load_checkpoint(str(tmp_path / "async" / "ckpt-1"))
    assert reader.get_tensor("count/.ATTRIBUTES/VARIABLE_VALUE") == 41
    assert reader.get_tensor("name/.ATTRIBUTES/VARIABLE_VALUE") == b"epoch one"


@pytest.mark.filterwarnings("error::UserWarning")
def test_every_save_is_committed_in_order_with_its_own_values(tmp_path):
    """A save every step, each due while the previous one writes (~25 MB: far longer than a
    step and a snapshot): each waits for it before it overwrites the reused snapshot buffers,
    so every checkpoint holds the values of its own step (a second loop, trained alike in this
    process, gives them)."""
    loop = TFLoop(inputs=1024, width=1024)
    manager = CheckpointManager(loop.checkpoint(), tmp_path, max_to_keep=None,
                                step_counter=loop.step, checkpoint_interval=1, async_save=True)
    for _ in range(6):
        loop.train()
        manager.save()
        assert manager.save() is None  # the same step again: skipped, and nothing waits
    manager.sync()
    assert names(manager) == [f"ckpt-{n}" for n in range(1, 7)]
    assert [r.step for r in manager.records] == list(range(1, 7))
    assert committed_on_disk(tmp_path) == names(manager)
    replay = TFLoop(inputs=1024, width=1024)
    for n in range(1, 7):
        replay.train()
        values, _ = restored_values(str(tmp_path / f"ckpt-{n}"), inputs=1024, width=1024)
        assert_all_equal(values, replay.values())


@pytest.mark.parametrize("raised_by", ["save", "sync", "close", "skipped save"])
def test_writer_error_is_raised_on_the_calling_thread(small_disk, raised_by):
    """~3.2 MB per checkpoint: two fit in 8 MB, the third fails in the background."""
    loop = TFLoop(inputs=368, width=368)
    manager = CheckpointManager(loop.checkpoint(), small_disk, max_to_keep=None,
                                step_counter=loop.step, checkpoint_interval=1, async_save=True)
    for _ in range(3):
        loop.train()
        manager.save()
    with pytest.raises(OSError, match="No space left on device") as err:
        if raised_by == "save":
            loop.train()
            manager.save()
        elif raised_by == "sync":
            manager.sync()
        elif raised_by == "close":
            manager.close()
        else:  # the same step: checkpoint_interval skips it, and it raises once the write is over
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                assert manager.save() is None
                time.sleep(0.01)
    assert err.value.filename == str(small_disk / "ckpt-3.index")
    assert f"ckpt-3.index in {small_disk}" in str(err.value)
    assert names(manager) == ["ckpt-1", "ckpt-2"]
    assert manager.latest_checkpoint == str(small_disk / "ckpt-2")
    assert committed_on_disk(small_disk) == ["ckpt-1", "ckpt-2"] and not temporaries(small_disk)
    assert state_file_names(small_disk) == "ckpt-2"
    manager.close()
    # A new manager (a restarted job) restores the last committed checkpoint.
    again = CheckpointManager(TFLoop(inputs=368, width=368).checkpoint(), small_disk,
                              max_to_keep=None)
    assert again.restore_or_initialize() == str(small_disk / "ckpt-2")


def test_close_lets_another_process_write_and_a_later_save_takes_the_directory_back(tmp_path):
    loop = TFLoop()
    manager = CheckpointManager(loop.checkpoint(), tmp_path, max_to_keep=None, async_save=True)
    loop.train()
    manager.save()
    manager.close()
    assert names(manager) == ["ckpt-1"]
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from keras_ckpt import storage; "
         "storage.acquire_writer(sys.argv[1]); storage.release_writer(sys.argv[1])", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert other.returncode == 0, other.stderr
    loop.train()
    manager.save()
    manager.sync()
    assert names(manager) == ["ckpt-1", "ckpt-2"] and committed_on_disk(tmp_path) == names(manager)
    blocked = subprocess.run(
        [sys.executable, "-c", "import sys; from keras_ckpt import storage; "
         "storage.acquire_writer(sys.argv[1])", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert "DirectoryLocked" in blocked.stderr


def test_write_callbacks_save_synchronously_with_a_warning(tmp_path):
    loop = TFLoop()
    written = []
    options = tf.train.CheckpointOptions(experimental_write_callbacks=[written.append])
    manager = CheckpointManager(loop.checkpoint(), tmp_path, max_to_keep=None, async_save=True)
    with pytest.warns(UserWarning, match="async_save: saving synchronously, because options"):
        manager.save(options=options)
    assert names(manager) == ["ckpt-1"] and len(written) == 1  # committed before save returned


# -- crashes and exits (real subprocesses) ----------------------------------------------------


def run_job(job: str, directory) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, JOB, job, str(directory)], capture_output=True,
                          text=True, timeout=600)


def reports(stdout: str) -> dict[str, dict]:
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {r["event"]: r for r in lines}


def test_kill_9_during_background_write_leaves_previous_checkpoint(tmp_path):
    directory = tmp_path / "run"
    job = subprocess.Popen([sys.executable, JOB, "kill-tf", str(directory)],
                           stdout=subprocess.PIPE, text=True)
    try:
        line = job.stdout.readline()
        assert json.loads(line) == {"event": "IN FLIGHT", "committed": ["ckpt-1"]}
        while not temporaries(directory):  # the writer has started on the files
            time.sleep(0.01)
        job.send_signal(signal.SIGKILL)
        assert job.wait(timeout=60) == -signal.SIGKILL
    finally:
        job.kill()
        job.stdout.close()
    loop = TFLoop(inputs=1024, width=1024)
    manager = CheckpointManager(loop.checkpoint(), directory, max_to_keep=1)
    assert manager.restore_or_initialize() == str(directory / "ckpt-1")
    manager.close()
    assert sorted(os.listdir(directory)) == [
        ".checkpoints.lock", "checkpoint", "checkpoints.json", "ckpt-1.data-00000-of-00001",
        "ckpt-1.index",
    ]
    assert committed_on_disk(directory) == ["ckpt-1"] and state_file_names(directory) == "ckpt-1"


@pytest.mark.parametrize("job", ["tf-exit", "tf-close"])
def test_exit_and_close_wait_for_the_save_in_flight(tmp_path, job):
    """tf-exit: the script ends right after save() returns (the interpreter waits for the
    writer); tf-close: os._exit the moment close() returns."""
    r = run_job(job, tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    seen = reports(r.stdout)
    if job == "tf-exit":
        assert seen["SAVED"]["committed"] == ["ckpt-1"]  # the second still in flight
    else:
        assert seen["CLOSED"]["committed"] == ["ckpt-1", "ckpt-2"]
    assert committed_on_disk(tmp_path) == ["ckpt-1", "ckpt-2"] and not temporaries(tmp_path)
    assert state_file_names(tmp_path) == "ckpt-2"


def test_saves_from_several_threads_all_commit_each_with_whole_values(tmp_path):
    """Threads that share one manager (a trainer and a watchdog saving, say): each save waits
    for the one before it as on one thread (was: ``RuntimeError: cannot join thread before it
    is started`` from a save racing another's writer start, and snapshots racing into the same
    buffers)."""
    variables = [tf.Variable(np.full(300_000, float(i), np.float32)) for i in range(8)]
    checkpoint = tf.train.Checkpoint(vs=variables)
    manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=None, async_save=True)
    errors: list[BaseException] = []

    def saves(thread: int) -> None:
        try:
            for n in range(12):
                manager.save(checkpoint_number=100 * thread + n)
        except BaseException as e:  # noqa: BLE001 - the test reports it below
            errors.append(e)

    threads = [threading.Thread(target=saves, args=(t,)) for t in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    manager.sync()
    assert errors == []
    assert sorted(names(manager)) == sorted(f"ckpt-{100 * t + n}" for t in range(3) for n in range(12))
    assert sorted(committed_on_disk(tmp_path)) == sorted(names(manager))
    assert not temporaries(tmp_path)
    for prefix in manager.checkpoints:
        reader = tf.train.load_checkpoint(prefix)
        for i in range(8):
            assert (reader.get_tensor(f"vs/{i}/.ATTRIBUTES/VARIABLE_VALUE") == i).all()


def test_init_fn_may_save(tmp_path):
    """``init_fn`` runs inside ``restore_or_initialize``; a first save there must not wait for
    the call it runs in."""
    checkpoint = tf.train.Checkpoint(a=tf.Variable(1.0))
    manager = None

    def init_fn() -> None:
        manager.save()

    manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=1, init_fn=init_fn, async_save=True)
    done = threading.Thread(target=manager.restore_or_initialize, daemon=True)
    done.start()
    done.join(timeout=60)
    assert not done.is_alive(), "restore_or_initialize deadlocked on init_fn's save"
    manager.sync()
    assert names(manager) == ["ckpt-1"]
