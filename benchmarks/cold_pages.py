"""Why saves are timed after a pause: the cost of page-cache pages nobody touched for a while.

    python benchmarks/cold_pages.py [--mb 600] [--repeats 5] [--pause 3] [--dir DIR]

Writes a new file of ``--mb`` megabytes (while the previous one still exists, as a checkpoint
is written) under two conditions, and times the ``write`` calls and the ``fsync`` apart:

- cold: after ``--pause`` idle seconds, as after a stretch of training;
- warm: right after touching (and freeing) as much memory as the file needs.

On VMs whose host reclaims the guest's idle free memory (free page reporting, ballooning), the
cold ``write`` calls are several times slower than the warm ones although no disk is involved
yet. Each condition is run with plain ``write`` + ``fsync`` and through keras_ckpt's output path
(``keras_ckpt.storage.EarlyWriteback``: disk started per 16 MiB, pages dropped two chunks
behind), which keeps reusing the same few warm pages.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_ckpt import storage  # noqa: E402


def plain(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def output_path(fd: int, data: memoryview) -> None:
    with open(fd, "wb", buffering=0, closefd=False) as f:
        storage.EarlyWriteback(f).write(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pause", type=float, default=3.0)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    data = np.random.default_rng(0).integers(0, 256, args.mb * 10**6, dtype=np.uint8)
    directory = tempfile.mkdtemp(prefix="cold_pages-", dir=args.dir)
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    previous: str | None = None
    try:
        for round_ in range(args.repeats):
            for condition in ("cold", "warm"):
                for writer in (plain, output_path):
                    os.sync()
                    time.sleep(args.pause)
                    if condition == "warm":
                        scratch = np.ones(data.size + (64 << 20), dtype=np.uint8)
                        del scratch
                    path = os.path.join(directory, f"{round_}-{condition}-{writer.__name__}")
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    start = time.perf_counter()
                    writer(fd, memoryview(data))
                    written = time.perf_counter()
                    os.fsync(fd)
                    done = time.perf_counter()
                    os.close(fd)
                    if previous is not None:
                        os.unlink(previous)
                    previous = path
                    results.setdefault((condition, writer.__name__), []).append(
                        (written - start, done - written)
                    )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"{args.mb} MB new file, {args.repeats} rounds, {args.pause:g} s pause, medians (s)")
    print(f"{'condition':10} {'writer':12} {'write':>7} {'fsync':>7} {'total':>7}")
    for (condition, writer), runs in results.items():
        w = statistics.median(r[0] for r in runs)
        f = statistics.median(r[1] for r in runs)
        t = statistics.median(r[0] + r[1] for r in runs)
        print(f"{condition:10} {writer:12} {w:7.3f} {f:7.3f} {t:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
