"""Runs within a series, one owner of best, prune with the stored policy, resume by commit order.

Driven through the framework-neutral Checkpointer and the CLI, as a user's job would hit them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import pytest

from keras_ckpt import cli, storage
from keras_ckpt import engine as engine_mod
from keras_ckpt import manifest as mf
from keras_ckpt.checkpointer import Checkpointer as _Checkpointer
from keras_ckpt.checkpointer import Payload
from keras_ckpt.config import CheckpointConfig
from keras_ckpt.engine import Engine
from keras_ckpt.policy import RetentionPolicy


def Checkpointer(filepath, *, framework, **arguments):  # noqa: N802 -- reads as the class it builds
    """The front-ends' construction: validated arguments, then the lifecycle."""
    return _Checkpointer(CheckpointConfig(filepath, **arguments), framework=framework)


def payload(tag):
    def capture(path, state, snapshot):
        blob = json.dumps({"tag": tag, "state": state}).encode()

        def write(tx):
            with tx.open() as f:
                f.write(blob)
        return Payload(write, detached=True)
    return capture


def train(ck, values, start=0, monitor="val_loss"):
    ck.begin()
    for epoch, value in enumerate(values, start=start):
        ck.on_epoch_begin(epoch)
        ck.step += 1
        if ck.epoch_due(epoch):
            ck.save(epoch, None, {monitor: value}, payload(f"e{epoch}"))
    ck.end()


def names(d):
    return sorted(p.name for p in d.iterdir() if not p.name.startswith((".", "checkpoints")))


def test_a_new_run_starts_a_fresh_best_as_keras_does(tmp_path):
    template = str(tmp_path / "ck-{epoch}.bin")
    train(Checkpointer(template, framework="t", max_to_keep=2), [0.1, 0.2, 0.3])
    again = Checkpointer(template, framework="t", save_best_only=True, max_to_keep=2,
                         initial_value_threshold=0.9)
    with pytest.warns(UserWarning, match="starts a new run: best starts afresh"):
        train(again, [0.5, 0.6, 0.4], start=10)
    # save_best_only saved at the new run's first epoch (0.5 beats the threshold 0.9, though not
    # the old run's 0.1), skipped 0.6, saved 0.4; the old run rotated out under max_to_keep=2.
    assert again.best == 0.4 and os.path.basename(again.best_path) == "ck-13.bin"
    assert names(tmp_path) == ["ck-11.bin", "ck-13.bin"]
    runs = {r.name: r.run for r in mf.load(str(tmp_path)).checkpoints}
    assert runs == {"ck-11": 2, "ck-13": 2}


def test_resume_continues_the_run_and_a_changed_monitor_starts_afresh(tmp_path):
    template = str(tmp_path / "ck-{epoch}.bin")
    train(Checkpointer(template, framework="t", keep_best=1, max_to_keep=1), [0.3, 0.1, 0.2])
    same = Checkpointer(template, framework="t", keep_best=1, max_to_keep=1, resume=True)
    train(same, [0.25], start=3)  # worse: the old best stays best
    assert same.best == 0.1 and os.path.basename(same.best_path) == "ck-2.bin"
    other = Checkpointer(template, framework="t", keep_best=1, max_to_keep=1, resume=True,
                         monitor="val_acc", mode="max")
    with pytest.warns(UserWarning, match="ranked checkpoints by monitor='val_loss'"):
        train(other, [0.7], start=4, monitor="val_acc")
    assert other.best == 0.7 and os.path.basename(other.best_path) == "ck-5.bin"  # not "0.1 on a loss"


def test_an_out_of_order_report_leaves_one_best(tmp_path):
    e = Engine(str(tmp_path / "ck-{epoch}.bin"), framework="t",
               policy=RetentionPolicy(max_to_keep=1, keep_best=1, monitor="acc", mode="max"))
    e.open()
    for epoch in (1, 2, 3):
        with e.transaction(str(tmp_path / f"ck-{epoch}.bin"), epoch=epoch, step=epoch, pending=True) as tx:
            tx.open().write(b"x")
    e.report("ck-3", {"acc": 0.8})
    e.report("ck-1", {"acc": 0.9})  # late, for an older checkpoint, and better
    e.report("ck-2", {"acc": 0.9})  # a tie with an older one: the older stays best
    kept = {r.name: r.kept for r in e.records}
    assert [n for n, why in kept.items() if "best" in why] == ["ck-1"]
    assert e.state.best_name == "ck-1" and e.best == 0.9
    assert set(kept) == {"ck-1", "ck-3"}


