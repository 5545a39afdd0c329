"""Synchronous checkpoint save throughput: keras_ckpt's writers against stock Keras and raw disk.

    python benchmarks/save_throughput.py [--params 50e6] [--repeats 7] [--pause 3] [--backend tensorflow]

Every measurement runs until the bytes are on disk (the call, then fsync; for keras_ckpt's
callback, until its manifest is committed). Each save is timed the way checkpoints are written
in training: into a new file while the row's previous checkpoint still exists (deleted after
the timing; one extra row times a callback whose rotation deletes it), after a pause
(``--pause`` seconds) that stands for the training between two saves. The pause matters on VMs
whose host reclaims the guest's idle free memory: a write into page-cache pages nobody touched
for a few seconds costs a host page fault per page (see ``keras_ckpt.storage.EarlyWriteback``).
``--pause 0`` gives back-to-back saves. Rows are interleaved round by round, in a rotating
order, after one untimed warm-up round, so a noisy neighbour or a slow disk phase hits every
row alike; the table shows medians. "ratio" is the row's throughput over raw ``write`` +
``fsync`` of a buffer as large as our ``.keras`` file. The second row writes the same raw bytes
through keras_ckpt's output path (disk started per 16 MiB, pages dropped behind the write):
the ceiling for any writer here; "x path" is the row's throughput over that row's.

To add a row, write one function ``(bench, path) -> None`` and decorate it with ``@row``.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Bench:
    """What the rows share: the model under test and a raw buffer of the checkpoint's size."""

    model: Any
    raw: memoryview
    state: bytes
    callbacks: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0  # the round being timed: engine rows save it as their epoch


@dataclass
class Row:
    label: str
    suffix: str
    fn: Callable[[Bench, str], None]
    engine: bool  # the save fsyncs by itself (and names its file from its template)
    rotates: bool  # the save deletes its previous file itself (else the harness does, untimed)


ROWS: list[Row] = []


def row(label: str, suffix: str, engine: bool = False, rotates: bool = False) -> Callable:
    """Register a timed row: ``fn(bench, path)`` writes one checkpoint to ``path``."""

    def register(fn: Callable[[Bench, str], None]) -> Callable[[Bench, str], None]:
        ROWS.append(Row(label, suffix, fn, engine, rotates))
        return fn

    return register


@row("raw write + fsync", ".bin")
def raw_write(bench: Bench, path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        data = bench.raw
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)


@row("raw write via keras_ckpt's output path + fsync", ".bin")
def raw_write_early(bench: Bench, path: str) -> None:
    """The same bytes through our writers' output path: what the disk allows at best."""
    from keras_ckpt import storage

    with open(path, "wb", buffering=0) as raw:
        storage.EarlyWriteback(raw).write(bench.raw)


@row("keras_ckpt write_weights_h5", ".weights.h5")
def ours_weights_h5(bench: Bench, path: str) -> None:
    from keras_ckpt import _kerasio

    _kerasio.write_weights_h5(bench.model, path, state=bench.state)


@row("keras_ckpt write_keras", ".keras")
def ours_keras(bench: Bench, path: str) -> None:
    from keras_ckpt import _kerasio

    _kerasio.write_keras(bench.model, path, state=bench.state)


@row("stock model.save (.keras, = ModelCheckpoint)", ".keras")
def stock_keras(bench: Bench, path: str) -> None:
    bench.model.save(path, overwrite=True)  # what keras.callbacks.ModelCheckpoint calls


@row("stock model.save_weights (.weights.h5)", ".weights.h5")
def stock_weights(bench: Bench, path: str) -> None:
    bench.model.save_weights(path, overwrite=True)


def _engine_save(bench: Bench, path: str, **kwargs: Any) -> None:
    """One whole ``on_epoch_end``: write, checksum, fsync, rename, manifest commit (, rotation).

    ``path`` is the name this round's file gets from the callback's ``{epoch}`` template. Without
    rotation the harness deletes the previous file after the timing, as for every other row
    (the manifest then lists a missing file, which no save reads). With ``max_to_keep=1`` the
    improving loss makes each save the best, so rotation deletes the previous one, timed.
    """
    import keras_ckpt

    template = path.replace(f"-{bench.epoch + 1:03d}.", "-{epoch:03d}.")
    ckpt = bench.callbacks.get(template)
    if ckpt is None:
        ckpt = keras_ckpt.ModelCheckpoint(
            template, monitor="loss", **kwargs
        )
        ckpt.set_model(bench.model)
        ckpt.on_train_begin()
        bench.callbacks[template] = ckpt
    ckpt.on_epoch_end(bench.epoch, {"loss": 1.0 / (bench.epoch + 1)})


