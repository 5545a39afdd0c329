"""The keras-ckpt command on a real manifest (no framework needed)."""

from __future__ import annotations

import os
import subprocess
import sys

from keras_ckpt.engine import Engine
from keras_ckpt.policy import RetentionPolicy


def populate(d, n=5):
    e = Engine(os.path.join(d, "ck-{epoch:02d}.bin"), framework="test",
               policy=RetentionPolicy(monitor="val_loss"))
    e.open()
    for epoch, v in enumerate([0.5, 0.2, 0.4, 0.3, 0.6][:n], start=1):
        with e.transaction(os.path.join(d, f"ck-{epoch:02d}.bin"), epoch=epoch, step=epoch * 3,
                           metrics={"val_loss": v}) as tx:
            with tx.open() as f:
                f.write(b"z" * 2048)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "keras_ckpt", *args], capture_output=True, text=True)


def test_ls_marks_the_best_and_shows_why_kept(tmp_path):
    populate(str(tmp_path))
    out = cli("ls", str(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("series ck-{epoch:02d}.bin") and "best val_loss (min) = 0.2" in lines[0]
    assert lines[1].split()[:4] == ["name", "run", "epoch", "step"]
    best = [ln for ln in lines if ln.startswith("*")]
    assert "val_loss" in lines[1].split()
    assert len(best) == 1 and "ck-02" in best[0] and " 0.2 " in best[0]
    assert "2.0 KB" in best[0] and "latest" in best[0]


def test_verify_finds_a_corrupt_file(tmp_path):
    populate(str(tmp_path))
    assert cli("verify", str(tmp_path)).returncode == 0
    (tmp_path / "ck-03.bin").write_bytes(b"y" * 2048)
    out = cli("verify", str(tmp_path))
    assert out.returncode == 1 and "BAD ck-03" in out.stdout and "4 ok, 1 bad" in out.stdout


def test_prune_applies_a_policy_after_the_fact(tmp_path):
    populate(str(tmp_path))
    out = cli("prune", str(tmp_path), "--max-to-keep", "1", "--keep-best", "1")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["ck-02.bin", "ck-05.bin"]


def test_newer_manifest_is_refused_clearly(tmp_path):
    (tmp_path / "checkpoints.json").write_text('{"format": 7, "checkpoints": []}')
    out = cli("ls", str(tmp_path))
    assert out.returncode == 2 and "newer than this keras_ckpt understands" in out.stderr
