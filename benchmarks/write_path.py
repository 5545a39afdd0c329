"""The output path's two costs that a one-buffer raw write does not show, side by side.

    python -m benchmarks.write_path [--rounds 7] [--params 50e6] [--dir DIR]

1. CRC-32 of the same 256 MiB: zlib's, and ISA-L's (``isal``, which ``keras_ckpt._zip`` uses
   where it is installed), alone and beside a busy Python thread (the writer's).
2. Writes through ``storage.EarlyWriteback`` + fsync of a ~50M-parameter Keras model's
   ``.weights.h5`` bytes (≈ 604 MB, TensorFlow backend), in shuffled rounds, each after the
   disk queue drained: the bytes as one buffer; the same buffer split where the file's segments
   (HDF5 metadata, each variable) begin; the segments themselves (the variables' memory), each
   with the writeback started up to the last whole page (as shipped) and up to the last byte
   (before: a write into a page under writeback waits for its I/O).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zlib
from typing import Any, Callable

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WIDTH = 2048


def crc_rates() -> list[tuple[str, float, float]]:
    """(name, GB/s alone, GB/s beside a busy Python thread) of each CRC-32 available."""
    import numpy as np

    data = memoryview(np.random.default_rng(0).integers(0, 256, 256 << 20, dtype=np.uint8))
    crcs: list[tuple[str, Callable[..., int]]] = [("zlib", zlib.crc32)]
    try:
        from isal.isal_zlib import crc32
    except ImportError:
        pass
    else:
        crcs.append(("isal (ISA-L)", crc32))
    rates = []
    for name, crc in crcs:
        crc(data[:4096])
        start = time.perf_counter()
        crc(data)
        alone = time.perf_counter() - start
        done = threading.Event()

        def pieces(crc: Callable[..., int] = crc, done: threading.Event = done) -> None:
            for at in range(0, len(data), 8 << 20):
                crc(data[at : at + (8 << 20)])
            done.set()

        worker = threading.Thread(target=pieces)
        start = time.perf_counter()
        worker.start()
        spins = 0
        while not done.is_set():
            spins += 1  # the writer's Python, holding the GIL between its system calls
        beside = time.perf_counter() - start
        worker.join()
        rates.append((name, len(data) / alone / 1e9, len(data) / beside / 1e9))
    return rates


def segmented_writes(rounds: int, params: float, directory: str) -> dict[str, list[float]]:
    import keras
    import numpy as np

    from keras_ckpt import _kerasio, storage

    layers = max(1, round(params / (WIDTH * WIDTH + WIDTH)))
    model = keras.Sequential([keras.Input((WIDTH,))] + [keras.layers.Dense(WIDTH) for _ in range(layers)])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    segments = _kerasio.plan_weights_h5(model, state=b"{}")._segments
    flat = np.concatenate([np.frombuffer(s, np.uint8) for s in segments])
    split, at = [], 0
    for segment in segments:
        split.append(memoryview(flat[at : at + segment.nbytes]))
        at += segment.nbytes
    sources: dict[str, list[Any]] = {"one buffer": [memoryview(flat)], "one buffer, split": split,
                                     "the variables": list(segments)}
    page = storage._PAGE_SIZE
    times: dict[str, list[float]] = {}
    order = random.Random(0)
    path = os.path.join(directory, "w.bin")
    for _ in range(rounds):
        rows = [(source, whole) for source in sources for whole in (True, False)]
        order.shuffle(rows)
        for source, whole in rows:
            storage._PAGE_SIZE = page if whole else 1  # 1: up to the last byte, as before
            os.sync()
            time.sleep(1.5)
            try:
                start = time.perf_counter()
                with open(path, "wb", buffering=0) as f:
                    out = storage.EarlyWriteback(f)
                    for view in sources[source]:
                        out.write(view)
                    os.fsync(f.fileno())
                seconds = time.perf_counter() - start
            finally:
                storage._PAGE_SIZE = page
            os.unlink(path)
            label = f"{source}, writeback to the last {'whole page' if whole else 'byte'}"
            times.setdefault(label, []).append(seconds)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    print(f"# command: python -m benchmarks.write_path --rounds {args.rounds} --params {args.params:g}")
    for name, alone, beside in crc_rates():
        print(f"crc32 {name:14} {alone:6.1f} GB/s alone {beside:6.1f} GB/s beside a busy thread")
    directory = tempfile.mkdtemp(prefix="keras_ckpt-write-", dir=args.dir)
    try:
        times = segmented_writes(args.rounds, args.params, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    reference = times["one buffer, writeback to the last whole page"]
    for label, seconds in times.items():
        ratio = statistics.median(r / s for r, s in zip(reference, seconds))
        print(f"write {label:55} {statistics.median(seconds):7.3f} s  {ratio:5.2f}x one buffer")
    print(f"# load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
