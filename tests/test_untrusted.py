"""A crafted or damaged checkpoints.json, special files, a second writer: refused, nothing touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from _engine_helpers import make_engine, rewrite, save

from keras_ckpt import cli, storage
from keras_ckpt import manifest as mf
from keras_ckpt.engine import verify


@pytest.fixture
def victim(tmp_path):
    """A directory beside the checkpoints, with a file and a subdirectory that must survive."""
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "precious.txt").write_text("keep me")
    (outside / "sub" / "also.txt").write_text("keep me too")
    return outside


def snapshot(path):
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None)
                  for p in path.rglob("*"))


@pytest.mark.parametrize("bad_path", [
    "../outside/precious.txt", "/etc/hostname", "OUTSIDE_ABS", "../outside", "sub/x.bin", ".", "",
    "..\\outside\\precious.txt", "checkpoints.json",
])
def test_record_paths_outside_the_directory_are_refused(tmp_path, victim, bad_path):
    d = tmp_path / "ckpts"
    e = make_engine(d, max_to_keep=1)
    save(e, 1, 0.5)
    e.close()
    bad_path = str(victim / "precious.txt") if bad_path == "OUTSIDE_ABS" else bad_path
    rewrite(d, lambda m: m["checkpoints"][0]["files"][0].update(path=bad_path))
    before = snapshot(victim)
    with pytest.raises(mf.ManifestError) as err:
        make_engine(d, max_to_keep=1)  # ordinary training, resume=True, max_to_keep=1
    assert "checkpoints.json" in str(err.value) and "checkpoints[0] ('ck-001')" in str(err.value)
    assert ".files[0].path" in str(err.value)
    assert cli.main(["prune", str(d), "--max-to-keep", "0"]) == 2
    assert cli.main(["verify", str(d)]) == 2
    assert snapshot(victim) == before


@pytest.mark.parametrize("mutate,needle", [
    (lambda m: m.update(checkpoints="oops"), "checkpoints: must be a list"),
    (lambda m: m["checkpoints"][0]["files"][0].update(bytes=None), ".files[0].bytes: must be an integer"),
    (lambda m: m["checkpoints"][0].update(epoch="three"), ".epoch: must be an integer"),
    (lambda m: m["checkpoints"][0].update(metrics=[1, 2]), ".metrics: must be an object"),
    (lambda m: m["checkpoints"][0]["files"][0].update(xxh3_128="zz"), "xxh3_128: must be 32"),
    (lambda m: m["checkpoints"][0].update(files=[]), ".files: must list at least one file"),
    (lambda m: m["checkpoints"].append(dict(m["checkpoints"][0])), "twice"),
    (lambda m: m.update(series={"x": {"mode": "sideways"}}), ".mode: must be 'min', 'max'"),
    (lambda m: m.update(deleting=["../outside/precious.txt"]), "deleting[0]: must be a plain file name"),
    (lambda m: m.update(intent={"series": "s", "moves": [{"temp": "/etc/passwd", "path": "a"}],
                                "record": {}, "state": {}}), "intent.moves[0].temp"),
])
def test_malformed_manifests_name_the_file_record_and_field(tmp_path, mutate, needle):
    d = tmp_path / "ckpts"
    e = make_engine(d)
    save(e, 1, 0.5)
    e.close()
    rewrite(d, mutate)
    with pytest.raises(mf.ManifestError) as err:
        make_engine(d)
    assert "checkpoints.json" in str(err.value) and needle in str(err.value), str(err.value)


def test_a_crafted_deleting_list_removes_nothing_outside_or_foreign(tmp_path, victim):
    d = tmp_path / "ckpts"
    e = make_engine(d)
    save(e, 1, 0.5)
    e.close()
    (d / "notes.txt").write_text("mine")
    rewrite(d, lambda m: m.update(deleting=["notes.txt", "ck-001.bin"]))
    make_engine(d).close()
    # Only names the series' template can produce are deleted, and never a listed one.
    assert (d / "notes.txt").read_text() == "mine" and (d / "ck-001.bin").exists()


def test_special_files_never_hang_or_stream(tmp_path):
    d = tmp_path / "ckpts"
    e = make_engine(d, template="model.bin")
    rec = save(e, 1, 0.5).record
    e.close()
    target = d / "model.bin"
    target.unlink()
    os.mkfifo(target)  # a reader opening a FIFO would block forever
    done = []
    t = threading.Thread(target=lambda: done.append(verify(str(d), rec)), daemon=True)
    t.start()
    t.join(5)
    assert done and "not a regular file" in done[0]
    target.unlink()
    target.symlink_to("/dev/zero")  # would stream forever
    assert "symbolic link" in verify(str(d), rec)
    target.unlink()
    target.mkdir()
    assert "not a regular file" in verify(str(d), rec)


def test_sizes_are_compared_before_hashing(tmp_path):
    d = tmp_path / "ckpts"
    e = make_engine(d, template="model.bin")
    rec = save(e, 1, 0.5).record
    e.close()
    with open(d / "model.bin", "r+b") as f:
        f.truncate(1 << 40)  # a 1 TiB sparse file: reading it would take hours
    t0 = time.monotonic()
    assert "1099511627776 bytes, the manifest says 1000" in verify(str(d), rec)
    assert time.monotonic() - t0 < 5


def test_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        e = make_engine(tmp_path / "ckpts")
        save(e, 1, 0.5)
    finally:
        os.umask(old)
    for name in ("ck-001.bin", "checkpoints.json"):
        assert (tmp_path / "ckpts" / name).stat().st_mode & 0o777 == 0o644, name


SECOND_WRITER = textwrap.dedent(r"""
    import os, sys, time
    from keras_ckpt.engine import Engine
    from keras_ckpt.policy import RetentionPolicy
    e = Engine(os.path.join(sys.argv[1], "ck-{epoch}.bin"), framework="t",
               policy=RetentionPolicy(max_to_keep=1, monitor="m"))
    try:
        e.open()
    except RuntimeError as err:
        print("REFUSED", err, flush=True)
        sys.exit(3)
    print("WRITING", flush=True)
    with e.transaction(os.path.join(sys.argv[1], "ck-7.bin"), epoch=7, step=7) as tx:
        tx.open().write(b"seven")
    if sys.argv[2] == "hold":
        time.sleep(60)
