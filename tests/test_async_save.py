"""``async_save=True``: snapshot on the training thread, write + commit + prune in the background.

How a save is held in flight deterministically: the writer takes
``keras_ckpt.storage.directory_lock`` (this process's lock on the directory's manifest) to
commit; a test holding it on the training thread lets the writer stream and fsync the file and
then wait, so the test can look at the callback while the save is not yet committed. Whether the
snapshot is taken before training goes on is checked with models large enough (tens of MB) that
their write lasts far longer than the few variable assignments the test makes right after the
save returns: a writer that read the live variables would write the changed values.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile

import keras
import numpy as np
import pytest

import keras_ckpt
from keras_ckpt import _kerasio, storage
from keras_ckpt import manifest as mf
from keras_ckpt.engine import verify

try:
    import torch

    from keras_ckpt.torch import ModelCheckpoint as TorchCheckpoint
except ImportError:  # the jax environment has no torch; the Keras tests here still run there
    torch = TorchCheckpoint = None
needs_torch = pytest.mark.skipif(torch is None, reason="the torch shim's tests need torch")

JOB = os.path.join(os.path.dirname(__file__), "async_job.py")
TMP_PREFIX = ".keras_ckpt-tmp"


# -- helpers ----------------------------------------------------------------------------------


def _zip_volatile(data: bytes, members: tuple[str, ...]) -> list[tuple[int, int]]:
    """Byte ranges allowed to differ between two saves of one state: each entry's DOS time and
    date (local header and central directory), and all of the entries named in ``members``."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    starts = sorted(i.header_offset for i in zf.infolist()) + [zf.start_dir]
    ranges = []
    for info in zf.infolist():
        ranges.append((info.header_offset + 10, info.header_offset + 14))
        if info.filename in members:
            ranges.append((info.header_offset, next(s for s in starts if s > info.header_offset)))
    pos = zf.start_dir
    while data[pos:pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack("<HHH", data[pos + 28:pos + 34])
        ranges.append((pos + 12, pos + 16))
        if data[pos + 46:pos + 46 + n].decode() in members:
            ranges.append((pos, pos + 46 + n + m + k))
        pos += 46 + n + m + k
    return ranges


def assert_same_payload(a_path, b_path, volatile_members: tuple[str, ...] = ()) -> None:
    """Byte for byte equal, except zip timestamps (the wall clock of each save, at 2 s
    resolution) and ``volatile_members`` (torch's random serialization id)."""
    a, b = open(a_path, "rb").read(), bytearray(open(b_path, "rb").read())
    assert len(a) == len(b)
    if zipfile.is_zipfile(io.BytesIO(a)):
        for lo, hi in _zip_volatile(a, volatile_members):
            b[lo:hi] = a[lo:hi]
    assert a == bytes(b)


def names(ckpt) -> list[str]:
    return [r.name for r in ckpt.checkpoints]


def temporaries(directory) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(TMP_PREFIX)]


def committed_on_disk(directory) -> list[str]:
    records = mf.load(str(directory)).checkpoints
    assert all(verify(str(directory), r) is None for r in records)
    return [r.name for r in records]


def run_job(job: str, directory, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, JOB, job, str(directory)], capture_output=True,
                          text=True, timeout=600, **kwargs)


def reports(stdout: str) -> dict[str, dict]:
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {r["event"]: r for r in lines}


def keras_model(inputs: int = 8, width: int = 32) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(width, activation="relu"),
                              keras.layers.Dropout(0.2), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


def keras_data(inputs: int = 8, n: int = 64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, inputs)).astype("float32")
    return x, x[:, :1] * 2.0


class TorchLoop:
    """A small real training loop for the torch shim."""

    def __init__(self, inputs: int = 16, width: int = 32) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(inputs, width), torch.nn.ReLU(),
                                         torch.nn.Linear(width, 2))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.x, self.y = torch.randn(32, inputs), torch.randint(0, 2, (32,))

    def step(self) -> float:
        self.opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss.item()


# -- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", 2, None])
def test_async_save_must_be_a_bool(tmp_path, value):
    with pytest.raises(TypeError, match=f"async_save={value!r}"):
        keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}.keras"), async_save=value)


@needs_torch
@pytest.mark.parametrize("value", ["yes", 2, None])
def test_torch_async_save_must_be_a_bool(tmp_path, value):
    with pytest.raises(TypeError, match=f"async_save={value!r}"):
        TorchCheckpoint(str(tmp_path / "c-{epoch}.pt"), model=torch.nn.Linear(2, 2),
                        async_save=value)


