"""`python -m benchmarks --quick` runs end to end and prints every row of the one table.

No timings are asserted (figures live in docs/benchmarks.md); what a reader of the table relies
on is: every row is there, each with a number in the ratio column, and the async rows say why
they are empty when the installed keras_ckpt cannot save asynchronously.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (section, row label, what its ratio is of); None: a reference row or one without a ratio.
ROWS = [
    ("save", "raw write + fsync", "x raw write"),
    ("save", "raw bytes via keras_ckpt's output path + fsync", "x raw write"),
    ("save", "keras_ckpt.ModelCheckpoint .keras (on_epoch_end)", "x raw write"),
    ("save", "keras_ckpt.ModelCheckpoint .weights.h5", "x raw write"),
    ("save", "keras_ckpt.torch.ModelCheckpoint .pt", "x raw write"),
    ("save", "stock model.save .keras + fsync", "x raw write"),
    ("save", "stock model.save_weights .weights.h5 + fsync", "x raw write"),
    ("save", "stock tf.train.CheckpointManager.save + fsync", "x raw write"),
    ("save", "keras_ckpt.tf.CheckpointManager.save", "x raw write"),
    ("async", "stock TF async (CheckpointOptions) stall", "x stock sync save"),
    ("save", "stock torch.save .pt + fsync", "x raw write"),
    ("resume", "raw cold read of the .keras file", "x raw read .keras"),
    ("resume", "  raw O_DIRECT read of the .keras file", "x raw read .keras"),
    ("resume", "keras_ckpt resume .keras (on_train_begin)", "x raw read .keras"),
    ("resume", "stock keras.saving.load_model .keras", "x raw read .keras"),
    ("resume", "raw cold read of the .weights.h5 file", "x raw read .weights.h5"),
    ("resume", "  raw O_DIRECT read of the .weights.h5 file", "x raw read .weights.h5"),
    ("resume", "keras_ckpt resume .weights.h5 (on_train_begin)", "x raw read .weights.h5"),
    ("resume", "stock model.load_weights .weights.h5", "x raw read .weights.h5"),
    ("resume", "stock tf.train.Checkpoint restore (CheckpointManager)", "x raw read .weights.h5"),
    ("resume", "raw cold read of the .pt file", "x raw read .pt"),
    ("resume", "  raw O_DIRECT read of the .pt file", "x raw read .pt"),
    ("resume", "keras_ckpt.torch resume .pt (on_train_begin)", "x raw read .pt"),
    ("resume", "stock torch.load + load_state_dict .pt", "x raw read .pt"),
    ("overhead", "Keras fit step, no callback", None),
    ("overhead", "  the same again (A/A: the noise of a fit ratio)", "x no callback"),
    ("overhead", "Keras fit step + keras_ckpt.ModelCheckpoint", "x no callback"),
    ("overhead", "Keras fit step + keras.callbacks.ModelCheckpoint", "x no callback"),
    ("overhead", "  keras_ckpt's batch hooks via fit's CallbackList", "x no callback"),
    ("overhead", "torch step, bare loop", None),
    ("overhead", "torch step + shim on_train_batch_end", "x no callback"),
    ("overhead", "  the shim's on_train_batch_end itself", "x no callback"),
    ("disk", "latest-1 + best-1 .keras, 5 epochs", "x one ckpt (size)"),
    ("disk", "latest-1 + best-1 .pt, 5 epochs", "x one ckpt (size)"),
]
ASYNC = ("keras_ckpt .weights.h5 async stall", "keras_ckpt.torch .pt async stall",
         "keras_ckpt.tf.CheckpointManager async stall")


def _table(out: str) -> tuple[str, list[str]]:
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("section "))
    return lines[at], [line for line in lines[at + 2 :] if line.strip()]


def _ratio(header: str, line: str) -> str:
    end = header.index("ratio") + len("ratio")
    return line[end - 6 : end].strip()


def test_quick_run_prints_every_row_with_its_ratio(tmp_path):
    for module in ("tensorflow", "torch", "keras"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the benchmark needs {module}")
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "# command: python -m benchmarks --quick" in done.stdout
    assert "# machine: " in done.stdout and "# filesystem: " in done.stdout
    header, rows = _table(done.stdout)
    for section, label, of in ROWS:
        found = [r for r in rows if r.startswith(f"{section:8} {label} ")]
        assert found, f"no row {section} / {label} in:\n{done.stdout}"
        if of is not None:
            assert of in found[0], found[0]
            float(_ratio(header, found[0]))  # a number, not blank or n/a
    # Each keras_ckpt save row is followed by its ratio to raw bytes through our output path.
    for label in ROWS[2:5]:
        at = next(i for i, r in enumerate(rows) if r.startswith(f"save     {label[1]} "))
        assert "x own output path" in rows[at + 1] and float(_ratio(header, rows[at + 1]))

    import keras_ckpt
    import keras_ckpt.tf
    import keras_ckpt.torch

    classes = (keras_ckpt.ModelCheckpoint, keras_ckpt.torch.ModelCheckpoint,
               keras_ckpt.tf.CheckpointManager)
    for label, cls in zip(ASYNC, classes):
        line = next(r for r in rows if r.startswith(f"async    {label}"))
        if "async_save" in inspect.signature(cls.__init__).parameters:
            float(_ratio(header, line))
        else:
            assert "n/a (async_save not available)" in line
    # No checkpoint or scratch file is left where it wrote.
    assert not any(os.scandir(tmp_path))


def _small_run(module: str, tmp_path) -> list[str]:
    """The output lines of ``python -m benchmarks.<module>`` on a tiny model, one round; asserts
    it left nothing where it wrote."""
    pytest.importorskip("tensorflow")
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=ROOT)
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--rounds", "1", "--params", "2e5",
         "--dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"# command: python -m benchmarks.{module} --rounds 1" in done.stdout
    assert not any(os.scandir(tmp_path))
    return done.stdout.splitlines()


def test_the_resume_walk_comparison_prints_both_walks_beside_the_raw_read(tmp_path):
    lines = _small_run("resume_walk", tmp_path)
    for suffix in (".keras", ".weights.h5"):
        for label in ("raw cold read", "held walk", "walk after checksum"):
            line = next(r for r in lines if r.startswith(f"{suffix:12} {label} "))
            assert float(line.split()[-1]) > 0


def test_the_write_path_comparison_prints_both_crcs_and_every_write_row(tmp_path):
    lines = _small_run("write_path", tmp_path)
    assert any(line.startswith("crc32 zlib ") for line in lines)
    writes = [line for line in lines if line.startswith("write ")]
    assert len(writes) == 6 and all(line.endswith("x one buffer") for line in writes)
