import importlib.util
import os
import subprocess
import uuid

import pytest

# Keras picks its backend once per process, at import. Without KERAS_BACKEND the tests (and the
# jobs they start, which inherit it) run the first installed one: TensorFlow in the main
# environment, JAX in the jax-only one (`make test-jax` also sets it explicitly).
if "KERAS_BACKEND" not in os.environ:
    _installed = [b for b in ("tensorflow", "jax", "torch") if importlib.util.find_spec(b) is not None]
    os.environ["KERAS_BACKEND"] = _installed[0] if _installed else "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MB filesystem (tmpfs, as root) that fills up: ENOSPC from the kernel itself."""
    d = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture
def read_only_view(tmp_path):
    """``read_only_view(src)``: ``src`` bind-mounted read-only (as root), as an evaluation job or
    the next job of a chain sees its input: EROFS from the kernel on every write."""
    mounts = []

    def view(src):
        d = tmp_path / f"ro-{uuid.uuid4().hex[:6]}"
        d.mkdir()
        r = subprocess.run(["mount", "--bind", str(src), str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot bind-mount here (needs root): {r.stderr.decode().strip()}")
        mounts.append(d)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(d)], check=True)
        return d

    try:
        yield view
    finally:
        for d in mounts:
            subprocess.run(["umount", "-l", str(d)], check=False)