# -- the same bytes ---------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".keras", ".weights.h5"])
def test_keras_async_payload_is_byte_identical(tmp_path, ext):
    """Two callbacks of one fit save the same state each epoch: one sync, one async."""
    model = keras_model()
    x, y = keras_data()
    weights_only = ext == ".weights.h5"
    sync = keras_ckpt.ModelCheckpoint(str(tmp_path / "sync" / f"c-{{epoch}}{ext}"),
                                      save_weights_only=weights_only)
    background = keras_ckpt.ModelCheckpoint(str(tmp_path / "async" / f"c-{{epoch}}{ext}"),
                                            save_weights_only=weights_only, async_save=True)
    model.fit(x, y, epochs=3, batch_size=16, validation_split=0.25, verbose=0,
              callbacks=[sync, background])
    assert names(background) == names(sync) == ["c-1", "c-2", "c-3"]
    for epoch in (1, 2, 3):
        a, b = tmp_path / "sync" / f"c-{epoch}{ext}", tmp_path / "async" / f"c-{epoch}{ext}"
        if ext == ".weights.h5":
            assert open(a, "rb").read() == open(b, "rb").read()
            continue
        # Keras's metadata.json records the wall-clock time of the save ("date_saved"): the
        # one member compared as JSON without it; every other byte must be the same.
        assert_same_payload(a, b, volatile_members=("metadata.json",))
        meta = [json.loads(zipfile.ZipFile(f).read("metadata.json")) for f in (a, b)]
        for m in meta:
            m.pop("date_saved")
        assert meta[0] == meta[1]


class _Holder:
    """An ``extra`` object whose state shares memory: a view into a larger tensor, an array."""

    def __init__(self) -> None:
        self.big = torch.arange(40, dtype=torch.float32)
        self.array = np.arange(6, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"view": self.big[3:9].view(2, 3), "again": self.big, "array": self.array,
                "n": np.int64(3)}

    def load_state_dict(self, state: dict) -> None:
        self.big.copy_(state["again"])


@needs_torch
def test_torch_async_payload_is_byte_identical(tmp_path):
    loop = TorchLoop(inputs=32, width=32)
    tied = torch.nn.Linear(32, 32, bias=False)
    tied.weight = loop.model[0].weight  # tied weights: one storage, two keys
    extra = {"holder": _Holder(), "tied": tied}
    sched = torch.optim.lr_scheduler.StepLR(loop.opt, step_size=1, gamma=0.5)
    kwargs = dict(model=loop.model, optimizer=loop.opt, scheduler=sched, extra=extra,
                  monitor="loss")
    sync = TorchCheckpoint(str(tmp_path / "sync" / "c-{epoch}.pt"), **kwargs)
    background = TorchCheckpoint(str(tmp_path / "async" / "c-{epoch}.pt"), async_save=True,
                                 **kwargs)
    sync.on_train_begin()
    background.on_train_begin()
    for epoch in range(3):
        loss = loop.step()
        extra["holder"].big += 1
        sched.step()
        sync.on_epoch_end(epoch, logs={"loss": loss})
        background.on_epoch_end(epoch, logs={"loss": loss})
    sync.on_train_end()
    background.on_train_end()
    assert names(background) == names(sync) == ["c-1", "c-2", "c-3"]
    for epoch in (1, 2, 3):
        assert_same_payload(tmp_path / "sync" / f"c-{epoch}.pt",
                            tmp_path / "async" / f"c-{epoch}.pt",
                            volatile_members=("archive/.data/serialization_id",))
        loaded = torch.load(tmp_path / "async" / f"c-{epoch}.pt", weights_only=True)
        holder = loaded["extra"]["holder"]  # the view still shares the tensor's storage
        assert holder["view"].untyped_storage().data_ptr() == holder["again"].untyped_storage().data_ptr()


# -- a consistent snapshot --------------------------------------------------------------------