@row("keras_ckpt.ModelCheckpoint (.keras)", ".keras", engine=True)
def full_checkpoint_keras(bench: Bench, path: str) -> None:
    _engine_save(bench, path)


@row("keras_ckpt.ModelCheckpoint (.weights.h5)", ".weights.h5", engine=True)
def full_checkpoint_weights(bench: Bench, path: str) -> None:
    _engine_save(bench, path, save_weights_only=True)


@row("  the same, max_to_keep=1 (its rotation timed)", ".weights.h5", engine=True, rotates=True)
def full_checkpoint_rotating(bench: Bench, path: str) -> None:
    _engine_save(bench, path, save_weights_only=True, max_to_keep=1, keep_best=1)


def _timed(entry: Row, bench: Bench, path: str, pause: float) -> tuple[float, int]:
    from keras_ckpt import storage

    gc.collect()
    os.sync()  # start from a clean disk queue: no row pays for the previous row's writeback
    time.sleep(pause)
    start = time.perf_counter()
    entry.fn(bench, path)
    if not entry.engine:
        storage.fsync_path(path)
    return time.perf_counter() - start, os.path.getsize(path)


def _build_model(params: float, width: int) -> Any:
    import keras
    import numpy as np

    layers = max(1, round(params / (width * width + width)))
    model = keras.Sequential(
        [keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(layers)]
    )
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, width), dtype="float32")
    model.train_on_batch(x, x)  # builds Adam's moments and makes them non-zero
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=50e6, help="model parameters (~)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median)")
    parser.add_argument(
        "--pause", type=float, default=3.0, help="seconds of idle before each save (training)"
    )
    parser.add_argument("--width", type=int, default=2048, help="Dense layer width")
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "tensorflow"))
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, _ROOT)

    import keras
    import numpy as np

    model = _build_model(args.params, args.width)
    n_params = sum(int(np.prod(v.shape)) for v in model.weights)
    directory = tempfile.mkdtemp(prefix="save_throughput-", dir=args.dir)
    try:
        # Size the raw row like our .keras file; touch the buffer so its pages exist.
        bench = Bench(model, memoryview(b""), state=b'{"epoch": 1}')
        probe = os.path.join(directory, "probe.keras")
        ours_keras(bench, probe)
        raw = np.random.default_rng(1).integers(0, 256, os.path.getsize(probe), dtype=np.uint8)
        os.unlink(probe)
        bench.raw = memoryview(raw)

        rows = list(ROWS)
        times: dict[str, list[float]] = {r.label: [] for r in rows}
        sizes: dict[str, int] = {}
        previous: dict[str, str] = {}
        for round_ in range(args.repeats + 1):  # round 0 warms up and is not counted
            shift = round_ % len(rows)
            bench.epoch = round_
            for entry in rows[shift:] + rows[:shift]:
                path = os.path.join(
                    directory, f"row{ROWS.index(entry)}-{round_ + 1:03d}{entry.suffix}"
                )
                try:
                    seconds, size = _timed(entry, bench, path, args.pause)
                except NotImplementedError:
                    rows.remove(entry)
                    continue
                if not entry.rotates and entry.label in previous:
                    os.unlink(previous[entry.label])  # rotation, outside the timing
                previous[entry.label] = path
                if round_:
                    times[entry.label].append(seconds)
                sizes[entry.label] = size
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    print(
        f"keras {keras.__version__}, backend {args.backend}, {n_params / 1e6:.1f}M params "
        f"+ Adam, {args.repeats} rounds (median), {args.pause:g} s pause, {os.cpu_count()} CPUs"
    )
    raw_label, path_label = ROWS[0].label, ROWS[1].label
    raw_rate = sizes[raw_label] / statistics.median(times[raw_label])
    path_rate = sizes[path_label] / statistics.median(times[path_label])
    print(
        f"{'row':48} {'MB':>7} {'median s':>9} {'min s':>7} {'GB/s':>6} {'ratio':>6} "
        f"{'x path':>6}"
    )
    for entry in rows:
        median = statistics.median(times[entry.label])
        rate = sizes[entry.label] / median
        print(
            f"{entry.label:48} {sizes[entry.label] / 1e6:7.1f} {median:9.3f} "
            f"{min(times[entry.label]):7.3f} {rate / 1e9:6.2f} {rate / raw_rate:6.2f} "
            f"{rate / path_rate:6.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
