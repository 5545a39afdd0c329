"""Keras's own ModelCheckpoint tests, run against ``keras_ckpt.ModelCheckpoint``.

The drop-in promise is checked with Keras's test file itself, read at test time from the sdist
of the installed Keras version (downloaded once per version, then cached): no copy of Keras's
test code lives in this repository, and an upgrade of Keras brings its new tests along.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import xml.etree.ElementTree as ET

import pytest

keras = pytest.importorskip("keras")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_MEMBER = "keras/src/callbacks/model_checkpoint_test.py"
CACHE = os.path.join(tempfile.gettempdir(), "keras_ckpt-test-cache")

# What pip says when it cannot reach the index (as opposed to the index refusing the request).
_OFFLINE_MARKERS = (
    "NewConnectionError", "Failed to establish a new connection", "Name or service not known",
    "Temporary failure in name resolution", "Network is unreachable", "ConnectTimeout",
    "ReadTimeout", "ProxyError", "Connection refused", "No route to host",
)

# Runs inside the pytest subprocess, before Keras's test module is imported: every name the test
# file reaches the class through now gives ours, and each construction is counted.
_CONFTEST = textwrap.dedent(
    '''
    import json
    import os

    import keras
    import keras.src.callbacks
    import keras.src.callbacks.model_checkpoint

    import keras_ckpt

    _constructed = []
    _init = keras_ckpt.ModelCheckpoint.__init__


    def _counting_init(self, *args, **kwargs):
        _constructed.append(type(self).__module__)
        _init(self, *args, **kwargs)


    keras_ckpt.ModelCheckpoint.__init__ = _counting_init
    for _module in (keras.callbacks, keras.src.callbacks, keras.src.callbacks.model_checkpoint):
        _module.ModelCheckpoint = keras_ckpt.ModelCheckpoint


    def pytest_configure(config):
        config.addinivalue_line("markers", "requires_trainable_backend: Keras's own marker")


    def pytest_sessionfinish(session):
        with open(os.environ["PEER_REPORT"], "w") as f:
            json.dump({"constructed": len(_constructed)}, f)
    '''
)


def _download_test_file(version: str) -> str:
    """Keras ``version``'s ``model_checkpoint_test.py``, from its sdist (cached per version)."""
    target = os.path.join(CACHE, f"keras-{version}", "model_checkpoint_test.py")
    if os.path.exists(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as work:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--retries", "1", "--timeout", "20", f"keras=={version}", "-d", work],
            capture_output=True, text=True, timeout=600,
        )
        if out.returncode != 0:
            log = out.stdout + out.stderr
            if any(marker in log for marker in _OFFLINE_MARKERS):
                pytest.skip(f"pip cannot reach the package index to fetch keras=={version}'s "
                            f"sdist (Keras's own tests come from it): {log.strip()[-300:]}")
            pytest.fail(f"pip download keras=={version} (sdist) failed:\n{log[-3000:]}")
        (sdist,) = [f for f in os.listdir(work) if f.endswith((".tar.gz", ".tgz"))]
        with tarfile.open(os.path.join(work, sdist)) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith("/" + TEST_MEMBER)]
            assert members, f"{sdist} has no {TEST_MEMBER}"
            source = tar.extractfile(members[0]).read()
        staged = os.path.join(work, "model_checkpoint_test.py")
        with open(staged, "wb") as f:
            f.write(source)
        os.replace(staged, target)  # a concurrent or interrupted run never sees half a file
    return target


@pytest.fixture(scope="module")
def keras_test_file() -> str:
    return _download_test_file(keras.__version__)


@pytest.mark.parametrize("backend", ["tensorflow", "torch", "jax"])
def test_keras_own_model_checkpoint_tests_pass_with_ours(tmp_path, keras_test_file, backend):
    pytest.importorskip(backend)  # each CI environment has some of the backends
    run_dir = tmp_path / "keras_tests"
    run_dir.mkdir()
    (run_dir / "model_checkpoint_test.py").write_bytes(open(keras_test_file, "rb").read())
    (run_dir / "conftest.py").write_text(_CONFTEST)
    (run_dir / "pytest.ini").write_text("[pytest]\n")  # keeps this repo's pytest config out
    report, junit = tmp_path / "report.json", tmp_path / "junit.xml"
    env = dict(
        os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", PEER_REPORT=str(report),
        PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
    )
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--tb=short",
         f"--junitxml={junit}", "model_checkpoint_test.py"],
        cwd=run_dir, env=env, capture_output=True, text=True, timeout=900,
    )
    log = out.stdout + out.stderr
    assert junit.exists(), f"Keras's tests did not run (rc={out.returncode}):\n{log[-6000:]}"
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] > 0 and not (counts["failures"] or counts["errors"] or counts["skipped"]), (
        f"Keras {keras.__version__}'s {TEST_MEMBER} with keras_ckpt.ModelCheckpoint "
        f"({backend}): {counts}\n{log[-6000:]}"
    )
    assert out.returncode == 0, log[-6000:]
    assert json.loads(report.read_text())["constructed"] > 0, "the swap did not take effect"
