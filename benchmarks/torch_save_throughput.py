"""Save throughput: keras_ckpt.torch's full-state checkpoint vs torch.save vs a raw write.

One process, the three methods interleaved (the order rotates every round), medians of
``--repeats`` rounds, about 600 MB of state by default (a ~50M-parameter MLP plus Adam's two
slots). Every method ends with its bytes on disk (fsync):

- raw write + fsync: the bytes torch.save produces for the same dict, from memory, one write.
- torch.save + fsync: ``torch.save(state, f)`` of the same dict, then fsync.
- keras_ckpt.torch: ``ModelCheckpoint.on_epoch_end``: state capture, torch's zip format
  (CRC-32s computed beside the write), xxh3-128 checksum, fsync, rename, directory fsync,
  manifest commit.
- raw, early writeback: the raw write through the shim's output path
  (``keras_ckpt.storage.EarlyWriteback``: disk started per 16 MiB, pages dropped behind the
  write), to show what that part is worth alone.

Each save writes a new file while the method's previous one still exists, as checkpointing
does; the previous file is deleted after the timed call, outside the timing (unlinking 600 MB
is slow on a filesystem mounted with online discard, and is the same for all). Each timed call
follows ``--pause`` idle seconds, standing for the training between two saves: on VMs whose
host reclaims idle free memory, writes into pages untouched for seconds are several times
slower (see ``keras_ckpt.storage.EarlyWriteback``).

    python benchmarks/torch_save_throughput.py [--params 50e6] [--repeats 7] [--pause 3]
                                               [--dir DIR] [--device cuda]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import tempfile
import time

import torch

from keras_ckpt import storage
from keras_ckpt.torch import ModelCheckpoint


def build(
    params: float, device: str, width: int = 4096
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    layers = max(1, round(params / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one step, so Adam has its exp_avg/exp_avg_sq slots
        p.grad = torch.zeros_like(p)
    opt.step()
    return model, opt


def fsynced(path: str, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=50e6, help="model parameters (Adam adds 2x)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--pause", type=float, default=3.0, help="idle seconds before each save")
    ap.add_argument("--dir", help="where to write (default: a temporary directory, removed)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    root = args.dir or tempfile.mkdtemp(prefix="torch-save-bench-")
    os.makedirs(root, exist_ok=True)
    model, opt = build(args.params, args.device)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()
    ckpt = ModelCheckpoint(os.path.join(root, "shim", "ckpt-{epoch:03d}.pt"), model=model,
                           optimizer=opt, max_to_keep=None)
    ckpt.on_train_begin()
    os.makedirs(os.path.join(root, "base"), exist_ok=True)

    def raw(i: int) -> str:
        path = os.path.join(root, "base", f"raw-{i}")
        fsynced(path, lambda f: f.write(data))
        return path

    def raw_early(i: int) -> str:
        path = os.path.join(root, "base", f"early-{i}")
        fsynced(path, lambda f: storage.EarlyWriteback(f).write(data))
        return path

    def torch_save(i: int) -> str:
        path = os.path.join(root, "base", f"torch-{i}")
        fsynced(path, lambda f: torch.save(state, f))
        return path

    def shim(i: int) -> str:
        ckpt.on_epoch_end(i)
        return ckpt.latest_path

    methods = {"raw write + fsync": raw, "torch.save + fsync": torch_save, "keras_ckpt.torch": shim,
               "raw, early writeback + fsync": raw_early}
    times: dict[str, list[float]] = {name: [] for name in methods}
    sizes: dict[str, int] = {}
    previous: dict[str, str] = {}
    names = list(methods)
    try:
        for i in range(args.repeats):
            for name in names[i % len(names):] + names[: i % len(names)]:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                os.sync()
                time.sleep(args.pause)
                start = time.perf_counter()
                path = methods[name](i)
                times[name].append(time.perf_counter() - start)
                sizes[name] = os.path.getsize(path)
                # The shim keeps all (max_to_keep=None) and never reads an old file again, so
                # its previous file can go too; the manifest still lists it, which is harmless here.
                if name in previous:
                    os.remove(previous[name])
                previous[name] = path
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    base = statistics.median(times["raw write + fsync"])
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU tensors"
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters + Adam on "
          f"{where}; {sizes['raw write + fsync'] / 1e6:.0f} MB; {args.repeats} interleaved rounds\n")
    print("| method | median s | GB/s | x raw | all runs (s) |\n|---|---:|---:|---:|---|")
    for name in names:
        median = statistics.median(times[name])
        runs = " ".join(f"{t:.3f}" for t in times[name])
        print(f"| {name} | {median:.3f} | {sizes[name] / median / 1e9:.2f} | "
              f"{base / median:.2f} | {runs} |")


if __name__ == "__main__":
    main()