def test_keras_weights_changed_after_async_save_do_not_leak(tmp_path):
    """Right after epoch 1's save returns, every weight and optimizer variable is overwritten
    (and training goes on); the file still holds the values at the save. While the commit is
    held, the callback lists nothing and no file of that checkpoint is visible.

    The variables are overwritten last-written first: a writer streaming the live variables
    would have to write the ~50 MB before the optimizer's last slots in the instant that takes.
    (On TensorFlow a variable whose buffer is still referenced is copied on write by TF itself,
    so there a missing snapshot goes unnoticed; KERAS_BACKEND=torch or jax catches it.)
    """
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1024,)), keras.layers.Dense(2048),
                              keras.layers.Dense(1024), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    x, y = keras_data(inputs=1024, n=32)
    directory = tmp_path / "run"
    ckpt = keras_ckpt.ModelCheckpoint(str(directory / "c-{epoch}.keras"), monitor="loss",
                                      async_save=True)
    seen: dict = {}

    def values(variables):
        return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]

    class Mutate(keras.callbacks.Callback):
        # Listed first, so it runs before the checkpoint callback at each epoch end.
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                seen["weights"] = values(self.model.weights)
                seen["optimizer"] = values(self.model.optimizer.variables)
                self.lock = storage.directory_lock(str(directory))
                self.lock.__enter__()

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:  # the first event after the save returned
                for v in reversed([*self.model.weights, *self.model.optimizer.variables]):
                    v.assign(keras.ops.full(v.shape, 7, dtype=v.dtype))
                seen["listed"] = names(ckpt)
                seen["latest"] = ckpt.latest_path
                seen["files"] = sorted(n for n in os.listdir(directory) if n.startswith("c-"))
                self.lock.__exit__(None, None, None)

    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[Mutate(), ckpt])
    assert seen["listed"] == [] and seen["latest"] is None and seen["files"] == []
    assert names(ckpt) == ["c-1", "c-2"]
    fresh = keras.models.clone_model(model)
    fresh.compile(optimizer="adam", loss="mse")
    _kerasio.load_into(fresh, str(directory / "c-1.keras"))
    for expected, got in zip(seen["weights"], values(fresh.weights)):
        np.testing.assert_array_equal(got, expected)
    for expected, got in zip(seen["optimizer"], values(fresh.optimizer.variables)):
        np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(values(model.weights)[0], seen["weights"][0])


@needs_torch
def test_torch_tensors_changed_after_async_save_do_not_leak(tmp_path):
    loop = TorchLoop(inputs=1024, width=4096)  # ~4.2M parameters: ~50 MB with Adam's state
    directory = tmp_path / "run"
    ckpt = TorchCheckpoint(str(directory / "c-{epoch}.pt"), model=loop.model, optimizer=loop.opt,
                           monitor="loss", max_to_keep=1, async_save=True)
    ckpt.on_train_begin()
    ckpt.on_epoch_end(0, logs={"loss": loop.step()})
    while not names(ckpt):  # committed (the next save would wait for it, and the lock below)
        time.sleep(0.01)
    loss = loop.step()
    model_at_save = {k: v.clone() for k, v in loop.model.state_dict().items()}
    exp_avg_at_save = [loop.opt.state[p]["exp_avg"].clone() for p in loop.model.parameters()]
    with storage.directory_lock(str(directory)):
        ckpt.on_epoch_end(1, logs={"loss": loss})
        with torch.no_grad():
            for p in loop.model.parameters():
                p.fill_(7.0)
                loop.opt.state[p]["exp_avg"].fill_(7.0)
        loop.step()  # and training goes on
        # Not committed yet: listed nowhere, and retention deleted nothing for it.
        assert names(ckpt) == ["c-1"]
        assert ckpt.latest_path == str(directory / "c-1.pt")
        assert committed_on_disk(directory) == ["c-1"]
        assert not (directory / "c-2.pt").exists()
    ckpt.on_train_end()
    assert names(ckpt) == ["c-2"] and not (directory / "c-1.pt").exists()
    saved = torch.load(directory / "c-2.pt", weights_only=True)
    for key, expected in model_at_save.items():
        assert torch.equal(saved["model"][key], expected)
    for i, expected in enumerate(exp_avg_at_save):
        assert torch.equal(saved["optimizer"]["state"][i]["exp_avg"], expected)
    assert torch.all(loop.model[0].weight != model_at_save["0.weight"])