""")


def test_a_second_writer_process_is_refused_then_takes_over_after_the_first_dies(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(SECOND_WRITER)
    d = tmp_path / "ckpts"
    d.mkdir()
    first = subprocess.Popen([sys.executable, str(script), str(d), "hold"], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().startswith("WRITING")
        second = subprocess.run([sys.executable, str(script), str(d), "once"], capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 3
        assert f"pid {first.pid}" in second.stdout and "since" in second.stdout, second.stdout
        assert cli.main(["prune", str(d)]) == 2  # the CLI's prune takes the same lock
    finally:
        first.kill()
        first.wait()
    third = subprocess.run([sys.executable, str(script), str(d), "once"], capture_output=True, text=True,
                           timeout=60)
    assert third.returncode == 0 and "WRITING" in third.stdout


def test_a_lock_from_another_host_is_honoured_until_stale(tmp_path):
    d = tmp_path / "ckpts"
    d.mkdir()
    lock = d / storage.LOCK_NAME
    lock.write_text(json.dumps({"pid": 4242, "host": "node-7", "identity": "0123456789ab.4242.99",
                                "since": time.time() - 600}))
    with pytest.raises(storage.DirectoryLocked, match="pid 4242 on host node-7"):
        make_engine(d)
    old = time.time() - storage.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))  # the node was lost: it stopped refreshing its lock
    with pytest.warns(UserWarning, match="took over the writer lock"):
        e = make_engine(d)
    save(e, 1, 0.5)
    e.close()


def test_one_process_may_hold_a_directory_with_two_series(tmp_path):
    a = make_engine(tmp_path, "a-{epoch}.bin")
    b = make_engine(tmp_path, "b-{epoch}.bin")
    save(a, 1, 0.5)
    save(b, 1, 0.5)
    a.close()
    assert storage.holds_writer(str(tmp_path))
    b.close()
    assert not storage.holds_writer(str(tmp_path))
