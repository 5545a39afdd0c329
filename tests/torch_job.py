"""Tiny PyTorch training jobs for the shim's tests, each runnable in its own process.

    python tests/torch_job.py train DIR OUT --epochs 4 [--stop-after 2] [--resume] [--device cuda]
    python tests/torch_job.py crash-loop DIR     (saves every batch until killed)
    python tests/torch_job.py restore FILE OUT   (restores FILE into a CPU model, dumps it)
    python tests/torch_job.py full-disk DIR      (DIR on a small filesystem: a save hits ENOSPC)
    python tests/torch_job.py save-loop DIR      (saves ~50 MB every epoch until interrupted)

Also importable: the GPU checks live here as plain functions so that benchmarks/gpu_check.py
can run them on a machine without pytest.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import warnings

# cuBLAS needs this before CUDA starts for deterministic matmuls (torch's determinism docs).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from keras_ckpt.torch import ModelCheckpoint  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = "ckpt-{epoch:02d}.pt"


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 2)
    )


def make_job(device: str = "cpu"):
    """An MLP with dropout, Adam, StepLR and a shuffled DataLoader (data fixed, order from the RNG)."""
    data = torch.Generator().manual_seed(1234)
    x = torch.randn(96, 6, generator=data)
    y = (x[:, 0] + x[:, 1] > 0).long()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True
    )
    model = make_model().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    return model, opt, sched, loader


def rng_fingerprint() -> dict:
    """Every global RNG's state, as plain values (to compare across processes)."""
    from keras_ckpt import rng

    state = rng.capture()
    state["torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def train(directory: str, epochs: int, stop_after: int | None = None, resume: bool = False,
          device: str = "cpu") -> dict:
    """Train to ``epochs`` (or stop after ``stop_after``, like a preempted job); report the run."""
    if device == "cuda":
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    seed_everything(0)
    model, opt, sched, loader = make_job(device)
    ckpt = ModelCheckpoint(os.path.join(directory, TEMPLATE), model=model, optimizer=opt,
                           scheduler=sched, monitor="val_loss", max_to_keep=2, keep_best=1,
                           resume=resume)
    start = ckpt.on_train_begin()
    losses: dict[int, list[float]] = {}
    rng_at_start: dict[int, dict] = {}
    for epoch in range(start, epochs):
        rng_at_start[epoch] = rng_fingerprint()
        model.train()
        losses[epoch] = []
        for batch, (xb, yb) in enumerate(loader):
            # Python's and numpy's RNGs feed the loss too, so a wrong restore shows.
            noise = torch.from_numpy(np.random.normal(0, 0.01, size=xb.shape).astype("float32"))
            xb = (xb + noise) * (1 + 0.01 * random.random())
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            losses[epoch].append(loss.item())
            ckpt.on_train_batch_end(batch, logs={"loss": loss.item()})
        sched.step()
        ckpt.on_epoch_end(epoch, logs={"loss": np.mean(losses[epoch]),
                                       "val_loss": np.float64(1.0 / (epoch + 1))})
        if stop_after is not None and epoch + 1 == stop_after:
            break
    ckpt.on_train_end()
    return {
        "start": start,
        "restored": ckpt.restored_path,
        "model": {k: v.cpu() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "losses": losses,
        "rng_at_start": rng_at_start,
        "step": ckpt.checkpoints[-1].step,
    }


def child_env(**extra: str) -> dict:
    """The environment for a child process: one intra-op thread, as spinning OpenMP threads
    slow tiny jobs down badly on a small, shared machine."""
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


def run_job(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """This script in a new process (a restart is a new process); raises with its stderr."""
    out = subprocess.run([sys.executable, os.path.join(HERE, "torch_job.py"), *args],
                         capture_output=True, text=True, env=env or child_env(), timeout=300)
    if out.returncode != 0:
        raise AssertionError(f"torch_job.py {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out


def train_in_processes(root: str, device: str = "cpu") -> tuple[dict, dict, dict]:
    """4 epochs straight, and 2 + (new process) 2: the three runs' reports."""
    straight_dir, split_dir = os.path.join(root, "straight"), os.path.join(root, "split")
    reports = []
    for directory, extra, name in (
        (straight_dir, [], "straight"),
        (split_dir, ["--stop-after", "2"], "first"),
        (split_dir, ["--resume"], "second"),
    ):
        out = os.path.join(root, f"{name}.pt")
        run_job("train", directory, out, "--epochs", "4", "--device", device, *extra)
        reports.append(torch.load(out, weights_only=True))
    return reports[0], reports[1], reports[2]


def assert_same(a, b, where: str = "state") -> None:
    """Bitwise equality of nested state (tensors, numbers, containers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.cpu(), b.cpu()), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def check_exact_resume(root: str, device: str = "cpu") -> None:
    straight, first, second = train_in_processes(root, device)
    assert first["start"] == 0 and second["start"] == 2, (first["start"], second["start"])
    assert second["restored"] and second["restored"].endswith("ckpt-02.pt")
    for key in ("model", "optimizer", "scheduler"):
        assert_same(straight[key], second[key], key)
    for epoch in (2, 3):
        assert straight["losses"][epoch] == second["losses"][epoch], f"losses of epoch {epoch}"
        assert_same(straight["rng_at_start"][epoch], second["rng_at_start"][epoch], f"rng {epoch}")
    assert straight["step"] == second["step"] == 4 * 6


# -- GPU checks (plain functions: benchmarks/gpu_check.py runs them without pytest) -----------


def check_cuda_save_restores_on_cpu_and_cuda(root: str) -> None:
    seed_everything(0)
    model, opt, sched, loader = make_job("cuda")
    ckpt = ModelCheckpoint(os.path.join(root, "gpu", TEMPLATE), model=model, optimizer=opt,
                           scheduler=sched)
    ckpt.on_train_begin()
    for xb, yb in loader:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb.cuda()), yb.cuda()).backward()
        opt.step()
    ckpt.on_epoch_end(0, logs={"val_loss": 0.5})
    path = ckpt.latest_path
    payload = torch.load(path, weights_only=True)
    assert all(t.device.type == "cpu" for t in payload["model"].values())
    assert len(payload["training_state"]["rng"]["torch"]["cuda"]) == torch.cuda.device_count()

    for device in ("cpu", "cuda"):
        seed_everything(1)
        target, target_opt, target_sched, _ = make_job(device)
        restorer = ModelCheckpoint(os.path.join(root, f"into-{device}", TEMPLATE), model=target,
                                   optimizer=target_opt, scheduler=target_sched, resume=path)
        assert restorer.on_train_begin() == 1
        for name, value in target.state_dict().items():
            assert value.device.type == device, name
            assert torch.equal(value.cpu(), model.state_dict()[name].cpu()), name
        for state in target_opt.state.values():
            assert state["exp_avg"].device.type == device

    # A CPU-only machine: the same file, in a process that sees no CUDA device.
    out = os.path.join(root, "cpu-only.pt")
    result = run_job("restore", path, out, env=child_env(CUDA_VISIBLE_DEVICES=""))
    assert "CUDA device" in result.stderr, result.stderr  # the warning about the CUDA RNGs
    restored = torch.load(out, weights_only=True)
    for name, value in restored.items():
        assert torch.equal(value, model.state_dict()[name].cpu()), name


def check_cuda_exact_resume(root: str) -> None:
    check_exact_resume(root, device="cuda")


GPU_CHECKS = (check_cuda_save_restores_on_cpu_and_cuda, check_cuda_exact_resume)


# -- process entry points ---------------------------------------------------------------------


CRASH_TEMPLATES = {"rotating": "ckpt-{epoch:03d}-{batch:03d}.pt", "single": "last.pt"}


def crash_loop(directory: str, series: str = "rotating") -> None:
    """Save every batch (a few MB each) until killed; the test SIGKILLs it at random instants.

    ``series``: "rotating" (latest 2 + best 1 of many names) or "single" (one file overwritten).
    """
    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rotating = series == "rotating"
    ckpt = ModelCheckpoint(os.path.join(directory, CRASH_TEMPLATES[series]),
                           model=model, optimizer=opt, monitor="loss", save_freq=1,
                           max_to_keep=2 if rotating else None, keep_best=int(rotating), resume=True)
    epoch = ckpt.on_train_begin()
    while True:
        for batch in range(ckpt.start_batch, 20):
            opt.zero_grad()
            loss = model(torch.randn(8, 512)).square().mean()
            loss.backward()
            opt.step()
            ckpt.on_train_batch_end(batch, logs={"loss": random.random()})
        ckpt.on_epoch_end(epoch, logs={"loss": random.random()})
        epoch += 1


class Buffer:
    """An ``extra`` object whose state is one tensor of a chosen size."""

    def __init__(self, megabytes: float) -> None:
        self.data = torch.zeros(int(megabytes * 2**20) // 4)

    def state_dict(self) -> dict:
        return {"data": self.data}

    def load_state_dict(self, state: dict) -> None:
        self.data = state["data"]


def full_disk(directory: str) -> None:
    """``directory`` is on an 8 MB filesystem: a 3 MB save fits, a 6 MB one cannot.

    The failed save must be an OSError naming the file, the process must live on, and a save
    that fits afterwards must work: this prints what happened and exits 0.
    """
    buffer = Buffer(3)
    ckpt = ModelCheckpoint(os.path.join(directory, "c-{epoch}.pt"), model=make_model(),
                           extra={"buffer": buffer}, max_to_keep=None)
    ckpt.on_train_begin()
    ckpt.on_epoch_end(0)
    buffer.data = torch.ones(6 * 2**20 // 4)
    try:
        ckpt.on_epoch_end(1)
    except OSError as e:
        print(f"save failed: {type(e).__name__}: {e}", flush=True)
    else:
        raise SystemExit("the 6 MB save did not fail on an 8 MB filesystem")
    buffer.data = torch.full((2**20 // 4,), 2.0)
    ckpt.on_epoch_end(2)
    print("saved after the failure:", [r.name for r in ckpt.checkpoints], flush=True)


def save_loop(directory: str) -> None:
    """Save a ~50 MB checkpoint every epoch, forever; the test interrupts it with SIGINT."""
    model = torch.nn.Linear(3000, 4000)
    ckpt = ModelCheckpoint(os.path.join(directory, "c-{epoch}.pt"), model=model, max_to_keep=2)
    epoch = ckpt.on_train_begin()
    while True:
        ckpt.on_epoch_end(epoch)
        epoch += 1


def restore_into_cpu_model(path: str, out: str) -> None:
    torch.load(path, weights_only=True)  # CUDA tensors were saved from host copies: no map_location
    model, opt, sched, _ = make_job("cpu")
    ckpt = ModelCheckpoint(os.path.join(tempfile.mkdtemp(), TEMPLATE), model=model,
                           optimizer=opt, scheduler=sched, resume=path)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        ckpt.on_train_begin()
    torch.save(model.state_dict(), out)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("directory")
    t.add_argument("out")
    t.add_argument("--epochs", type=int, default=4)
    t.add_argument("--stop-after", type=int)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--device", default="cpu")
    c = sub.add_parser("crash-loop")
    c.add_argument("directory")
    c.add_argument("series", nargs="?", default="rotating", choices=sorted(CRASH_TEMPLATES))
    sub.add_parser("full-disk").add_argument("directory")
    sub.add_parser("save-loop").add_argument("directory")
    r = sub.add_parser("restore")
    r.add_argument("path")
    r.add_argument("out")
    args = ap.parse_args()
    if args.command == "train":
        report = train(args.directory, args.epochs, args.stop_after, args.resume, args.device)
        torch.save(report, args.out)
    elif args.command == "crash-loop":
        crash_loop(args.directory, args.series)
    elif args.command == "full-disk":
        full_disk(args.directory)
    elif args.command == "save-loop":
        save_loop(args.directory)
    else:
        restore_into_cpu_model(args.path, args.out)


if __name__ == "__main__":
    main()
