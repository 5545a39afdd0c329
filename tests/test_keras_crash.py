"""kill -9 a real Keras training process that saves every batch; the next run finds a clean directory."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from keras_ckpt import manifest as mf
from keras_ckpt.engine import Engine, verify
from keras_ckpt.policy import RetentionPolicy

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keras_job.py")


def _committed(directory) -> int:
    """The newest commit's number (a single-file series keeps one record, so not a count)."""
    try:
        return max((r.seq for r in mf.load(str(directory)).checkpoints), default=0)
    except (mf.ManifestError, OSError):
        return 0


@pytest.mark.parametrize("template", ["ck-{epoch:03d}-{batch:02d}.keras", "last.weights.h5"])
def test_kill_9_during_per_batch_saves_then_resume(tmp_path, template):
    d = tmp_path / "run"
    rnd = random.Random(template)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")  # KERAS_BACKEND: conftest.py's default or the CI's
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, JOB, str(d), "400", "--resume", "--template", template, "--save-freq", "1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        before = _committed(d)
        deadline = time.monotonic() + 120
        while _committed(d) <= before and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)  # wait for this process's first commit: then it is saving every batch
        time.sleep(rnd.random() * 0.4)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        e = Engine(str(d / template), framework="keras", policy=RetentionPolicy(monitor="val_loss"))
        e.open()  # what the next run's train begin does first
        e.close()
        m = mf.load(str(d))
        assert m.intent is None and m.checkpoints
        for r in m.checkpoints:
            assert verify(str(d), r) is None, r.name
        on_disk = {p.name for p in d.iterdir()} - {mf.FILENAME, ".checkpoints.lock"}
        assert on_disk == m.listed_files(), "only listed files after the next open"
    assert kills == 4
    newest = max(mf.load(str(d)).checkpoints, key=lambda r: r.seq)
    # The next run resumes from the newest committed step and trains on from there.
    done = subprocess.run(
        [sys.executable, JOB, str(d), str(newest.epoch + 2), "--resume", "--template", template,
         "--save-freq", "1"],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["restored"] == str(d / newest.path)
    assert report["iterations"] > newest.step


@pytest.mark.parametrize("kill_at, data", [(13, "numpy"), (15, "pydataset"), (13, "tfdata")])
def test_kill_9_mid_epoch_with_step_saves_resumes_bitwise_without_replay(tmp_path, kill_at, data):
    """save_freq=3, 5 batches an epoch: SIGKILL right after step 13 (newest save: step 12, in
    the middle of epoch 3) or 15 (saved after epoch 3's last batch, before its epoch end).
    The resumed run trains each remaining batch once and ends bitwise equal to a straight run,
    its logged loss for the interrupted epoch included. Inputs: numpy arrays, a PyDataset that
    fit shuffles, a tf.data pipeline with its own seeded order."""
    if data == "tfdata":
        pytest.importorskip("tensorflow")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    args = ["4", "--template", "ck-{epoch:02d}-{batch:02d}.keras", "--save-freq", "3",
            "--input", data]

    def job(d, *extra, code=0):
        done = subprocess.run([sys.executable, JOB, str(d), *args, *map(str, extra)], env=env,
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == code, done.stderr[-3000:]
        return done

    straight = json.loads(job(tmp_path / "a", "--dump", tmp_path / "a.npz").stdout.splitlines()[-1])
    job(tmp_path / "b", "--kill-at-step", kill_at, "--log", tmp_path / "killed.log",
        code=-signal.SIGKILL)
    newest = max(mf.load(str(tmp_path / "b")).checkpoints, key=lambda r: r.seq)
    assert newest.step == kill_at // 3 * 3 and newest.epoch == 2  # 2 epochs done, mid the 3rd
    done = job(tmp_path / "b", "--resume", "--dump", tmp_path / "b.npz", "--log",
               tmp_path / "resumed.log")
    assert "restarts at batch 0" not in done.stderr and "trained again" not in done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["restored"] == str(tmp_path / "b" / newest.path)
    assert report["epochs"] == [2, 3] and report["iterations"] == straight["iterations"] == 20
    steps = [int(line) for line in (tmp_path / "resumed.log").read_text().split()]
    # Each batch after the checkpoint trained once; when the saved batch ends its epoch, fit
    # steps through it once more without training (iterations unchanged), for the epoch's logs.
    replay = [newest.step] if newest.step == 15 else []
    assert steps == replay + list(range(newest.step + 1, 21))
    for key, values in straight["history"].items():
        assert report["history"][key] == values[2:], key
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert set(a.files) == set(b.files) and any(k.startswith("o") for k in a.files)
    for key in a.files:
        assert a[key].tobytes() == b[key].tobytes(), key