@needs_torch
def test_torch_at_most_one_save_in_flight(tmp_path):
    """A save due while one is writing waits for it: every save is committed, in order."""
    loop = TorchLoop()
    ckpt = TorchCheckpoint(str(tmp_path / "c-{epoch}-{batch}.pt"), model=loop.model,
                           optimizer=loop.opt, monitor="loss", save_freq=1, async_save=True)
    ckpt.on_train_begin()
    for batch in range(6):
        ckpt.on_train_batch_end(batch, logs={"loss": loop.step()})
    ckpt.on_train_end()
    assert names(ckpt) == [f"c-1-{b}" for b in range(1, 7)]
    assert [r.step for r in ckpt.checkpoints] == list(range(1, 7))
    assert committed_on_disk(tmp_path) == names(ckpt)


@needs_torch
def test_torch_save_best_only_decides_on_committed_best(tmp_path):
    loop = TorchLoop()
    ckpt = TorchCheckpoint(str(tmp_path / "c-{epoch}.pt"), model=loop.model, monitor="val_loss",
                           save_best_only=True, async_save=True)
    ckpt.on_train_begin()
    for epoch, value in enumerate([0.5, 0.7, 0.4, 0.45, 0.3]):
        loop.step()
        ckpt.on_epoch_end(epoch, logs={"val_loss": value})
    ckpt.on_train_end()
    assert names(ckpt) == ["c-1", "c-3", "c-5"]
    assert ckpt.best == 0.3 and ckpt.best_path == str(tmp_path / "c-5.pt")
    assert torch.load(ckpt.best_path, weights_only=True)["training_state"]["monitor"]["best"] == 0.3


# -- errors of the background writer -----------------------------------------------------------


@needs_torch
def test_torch_writer_error_raised_at_the_next_save(small_disk):
    loop = TorchLoop(inputs=256, width=1024)  # ~3.2 MB per file: two fit in 8 MB, three do not
    ckpt = TorchCheckpoint(str(small_disk / "c-{epoch}.pt"), model=loop.model, optimizer=loop.opt,
                           monitor="loss", async_save=True)
    ckpt.on_train_begin()
    for epoch in range(3):
        ckpt.on_epoch_end(epoch, logs={"loss": loop.step()})  # the third fails in the background
    with pytest.raises(OSError, match="No space left") as err:
        ckpt.on_epoch_end(3, logs={"loss": loop.step()})
    assert "c-3.pt" in str(err.value) and str(small_disk) in str(err.value)
    assert names(ckpt) == ["c-1", "c-2"]
    assert committed_on_disk(small_disk) == ["c-1", "c-2"] and not temporaries(small_disk)
    os.remove(small_disk / "c-1.pt")  # room again: the next save works
    ckpt.on_epoch_end(3, logs={"loss": loop.step()})
    ckpt.on_train_end()
    assert names(ckpt)[-1] == "c-4"


def test_keras_writer_error_raised_at_train_end(small_disk):
    model = keras_model(inputs=256, width=1024)  # ~3.2 MB per file: two fit in 8 MB, three do not
    x, y = keras_data(inputs=256)
    ckpt = keras_ckpt.ModelCheckpoint(str(small_disk / "c-{epoch}.keras"), monitor="loss",
                                      async_save=True)
    with pytest.raises(OSError, match="No space left") as err:
        model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[ckpt])
    assert "c-3.keras" in str(err.value)
    assert names(ckpt) == ["c-1", "c-2"]
    assert committed_on_disk(small_disk) == ["c-1", "c-2"] and not temporaries(small_disk)
    # The directory was released: a new run resumes from the last committed checkpoint.
    again = keras_ckpt.ModelCheckpoint(str(small_disk / "c-{epoch}.keras"), monitor="loss",
                                       resume=True)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[again])
    assert again.restored_path == str(small_disk / "c-2.keras")


# -- crashes, exits, preemption (real subprocesses) --------------------------------------------


@needs_torch
def test_kill_9_during_background_write_leaves_previous_checkpoint(tmp_path):
    directory = tmp_path / "run"
    job = subprocess.Popen([sys.executable, JOB, "kill-torch", str(directory)],
                           stdout=subprocess.PIPE, text=True)
    try:
        line = job.stdout.readline()
        assert json.loads(line) == {"event": "IN FLIGHT", "committed": ["ckpt-1"]}
        while not temporaries(directory):  # the writer has started on the file
            time.sleep(0.01)
        job.send_signal(signal.SIGKILL)
        assert job.wait(timeout=60) == -signal.SIGKILL
    finally:
        job.kill()
        job.stdout.close()
    loop = TorchLoop(inputs=32, width=4096)
    ckpt = TorchCheckpoint(str(directory / "ckpt-{epoch}.pt"), model=loop.model,
                           optimizer=loop.opt, monitor="loss", resume=True)
    assert ckpt.on_train_begin() == 1
    assert ckpt.restored_path == str(directory / "ckpt-1.pt")
    ckpt.on_train_end()
    assert sorted(os.listdir(directory)) == [".checkpoints.lock", "checkpoints.json", "ckpt-1.pt"]
    assert committed_on_disk(directory) == ["ckpt-1"]


