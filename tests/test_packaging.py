"""The wheel users install: typed, licensed, and the version from its one leaf module."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_wheel_ships_py_typed_and_the_license(tmp_path):
    done = subprocess.run(
        # Built as pip builds it for users: in an isolated environment with the declared backend.
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), ROOT],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("keras_ckpt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "keras_ckpt/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    from keras_ckpt import __version__

    assert wheel.name.startswith(f"keras_ckpt-{__version__}-")
