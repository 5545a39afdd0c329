"""save_on_preemption: a real training process gets SIGTERM / SIGUSR1 in the middle of an epoch.

The job (tests/preempt_job.py) writes a marker once it is mid-epoch and then paces its batches;
the test signals it after the marker appears. A process that dies of the re-delivered signal's
default action has ``returncode == -signum`` in ``subprocess`` (a shell reports 128 + signum:
143 for SIGTERM, 138 for SIGUSR1).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from keras_ckpt import manifest as mf
from keras_ckpt.engine import verify

HERE = os.path.dirname(os.path.abspath(__file__))
JOB = os.path.join(HERE, "preempt_job.py")
TIMEOUT = 180


@pytest.fixture(autouse=True)
def _default_signal_handlers():
    """Each test starts from the default SIGTERM/SIGUSR1 actions, whatever ran before in this
    process (a test that began training and never ended it leaves its flag handler installed,
    to be restored by the next train begin), and leaves them as it found them."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    for s in before:
        signal.signal(s, signal.SIG_DFL)
    yield
    for s, handler in before.items():
        if handler is not None:
            signal.signal(s, handler)


def _env(**extra: str) -> dict:
    root = os.path.dirname(HERE)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=path, **extra)


def _run(args: list, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, JOB, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _report(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def _wait_for(path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(path):
        if proc.poll() is not None:
            pytest.fail(f"the job ended ({proc.returncode}) before {path} appeared: "
                        f"{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no {path} after {TIMEOUT} s"
        time.sleep(0.02)


class _Job:
    """A job process that gets signals once it is mid-epoch (see tests/preempt_job.py)."""

    def __init__(self, args: list, env: dict, tmp, *, slow_save: bool = False) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.marker, self.log = tmp / "mid-epoch", tmp / "steps.log"
        self.saving = tmp / "saving" if slow_save else None
        extra = ["--pace", self.marker, "--log", self.log]
        if self.saving:
            extra += ["--slow-save", self.saving]
        self.proc = subprocess.Popen([sys.executable, JOB, *map(str, args + extra)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def signal(self, *signals: int):
        """Send ``signals`` mid-epoch; returns (returncode, stderr, the logged steps)."""
        proc = self.proc
        try:
            _wait_for(self.marker, proc)
            proc.send_signal(signals[0])
            if self.saving:
                _wait_for(self.saving, proc)  # the preemption save is running now
            for sig in signals[1:]:
                proc.send_signal(sig)
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return proc.returncode, err, [int(line) for line in self.log.read_text().split()]


def _signalled(args: list, env: dict, tmp, *signals: int, slow_save: bool = False):
    return _Job(args, env, tmp, slow_save=slow_save).signal(*signals)


def _newest(directory) -> mf.Record:
    """The newest committed record, after checking the whole directory is consistent."""
    m = mf.load(str(directory))
    assert m.intent is None and m.checkpoints
    for r in m.checkpoints:
        assert verify(str(directory), r) is None, r.name
    return max(m.checkpoints, key=lambda r: r.seq)


# -- Keras ------------------------------------------------------------------------------------


def test_keras_sigterm_mid_epoch_saves_stops_and_resumes_bitwise(tmp_path):
    """Both backends at once (two cores: the jobs' start-up dominates): SIGTERM mid-epoch, exit
    143, resume skips the trained batches and ends bitwise equal to an uninterrupted run."""
    backends = ("tensorflow", "torch")
    envs = {b: _env(KERAS_BACKEND=b) for b in backends}
    straight = {b: subprocess.Popen(
        [sys.executable, JOB, "keras", str(tmp_path / f"{b}-ref"), "--dump",
         str(tmp_path / f"{b}-ref.npz")], env=envs[b], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for b in backends}
    jobs = {b: _Job(["keras", tmp_path / b], envs[b], tmp_path / f"{b}-job") for b in backends}
    records = {}
    for backend, job in jobs.items():
        code, err, steps = job.signal(signal.SIGTERM)
        assert code == -signal.SIGTERM, err[-3000:]  # the default action: status 143 in a shell
        d = tmp_path / backend
        record = records[backend] = _newest(d)
        # Saved at the first batch boundary after the signal (checked at batch begin, so Keras
        # keeps dispatching batch ends asynchronously): the batch in progress is in it; Keras
        # trains one more batch before it stops, which is not saved.
        assert record.step in (steps[-1] - 1, steps[-1]) and 10 < record.step < 20, backend
        assert record.epoch == 1 and record.name == "ckpt-02"
        assert {p.name for p in d.iterdir()} - {mf.FILENAME, ".checkpoints.lock"} == (
            mf.load(str(d)).listed_files()
        )
    resumed = {b: subprocess.Popen(
        [sys.executable, JOB, "keras", str(tmp_path / b), "--resume", "--log",
         str(tmp_path / f"{b}-resumed.log"), "--dump", str(tmp_path / f"{b}-resumed.npz")],
        env=envs[b], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for b in backends}
    for backend, proc in resumed.items():
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err[-3000:]
        assert "restarts at batch 0" not in err and "trained again" not in err, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        record = records[backend]
        assert report["restored"] == str(tmp_path / backend / record.path)
        assert report["epochs"] == [1, 2] and report["iterations"] == 30  # 10 batches x 3
        assert report["preempted"] is False
        # No batch trained twice: the resumed process's first batch is the one after the save.
        steps = [int(line) for line in (tmp_path / f"{backend}-resumed.log").read_text().split()]
        assert steps == list(range(record.step + 1, 31)), backend
        ref_out, ref_err = straight[backend].communicate(timeout=TIMEOUT)
        assert straight[backend].returncode == 0, ref_err[-3000:]
        a, b = np.load(tmp_path / f"{backend}-ref.npz"), np.load(tmp_path / f"{backend}-resumed.npz")
        assert set(a.files) == set(b.files) and any(k.startswith("o") for k in a.files)
        for key in a.files:  # weights, optimizer slots and iterations; the epochs' mean losses
            if key == "loss":  # the resumed fit's history starts at the interrupted epoch
                assert a[key][1:].tobytes() == b[key].tobytes(), (backend, a[key], b[key])
            else:
                assert a[key].tobytes() == b[key].tobytes(), (backend, key)


def test_keras_users_own_handler_runs_after_the_save(tmp_path):
    d, done = tmp_path / "run", tmp_path / "handled"
    code, err, steps = _signalled(["keras", d, "--user-handler", done],
                                  _env(KERAS_BACKEND="tensorflow"), tmp_path, signal.SIGTERM)
    assert code == 3, err[-3000:]  # the user's handler ran (after fit returned) and exited
    assert done.read_text().strip() == "SIGTERM"
    assert _newest(d).step in (steps[-1] - 1, steps[-1])


# -- the torch shim ---------------------------------------------------------------------------


def _state(path) -> dict:
    import torch

    return torch.load(path, weights_only=True)


def _assert_bitwise_equal(a, b, where: str = "") -> None:
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("workers", [0, 2])
def test_torch_sigterm_saves_then_resume_is_bitwise_exact(tmp_path, workers):
    """A shuffling DataLoader (in-process or with worker processes) and dropout: the resumed
    process's ckpt.enumerate(loader) draws the interrupted epoch's order again, skips the
    trained batches without loading them, and ends bitwise equal to an uninterrupted run."""
    env = _env()
    w = ["--workers", workers]
    _run(["torch", tmp_path / "ref", "--dump", tmp_path / "ref.pt", *w], env)
    d = tmp_path / "run"
    code, err, steps = _signalled(["torch", d, *w], env, tmp_path, signal.SIGTERM)
    assert code == -signal.SIGTERM, err[-3000:]
    record = _newest(d)
    assert record.step == steps[-1] and 6 < record.step < 12  # mid epoch 2 (6 batches each)
    saved = _state(d / record.path)["training_state"]
    assert saved["batch"] == record.step - 7  # the 0-based index of the last trained batch
    log = tmp_path / "resumed.log"
    report = _report(_run(["torch", d, "--resume", "--dump", tmp_path / "resumed.pt", "--log", log,
                           *w], env))
    assert report["restored"] == str(d / record.path)
    # No batch trained twice: the first one trained is the one after the checkpoint.
    assert [int(s) for s in log.read_text().split()] == list(range(record.step + 1, 19))
    _assert_bitwise_equal(_state(tmp_path / "resumed.pt"), _state(tmp_path / "ref.pt"))


def test_torch_sigusr1_saves_then_dies_of_sigusr1(tmp_path):
    d = tmp_path / "run"
    code, err, steps = _signalled(["torch", d], _env(), tmp_path, signal.SIGUSR1)
    assert code == -signal.SIGUSR1, err[-3000:]
    assert _newest(d).step == steps[-1] > 6


def test_second_sigterm_during_the_save_does_not_interrupt_the_commit(tmp_path):
    d = tmp_path / "run"
    code, err, steps = _signalled(["torch", d], _env(), tmp_path, signal.SIGTERM, signal.SIGTERM,
                                  slow_save=True)
    assert code == -signal.SIGTERM, err[-3000:]
    record = _newest(d)
    assert record.step == steps[-1] > 6
    assert {p.name for p in d.iterdir()} - {mf.FILENAME, ".checkpoints.lock"} == (
        mf.load(str(d)).listed_files()
    )


def test_save_on_preemption_false_leaves_sigterm_alone(tmp_path):
    d = tmp_path / "run"
    code, err, steps = _signalled(["torch", d, "--signals", "false"], _env(), tmp_path,
                                  signal.SIGTERM)
    assert code == -signal.SIGTERM, err[-3000:]
    assert 6 < steps[-1] < 12
    # Killed at once: only the end of epoch 1 was saved.
    assert [r.step for r in mf.load(str(d)).checkpoints] == [6]


# -- the TF hook with MonitoredTrainingSession ------------------------------------------------


def test_tf_hook_sigterm_saves_the_current_step_and_resumes_from_it(tmp_path):
    d, env = tmp_path / "run", _env()
    code, err, steps = _signalled(["mts", d], env, tmp_path, signal.SIGTERM)
    assert code == -signal.SIGTERM, err[-3000:]
    record = _newest(d)
    assert record.step == steps[-1] >= 15 and record.step % 10
    state = (d / "checkpoint").read_text()
    assert f'model_checkpoint_path: "{record.name}"' in state  # TF resumes from it natively
    report = _report(_run(["mts", d], env))
    assert report["first_step"] == record.step


@pytest.mark.estimator
@pytest.mark.skipif(importlib.util.find_spec("tensorflow_estimator") is None,
                    reason="tf.estimator needs TensorFlow <= 2.15 with tensorflow-estimator")
def test_estimator_sigterm_saves_the_current_step_and_resumes_from_it(tmp_path):
    d, env = tmp_path / "run", _env()
    code, err, steps = _signalled(["estimator", d], env, tmp_path, signal.SIGTERM)
    assert code == -signal.SIGTERM, err[-3000:]
    record = _newest(d)
    assert record.step == steps[-1] >= 15 and record.step % 10
    assert _report(_run(["estimator", d], env))["first_step"] == record.step


# -- in-process: what is installed when ----------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", 1, (), ("SIGTERM",), (signal.SIGKILL,), (999,), [15]])
def test_invalid_save_on_preemption_is_a_value_error_naming_it(tmp_path, value):
    torch = pytest.importorskip("torch")
    from keras_ckpt.torch import ModelCheckpoint

    with pytest.raises(ValueError, match="save_on_preemption"):
        ModelCheckpoint(str(tmp_path / "c.pt"), model=torch.nn.Linear(1, 1),
                        save_on_preemption=value)


class _Recorder:
    """A user's SIGTERM handler that only records."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, signum, frame) -> None:
        self.calls.append(signum)


@pytest.fixture
def user_handler():
    handler = _Recorder()
    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield handler
    finally:
        signal.signal(signal.SIGTERM, before)


def _keras_fit(tmp_path, callback_cls, **kwargs):
    import keras

    import keras_ckpt

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    ckpt = keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}.keras"), monitor="loss", **kwargs)
    probe = callback_cls()
    x = np.zeros((8, 2), "float32")
    model.fit(x, x[:, :1], batch_size=4, epochs=1, verbose=0, callbacks=[probe, ckpt])
    return probe, ckpt


@pytest.mark.parametrize("save_on_preemption", [True, False])
def test_keras_handler_only_during_fit(tmp_path, user_handler, save_on_preemption):
    import keras

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.during = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)

    probe, _ = _keras_fit(tmp_path, Probe, save_on_preemption=save_on_preemption)
    if save_on_preemption:
        assert probe.during[0] == probe.during[1] not in (user_handler, signal.SIG_DFL)
    else:
        assert probe.during == (user_handler, signal.SIG_DFL)  # untouched
    assert signal.getsignal(signal.SIGTERM) is user_handler
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_keras_fit_that_raises_leaves_no_handler_swallowing_signals(tmp_path, user_handler):
    import keras

    class Boom(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _keras_fit(tmp_path, Boom)
    # on_train_end never ran; a signal now finds fit gone and goes to the user's handler.
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):
        if user_handler.calls:
            break
        time.sleep(0.01)
    assert user_handler.calls == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is user_handler


def test_torch_shim_outside_the_main_thread_installs_nothing(tmp_path):
    torch = pytest.importorskip("torch")
    from keras_ckpt.torch import ModelCheckpoint

    ckpt = ModelCheckpoint(str(tmp_path / "c-{epoch}.pt"), model=torch.nn.Linear(1, 1),
                           monitor="loss")
    seen = []

    def train() -> None:
        ckpt.on_train_begin()
        seen.append(signal.getsignal(signal.SIGTERM))
        ckpt.on_train_batch_end(0, {"loss": 1.0})
        ckpt.on_epoch_end(0, {"loss": 1.0})
        ckpt.on_train_end()

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    assert seen == [signal.SIG_DFL] and len(ckpt.checkpoints) == 1