def test_prune_uses_the_stored_policy_and_never_deletes_the_newest_that_verifies(tmp_path, capsys):
    template = str(tmp_path / "ck-{epoch}.bin")
    train(Checkpointer(template, framework="t", max_to_keep=3, keep_every_n_epochs=4), [7, 6, 5, 4, 3, 2, 1])
    before = names(tmp_path)
    assert before == ["ck-4.bin", "ck-5.bin", "ck-6.bin", "ck-7.bin"]
    assert cli.main(["prune", str(tmp_path)]) == 0  # the stored policy: nothing to do
    assert names(tmp_path) == before
    assert cli.main(["prune", str(tmp_path), "--max-to-keep", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove ck-5" in out and "would remove ck-6" in out and names(tmp_path) == before
    # The newest is corrupt: prune --max-to-keep 1 keeps the newest that still verifies too.
    (tmp_path / "ck-7.bin").write_bytes(b"garbage")
    assert cli.main(["prune", str(tmp_path), "--max-to-keep", "1", "--keep-every-n-epochs", "none"]) == 0
    assert names(tmp_path) == ["ck-4.bin", "ck-6.bin", "ck-7.bin"]  # ck-4: kept every 4 epochs, for good
    assert "removed ck-5" in capsys.readouterr().out
    out = json.loads(_ls_json(tmp_path, capsys))
    assert {c["name"] for c in out["checkpoints"]} == {"ck-4", "ck-6", "ck-7"}
    assert cli.main(["verify", str(tmp_path)]) == 1


def _ls_json(d, capsys):
    assert cli.main(["ls", str(d), "--json"]) == 0
    return capsys.readouterr().out


def test_resume_chooses_by_commit_order_not_wall_clock(tmp_path, monkeypatch):
    template = str(tmp_path / "ck-{epoch}.bin")
    clock = iter([5000.0, 4000.0, 3000.0])  # the clock stepped back between saves
    monkeypatch.setattr(engine_mod, "time", types.SimpleNamespace(time=lambda: next(clock)))
    train(Checkpointer(template, framework="t"), [0.3, 0.2, 0.1])
    monkeypatch.undo()
    assert Checkpointer(template, framework="t", resume=True).begin().endswith("ck-3.bin")
    other = tmp_path / "elsewhere" / "x-{epoch}.bin"
    ck = Checkpointer(str(other), framework="t", resume=str(tmp_path))
    assert ck.begin().endswith("ck-3.bin")
    ck.end()


def test_resume_from_a_directory_of_several_series_must_say_which(tmp_path):
    train(Checkpointer(str(tmp_path / "src" / "a-{epoch}.bin"), framework="t"), [0.3])
    train(Checkpointer(str(tmp_path / "src" / "b-{epoch}.bin"), framework="t"), [0.3])
    ck = Checkpointer(str(tmp_path / "new" / "c-{epoch}.bin"), framework="t", resume=str(tmp_path / "src"))
    with pytest.raises(ValueError, match=r"several series \(a-\{epoch\}.bin, b-\{epoch\}.bin\)"):
        ck.begin()
    same = Checkpointer(str(tmp_path / "new" / "b-{epoch}.bin"), framework="t", resume=str(tmp_path / "src"))
    assert same.begin().endswith(os.path.join("src", "b-1.bin"))  # the series of the same name
    same.end()


def test_resume_from_another_directory_copies_the_checkpoint_into_the_new_output(tmp_path):
    src = tmp_path / "job1"
    train(Checkpointer(str(src / "ck-{epoch}.bin"), framework="t"), [0.3, 0.2])
    ck = Checkpointer(str(tmp_path / "job2" / "ck-{epoch}.bin"), framework="t", save_best_only=True,
                      resume=str(src))
    path = ck.begin()
    ck.restored(path, {"epoch": 2, "step": 2, "monitor": {"monitor": "val_loss", "mode": "min", "best": 0.2}})
    ck.end()
    # Carried from an older checkpoint than the one restored: the value carries, no file here has it.
    other = Checkpointer(str(tmp_path / "job2b" / "ck-{epoch}.bin"), framework="t",
                         resume=str(src / "ck-2.bin"))
    other.restored(other.begin(), {"epoch": 2, "step": 2, "monitor": {"monitor": "val_loss", "best": 0.1}})
    other.end()
    assert other.best == 0.1 and other.best_path is None
    # A job that then never improved still leaves a resumable output for the next job, and the
    # copied checkpoint, the best of job 1, is the best here too.
    assert names(tmp_path / "job2") == ["ck-2.bin"]
    assert (tmp_path / "job2" / "ck-2.bin").read_bytes() == (src / "ck-2.bin").read_bytes()
    assert ck.best == 0.2 and os.path.basename(ck.best_path) == "ck-2.bin"
    job3 = Checkpointer(str(tmp_path / "job3" / "ck-{epoch}.bin"), framework="t",
                        resume=str(tmp_path / "job2"))
    assert job3.begin().endswith(os.path.join("job2", "ck-2.bin"))
    job3.end()


def test_a_restarted_job_prefers_its_own_newer_output_over_its_seed(tmp_path):
    src = tmp_path / "seed"
    train(Checkpointer(str(src / "ck-{epoch}.bin"), framework="t"), [0.3])
    out = tmp_path / "out" / "ck-{epoch}.bin"
    first = Checkpointer(str(out), framework="t", resume=str(src))
    first.restored(first.begin(), {"epoch": 1, "step": 1})
    for epoch in (1, 2):
        first.step += 1
        first.epoch_due(epoch)
        first.save(epoch, None, {"val_loss": 0.1}, payload("more"))
    first.end()
    again = Checkpointer(str(out), framework="t", resume=str(src))  # the same job command, restarted
    assert again.begin().endswith(os.path.join("out", "ck-3.bin"))
    again.end()


def test_a_re_rendered_name_never_replaces_the_committed_best(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck-{epoch}-{batch}.bin"), framework="t", monitor="loss",
                      keep_best=1, max_to_keep=2, save_freq=2)
    ck.begin()
    ck.on_epoch_begin(0)
    for batch, loss in enumerate([0.9, 0.1, 0.8, 0.7]):
        ck.step += 1
        if ck.batch_due(batch):
            ck.save(0, batch, {"loss": loss}, payload(f"b{batch}"))
    best_bytes = (tmp_path / "ck-1-2.bin").read_bytes()
    # Resumed from the mid-epoch checkpoint, the epoch's batches are counted from 0 again.
    ck._last_batch_seen = None
    for batch, loss in enumerate([0.5, 0.6]):
        ck.step += 1
        if ck.batch_due(batch):
            with pytest.warns(UserWarning, match="already holds the best checkpoint"):
                ck.save(0, batch, {"loss": loss}, payload("replayed"))
    assert (tmp_path / "ck-1-2.bin").read_bytes() == best_bytes
    assert (tmp_path / "ck-1-2.step6.bin").exists() and ck.best == 0.1
    ck.end()


@pytest.mark.parametrize("kwargs,needle", [
    ({"filepath": 123}, "filepath must be a str or os.PathLike. Received: filepath=123"),
    ({"filepath": "ck-{epcoh}.bin"}, "did you mean {epoch}?"),
    ({"filepath": "ck-{epoch:zz}.bin"}, "filepath cannot be rendered"),
    ({"filepath": "ck-{}.bin"}, "placeholders must be named"),
    ({"filepath": "ck-{epoch.bin"}, "not a valid template"),
    ({"verbose": "yes"}, "verbose must be an integer >= 0"),
    ({"save_best_only": "x"}, "save_best_only must be True or False"),
    ({"monitor": ""}, "monitor must be a non-empty string"),
    ({"initial_value_threshold": float("nan")}, "Received: initial_value_threshold=nan"),
    ({"resume": "/no/such/dir"}, "this path does not exist"),
    ({"resume": "EMPTY"}, "without keras_ckpt checkpoints"),
])
def test_bad_arguments_fail_at_construction(tmp_path, kwargs, needle):
    if kwargs.get("resume") == "EMPTY":
        (tmp_path / "empty").mkdir()
        kwargs = {"resume": str(tmp_path / "empty")}
    args = {"filepath": str(tmp_path / "ck-{epoch}.bin"), **kwargs}
    if "filepath" in kwargs and isinstance(kwargs["filepath"], str):
        args["filepath"] = str(tmp_path / kwargs["filepath"])
    with pytest.raises((ValueError, TypeError)) as err:
        Checkpointer(args.pop("filepath"), framework="t", **args)
    assert needle in str(err.value)
    assert not os.listdir(tmp_path) or os.listdir(tmp_path) == ["empty"]  # nothing written


def test_log_keys_in_templates_still_work(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck-{epoch:02d}-{val_loss:.3f}.bin"), framework="t")
    train(ck, [0.25])
    assert names(tmp_path) == ["ck-01-0.250.bin"]


def test_the_umask_decides_the_mode_of_everything_written(tmp_path):
    old = os.umask(0o027)
    try:
        train(Checkpointer(str(tmp_path / "ck-{epoch}.bin"), framework="t"), [0.1])
    finally:
        os.umask(old)
    assert (tmp_path / "ck-1.bin").stat().st_mode & 0o777 == 0o640
    assert time.time() > 0


def _read_all(path, stream):
    return storage.StreamedFile(stream).read() if stream is not None else open(path, "rb").read()


def test_resume_from_a_directory_whose_writer_rotates_the_file_away_meanwhile(tmp_path):
    """The checkpoint verified at begin() is the one loaded and copied, even once gone."""
    src = tmp_path / "job1"
    train(Checkpointer(str(src / "ck-{epoch}.bin"), framework="t"), [0.3, 0.2])
    verified = (src / "ck-2.bin").read_bytes()
    ck = Checkpointer(str(tmp_path / "job2" / "ck-{epoch}.bin"), framework="t", resume=str(src))
    path = ck.begin()
    os.remove(src / "ck-2.bin")  # job 1, still running, rotated it away
    assert ck.load(path, _read_all) == (path, verified)
    ck.restored(path, {"epoch": 2, "step": 2})
    ck.end()
    assert (tmp_path / "job2" / "ck-2.bin").read_bytes() == verified
    assert engine_mod.verify(str(tmp_path / "job2"), mf.load(str(tmp_path / "job2")).checkpoints[-1]) is None



@pytest.mark.parametrize("link", ["beside", "inside"])
def test_resume_from_a_symlink_to_a_checkpoint_follows_it(tmp_path, link):
    """``resume=latest.pt``, a link the user keeps to the newest checkpoint: the file it names
    is verified by its own manifest, loaded and copied (was: loaded, then a bare
    ``OSError: Too many levels of symbolic links`` from the copy, after the model was restored)."""
    src = tmp_path / "job1"
    train(Checkpointer(str(src / "ck-{epoch}.bin"), framework="t"), [0.3, 0.2])
    latest = (tmp_path if link == "beside" else src) / "latest.bin"
    latest.symlink_to(src / "ck-1.bin" if link == "beside" else "ck-1.bin")
    ck = Checkpointer(str(tmp_path / "job2" / "ck-{epoch}.bin"), framework="t", resume=str(latest))
    path = ck.begin()
    assert path == os.path.realpath(src / "ck-1.bin")
    assert ck.load(path, _read_all)[1] == (src / "ck-1.bin").read_bytes()
    ck.restored(path, {"epoch": 1, "step": 1})
    ck.end()
    (copied,) = mf.load(str(tmp_path / "job2")).checkpoints
    assert (tmp_path / "job2" / copied.path).read_bytes() == (src / "ck-1.bin").read_bytes()
    assert engine_mod.verify(str(tmp_path / "job2"), copied) is None


_LIVE_WRITER = """
import json, os, sys
sys.path.insert(0, sys.argv[2])
from keras_ckpt.checkpointer import Checkpointer, Payload
from keras_ckpt.config import CheckpointConfig
ck = Checkpointer(CheckpointConfig(os.path.join(sys.argv[1], "ck-{epoch}.bin"), max_to_keep=1),
                  framework="t")
ck.begin()
epoch = 0
while not os.path.exists(sys.argv[1] + ".stop"):
    blob = os.urandom(1 << 20)
    def capture(path, state, snapshot, blob=blob):
        def write(tx):
            with tx.open() as f:
                f.write(blob)
        return Payload(write, detached=True)
    ck.on_epoch_begin(epoch)
    ck.step += 1
    ck.epoch_due(epoch)
    ck.save(epoch, None, {"val_loss": 1.0}, capture)
    epoch += 1
    if epoch == 1:
        print("SAVING", flush=True)
ck.end()
"""


def test_resume_from_a_directory_another_job_keeps_saving_into(tmp_path):
    """A second job seeded from a running job's output (save every step, keep 1): every start
    loads and copies a checkpoint that verifies; none fails on a file rotated away meanwhile."""
    src = tmp_path / "job1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    writer = subprocess.Popen([sys.executable, "-c", _LIVE_WRITER, str(src), root],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "SAVING"
        for i in range(20):
            out = tmp_path / f"job2-{i}"
            ck = Checkpointer(str(out / "ck-{epoch}.bin"), framework="t", resume=str(src))
            path = ck.begin()
            time.sleep(0.05)  # a framework's work before it reads (Keras builds the optimizer)
            _, data = ck.load(path, _read_all)
            ck.restored(path, {"epoch": 1, "step": 1})
            ck.end()
            (copied,) = mf.load(str(out)).checkpoints
            assert (out / copied.path).read_bytes() == data and len(data) == 1 << 20
            assert engine_mod.verify(str(out), copied) is None
    finally:
        (tmp_path / "job1.stop").write_text("")
        assert writer.wait(timeout=60) == 0
        writer.stdout.close()
