"""The PyTorch shim: keras_ckpt.torch.ModelCheckpoint (DESIGN.md, "PyTorch")."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_job  # noqa: E402

from keras_ckpt import engine  # noqa: E402
from keras_ckpt import manifest as mf  # noqa: E402
from keras_ckpt.policy import RetentionPolicy  # noqa: E402
from keras_ckpt.storage import TMP_PREFIX  # noqa: E402
from keras_ckpt.torch import ModelCheckpoint  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny(out: int = 3, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, out)).to(dtype)


def adam_after_one_step(model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(2, 4, dtype=next(model.parameters()).dtype)).sum().backward()
    opt.step()
    return opt


def assert_loads_weights_only(directory) -> None:
    """Every file of the directory's manifest loads with plain torch.load(weights_only=True)."""
    for record in mf.load(str(directory)).checkpoints:
        for f in record.files:
            payload = torch.load(os.path.join(directory, f.path), weights_only=True,
                                 map_location="cpu")
            assert "model" in payload and "training_state" in payload


def kept_on_disk(directory) -> set[str]:
    return {n for n in os.listdir(directory) if n.endswith(".pt")}


# -- exact resume --------------------------------------------------------------------------------


def test_exact_resume_in_a_new_process(tmp_path):
    """4 epochs straight == 2 + (new process) 2: weights, Adam, StepLR, losses, RNG, step."""
    torch_job.check_exact_resume(str(tmp_path))
    assert_loads_weights_only(tmp_path / "split")
    assert kept_on_disk(tmp_path / "split") == {"ckpt-03.pt", "ckpt-04.pt"}


def test_mid_epoch_checkpoint_sets_start_batch_and_keeps_the_schedule(tmp_path):
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = ModelCheckpoint(str(tmp_path / "c-{epoch}-{batch}.pt"), model=model, optimizer=opt,
                           save_freq=4)
    ckpt.on_train_begin()
    for epoch in range(2):
        for batch in range(5):
            ckpt.on_train_batch_end(batch, logs={"loss": 1.0})
        if epoch == 0:
            ckpt.on_epoch_end(epoch, logs={"loss": 1.0})
    # Saves after 4 and 8 calls: epoch 1 batch index 3, epoch 2 batch index 2.
    assert [r.name for r in ckpt.checkpoints] == ["c-1-4", "c-2-3"]
    assert [(r.epoch, r.step) for r in ckpt.checkpoints] == [(0, 4), (1, 8)]

    again = ModelCheckpoint(str(tmp_path / "c-{epoch}-{batch}.pt"), model=tiny(), save_freq=4,
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), resume=True)
    assert again.on_train_begin() == 1
    assert again.start_batch == 3
    for batch in range(again.start_batch, 5):
        again.on_train_batch_end(batch)
    again.on_epoch_end(1)
    assert again.start_batch == 0
    for batch in range(5):
        again.on_train_batch_end(batch)
    # The straight run's next save: 4 batches after the one at epoch 2 batch index 2.
    assert [r.name for r in again.checkpoints][-1] == "c-3-2"
    assert again.checkpoints[-1].step == 12


