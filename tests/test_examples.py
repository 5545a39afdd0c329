"""The three classic examples as a job platform runs them: preempted, restarted, chained.

Each example runs in its own process, as a user would start it: job 1 writes ``out1`` and is
preempted (``--stop-after-epoch`` sends it SIGTERM), restarted with the very same command it
continues there, and job 2 starts from ``out1`` mounted read-only (``--resume-from``) into
``out2``. The Estimator example needs TF 2.15 + tensorflow-estimator (``make test-estimator``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import stat
import subprocess
import sys

import pytest

from keras_ckpt import manifest as mf

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
# What TensorFlow, absl and Estimator print when an example does not silence them.
NOISE = re.compile(r"^(I0000|W0000|E0000|WARNING: All log messages|INFO:tensorflow|WARNING:tensorflow"
                   r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] )", re.M)
EPOCH = re.compile(r"^epoch (\d+)/(\d+): ", re.M)


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs {module}")


def _keras() -> None:
    _needs("sklearn")
    keras = pytest.importorskip("keras")
    if not keras.__version__.startswith("3."):
        pytest.skip("the Keras example is for Keras 3")


def _torch() -> None:
    _needs("sklearn")
    _needs("torch")


def _estimator() -> None:
    _needs("sklearn")
    tf = pytest.importorskip("tensorflow")
    if not hasattr(tf, "estimator"):
        pytest.skip("tf.estimator needs TensorFlow <= 2.15 with tensorflow-estimator")


# script, its tiny settings, the check of the installed frameworks, the first checkpoint name.
CASES = {
    "keras": ("keras_mnist_cnn.py", [], _keras),
    "torch": ("pytorch_mnist_cnn.py", ["--device", "cpu"], _torch),
    "estimator": ("tf_estimator_mnist_cnn.py", ["--steps-per-epoch", "10", "--dense-units", "32"],
                  _estimator),
}


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # The example must quieten TensorFlow itself (conftest sets this for the tests' own TF).
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    done = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args],
                          capture_output=True, text=True, env=env, timeout=300)
    for stream in (done.stdout, done.stderr):
        assert not NOISE.search(stream), f"TF log noise:\n{stream[-3000:]}"
    return done


def _epochs(stdout: str) -> list[int]:
    return [int(m.group(1)) for m in EPOCH.finditer(stdout)]


def _names(directory) -> list[str]:
    return [r.name for r in mf.load(str(directory)).checkpoints]


def _ls(directory) -> str:
    return subprocess.run([sys.executable, "-m", "keras_ckpt", "ls", str(directory)],
                          capture_output=True, text=True, check=True, timeout=60).stdout


def _tree(directory) -> dict:
    """Every file's bytes and mtime, and every entry's mode: what a read-only mount keeps."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            data = open(path, "rb").read() if name in files else None
            out[os.path.relpath(path, directory)] = (data, os.stat(path).st_mtime_ns,
                                                     stat.S_IMODE(os.stat(path).st_mode))
    return out


def _chmod_tree(directory, mode: int) -> None:
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), mode)
        for name in files:
            os.chmod(os.path.join(root, name), mode & 0o444 | (mode & 0o200))
    os.chmod(directory, mode)


@pytest.mark.parametrize("case", [
    "keras",
    "torch",
    pytest.param("estimator", marks=pytest.mark.estimator),
])
def test_preempted_restarted_and_chained_from_a_read_only_output(case, tmp_path):
    script, tiny, check = CASES[case]
    check()
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    job1 = [*tiny, "--output", str(out1), "--epochs", "2", "--stop-after-epoch", "1"]

    first = _run(script, *job1)
    assert first.returncode == -signal.SIGTERM, first.stderr[-3000:]  # 143 in a shell
    saved_first = _names(out1)
    assert len(saved_first) == 1 and "SIGTERM" in first.stdout
    assert _epochs(first.stdout) == [1]

    # The scheduler restarts the job with the same command: it continues in out1.
    again = _run(script, *job1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out1 / saved_first[0]}" in again.stdout
    # The Estimator job was stopped before epoch 1's evaluation: it evaluates that first.
    assert _epochs(again.stdout) == ([1, 2] if case == "estimator" else [2])
    assert again.stdout.endswith(_ls(out1))
    chain_from = mf.load(str(out1)).checkpoints
    assert [r.name for r in chain_from][0] == saved_first[0] and len(chain_from) == 2

    # Job 2 of a chain: out1 is mounted read-only, out2 is its own.
    _chmod_tree(out1, 0o555)
    before = _tree(out1)
    try:
        second = _run(script, *tiny, "--output", str(out2), "--epochs", "3",
                      "--resume-from", str(out1))
        assert _tree(out1) == before  # not a byte, a timestamp or a mode changed
    finally:
        _chmod_tree(out1, 0o755)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _epochs(second.stdout) == [3]
    assert second.stdout.endswith(_ls(out2))

    restored = chain_from[-1]  # the newest of out1, copied in (the Estimator copies all)
    records = {r.name: r for r in mf.load(str(out2)).checkpoints}
    new = [name for name in records if name not in {r.name for r in chain_from}]
    assert len(new) == 1 and records[new[0]].step > restored.step
    assert restored.name in records
    assert records[restored.name].step == restored.step
    assert [f.xxh3_128 for f in records[restored.name].files] == [f.xxh3_128 for f in restored.files]
    assert records[restored.name].metrics == pytest.approx(restored.metrics)


def test_torch_sigterm_mid_epoch_resumes_exactly(tmp_path):
    """A real SIGTERM in the middle of an epoch: the restarted job skips the batches trained
    before it and ends with the same numbers as a job that was never interrupted."""
    _torch()
    script = os.path.join(EXAMPLES, "pytorch_mnist_cnn.py")
    args = ["--device", "cpu", "--epochs", "3", "--batch-size", "8"]  # 180 batches an epoch
    straight = _run("pytorch_mnist_cnn.py", *args, "--output", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-u", script, *args, "--output", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = []
    for line in job.stdout:
        lines.append(line)
        if line.startswith("epoch 1/3"):
            job.send_signal(signal.SIGTERM)  # epoch 2 has just begun
    assert job.wait(timeout=300) == -signal.SIGTERM, job.stderr.read()[-3000:]
    stopped = re.search(r"^epoch 2/3: SIGTERM after batch (\d+); saved ckpt-002\.pt, stopping$",
                        "".join(lines), re.M)
    assert stopped, "".join(lines)

    resumed = _run("pytorch_mnist_cnn.py", *args, "--output", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    batch = int(stopped.group(1))
    assert f"continuing at epoch 2 batch {batch + 1}" in resumed.stdout
    assert _epochs(resumed.stdout) == [2, 3]

    def metrics(stdout: str) -> list[str]:  # "epoch N/3: loss …, val_accuracy …" without "kept"
        return [line.split(";")[0] for line in stdout.splitlines() if EPOCH.match(line)]

    assert metrics(resumed.stdout) == metrics(straight.stdout)[1:]