def test_keras_fit_returns_after_the_last_save_is_committed(tmp_path):
    """The job calls os._exit the moment fit returns: nothing in flight could still finish."""
    r = run_job("exit-after-fit", tmp_path)
    assert r.returncode == 0, r.stderr
    assert reports(r.stdout)["FIT RETURNED"]["committed"] == ["ckpt-1", "ckpt-2"]
    assert committed_on_disk(tmp_path) == ["ckpt-1", "ckpt-2"] and not temporaries(tmp_path)


@needs_torch
def test_torch_on_train_end_waits_for_the_save_in_flight(tmp_path):
    r = run_job("exit-after-end", tmp_path)
    assert r.returncode == 0, r.stderr
    assert reports(r.stdout)["TRAIN END"]["committed"] == ["ckpt-1", "ckpt-2"]
    assert committed_on_disk(tmp_path) == ["ckpt-1", "ckpt-2"] and not temporaries(tmp_path)


def test_fit_that_raises_still_commits_the_save_in_flight(tmp_path):
    """fit raises (skipping on_train_end) while epoch 1's save waits to commit; the interpreter
    waits for the writer before it exits."""
    r = run_job("fit-raises", tmp_path)
    assert r.returncode == 1 and "RuntimeError: boom" in r.stderr
    assert reports(r.stdout)["RAISING"]["committed"] == []  # it was still in flight
    assert committed_on_disk(tmp_path) == ["ckpt-1"] and not temporaries(tmp_path)


@needs_torch
def test_preemption_save_waits_for_the_save_in_flight(tmp_path):
    directory = tmp_path / "run"
    job = subprocess.Popen([sys.executable, JOB, "preempt-torch", str(directory)],
                           stdout=subprocess.PIPE, text=True)
    try:
        report = json.loads(job.stdout.readline())
        assert report == {"event": "IN FLIGHT", "committed": ["ckpt-1-2"]}
        job.send_signal(signal.SIGTERM)
        (tmp_path / "signalled").write_text("sent\n")
        assert job.wait(timeout=120) == -signal.SIGTERM  # exit status 143 in a shell
        rest = job.stdout.read()
    finally:
        job.kill()
        job.stdout.close()
    assert "NOT PREEMPTED" not in rest
    # The save in flight, then the preemption save at the next batch end (batch 5, step 5).
    assert committed_on_disk(directory) == ["ckpt-1-2", "ckpt-1-4", "ckpt-1-5"]
    assert mf.load(str(directory)).checkpoints[-1].step == 5
    assert not temporaries(directory)


@needs_torch
def test_script_that_ends_with_a_save_in_flight_still_commits_it(tmp_path):
    """No on_train_end: the interpreter waits for the writer, whose zip records are CRC'd on a
    thread pool that concurrent.futures shuts down before that wait (it refused the work)."""
    r = run_job("exit-in-flight", tmp_path)
    assert r.returncode == 0, r.stderr
    assert reports(r.stdout)["RETURNING"]["committed"] == []  # still in flight as it returned
    assert "failed" not in r.stderr, r.stderr
    assert committed_on_disk(tmp_path) == ["ckpt-1"] and not temporaries(tmp_path)


@pytest.mark.parametrize("front_end", ["keras", pytest.param("torch", marks=needs_torch)])
def test_sigterm_while_train_end_waits_for_the_save_is_redelivered(tmp_path, front_end):
    """The signal lands while on_train_end waits for the last epoch's save: the save commits,
    then the process dies of it (it used to be swallowed, and the script went on)."""
    r = run_job(f"term-at-end-{front_end}", tmp_path)
    assert "SIGNALLING" in reports(r.stdout), r.stderr[-3000:]
    assert r.returncode == -signal.SIGTERM, r.stdout + r.stderr[-3000:]
    assert "SURVIVED" not in reports(r.stdout)
    assert committed_on_disk(tmp_path) == ["ckpt-1", "ckpt-2"] and not temporaries(tmp_path)