def test_a_new_run_without_resume_over_earlier_checkpoints_warns(tmp_path):
    template = str(tmp_path / "c-{epoch}.pt")
    model = tiny()
    ckpt = ModelCheckpoint(template, model=model, optimizer=adam_after_one_step(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty directory: nothing to warn about
        ckpt.on_train_begin()
    ckpt.on_epoch_end(0, logs={"val_loss": 0.5})
    again = ModelCheckpoint(template, model=model, optimizer=adam_after_one_step(model))
    with pytest.warns(UserWarning, match=r"resume=False, but .* 1 checkpoint\(s\).*'c-1'.*"
                      r"best val_loss so far: 0\.5.*resume=True"):
        assert again.on_train_begin() == 0


def test_step_comes_from_the_optimizer_without_batch_calls(tmp_path):
    model = tiny()
    opt = torch.optim.Adam(model.parameters())
    ckpt = ModelCheckpoint(str(tmp_path / "c-{epoch}.pt"), model=model, optimizer=opt)
    ckpt.on_train_begin()
    for epoch in range(2):
        for _ in range(3):
            opt.zero_grad()
            model(torch.ones(2, 4)).sum().backward()
            opt.step()
        ckpt.on_epoch_end(epoch)
    assert [r.step for r in ckpt.checkpoints] == [3, 6]


# -- retention and best ----------------------------------------------------------------------------


def expected_kept(values: list[float], latest: int, best: int) -> set[str]:
    names = [f"c-{i + 1:02d}.pt" for i in range(len(values))]
    ranked = sorted(range(len(values)), key=lambda i: (values[i], i))[:best]
    return set(names[-latest:]) | {names[i] for i in ranked}


def test_retention_keeps_exactly_latest_and_best_and_best_survives_restart(tmp_path):
    template = str(tmp_path / "c-{epoch:02d}.pt")
    script = [0.9, 0.5, 0.7, 0.4, 0.8, 0.6, 0.95, 0.45]
    model = tiny()
    opt = adam_after_one_step(model)
    ckpt = ModelCheckpoint(template, model=model, optimizer=opt, max_to_keep=2, keep_best=2)
    ckpt.on_train_begin()
    for epoch, value in enumerate(script):
        ckpt.on_epoch_end(epoch, logs={"val_loss": np.float64(value)})
        assert kept_on_disk(tmp_path) == expected_kept(script[: epoch + 1], 2, 2)
    assert ckpt.best == 0.4
    assert os.path.basename(ckpt.best_path) == "c-04.pt"

    # A new process's view: a new checkpointer on the same directory, then worse epochs.
    again = ModelCheckpoint(template, model=tiny(), optimizer=adam_after_one_step(tiny()),
                            max_to_keep=2, keep_best=2, resume=True)
    assert again.on_train_begin() == len(script)
    assert again.best == 0.4
    worse = [0.99, 0.97, 0.98]
    for i, value in enumerate(worse):
        again.on_epoch_end(len(script) + i, logs={"val_loss": value})
    assert again.best == 0.4 and os.path.basename(again.best_path) == "c-04.pt"
    assert kept_on_disk(tmp_path) == expected_kept(script + worse, 2, 2)
    assert {os.path.basename(r.path) for r in again.checkpoints} == kept_on_disk(tmp_path)
    assert_loads_weights_only(tmp_path)


def test_save_best_only_and_initial_value_threshold(tmp_path):
    model = tiny()
    ckpt = ModelCheckpoint(str(tmp_path / "best.pt"), model=model, save_best_only=True,
                           monitor="val_acc", mode="max", initial_value_threshold=0.5)
    ckpt.on_train_begin()
    for epoch, acc in enumerate([0.4, 0.6, 0.55, 0.7]):
        ckpt.on_epoch_end(epoch, logs={"val_acc": acc})
    assert ckpt.best == 0.7
    assert [r.metrics["val_acc"] for r in ckpt.checkpoints] == [0.7]
    assert kept_on_disk(tmp_path) == {"best.pt"}


def test_presets_fill_in_only_missing_arguments(tmp_path):
    ckpt = ModelCheckpoint(str(tmp_path / "c-{epoch}.pt"), model=tiny(), preset="normal",
                           max_to_keep=None)
    policy = ckpt._core.policy
    assert (policy.max_to_keep, policy.keep_best) == (None, 1)


# -- what a file holds and what restoring checks ----------------------------------------------------


class Counter:
    """An ``extra`` object whose state has numpy values (as scikit-learn's would)."""

    def __init__(self):
        self.state = {"count": np.int64(3), "mean": np.float64(0.25), "hist": np.arange(3.0)}

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = dict(state)


def test_numpy_values_are_converted_for_weights_only(tmp_path):
    model = tiny()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    ckpt = ModelCheckpoint(str(tmp_path / "c-{epoch}.pt"), model=model,
                           extra={"counter": Counter(), "scaler": scaler})
    ckpt.on_train_begin()
    ckpt.on_epoch_end(0, logs={"val_loss": np.float64(0.3)})
    ckpt.on_epoch_end(1, logs={"val_loss": np.float32(0.4)})
    payload = torch.load(ckpt.latest_path, weights_only=True)
    assert payload["extra"]["counter"]["count"] == 3
    assert torch.equal(payload["extra"]["counter"]["hist"], torch.arange(3.0, dtype=torch.float64))
    assert payload["extra"]["scaler"]["scale"] == scaler.get_scale()
    assert type(payload["training_state"]["monitor"]["best"]) is float

    counter = Counter()
    counter.state = {}
    again = ModelCheckpoint(str(tmp_path / "c-{epoch}.pt"), model=tiny(), resume=True,
                            extra={"counter": counter, "scaler": torch.amp.GradScaler("cpu")})
    again.on_train_begin()
    assert counter.state["count"] == 3 and counter.state["mean"] == 0.25


def test_unpicklable_state_fails_before_anything_is_written(tmp_path):
    bad = Counter()
    bad.state = {"when": object()}
    ckpt = ModelCheckpoint(str(tmp_path / "c-{epoch}.pt"), model=tiny(), extra={"bad": bad})
    ckpt.on_train_begin()
    with pytest.raises(TypeError, match=r"\['extra'\]\['bad'\]\['when'\] is a builtins.object"):
        ckpt.on_epoch_end(0)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".pt") or n.startswith(TMP_PREFIX)]
    assert ckpt.checkpoints == []


