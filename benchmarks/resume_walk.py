"""Keras resume with the loading walk held back during the read, against the walk after the checksum.

    python -m benchmarks.resume_walk [--rounds 9] [--params 50e6] [--dir DIR]

The same ~50M-parameter Keras model with Adam (≈ 604 MB, Dense layers 2048 wide, TensorFlow
backend) is saved once as ``.keras`` and once as ``.weights.h5``; then, in ``--rounds`` rounds,
each in a shuffled order and each from the same start (files fsynced and out of the page cache,
700 MB of fresh memory touched and freed), three rows per format:

- ``raw cold read``: a plain read of the whole file into a buffer allocated once;
- ``held walk``: ``resume=True`` as shipped: Keras's loading walk runs while the file is read,
  its assigns applied once the checksum matched;
- ``walk after checksum``: the same with the walk forced to wait for the checksum (what a model
  with a user's own loader, or the jax and torch backends, get).

Ratio: raw read time ÷ the row's time in the same round, median over rounds.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.suite import drop_pages  # noqa: E402

WIDTH = 2048
_WARM_BYTES = 700 << 20
_ROWS = (("raw", "raw cold read"), ("held", "held walk"), ("after", "walk after checksum"))


def measure(rounds: int, params: float, directory: str) -> dict[str, dict[str, list[float]]]:
    import keras
    import numpy as np

    import keras_ckpt
    from keras_ckpt import _kerasio

    layers = max(1, round(params / (WIDTH * WIDTH + WIDTH)))
    model = keras.Sequential([keras.Input((WIDTH,))] + [keras.layers.Dense(WIDTH) for _ in range(layers)])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    templates = {s: os.path.join(directory, s.strip("."), "ckpt-{epoch:03d}" + s)
                 for s in (".keras", ".weights.h5")}
    files = {}
    for suffix, template in templates.items():
        cb = keras_ckpt.ModelCheckpoint(template, save_weights_only=suffix == ".weights.h5",
                                        monitor="loss")
        cb.set_model(model)
        cb.on_train_begin()
        cb.on_epoch_end(0, {"loss": 1.0})
        cb.on_train_end()
        files[suffix] = cb.latest_path
    buf = np.zeros(max(os.path.getsize(f) for f in files.values()), np.uint8)
    held = _kerasio._holds_assigns
    times: dict[str, dict[str, list[float]]] = {s: {"raw": [], "held": [], "after": []} for s in files}
    order = random.Random(0)

    def resume(suffix: str) -> float:
        cb = keras_ckpt.ModelCheckpoint(templates[suffix], save_weights_only=suffix == ".weights.h5",
                                        monitor="loss", resume=True)
        cb.set_model(model)
        start = time.perf_counter()
        cb.on_train_begin()
        seconds = time.perf_counter() - start
        cb.on_train_end()
        return seconds

    for _ in range(rounds):
        rows = [(s, kind) for s in files for kind in ("raw", "held", "after")]
        order.shuffle(rows)
        for suffix, kind in rows:
            drop_pages(directory)
            warm = np.ones(_WARM_BYTES, np.uint8)
            del warm
            if kind == "raw":
                start = time.perf_counter()
                with open(files[suffix], "rb", buffering=0) as f:
                    view, n = memoryview(buf), 0
                    while chunk := f.readinto(view[n:]):
                        n += chunk
                times[suffix][kind].append(time.perf_counter() - start)
                continue
            _kerasio._holds_assigns = held if kind == "held" else (lambda model: False)
            try:
                times[suffix][kind].append(resume(suffix))
            finally:
                _kerasio._holds_assigns = held
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="keras_ckpt-walk-", dir=args.dir)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times = measure(args.rounds, args.params, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"# command: python -m benchmarks.resume_walk --rounds {args.rounds} --params {args.params:g}")
    print(f"# load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'format':12} {'row':22} {'median s':>9} {'ratio':>6}")
    for suffix, rows in times.items():
        for kind, label in _ROWS:
            ratio = statistics.median(r / t for r, t in zip(rows["raw"], rows[kind]))
            print(f"{suffix:12} {label:22} {statistics.median(rows[kind]):9.3f} {ratio:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
