"""Regression tests for holes found by attacking the commit protocol, the lock and the manifest.

Each test reproduces a user-visible harm with real files and processes: a file outside the
checkpoint directory changed or moved, another directory's checkpoints pruned, a directory that
stays locked after training released it, a leaked temporary on a full disk.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from _engine_helpers import make_engine, rewrite, save

from keras_ckpt import cli, storage
from keras_ckpt import manifest as mf

SERIES = "ck-{epoch:03d}.bin"  # what _engine_helpers.make_engine uses by default








def crafted_intent(data, temp, path):
    """An intent in ``data`` bringing in a record ``ck-002`` whose one move is ``temp`` -> ``path``."""
    record = dict(data["checkpoints"][0], name="ck-002", seq=5,
                  files=[{"path": "ck-002.bin", "bytes": 4, "xxh3_128": "0" * 32}])
    data["intent"] = {"series": SERIES, "record": record, "state": data["series"][SERIES],
                      "moves": [{"temp": temp, "path": path}], "drop": [], "kept": {}}


@pytest.fixture
def outside(tmp_path):
    d = tmp_path / "outside"
    d.mkdir()
    (d / "precious.txt").write_text("keep me")
    return d


def test_prune_of_a_crafted_manifest_does_not_prune_another_directory(tmp_path):
    # Harm: `keras-ckpt prune evil/` with a series key "../victim/ck-{epoch:03d}.bin" deleted
    # three of victim/'s four checkpoints, with a policy taken from evil/'s manifest.
    victim, evil = str(tmp_path / "victim"), str(tmp_path / "evil")
    e = make_engine(victim, max_to_keep=None)
    for epoch in range(1, 5):
        save(e, epoch, 1.0 / epoch)
    e.close()
    e = make_engine(evil, max_to_keep=1, keep_best=0)
    save(e, 1, 1.0)
    e.close()

    def hostile(data):
        data["series"]["../victim/" + SERIES] = data["series"].pop(SERIES)

    rewrite(evil, hostile)
    before = sorted(os.listdir(victim))
    code = cli.main(["prune", evil])
    assert sorted(os.listdir(victim)) == before
    assert code == 2  # refused: a series name is a plain file name template


def test_recovery_never_moves_a_file_from_outside_through_a_symlinked_staging_dir(tmp_path, outside):
    # Harm: an intent whose temp is "<staging symlink>/precious.txt" moved precious.txt out of a
    # directory beside the checkpoints into them (as ck-002.bin) at the next open.
    d = str(tmp_path / "ck")
    e = make_engine(d)
    save(e, 1, 0.5)
    e.close()
    link = f"{storage.TMP_PREFIX}-deadbeef.1.1-00000000-staging"
    os.symlink(outside, os.path.join(d, link))
    rewrite(d, lambda data: crafted_intent(data, f"{link}/precious.txt", "ck-002.bin"))
    try:
        make_engine(d).close()
    except mf.ManifestError:
        pass  # refusing the manifest is fine too
    assert (outside / "precious.txt").read_text() == "keep me"
    assert not os.path.exists(os.path.join(d, "ck-002.bin"))


def test_recovery_does_not_rename_onto_a_file_the_series_does_not_own(tmp_path):
    # Harm: a crafted intent move overwrote the user's notes.txt in the checkpoint directory;
    # deletion refuses names the series' template cannot produce, renaming over them did not.
    d = str(tmp_path / "ck")
    e = make_engine(d)
    save(e, 1, 0.5)
    e.close()
    (tmp_path / "ck" / "notes.txt").write_text("user's notes")
    temp = f"{storage.TMP_PREFIX}-deadbeef.1.1-00000000-x"
    (tmp_path / "ck" / temp).write_text("junk")
    rewrite(d, lambda data: crafted_intent(data, temp, "notes.txt"))
    try:
        make_engine(d).close()
    except mf.ManifestError:
        pass
    assert (tmp_path / "ck" / "notes.txt").read_text() == "user's notes"


def test_a_symlinked_lock_file_never_writes_outside(tmp_path, outside):
    # Harm: .checkpoints.lock -> ../outside/precious.txt: taking the lock truncated precious.txt
    # and wrote the holder's JSON into it; releasing it left it empty.
    d = tmp_path / "ck"
    d.mkdir()
    os.symlink(outside / "precious.txt", d / storage.LOCK_NAME)
    try:
        e = make_engine(str(d))
        save(e, 1, 0.5)
        e.close()
    except (storage.DirectoryLocked, OSError, ValueError):
        pass  # refusing is fine; touching the target is not
    assert (outside / "precious.txt").read_text() == "keep me"


def test_a_forked_child_does_not_keep_the_directory_locked(tmp_path):
    # Harm: torch DataLoader workers (fork, persistent_workers=True) inherit the lock's file
    # descriptor, so after on_train_end a second training phase in the same process, or
    # `keras-ckpt prune`, was refused with "another process is writing ... pid ? on host ?".
    d = str(tmp_path / "ck")
    e = make_engine(d)
    save(e, 1, 0.5)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker that outlives the training phase
        # The at-fork handlers have run by now; the parent goes on only then (on a loaded
        # machine the child could otherwise still hold the inherited descriptor).
        os.write(ready_w, b"x")
        time.sleep(60)
        os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"x"
    os.close(ready_r)
    try:
        save(e, 2, 0.4)
        e.close()
        make_engine(d).close()
        out = subprocess.run([sys.executable, "-m", "keras_ckpt", "prune", d],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_deletions_cut_short_in_one_series_are_not_forgotten_by_another(tmp_path):
    # Harm: series a was killed after committing and before deleting a-001.bin; the next process
    # opened series b first, which dropped a's pending deletion from the manifest, so
    # a-001.bin stayed on disk, unlisted, forever.
    d = str(tmp_path / "ck")
    a = make_engine(d, "a-{epoch:03d}.bin", max_to_keep=1, keep_best=0)
    b = make_engine(d, "b-{epoch:03d}.bin", max_to_keep=1, keep_best=0)
    save(a, 1, 1.0)
    save(b, 1, 1.0)
    a._delete = lambda names: None  # the kill -9 in step 5: committed, nothing deleted yet
    save(a, 2, 0.9)
    a.close()
    b.close()
    assert mf.load(d).deleting == ["a-001.bin"]
    b = make_engine(d, "b-{epoch:03d}.bin", max_to_keep=1, keep_best=0)
    save(b, 2, 0.8)
    b.close()
    make_engine(d, "a-{epoch:03d}.bin", max_to_keep=1, keep_best=0).close()
    assert not os.path.exists(os.path.join(d, "a-001.bin"))


def test_a_long_name_the_filesystem_accepts_can_be_saved(tmp_path):
    # Harm: a 213-character checkpoint name is fine for the filesystem (255), but the temporary
    # beside it is ~57 characters longer: the first save failed (after an epoch of training)
    # with a raw "[Errno 36] File name too long" naming the temporary.
    d = str(tmp_path / "ck")
    template = "m" * 200 + "-{epoch:03d}.bin"
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / template.format(epoch=1)).write_bytes(b"")
    e = make_engine(d, template)
    save(e, 1, 0.5)
    assert [r.name for r in e.records] == ["m" * 200 + "-001"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="needs root to mount a tmpfs")
def test_full_disk_at_the_buffered_tail_names_the_file_and_leaks_no_temporary(tmp_path):
    # Harm: when the disk filled up in the last bytes still in Python's write buffer, closing the
    # file raised again inside Transaction.__exit__'s cleanup: the error no longer named the
    # checkpoint, and the partial temporary (almost a whole checkpoint) stayed on the full disk,
    # never swept by this process, so the next save failed too.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.check_call(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)])
    try:
        failures = []
        for pages in range(18, 30):
            d = mnt / f"ck{pages}"
            e = make_engine(str(d), max_to_keep=1, keep_best=0)
            save(e, 1, 1.0, b"a" * 100_000)
            st = os.statvfs(mnt)
            filler = mnt / "filler"
            with open(filler, "wb") as f:
                f.write(b"\0" * max(st.f_bavail * st.f_frsize - pages * 4096, 0))
            try:
                save(e, 2, 0.8, b"c" * 100_000)
            except OSError as err:
                leaked = [n for n in os.listdir(d) if n.startswith(storage.TMP_PREFIX)]
                if "ck-002.bin" not in str(err) and mf.FILENAME not in str(err) or leaked:
                    failures.append((pages, str(err), leaked))
            finally:
                filler.unlink()
                e.close()
            shutil.rmtree(d)
        assert not failures
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