def saved_tiny(tmp_path) -> tuple[str, torch.nn.Module]:
    model = tiny()
    ckpt = ModelCheckpoint(str(tmp_path / "src" / "c-{epoch}.pt"), model=model)
    ckpt.on_train_begin()
    ckpt.on_epoch_end(0)
    return ckpt.latest_path, model


@pytest.mark.parametrize("strict", [True, False])
def test_shape_or_dtype_mismatch_fails_naming_the_key(tmp_path, strict):
    path, _ = saved_tiny(tmp_path)
    for target, match in (
        (tiny(out=5), r"'0\.weight': shape \(3, 4\) in the checkpoint, \(5, 4\) in the model"),
        (tiny(dtype=torch.float64), r"'0\.weight': dtype torch\.float32 in the checkpoint"),
    ):
        before = {k: v.clone() for k, v in target.state_dict().items()}
        ckpt = ModelCheckpoint(str(tmp_path / "dst" / "c-{epoch}.pt"), model=target,
                               resume=path, strict=strict)
        with pytest.raises(ValueError, match=match):
            ckpt.on_train_begin()
        for k, v in target.state_dict().items():  # nothing was loaded, not even the bias
            assert torch.equal(v, before[k]), k


def test_strict_governs_missing_and_unexpected_keys_only(tmp_path):
    path, source = saved_tiny(tmp_path)
    torch.manual_seed(1)
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ckpt = ModelCheckpoint(str(tmp_path / "a" / "c-{epoch}.pt"), model=bigger, resume=path)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['1\.bias', '1\.weight'\]"):
        ckpt.on_train_begin()
    assert not torch.equal(bigger[0].weight, source[0].weight)

    loose = ModelCheckpoint(str(tmp_path / "b" / "c-{epoch}.pt"), model=bigger, resume=path,
                            strict=False, optimizer=torch.optim.SGD(bigger.parameters(), lr=1))
    with pytest.warns(UserWarning, match=r"missing from the checkpoint"):
        loose.on_train_begin()
    assert torch.equal(bigger[0].weight, source[0].weight)


