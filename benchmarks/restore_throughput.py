"""Resume throughput: keras_ckpt's restore against a raw cold read of the same file and stock loaders.

    python -m benchmarks.restore_throughput [--params 50e6] [--rounds 5] [--dir DIR]

A ~50M-parameter model with its Adam state (≈ 600 MB) is saved once per format with keras_ckpt:
``.keras`` and ``.weights.h5`` from a Keras model (Dense layers 2048 wide, TensorFlow backend),
``.pt`` from a torch MLP of the same size. Then, in ``--rounds`` interleaved rounds, each
measurement starts from a cold page cache (the file is fsynced, then dropped with
``posix_fadvise(POSIX_FADV_DONTNEED)``) and times:

- ``raw cold read``: ``preadv`` of the whole file into a buffer allocated once (the ceiling);
- ``keras_ckpt resume``: what ``resume=True`` runs at train begin, the callback's own
  ``on_train_begin`` (Keras: ``ModelCheckpoint.set_model`` + ``on_train_begin``; torch:
  ``ModelCheckpoint.on_train_begin``), then ``on_train_end`` to release the directory: manifest
  read, checksum verified and every variable loaded;
- stock: ``keras.models.load_model`` (``.keras``), ``model.load_weights`` (``.weights.h5``),
  ``torch.load`` + ``load_state_dict`` of the model and the optimizer (``.pt``); none verifies a
  checksum.

"ratio" is the median over rounds of raw cold read time ÷ the row's time in the same round
(1.0: as fast as reading the file); the target for keras_ckpt's rows is ≥ 0.80.
:func:`measure` returns the rows for a combined table.
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
from typing import Any, Callable

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.suite import drop_pages  # noqa: E402

TARGET = 0.80
WIDTH = 2048


def _raw_reader(size: int) -> Callable[[str], None]:
    buf = memoryview(bytearray(size))  # allocated and touched once, outside the timings
    chunk = 16 << 20

    def read(path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < size:
                n = os.preadv(fd, [buf[done : done + chunk]], done)
                if not n:
                    break
                done += n
        finally:
            os.close(fd)

    return read


def _keras_setup(params: float, root: str) -> tuple[dict[str, str], dict[str, Callable[[], None]]]:
    import keras
    import numpy as np

    import keras_ckpt

    layers = max(1, round(params / (WIDTH * WIDTH + WIDTH)))

    def build() -> keras.Model:
        model = keras.Sequential(
            [keras.Input((WIDTH,))] + [keras.layers.Dense(WIDTH) for _ in range(layers)]
        )
        model.compile(optimizer="adam", loss="mse")
        model.optimizer.build(model.trainable_variables)
        return model

    model = build()
    x = np.zeros((8, WIDTH), np.float32)
    templates = {
        "keras": os.path.join(root, "keras", "ck-{epoch}.keras"),
        "weights.h5": os.path.join(root, "h5", "ck-{epoch}.weights.h5"),
    }
    callbacks = [
        keras_ckpt.ModelCheckpoint(templates["keras"], monitor="loss"),
        keras_ckpt.ModelCheckpoint(templates["weights.h5"], monitor="loss", save_weights_only=True),
    ]
    model.fit(x, x, epochs=1, batch_size=8, verbose=0, callbacks=callbacks)
    files = {fmt: t.format(epoch=1) for fmt, t in templates.items()}
    target = build()

    def resume(fmt: str) -> Callable[[], None]:
        def run() -> None:
            ckpt = keras_ckpt.ModelCheckpoint(
                templates[fmt], monitor="loss", save_weights_only=fmt == "weights.h5", resume=True
            )
            ckpt.set_model(target)
            ckpt.on_train_begin()
            ckpt.on_train_end()
            assert ckpt.restored_path == files[fmt]

        return run

    return files, {
        "keras/resume": resume("keras"),
        "keras/stock": lambda: keras.models.load_model(files["keras"]),
        "weights.h5/resume": resume("weights.h5"),
        "weights.h5/stock": lambda: target.load_weights(files["weights.h5"]),
    }


def _torch_setup(params: float, root: str) -> tuple[dict[str, str], dict[str, Callable[[], None]]]:
    import torch

    from keras_ckpt.torch import ModelCheckpoint

    layers = max(1, round(params / (WIDTH * WIDTH + WIDTH)))

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
        optimizer = torch.optim.Adam(model.parameters())
        model(torch.zeros(2, WIDTH)).sum().backward()
        optimizer.step()  # Adam's state exists after its first step
        optimizer.zero_grad()
        return model, optimizer

    model, optimizer = build()
    template = os.path.join(root, "pt", "ck-{epoch}.pt")
    ckpt = ModelCheckpoint(template, model=model, optimizer=optimizer, monitor="loss")
    ckpt.on_train_begin()
    ckpt.on_epoch_end(0, {"loss": 1.0})
    ckpt.on_train_end()
    path = template.format(epoch=1)
    target, target_opt = build()

    def resume() -> None:
        again = ModelCheckpoint(template, model=target, optimizer=target_opt, monitor="loss",
                                resume=True)
        again.on_train_begin()
        again.on_train_end()
        assert again.restored_path == path

    def stock() -> None:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        target.load_state_dict(payload["model"])
        target_opt.load_state_dict(payload["optimizer"])

    return {"pt": path}, {"pt/resume": resume, "pt/stock": stock}


_LABELS = {
    "raw": "raw cold read",
    "resume": "keras_ckpt resume (on_train_begin)",
    "keras/stock": "keras.models.load_model",
    "weights.h5/stock": "model.load_weights",
    "pt/stock": "torch.load + load_state_dict",
}


def measure(rounds: int = 5, params: float = 50e6, directory: str | None = None) -> list[dict[str, Any]]:
    """Time every row over ``rounds`` interleaved cold-cache rounds; one dict per row.

    Keys: ``format``, ``row`` (what was timed), ``median_s``, ``ratio`` (median over rounds of raw
    cold read time ÷ the row's), ``target`` (0.80 for keras_ckpt's resume rows, else None) and
    ``bytes`` (the file's size).
    """
    import warnings

    root = tempfile.mkdtemp(prefix="restore_throughput-", dir=directory)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stock Keras's optimizer/compile notices
            files, fns = _keras_setup(params, root)
            more_files, more_fns = _torch_setup(params, root)
            files.update(more_files)
            fns.update(more_fns)
            sizes = {fmt: os.path.getsize(p) for fmt, p in files.items()}
            raw = _raw_reader(max(sizes.values()))
            times: dict[str, list[float]] = {}
            ratios: dict[str, list[float]] = {}
            order = [(fmt, kind) for fmt in files for kind in ("raw", "resume", "stock")]
            for fmt, kind in order:  # warm-up: imports, first-call costs
                drop_pages(files[fmt])
                raw(files[fmt]) if kind == "raw" else fns[f"{fmt}/{kind}"]()
            for round_ in range(rounds):
                for fmt in files:
                    seconds: dict[str, float] = {}
                    kinds = ["raw", "resume", "stock"]
                    kinds = kinds[round_ % 3 :] + kinds[: round_ % 3]  # rotate the order
                    for kind in kinds:
                        gc.collect()
                        drop_pages(files[fmt])
                        start = time.perf_counter()
                        raw(files[fmt]) if kind == "raw" else fns[f"{fmt}/{kind}"]()
                        seconds[kind] = time.perf_counter() - start
                    for kind, s in seconds.items():
                        times.setdefault(f"{fmt}/{kind}", []).append(s)
                        ratios.setdefault(f"{fmt}/{kind}", []).append(seconds["raw"] / s)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for fmt in files:
        for kind in ("raw", "resume", "stock"):
            key = f"{fmt}/{kind}"
            rows.append({
                "format": fmt,
                "row": _LABELS.get(key, _LABELS.get(kind, kind)),
                "median_s": statistics.median(times[key]),
                "ratio": statistics.median(ratios[key]),
                "target": TARGET if kind == "resume" else None,
                "bytes": sizes[fmt],
            })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the checkpoints go (default: $TMPDIR)")
    args = parser.parse_args()
    rows = measure(args.rounds, args.params, args.dir)
    print(f"{'format':<11} {'row':<36} {'median s':>9} {'ratio':>6} {'target':>7}")
    for r in rows:
        target = f">= {r['target']:.2f}" if r["target"] is not None else ""
        print(f"{r['format']:<11} {r['row']:<36} {r['median_s']:>9.3f} {r['ratio']:>6.2f} {target:>7}")
    sizes = ", ".join(f"{r['format']} {r['bytes'] / 1e6:.0f} MB" for r in rows if r["target"])
    print(f"medians of {args.rounds} rounds ({sizes}); ratio: raw cold read time / row time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