def test_optimizer_layout_mismatch_fails_before_anything_is_loaded(tmp_path):
    model = tiny()
    opt = adam_after_one_step(model)
    ckpt = ModelCheckpoint(str(tmp_path / "c-{epoch}.pt"), model=model, optimizer=opt)
    ckpt.on_train_begin()
    ckpt.on_epoch_end(0)
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 3))
    before = other[0].weight.clone()
    wrong_groups = ModelCheckpoint(str(tmp_path / "x" / "c-{epoch}.pt"), model=other,
                                   optimizer=torch.optim.Adam(other.parameters()),
                                   resume=ckpt.latest_path, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"parameter groups hold \[4\].*\[2\]"):
            wrong_groups.on_train_begin()
    assert torch.equal(other[0].weight, before)


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_to_keep": -1}, r"max_to_keep.*Received: max_to_keep=-1"),
        ({"keep_best": -3}, r"Received: keep_best=-3"),
        ({"keep_every_n_epochs": 0}, r"Received: keep_every_n_epochs=0"),
        ({"keep_every_n_hours": -1}, r"Received: keep_every_n_hours=-1"),
        ({"save_every_n_seconds": -5}, r"Received: save_every_n_seconds=-5"),
        ({"preset": "forever"}, r"Received: preset='forever'"),
        ({"save_freq": 0}, r"Received: save_freq=0"),
        ({"resume": 3}, r"Received: resume=3"),
        ({"optimizer": "adam"}, r"optimizer must have state_dict\(\).*Received: optimizer='adam'"),
        ({"extra": {"scaler": 1.0}}, r"Received: extra\['scaler'\]=1\.0"),
        ({"extra": [1]}, r"Received: extra=\[1\]"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelCheckpoint(str(tmp_path / "c-{epoch}.pt"), model=tiny(), **kwargs)


def test_bad_filepaths_raise_value_error_naming_filepath(tmp_path):
    with pytest.raises(ValueError, match=r"must end in `\.pt`, `\.pth` or `\.pth\.tar`.*"
                       r"filepath=.*c-\{epoch\}\.ckpt"):
        ModelCheckpoint(str(tmp_path / "c-{epoch}.ckpt"), model=tiny())
    with pytest.raises(ValueError, match=r"no \{epoch\} or \{batch\}.*filepath=.*m\.pt"):
        ModelCheckpoint(str(tmp_path / "m.pt"), model=tiny(), max_to_keep=3)
    with pytest.raises(ValueError, match=r"filepath=.*m\.pt"):
        ModelCheckpoint(str(tmp_path / "m.pt"), model=tiny(), keep_best=1)
    with pytest.raises(ValueError, match=r"model must be a torch\.nn\.Module.*Received: model=None"):
        ModelCheckpoint(str(tmp_path / "c-{epoch}.pt"), model=None)


def test_uncreatable_directory_and_unknown_direction_fail_at_train_begin(tmp_path):
    (tmp_path / "file").write_text("a regular file")
    ckpt = ModelCheckpoint(str(tmp_path / "file" / "sub" / "c-{epoch}.pt"), model=tiny())
    with pytest.raises(ValueError, match=r"cannot be created.*Received: filepath="):
        ckpt.on_train_begin()
    custom = ModelCheckpoint(str(tmp_path / "c-{epoch}.pt"), model=tiny(), monitor="val_f1",
                             keep_best=1)
    with pytest.raises(ValueError, match=r"mode='auto'.*val_f1"):
        custom.on_train_begin()


def test_unknown_mode_warns_like_keras(tmp_path):
    with pytest.warns(UserWarning, match="ModelCheckpoint mode 'up' is unknown"):
        ModelCheckpoint(str(tmp_path / "c-{epoch}.pt"), model=tiny(), mode="up")


# -- crash safety ---------------------------------------------------------------------------------


def assert_manifest_consistent(directory) -> None:
    records = mf.load(str(directory)).checkpoints
    assert records, "nothing committed"
    for record in records:
        assert engine.verify(str(directory), record) is None, record.name
    torch.load(os.path.join(directory, records[-1].path), weights_only=True)


@pytest.mark.parametrize("series", ["rotating", "single"])
def test_sigkill_at_random_instants_leaves_a_consistent_directory(tmp_path, series):
    directory = tmp_path / "run"
    job = [sys.executable, os.path.join(torch_job.HERE, "torch_job.py"), "crash-loop",
           str(directory), series]
    template = torch_job.CRASH_TEMPLATES[series]
    chance = random.Random(series)
    committed = 0
    for _ in range(4):
        proc = subprocess.Popen(job, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=torch_job.child_env())
        deadline = time.monotonic() + 60
        # Wait for this process's first commit, so each kill lands mid-training (mostly mid-save).
        while time.monotonic() < deadline and proc.poll() is None:
            records = mf.load(str(directory)).checkpoints if (directory / "checkpoints.json").exists() else []
            if records and (committed == 0 or records[-1].step > committed):
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(chance.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        # The next start finishes what the kill interrupted, and leaves only listed files.
        e = engine.Engine(str(directory / template), framework="torch",
                          policy=RetentionPolicy(monitor="loss"))
        e.open()
        e.close()
        assert_manifest_consistent(directory)
        m = mf.load(str(directory))
        on_disk = set(os.listdir(directory)) - {"checkpoints.json", ".checkpoints.lock"}
        assert on_disk == m.listed_files()
        assert max(r.step for r in m.checkpoints) >= committed
        committed = max(r.step for r in m.checkpoints)
    ckpt = ModelCheckpoint(str(directory / template),
                           model=torch.nn.Sequential(torch.nn.Linear(512, 1024),
                                                     torch.nn.Linear(1024, 512)),
                           monitor="loss", save_freq=1, max_to_keep=2 if series == "rotating" else None,
                           keep_best=int(series == "rotating"), resume=True)
    ckpt.on_train_begin()
    assert ckpt.restored_path == ckpt.latest_path
    assert torch.load(ckpt.restored_path, weights_only=True)["training_state"]["step"] == committed
    ckpt.on_train_end()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, damage):
    template = str(tmp_path / "c-{epoch:02d}.pt")
    model = tiny()
    ckpt = ModelCheckpoint(template, model=model)
    ckpt.on_train_begin()
    for epoch in range(3):
        ckpt.on_epoch_end(epoch)
    newest = ckpt.latest_path
    size = os.path.getsize(newest)
    with open(newest, "r+b") as f:
        if damage == "truncate":
            f.truncate(size // 2)
        else:
            f.seek(size // 2)
            byte = f.read(1)
            f.seek(size // 2)
            f.write(bytes([byte[0] ^ 0xFF]))
    again = ModelCheckpoint(template, model=tiny(), resume=True)
    with pytest.warns(UserWarning, match=r"skipping checkpoint 'c-03'"):
        assert again.on_train_begin() == 2
    assert os.path.basename(again.restored_path) == "c-02.pt"


# -- imports, wrappers --------------------------------------------------------------------------


def test_import_pulls_in_neither_tensorflow_nor_keras():
    code = ("import json, sys, keras_ckpt.torch; print(json.dumps("
            "[m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def assert_plain_keys_and_round_trip(tmp_path, wrapped, plain_factory, wrap) -> None:
    ckpt = ModelCheckpoint(str(tmp_path / "w" / "c-{epoch}.pt"), model=wrapped,
                           optimizer=adam_after_one_step(wrapped))
    ckpt.on_train_begin()
    ckpt.on_epoch_end(0)
    keys = list(torch.load(ckpt.latest_path, weights_only=True)["model"])
    assert keys == ["0.weight", "0.bias"]
    for name, target in (("plain", plain_factory()), ("wrapped", wrap(plain_factory()))):
        with torch.no_grad():
            for p in target.parameters():
                p.zero_()
        restorer = ModelCheckpoint(str(tmp_path / name / "c-{epoch}.pt"), model=target,
                                   resume=ckpt.latest_path, strict=True)
        restorer.on_train_begin()
        for a, b in zip(target.parameters(), wrapped.parameters()):
            assert torch.equal(a.cpu(), b.cpu())  # DataParallel moves to the GPU if there is one


def test_distributed_data_parallel_saves_and_restores_plain_keys(tmp_path, monkeypatch):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not built in")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel
        assert_plain_keys_and_round_trip(tmp_path, ddp(tiny()), tiny, ddp)
        # Other ranks restore but never write: one writer per directory.
        monkeypatch.setattr(dist, "get_rank", lambda: 1)
        follower = ModelCheckpoint(str(tmp_path / "rank1" / "c-{epoch}.pt"), model=ddp(tiny()))
        follower.on_train_begin()
        follower.on_epoch_end(0)
        assert follower.checkpoints == [] and kept_on_disk(tmp_path / "rank1") == set()
    finally:
        dist.destroy_process_group()


def test_compiled_model_saves_and_restores_plain_keys(tmp_path):
    # backend="eager": dynamo captures the graph without generating C++ (fast on CPU).
    def compiled(m):
        return torch.compile(m, backend="eager")

    model = compiled(tiny())
    model(torch.ones(1, 4))
    assert list(model.state_dict())[0].startswith("_orig_mod.")
    assert_plain_keys_and_round_trip(tmp_path, model, tiny, compiled)


def test_compiled_data_parallel_unwraps_both_layers(tmp_path):
    model = torch.compile(torch.nn.DataParallel(tiny()), backend="eager")
    assert list(model.state_dict())[0] == "_orig_mod.module.0.weight"
    assert_plain_keys_and_round_trip(tmp_path, model, tiny, torch.nn.DataParallel)


# -- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_cuda_checkpoint_restores_on_cpu_and_cuda(tmp_path):
    torch_job.check_cuda_save_restores_on_cpu_and_cuda(str(tmp_path))


@pytest.mark.gpu
@needs_cuda
def test_exact_resume_on_cuda(tmp_path):
    torch_job.check_cuda_exact_resume(str(tmp_path))


# -- the example ----------------------------------------------------------------------------------


# -- failures during a save -----------------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path):
    """An 8 MB tmpfs (needs root); skipped where it cannot be mounted."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_fails_the_save_with_an_os_error_and_the_process_lives_on(small_filesystem):
    out = subprocess.run([sys.executable, os.path.join(torch_job.HERE, "torch_job.py"),
                          "full-disk", str(small_filesystem)],
                         capture_output=True, text=True, env=torch_job.child_env(), timeout=300)
    # Before: torch's C++ writer threw from its destructor, SIGABRT (-6).
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"save failed: OSError: \[Errno 28\] .*No space left on device: '.*c-2\.pt'",
                     out.stdout), out.stdout
    assert "saved after the failure: ['c-1', 'c-3']" in out.stdout
    assert not [n for n in os.listdir(small_filesystem) if n.startswith(TMP_PREFIX)]
    assert kept_on_disk(small_filesystem) == {"c-1.pt", "c-3.pt"}
    assert_manifest_consistent(small_filesystem)
    payload = torch.load(small_filesystem / "c-1.pt", weights_only=True)
    assert torch.equal(payload["extra"]["buffer"]["data"], torch.zeros(3 * 2**20 // 4))


def test_ctrl_c_during_a_save_is_a_keyboard_interrupt_not_an_abort(tmp_path):
    directory = tmp_path / "run"
    chance = random.Random(1)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, os.path.join(torch_job.HERE, "torch_job.py"),
                                 "save-loop", str(directory)],
                                stderr=subprocess.PIPE, env=torch_job.child_env())
        deadline = time.monotonic() + 120
        start = len(mf.load(str(directory)).checkpoints) if directory.exists() else 0
        # Once it has committed a save of its own, the loop does nothing but save.
        while time.monotonic() < deadline and proc.poll() is None:
            if (directory / "checkpoints.json").exists():
                records = mf.load(str(directory)).checkpoints
                if records and records[-1].epoch > start:
                    break
            time.sleep(0.02)
        time.sleep(chance.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()  # not left saving forever beside the rest of the suite
            pytest.fail(f"the save loop went on after SIGINT:\n{proc.communicate()[1].decode()[-3000:]}")
        err = err.decode()
        # Python re-raises an unhandled KeyboardInterrupt as SIGINT (-2); never SIGABRT (-6).
        assert proc.returncode in (-signal.SIGINT, 1, 130), (proc.returncode, err[-3000:])
        assert err.rstrip().endswith("KeyboardInterrupt"), err[-3000:]
        assert not [n for n in os.listdir(directory) if n.startswith(TMP_PREFIX)]
        assert_manifest_consistent(directory)


# -- the file format ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["c-{epoch}.pt", "c-{epoch}.pth", "checkpoint-{epoch}.pth.tar"])
def test_files_are_valid_zip_archives_that_torch_loads_in_every_way(tmp_path, name):
    import zipfile

    model = torch.nn.Sequential(torch.nn.Linear(600, 600), torch.nn.Linear(600, 3))
    model[1].to(torch.bfloat16)
    opt = torch.optim.Adam(model[0].parameters())
    model[0](torch.ones(2, 600)).sum().backward()
    opt.step()
    ckpt = ModelCheckpoint(str(tmp_path / name), model=model, optimizer=opt)
    ckpt.on_train_begin()
    ckpt.on_epoch_end(0)
    path = ckpt.latest_path
    assert os.path.basename(path) == name.format(epoch=1)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every CRC-32 is right
    for mmap in (False, True):  # mmap maps storages in place: their alignment must hold
        payload = torch.load(path, weights_only=True, mmap=mmap)
        for key, value in model.state_dict().items():
            assert_same(payload["model"][key], value, key)
        assert_same(payload["optimizer"]["state"], opt.state_dict()["state"], "optimizer")
    again = ModelCheckpoint(str(tmp_path / name), model=torch.nn.Sequential(
        torch.nn.Linear(600, 600), torch.nn.Linear(600, 3).to(torch.bfloat16)), resume=True)
    assert again.on_train_begin() == 1
    assert_same(again.model.state_dict(), model.state_dict(), "restored")


@pytest.mark.parametrize("name", [
    "ckpt-{epoch}.pt", "ckpt-{epoch}.pth",
    "ckpt-{epoch}.pth.tar",
])
def test_record_names_drop_the_whole_extension(tmp_path, name):
    ckpt = ModelCheckpoint(str(tmp_path / name), model=tiny())
    ckpt.on_train_begin()
    for epoch in range(3):
        ckpt.on_epoch_end(epoch)
    assert ckpt.checkpoints[-1].name == "ckpt-3"


def assert_same(a, b, where: str) -> None:
    torch_job.assert_same(a, b, where)


# -- epoch numbering ------------------------------------------------------------------------------


def test_one_based_epochs_warn_once(tmp_path):
    ckpt = ModelCheckpoint(str(tmp_path / "c-{epoch}.pt"), model=tiny())
    start = ckpt.on_train_begin()
    with pytest.warns(UserWarning, match=r"on_epoch_end\(epoch=1\) where epoch=0 was expected.*"
                      r"0-based.*one too high") as caught:
        for epoch in range(start + 1, 4):  # the natural 1-based loop
            ckpt.on_epoch_end(epoch)
    assert len([w for w in caught if "was expected" in str(w.message)]) == 1

    resumed = ModelCheckpoint(str(tmp_path / "c-{epoch}.pt"), model=tiny(), resume=True)
    start = resumed.on_train_begin()
    assert start == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in range(start, 6):  # the documented loop: no warning
            resumed.on_epoch_end(epoch)
    with pytest.warns(UserWarning, match=r"on_epoch_end\(epoch=7\) where epoch=6 was expected"):
        resumed.on_epoch_end(7)


# -- bad arguments (the front-end's own) ----------------------------------------------------------


class NoLoad:
    def state_dict(self):
        return {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strict": "no"}, r"strict must be True or False. Received: strict='no'"),
        ({"model": torch.optim}, r"model must be a torch\.nn\.Module. Received: model=<module"),
        ({"optimizer": NoLoad()}, r"optimizer must have state_dict\(\) and load_state_dict\(\)"),
        ({"scheduler": 0.1}, r"Received: scheduler=0\.1"),
        ({"extra": {"x": NoLoad()}}, r"Received: extra\['x'\]=<"),
        ({"extra": {1: NoLoad()}}, r"extra's keys must be strings.*Received: extra key 1"),
        ({"extra": "scaler"}, r"Received: extra='scaler'"),
    ],
)
def test_bad_torch_arguments_fail_at_construction(tmp_path, kwargs, match):
    kwargs = {"model": tiny(), **kwargs}
    with pytest.raises(ValueError, match=match):
        ModelCheckpoint(str(tmp_path / "c-{epoch}.pt"), **kwargs)


def test_resume_from_a_file_of_another_format_names_resume_and_the_file(tmp_path):
    import zipfile

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    keras_like = tmp_path / "model.pt"
    with zipfile.ZipFile(keras_like, "w") as z:
        z.writestr("config.json", "{}")
        z.writestr("model.weights.h5", b"\x89HDF")
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": {}, "thing": Counter()}, pickled)
    for path, what in ((text, "not a file torch.save wrote"),
                       (keras_like, "a zip archive that is not torch.save's format"),
                       (pickled, "objects other than tensors")):
        ckpt = ModelCheckpoint(str(tmp_path / "out" / "c-{epoch}.pt"), model=tiny(),
                               resume=str(path))
        with pytest.raises(ValueError, match=rf"resume=.*{path.name}.*{what}") as info:
            ckpt.on_train_begin()
        assert "weights_only=False" not in str(info.value)
        assert info.value.__cause__ is None and info.value.__suppress_context__


class _Stop(Exception):
    pass


class _Shuffled(torch.utils.data.IterableDataset):
    """Draws its order from torch's global RNG as each iteration starts."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        for i in torch.randperm(len(self.x)).tolist():
            yield self.x[i], self.y[i]


def _enumerate_run(directory, make_loader, resume=False, stop_at=None, epochs=3):
    """3 epochs of 6 batches, a save every 4 batches; ``stop_at`` (global step) kills it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = ModelCheckpoint(os.path.join(directory, "c-{epoch}-{batch}.pt"), monitor="loss",
                           save_freq=4, max_to_keep=None, resume=resume, model=model, optimizer=opt)
    step, last = 0, 0.0  # (a resumed epoch can have no batch left)
    try:
        for epoch in range(ckpt.on_train_begin(), epochs):
            for batch, (xb, yb) in ckpt.enumerate(make_loader()):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                step, last = step + 1, loss.item()
                ckpt.on_train_batch_end(batch, logs={"loss": last})
                if step == stop_at:
                    raise _Stop
            ckpt.on_epoch_end(epoch, logs={"loss": last})
        ckpt.on_train_end()
    except _Stop:
        pass
    return model, ckpt


@pytest.mark.parametrize("kind", ["iterable_dataset", "generator", "batch_size_none"])
def test_enumerate_resumes_an_iterable_drawing_its_order_as_it_starts_bitwise(tmp_path, kind):
    # Their order is drawn from the global RNG at their first item: the skipped items are read
    # with the epoch-begin RNGs in place, so the interrupted epoch's order comes back.
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 6, generator=g), torch.randint(0, 2, (96,), generator=g)

    def batches():  # a generator of 16-sample batches, shuffled as it starts
        perm = torch.randperm(96)
        for i in range(0, 96, 16):
            yield x[perm[i:i + 16]], y[perm[i:i + 16]]

    def make_loader():
        if kind == "iterable_dataset":
            return torch.utils.data.DataLoader(_Shuffled(x, y), batch_size=16)
        if kind == "generator":
            return batches()
        chunks = torch.utils.data.TensorDataset(x.reshape(6, 16, 6), y.reshape(6, 16))
        return torch.utils.data.DataLoader(chunks, batch_size=None, shuffle=True)

    straight, _ = _enumerate_run(tmp_path / "a", make_loader)
    _enumerate_run(tmp_path / "b", make_loader, stop_at=10)  # newest save: step 8, mid-epoch 2
    resumed, ckpt = _enumerate_run(tmp_path / "b", make_loader, resume=True)
    assert ckpt.restored_path.endswith("c-2-2.pt")
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_enumerate_over_a_shorter_loader_than_the_interrupted_epoch_warns(tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(96, 6), torch.randint(0, 2, (96,)))
    _enumerate_run(tmp_path, lambda: torch.utils.data.DataLoader(data, batch_size=16), stop_at=10)
    short = torch.utils.data.TensorDataset(torch.randn(16, 6), torch.randint(0, 2, (16,)))
    with pytest.warns(UserWarning, match="ran out after 1 of the 2 batches to skip"):
        _enumerate_run(tmp_path, lambda: torch.utils.data.DataLoader(short, batch_size=16),
                       resume=True, epochs=2)


def test_enumerate_with_a_damaged_epoch_rng_warns_and_resumes(tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(96, 6), torch.randint(0, 2, (96,)))
    loader = lambda: torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)  # noqa: E731
    _enumerate_run(tmp_path / "a", loader, stop_at=10)
    src = os.path.join(tmp_path / "a", "c-2-2.pt")
    payload = torch.load(src, weights_only=True)
    payload["training_state"]["epoch_rng"]["torch"] = {"cpu": torch.zeros(3, dtype=torch.uint8)}
    bare = str(tmp_path / "bare.pt")
    torch.save(payload, bare)
    with pytest.warns(UserWarning, match="epoch_rng.*damaged.*drawn anew"):
        _, ckpt = _enumerate_run(tmp_path / "c", loader, resume=bare)
    assert ckpt.restored_path == bare
