"""keras_ckpt's benchmark: every figure issue 9 asks for, measured side by side, in one table.

    python -m benchmarks [--rounds 5] [--quick] [--only SECTION] [--pause 3] [--dir DIR]
    make bench

Sections (``--only`` runs one; each runs its rows interleaved, round by round, in a rotating
order (resume: a seeded random one), after one untimed warm-up round, and reports medians):

- ``save``: one synchronous full save of a ~50M-parameter model + Adam (~600 MB) by each
  front-end, beside raw ``write`` + ``fsync`` of as many bytes, the same bytes through
  keras_ckpt's own output path (``storage.EarlyWriteback``) and the stock savers. Each save
  writes a new file while the row's previous one exists and follows ``--pause`` idle seconds
  (the training between two saves; see docs/performance.md for why that matters on VMs whose
  host reclaims idle guest memory).
- ``async``: with ``async_save=True``, what a save stops training for (the stall), the next
  training step after it, and the time until the save is durable, beside the synchronous save of
  the same state and one plain memcpy of the state's bytes (the ``save`` section's synchronous
  rows run too: they are the denominators). On the TensorFlow backend also the TF2
  ``CheckpointManager`` (a ``tf.train.Checkpoint`` of the Keras model and its optimizer), and,
  as an anchor, TF's own ``CheckpointOptions(experimental_enable_async_checkpoint=True)`` with
  the stock manager (on the variables themselves: with the Keras model its second save fails).
- ``resume``: ``ModelCheckpoint(resume=True)``'s ``on_train_begin`` (find the newest
  checkpoint that verifies, load it: what a restarted job waits for) beside a raw read of the
  same file (and an ``O_DIRECT`` one), every row from the same start (all the section's files
  fsynced and their pages dropped with ``POSIX_FADV_DONTNEED``, then the same fresh memory
  touched and freed); the stock loaders as anchors; each ratio is over the raw read of the
  same round. No pause: reads do not write new page-cache pages of their own
  into a file that must survive, and every row reads into pages the drop just freed.
- ``overhead``: a small model's training step without a callback, with keras_ckpt's
  ``ModelCheckpoint`` (default arguments) and with Keras's own; the torch shim's
  ``on_train_batch_end`` in a bare loop. The saves at epoch end are not counted.
- ``disk``: bytes on disk for latest-1 ∪ best-1 after a few epochs, beside one checkpoint.

Every ratio is a throughput ratio (the row's bytes/s, or steps/s, over its reference's: higher
is better; for rows of equal bytes it is the reference's time over the row's), except the disk
rows (bytes over one checkpoint's bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import mmap
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

SECTIONS = ("save", "async", "resume", "overhead", "disk")
NA_ASYNC = "n/a (async_save not available)"


@dataclass
class Row:
    """One measurement: ``fn(round, settle)`` calls ``settle()`` right before it starts its clock
    and returns what it measured (``s``: seconds; ``bytes``; ``files``: to delete next round)."""

    key: str
    label: str
    fn: Callable[[int, Callable[[], None]], dict]
    pause: bool = True  # settle() idles --pause seconds (saves only)


@dataclass
class Line:
    """A line of the table."""

    section: str
    label: str
    mb: float | None = None
    seconds: float | None = None
    rate: str = ""
    ratio: float | None = None
    ref: str = ""
    target: str = ""
    met: str = ""
    note: str = ""


@dataclass
class Env:
    """What the rows share."""

    args: argparse.Namespace
    root: str
    cache: dict[str, Any] = field(default_factory=dict)


# -- helpers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Warnings off around a row: the callbacks warn about things a benchmark does on purpose
    (a new run in a directory with earlier ones, no ``fit`` to pass ``initial_epoch`` to)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def drop_pages(*paths: str) -> None:
    """fsync each file (dirty pages cannot be dropped), then drop its pages from the cache."""
    for top in paths:
        files = [top] if os.path.isfile(top) else [
            os.path.join(d, n) for d, _, names in os.walk(top) for n in names
        ]
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def files_bytes(*paths: str) -> int:
    total = 0
    for top in paths:
        if os.path.isfile(top):
            total += os.path.getsize(top)
        for d, _, names in os.walk(top):
            total += sum(os.path.getsize(os.path.join(d, n)) for n in names)
    return total


def remove(*paths: str) -> None:
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)


def async_available() -> dict[str, bool]:
    """Which front-ends of the installed keras_ckpt take ``async_save``."""
    import keras_ckpt
    import keras_ckpt.torch

    classes = [("keras", keras_ckpt.ModelCheckpoint), ("torch", keras_ckpt.torch.ModelCheckpoint)]
    if keras_backend() == "tensorflow":
        import keras_ckpt.tf

        classes.append(("tf", keras_ckpt.tf.CheckpointManager))
    return {name: "async_save" in inspect.signature(cls.__init__).parameters
            for name, cls in classes}


def run_rounds(env: Env, rows: list[Row], rounds: int, shuffle: int | None = None) -> dict[str, list[dict]]:
    """Round 0 warms up (no pause, not counted); each round rotates the rows' order, or, with
    ``shuffle`` (a seed), runs them in a random order drawn from that seed: a fixed rotation puts
    a row right after the same neighbour in most rounds, and what that neighbour leaves behind
    (freed memory, a busy disk) then favours or penalises it every time."""
    results: dict[str, list[dict]] = {r.key: [] for r in rows}
    order = random.Random(shuffle)
    # Keras and TF hold millions of long-lived objects: a full collection takes ~0.4 s. Frozen
    # once here, the collection before each timed row only walks what the rows made since.
    gc.collect()
    gc.freeze()
    leftovers: dict[str, list[str]] = {}
    for round_ in range(rounds + 1):
        shift = round_ % len(rows)
        ordered = rows[shift:] + rows[:shift]
        if shuffle is not None:
            ordered = order.sample(rows, len(rows))
        for row in ordered:
            pause = env.args.pause if (row.pause and round_) else 0.0

            def settle(pause: float = pause) -> None:
                gc.collect()
                os.sync()  # no row pays for the previous row's writeback
                time.sleep(pause)

            print(f"  {row.key}: round {round_}/{rounds}", file=sys.stderr, flush=True)
            with _quiet():
                measured = row.fn(round_, settle)
            # The previous round's files go after the timing, as rotation would delete them.
            remove(*leftovers.get(row.key, ()))
            leftovers[row.key] = measured.pop("files", [])
            if round_:
                results[row.key].append(measured)
    for files in leftovers.values():
        remove(*files)
    return results


def med(results: dict[str, list[dict]], key: str, what: str = "s") -> float:
    return statistics.median(m[what] for m in results[key])


def throughput(results: dict[str, list[dict]], key: str) -> float:
    return statistics.median(m["bytes"] for m in results[key]) / med(results, key)


def verdict(ratio: float, at_least: float) -> str:
    return "yes" if ratio >= at_least else "NO"


# -- the models -------------------------------------------------------------------------------


def keras_model(env: Env) -> Any:
    if "keras_model" not in env.cache:
        from benchmarks.save_throughput import _build_model

        env.cache["keras_model"] = _build_model(env.args.params, env.args.width)
    return env.cache["keras_model"]


def torch_model(env: Env) -> tuple[Any, Any]:
    if "torch_model" not in env.cache:
        from benchmarks.torch_save_throughput import build

        env.cache["torch_model"] = build(env.args.params, "cpu", width=env.args.torch_width)
    return env.cache["torch_model"]


def torch_state(env: Env) -> dict:
    model, opt = torch_model(env)
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def keras_step(env: Env) -> Callable[[], None]:
    """One training step of the big Keras model (what follows a save in training)."""
    import numpy as np

    model = keras_model(env)
    x = np.random.default_rng(2).standard_normal((8, env.args.width), dtype="float32")
    return lambda: model.train_on_batch(x, x)


def torch_step(env: Env) -> Callable[[], None]:
    import torch

    model, opt = torch_model(env)
    width = model[0].in_features
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(2))

    def step() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    return step


def raw_buffer(env: Env) -> Any:
    """Random bytes as many as a ``.keras`` checkpoint of the Keras model, pages touched."""
    if "raw" not in env.cache:
        import numpy as np

        from benchmarks.save_throughput import Bench, ours_keras

        probe = os.path.join(env.root, "probe.keras")
        ours_keras(Bench(keras_model(env), memoryview(b""), state=b"{}"), probe)
        size = os.path.getsize(probe)
        os.unlink(probe)
        env.cache["raw"] = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    return env.cache["raw"]


def bench_of(env: Env) -> Any:
    """save_throughput's Bench: its row functions take it."""
    if "bench" not in env.cache:
        from benchmarks.save_throughput import Bench

        env.cache["bench"] = Bench(keras_model(env), memoryview(raw_buffer(env)),
                                   state=b'{"epoch": 1}')
    return env.cache["bench"]


def tf_checkpoint(env: Env, directory: str) -> Any:
    """``tf.train.CheckpointManager`` over a ``tf.train.Checkpoint`` of the Keras model's
    variables (weights and Adam's slots), keeping all (the harness deletes, as for every row)."""
    import tensorflow as tf

    model = keras_model(env)
    variables = [v.value for v in model.weights + model.optimizer.variables]
    return tf.train.CheckpointManager(tf.train.Checkpoint(variables=variables), directory,
                                      max_to_keep=None)


def model_checkpoint(env: Env) -> Any:
    """A ``tf.train.Checkpoint`` of the Keras model and its optimizer, as a TF2 custom loop has."""
    import tensorflow as tf

    model = keras_model(env)
    return tf.train.Checkpoint(model=model, optimizer=model.optimizer)


def prefix_files(prefix: str) -> list[str]:
    """The files of TF checkpoint ``prefix`` (``.index``, ``.data-*``)."""
    directory, base = os.path.split(prefix)
    return [os.path.join(directory, n) for n in os.listdir(directory) if n.startswith(base + ".")]


def keras_backend() -> str:
    import keras

    return keras.backend.backend()


# -- save and async ---------------------------------------------------------------------------


def save_rows(env: Env) -> list[Row]:
    import torch

    import keras_ckpt.torch
    from benchmarks import save_throughput as st
    from benchmarks.torch_save_throughput import fsynced

    bench = bench_of(env)
    root = os.path.join(env.root, "save")
    os.makedirs(root, exist_ok=True)

    def keras_row(fn: Callable, name: str, suffix: str, engine: bool) -> Callable:
        def run(i: int, settle: Callable[[], None]) -> dict:
            bench.epoch = i
            path = os.path.join(root, f"{name}-{i + 1:03d}{suffix}")
            settle()
            start = time.perf_counter()
            fn(bench, path)
            if not engine:
                _fsync(path)
            return {"s": time.perf_counter() - start, "bytes": os.path.getsize(path),
                    "files": [path]}

        return run

    model, opt = torch_model(env)
    state = torch_state(env)
    shim = keras_ckpt.torch.ModelCheckpoint(os.path.join(root, "shim", "ckpt-{epoch:03d}.pt"),
                                            model=model, optimizer=opt)
    with _quiet():
        shim.on_train_begin()

    def shim_save(i: int, settle: Callable[[], None]) -> dict:
        settle()
        start = time.perf_counter()
        shim.on_epoch_end(i)
        seconds = time.perf_counter() - start
        return {"s": seconds, "bytes": os.path.getsize(shim.latest_path),
                "files": [shim.latest_path]}

    def torch_save(i: int, settle: Callable[[], None]) -> dict:
        path = os.path.join(root, f"torch-{i}.pt")
        settle()
        start = time.perf_counter()
        fsynced(path, lambda f: torch.save(state, f))
        return {"s": time.perf_counter() - start, "bytes": os.path.getsize(path), "files": [path]}

    rows = [
        Row("raw", "raw write + fsync", keras_row(st.raw_write, "raw", ".bin", False)),
        Row("path", "raw bytes via keras_ckpt's output path + fsync",
            keras_row(st.raw_write_early, "path", ".bin", False)),
        Row("ck_keras", "keras_ckpt.ModelCheckpoint .keras (on_epoch_end)",
            keras_row(st.full_checkpoint_keras, "ck", ".keras", True)),
        Row("ck_h5", "keras_ckpt.ModelCheckpoint .weights.h5",
            keras_row(st.full_checkpoint_weights, "ck", ".weights.h5", True)),
        Row("ck_pt", "keras_ckpt.torch.ModelCheckpoint .pt", shim_save),
        Row("st_keras", "stock model.save .keras + fsync",
            keras_row(st.stock_keras, "stock", ".keras", False)),
        Row("st_h5", "stock model.save_weights .weights.h5 + fsync",
            keras_row(st.stock_weights, "stock", ".weights.h5", False)),
        Row("st_pt", "stock torch.save .pt + fsync", torch_save),
    ]
    if keras_backend() == "tensorflow":
        manager = tf_checkpoint(env, os.path.join(root, "tf"))

        def tf_save(i: int, settle: Callable[[], None]) -> dict:
            settle()
            start = time.perf_counter()
            paths = prefix_files(manager.save())
            for path in paths:
                _fsync(path)
            return {"s": time.perf_counter() - start, "bytes": files_bytes(*paths),
                    "files": paths}

        import keras_ckpt.tf

        ours = keras_ckpt.tf.CheckpointManager(model_checkpoint(env), os.path.join(root, "ck_tf"),
                                               max_to_keep=None)

        def ck_tf(i: int, settle: Callable[[], None]) -> dict:
            settle()
            start = time.perf_counter()
            prefix = ours.save()
            seconds = time.perf_counter() - start
            paths = prefix_files(prefix)
            return {"s": seconds, "bytes": files_bytes(*paths), "files": paths}

        rows.append(Row("st_tf", "stock tf.train.CheckpointManager.save + fsync", tf_save))
        rows.append(Row("ck_tf", _LABELS["ck_tf"], ck_tf))
    return rows


def _fsync(path: str) -> None:
    from keras_ckpt import storage

    storage.fsync_path(path)


def async_rows(env: Env) -> list[Row]:
    """The async stall rows (where the installed keras_ckpt has ``async_save``) and memcpy."""
    import numpy as np

    import keras_ckpt
    import keras_ckpt.torch

    available = async_available()
    src = raw_buffer(env)
    dst = np.empty_like(src)
    dst[:] = 0  # a reused, already-touched destination, as a snapshot's host buffers are

    def memcpy(i: int, settle: Callable[[], None]) -> dict:
        settle()
        start = time.perf_counter()
        np.copyto(dst, src)
        return {"s": time.perf_counter() - start, "bytes": src.nbytes}

    rows = [Row("memcpy", "one plain memcpy of the state's bytes", memcpy)]
    root = os.path.join(env.root, "async")
    if available["keras"]:
        cb = keras_ckpt.ModelCheckpoint(os.path.join(root, "h5", "ckpt-{epoch:03d}.weights.h5"),
                                        save_weights_only=True, monitor="loss", async_save=True)
        cb.set_model(keras_model(env))
        with _quiet():
            cb.on_train_begin()
        rows.append(Row("as_h5", "keras_ckpt .weights.h5, async_save=True",
                        _async_row(cb, keras_step(env), lambda i: cb.on_epoch_end(
                            i, {"loss": 1.0 / (i + 1)}))))
    if available["torch"]:
        model, opt = torch_model(env)
        shim = keras_ckpt.torch.ModelCheckpoint(os.path.join(root, "pt", "ckpt-{epoch:03d}.pt"),
                                                model=model, optimizer=opt, async_save=True)
        with _quiet():
            shim.on_train_begin()
        rows.append(Row("as_pt", "keras_ckpt.torch .pt, async_save=True",
                        _async_row(shim, torch_step(env), shim.on_epoch_end)))
    if available.get("tf"):
        import tensorflow as tf

        import keras_ckpt.tf

        manager = keras_ckpt.tf.CheckpointManager(model_checkpoint(env), os.path.join(root, "tf"),
                                                  max_to_keep=None, async_save=True)
        rows.append(Row("as_tf", "keras_ckpt.tf.CheckpointManager, async_save=True",
                        _async_row(manager, keras_step(env), lambda i: manager.save(),
                                   wait=manager.sync,
                                   files=lambda: prefix_files(manager.latest_checkpoint))))
        stock = tf_checkpoint(env, os.path.join(root, "tfopt"))
        options = tf.train.CheckpointOptions(experimental_enable_async_checkpoint=True)
        rows.append(Row("as_tfopt", _LABELS["as_tfopt"],
                        _async_row(stock, keras_step(env), lambda i: stock.save(options=options),
                                   wait=stock.checkpoint.sync,
                                   files=lambda: prefix_files(stock.latest_checkpoint))))
    return rows


def _async_row(
    ckpt: Any, step: Callable[[], None], save: Callable[[int], None],
    wait: Callable[[], None] | None = None, files: Callable[[], list[str]] | None = None,
) -> Callable:
    """A training step, the save (its stall), the next step, then the wait until it is durable.

    Durable means committed: ``latest_path`` reflects committed checkpoints only (DESIGN.md,
    "Async saving"), so the row polls it; the benchmark needs no private hook into the writer.
    Where the checkpointer has a public ``wait`` (the TF managers' ``sync``), the row calls it
    instead, and ``files`` lists the newest checkpoint's files (default: ``latest_path``).
    """

    def run(i: int, settle: Callable[[], None]) -> dict:
        before = ckpt.latest_path if wait is None else None
        settle()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        save(i)
        t2 = time.perf_counter()
        step()
        t3 = time.perf_counter()
        if wait is not None:
            wait()
        deadline = t3 + 120
        while wait is None and ckpt.latest_path == before and time.perf_counter() < deadline:
            time.sleep(0.001)
        if wait is None and ckpt.latest_path == before:
            raise RuntimeError("async save not committed after 120 s (latest_path unchanged)")
        t4 = time.perf_counter()
        paths = [ckpt.latest_path] if files is None else files()
        return {"s": t2 - t1, "base_step": t1 - t0, "next_step": t3 - t2, "durable": t4 - t1,
                "bytes": files_bytes(*paths), "files": paths}

    return run


def save_lines(r: dict[str, list[dict]], with_save: bool, with_async: bool) -> list[Line]:
    lines: list[Line] = []
    raw, path = throughput(r, "raw"), throughput(r, "path")
    targets = {"ck_keras": 0.75, "ck_h5": 0.90, "ck_pt": 0.90}
    if with_save:
        for key, label in (("raw", "raw write + fsync"),
                           ("path", "raw bytes via keras_ckpt's output path + fsync")):
            rate = throughput(r, key)
            lines.append(Line("save", label, _mb(r, key), med(r, key), _gbs(rate), rate / raw,
                              "x raw write"))
        for key in ("ck_keras", "ck_h5", "ck_pt", "ck_tf", "st_keras", "st_h5", "st_tf", "st_pt"):
            if key not in r:
                continue
            rate = throughput(r, key)
            label = _LABELS[key]
            lines.append(Line("save", label, _mb(r, key), med(r, key), _gbs(rate), rate / raw,
                              "x raw write"))
            line = Line("save", "  same", ratio=rate / path, ref="x own output path")
            if key in targets:
                line.target = f">= {targets[key]:.2f}"
                line.met = verdict(rate / path, targets[key])
            lines.append(line)
    if not with_async:
        return lines
    memcpy = med(r, "memcpy")
    lines.append(Line("async", "one plain memcpy of the state's bytes", _mb(r, "memcpy"), memcpy,
                      _gbs(throughput(r, "memcpy"))))
    for key, sync_key, label in (("as_h5", "ck_h5", "keras_ckpt .weights.h5 async stall"),
                                 ("as_pt", "ck_pt", "keras_ckpt.torch .pt async stall"),
                                 ("as_tf", "ck_tf", "keras_ckpt.tf.CheckpointManager async stall"),
                                 ("as_tfopt", "st_tf", _LABELS["as_tfopt"] + " stall")):
        if sync_key not in r:
            continue  # another backend than TensorFlow: no TF rows
        if key not in r:
            lines.append(Line("async", label, note=NA_ASYNC))
            continue
        stall, sync = med(r, key), med(r, sync_key)
        if key == "as_tfopt":  # an anchor: no target of ours
            lines.append(Line("async", label, _mb(r, key), stall, ratio=sync / stall,
                              ref="x stock sync save", note="shares the variables' memory (copy-on-write)"))
            lines.append(Line("async", "  same", ratio=memcpy / stall, ref="x memcpy"))
        else:
            lines.append(Line("async", label, _mb(r, key), stall, ratio=sync / stall,
                              ref="x sync save", target=">= 10.0 (t <= 0.10x)",
                              met=verdict(sync / stall, 10.0) if sync / stall >= 10.0
                              else verdict(memcpy / stall, 1 / 1.5)))
            lines.append(Line("async", "  same", ratio=memcpy / stall, ref="x memcpy",
                              target=">= 0.67 (t <= 1.5x)", met=verdict(memcpy / stall, 1 / 1.5),
                              note="either target"))
        base, after = med(r, key, "base_step"), med(r, key, "next_step")
        lines.append(Line("async", "  next training step", seconds=after, ratio=base / after,
                          ref="x a step", note=f"a step without a save: {base:.3f} s"))
        lines.append(Line("async", "  until durable", seconds=med(r, key, "durable"),
                          ratio=sync / med(r, key, "durable"), ref="x sync save",
                          note="stall + step + background write" + (
                              " (sync(): written, TF does not fsync)" if key == "as_tfopt"
                              else "")))
    return lines


_LABELS = {
    "ck_keras": "keras_ckpt.ModelCheckpoint .keras (on_epoch_end)",
    "ck_h5": "keras_ckpt.ModelCheckpoint .weights.h5",
    "ck_pt": "keras_ckpt.torch.ModelCheckpoint .pt",
    "st_keras": "stock model.save .keras + fsync",
    "st_h5": "stock model.save_weights .weights.h5 + fsync",
    "st_tf": "stock tf.train.CheckpointManager.save + fsync",
    "st_pt": "stock torch.save .pt + fsync",
    "ck_tf": "keras_ckpt.tf.CheckpointManager.save",
    "as_tfopt": "stock TF async (CheckpointOptions)",
}


def _mb(r: dict[str, list[dict]], key: str) -> float:
    return statistics.median(m["bytes"] for m in r[key]) / 1e6


def _gbs(rate: float) -> str:
    return f"{rate / 1e9:.2f} GB/s"


# -- resume -----------------------------------------------------------------------------------


def resume_rows(env: Env) -> list[Row]:
    import keras
    import numpy as np
    import torch

    import keras_ckpt
    import keras_ckpt.torch

    model = keras_model(env)
    tmodel, opt = torch_model(env)
    root = os.path.join(env.root, "resume")
    files: dict[str, str] = {}
    with _quiet():
        for suffix in (".keras", ".weights.h5"):
            cb = keras_ckpt.ModelCheckpoint(
                os.path.join(root, suffix.strip("."), "ckpt-{epoch:03d}" + suffix),
                save_weights_only=suffix == ".weights.h5", monitor="loss")
            cb.set_model(model)
            cb.on_train_begin()
            cb.on_epoch_end(0, {"loss": 1.0})
            cb.on_train_end()
            files[suffix] = cb.latest_path
        shim = keras_ckpt.torch.ModelCheckpoint(os.path.join(root, "pt", "ckpt-{epoch:03d}.pt"),
                                                model=tmodel, optimizer=opt)
        shim.on_train_begin()
        shim.on_epoch_end(0)
        shim.on_train_end()
        files[".pt"] = shim.latest_path
    stock = {s: os.path.join(root, "stock" + s) for s in (".keras", ".weights.h5", ".pt")}
    model.save(stock[".keras"])
    model.save_weights(stock[".weights.h5"])
    torch.save(torch_state(env), stock[".pt"])
    size = max(os.path.getsize(f) for f in files.values())
    buf = np.empty(size, dtype=np.uint8)
    buf[:] = 0  # touched once: raw reads land in warm memory
    # O_DIRECT needs a sector-aligned buffer; a mapping is page-aligned. Whole pieces: the
    # last read asks past the end and gets the file's tail.
    direct_buf = mmap.mmap(-1, -(-size // _DIRECT_PIECE) * _DIRECT_PIECE)
    direct_buf.write(b"\1" * len(direct_buf))

    def same_start(settle: Callable[[], None]) -> None:
        """What every resume row starts from, whatever ran before it: every file of the section
        on disk and out of the page cache, then ``settle()``, then a fixed amount of fresh
        memory touched and let go. This VM's host takes back guest pages left free for a few
        seconds, and refilling them costs a host page fault each: a cold read of 604 MB took
        1.01-1.18 s after 4 s idle, 0.28-0.78 s right after 700 MB were touched. So the free
        memory a row reads into is as warm for every row, not as warm as its predecessor left it."""
        drop_pages(root)
        settle()
        warm = np.ones(_WARM_BYTES, dtype=np.uint8)
        del warm

    def raw_read(suffix: str) -> Callable:
        def run(i: int, settle: Callable[[], None]) -> dict:
            path = files[suffix]
            same_start(settle)
            start = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                view, n = memoryview(buf), 0
                while chunk := f.readinto(view[n:]):
                    n += chunk
            return {"s": time.perf_counter() - start, "bytes": n}

        return run

    def direct_read(suffix: str) -> Callable:
        def run(i: int, settle: Callable[[], None]) -> dict:
            path = files[suffix]
            same_start(settle)
            start = time.perf_counter()
            n = _read_direct(path, memoryview(direct_buf))
            return {"s": time.perf_counter() - start, "bytes": n}

        return run

    def ours_keras(suffix: str) -> Callable:
        def run(i: int, settle: Callable[[], None]) -> dict:
            template = os.path.join(root, suffix.strip("."), "ckpt-{epoch:03d}" + suffix)
            cb = keras_ckpt.ModelCheckpoint(template, save_weights_only=suffix == ".weights.h5",
                                            monitor="loss", resume=True)
            cb.set_model(model)
            same_start(settle)
            start = time.perf_counter()
            cb.on_train_begin()
            seconds = time.perf_counter() - start
            cb.on_train_end()
            assert cb.restored_path == files[suffix], cb.restored_path
            return {"s": seconds, "bytes": os.path.getsize(files[suffix])}

        return run

    def ours_torch(i: int, settle: Callable[[], None]) -> dict:
        ckpt = keras_ckpt.torch.ModelCheckpoint(
            os.path.join(root, "pt", "ckpt-{epoch:03d}.pt"), model=tmodel, optimizer=opt,
            resume=True)
        same_start(settle)
        start = time.perf_counter()
        ckpt.on_train_begin()
        seconds = time.perf_counter() - start
        ckpt.on_train_end()
        assert ckpt.restored_path == files[".pt"], ckpt.restored_path
        return {"s": seconds, "bytes": os.path.getsize(files[".pt"])}

    def stock_row(paths: list[str], load: Callable[[], Any]) -> Callable:
        def run(i: int, settle: Callable[[], None]) -> dict:
            same_start(settle)
            start = time.perf_counter()
            load()
            return {"s": time.perf_counter() - start, "bytes": files_bytes(*paths)}

        return run

    def torch_load() -> None:
        state = torch.load(stock[".pt"], map_location="cpu", weights_only=True)
        tmodel.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])

    rows = [
        Row("raw_keras", "raw cold read of the .keras file", raw_read(".keras"), pause=False),
        Row("dio_keras", "raw O_DIRECT read of the .keras file", direct_read(".keras"),
            pause=False),
        Row("ck_keras", "keras_ckpt resume .keras", ours_keras(".keras"), pause=False),
        Row("raw_h5", "raw cold read of the .weights.h5 file", raw_read(".weights.h5"),
            pause=False),
        Row("dio_h5", "raw O_DIRECT read of the .weights.h5 file", direct_read(".weights.h5"),
            pause=False),
        Row("ck_h5", "keras_ckpt resume .weights.h5", ours_keras(".weights.h5"), pause=False),
        Row("raw_pt", "raw cold read of the .pt file", raw_read(".pt"), pause=False),
        Row("dio_pt", "raw O_DIRECT read of the .pt file", direct_read(".pt"), pause=False),
        Row("ck_pt", "keras_ckpt.torch resume .pt", ours_torch, pause=False),
        Row("st_keras", "stock keras.saving.load_model .keras",
            stock_row([stock[".keras"]], lambda: keras.saving.load_model(stock[".keras"])),
            pause=False),
        Row("st_h5", "stock model.load_weights .weights.h5",
            stock_row([stock[".weights.h5"]], lambda: model.load_weights(stock[".weights.h5"])),
            pause=False),
        Row("st_pt", "stock torch.load + load_state_dict .pt",
            stock_row([stock[".pt"]], torch_load), pause=False),
    ]
    if keras_backend() == "tensorflow":
        manager = tf_checkpoint(env, os.path.join(root, "tf"))
        prefix = manager.save()
        tf_files = [os.path.join(root, "tf", n) for n in os.listdir(os.path.join(root, "tf"))
                    if os.path.join(root, "tf", n).startswith(prefix + ".")]
        rows.append(Row("st_tf", "stock tf.train.CheckpointManager restore",
                        stock_row(tf_files, lambda: manager.checkpoint.restore(
                            manager.latest_checkpoint).assert_consumed()), pause=False))
    return rows


_WARM_BYTES = 700 << 20  # more than one checkpoint: every row reads into pages touched just now
_DIRECT_PIECE = 16 << 20


def _read_direct(path: str, buf: memoryview) -> int:
    """Read ``path`` with ``O_DIRECT`` (no page cache) into the aligned ``buf``; bytes read.

    Where the filesystem refuses ``O_DIRECT`` (tmpfs: EINVAL) it is a plain read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        fd = os.open(path, os.O_RDONLY)
    try:
        n = 0
        while got := os.preadv(fd, [buf[n : n + _DIRECT_PIECE]], n):
            n += got
        return n
    finally:
        os.close(fd)


def paired_ratio(r: dict[str, list[dict]], key: str, ref: str) -> float:
    """Median over rounds of the row's throughput over ``ref``'s in the same round: a round
    where the disk or the host is slow is slow for both, so the ratio keeps what the row does."""
    return statistics.median(
        (m["bytes"] / m["s"]) / (n["bytes"] / n["s"]) for m, n in zip(r[key], r[ref]))


def resume_lines(r: dict[str, list[dict]]) -> list[Line]:
    lines: list[Line] = []
    for fmt, raw_key, direct, ours, stocks in (
        (".keras", "raw_keras", "dio_keras", "ck_keras", ("st_keras",)),
        (".weights.h5", "raw_h5", "dio_h5", "ck_h5", ("st_h5", "st_tf")),
        (".pt", "raw_pt", "dio_pt", "ck_pt", ("st_pt",)),
    ):
        raw = throughput(r, raw_key)
        of = f"x raw read {fmt}"
        lines.append(Line("resume", f"raw cold read of the {fmt} file", _mb(r, raw_key),
                          med(r, raw_key), _gbs(raw), 1.0, of))
        lines.append(Line("resume", f"  raw O_DIRECT read of the {fmt} file", _mb(r, direct),
                          med(r, direct), _gbs(throughput(r, direct)),
                          paired_ratio(r, direct, raw_key), of, note="no page cache"))
        label = {"ck_pt": "keras_ckpt.torch resume .pt (on_train_begin)"}.get(
            ours, f"keras_ckpt resume {fmt} (on_train_begin)")
        ratio = paired_ratio(r, ours, raw_key)
        lines.append(Line("resume", label, _mb(r, ours), med(r, ours), _gbs(throughput(r, ours)),
                          ratio, of, ">= 0.80", verdict(ratio, 0.80)))
        for key in stocks:
            if key not in r:
                continue
            lines.append(Line("resume", _RESUME_LABELS[key], _mb(r, key), med(r, key),
                              _gbs(throughput(r, key)), paired_ratio(r, key, raw_key), of))
    return lines


_RESUME_LABELS = {
    "st_keras": "stock keras.saving.load_model .keras",
    "st_h5": "stock model.load_weights .weights.h5",
    "st_tf": "stock tf.train.Checkpoint restore (CheckpointManager)",
    "st_pt": "stock torch.load + load_state_dict .pt",
}


# -- overhead on steps that do not save -------------------------------------------------------


def overhead_rows(env: Env) -> list[Row]:
    """Two measures of what keras_ckpt costs a step that does not save.

    *Fit steps*: a round's step time = its fastest block of ``--steps`` / 20 steps, per step. A
    block runs from one batch begin to the one a block later, so the saves at epoch end and
    fit's setup are outside every block; the fastest block is the one other processes disturbed
    least. The Keras rows all carry the same timer, a batch-begin hook: Keras dispatches batch
    ends asynchronously where it can, batch begins never, so the timer changes nothing the
    checkpoint callbacks would. A second no-callback row (A/A) shows the noise a ratio of two
    fits carries on this machine.

    *Hooks*: what the callback adds to each step, measured directly: the batch-begin and
    batch-end calls of the CallbackList that ``fit`` builds (History included), with and
    without the callback, in alternating blocks; the torch shim's ``on_train_batch_end`` beside
    an empty call. Differences of a microsecond, which no ratio of two fits can resolve.
    """
    import keras
    import numpy as np
    import torch

    import keras_ckpt
    import keras_ckpt.torch

    steps, batch = env.args.steps, 32
    block = max(1, steps // 20)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((steps * batch, 64), dtype="float32")
    y = rng.standard_normal((steps * batch, 8), dtype="float32")
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(256, activation="relu"), keras.layers.Dense(8)])
    model.compile(optimizer="adam", loss="mse")
    root = os.path.join(env.root, "overhead")

    class BlockTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.stamps: list[float] = []

        def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            if batch % block == 0:
                self.stamps.append(time.perf_counter())

    def fit(make: Callable[[str], Any] | None) -> Callable:
        def run(i: int, settle: Callable[[], None]) -> dict:
            directory = os.path.join(root, f"r{i}")
            timer = BlockTimer()
            callbacks = [timer]
            if make is not None:
                callbacks.append(make(os.path.join(directory, "ckpt-{epoch:03d}.keras")))
            settle()
            model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0,
                      callbacks=callbacks)
            return {"s": _per_step(timer.stamps, block), "bytes": 0, "files": [directory]}

        return run

    def keras_hooks(i: int, settle: Callable[[], None]) -> dict:
        directory = os.path.join(root, f"h{i}")
        ours = keras_ckpt.ModelCheckpoint(os.path.join(directory, "ckpt-{epoch:03d}.keras"))
        lists = {}
        for key, callbacks in (("none", []), ("ours", [ours])):
            # As fit builds it (verbose=0: no progress bar).
            lists[key] = keras.callbacks.CallbackList(
                callbacks, add_history=True, add_progbar=False, verbose=0, epochs=1,
                steps=steps, model=model)
            lists[key].on_train_begin()
            lists[key].on_epoch_begin(0)
        logs = {"loss": 0.5}
        per: dict[str, list[float]] = {"none": [], "ours": []}
        settle()
        for _ in range(_HOOK_BLOCKS):
            for key, callbacks in lists.items():
                start = time.perf_counter()
                for b in range(steps):
                    callbacks.on_train_batch_begin(b)
                    callbacks.on_train_batch_end(b, logs)
                per[key].append((time.perf_counter() - start) / steps)
        asynchronous = lists["ours"]._async_train  # whether Keras hands batch ends to a thread
        for callbacks in lists.values():
            callbacks.on_train_end()
        return {"s": min(per["ours"]) - min(per["none"]), "bytes": 0, "files": [directory],
                "async": asynchronous}

    tmodel = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                 torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                 torch.nn.Linear(256, 8))
    topt = torch.optim.Adam(tmodel.parameters())
    tx, ty = torch.from_numpy(x[:batch]), torch.from_numpy(y[:batch])

    def loop(with_shim: bool) -> Callable:
        def run(i: int, settle: Callable[[], None]) -> dict:
            directory = os.path.join(root, f"t{i}")
            shim = None
            if with_shim:
                shim = keras_ckpt.torch.ModelCheckpoint(
                    os.path.join(directory, "ckpt-{epoch:03d}.pt"), model=tmodel, optimizer=topt)
                shim.on_train_begin()
            stamps = []
            # One thread: a small model's step on two threads spends most of its time in their
            # hand-offs, and that time swings tenfold with the load other processes put on them.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            settle()
            for b in range(steps):
                if b % block == 0:
                    stamps.append(time.perf_counter())
                topt.zero_grad()
                torch.nn.functional.mse_loss(tmodel(tx), ty).backward()
                topt.step()
                if shim is not None:
                    shim.on_train_batch_end(b)
            stamps.append(time.perf_counter())
            torch.set_num_threads(threads)
            if shim is not None:
                shim.on_train_end()
            return {"s": _per_step(stamps, block), "bytes": 0, "files": [directory]}

        return run

    def torch_hooks(i: int, settle: Callable[[], None]) -> dict:
        directory = os.path.join(root, f"th{i}")
        shim = keras_ckpt.torch.ModelCheckpoint(os.path.join(directory, "ckpt-{epoch:03d}.pt"),
                                                model=tmodel, optimizer=topt)
        shim.on_train_begin()

        def empty(batch: int) -> None:
            pass

        per: dict[str, list[float]] = {"empty": [], "shim": []}
        settle()
        for _ in range(_HOOK_BLOCKS):
            for key, hook in (("empty", empty), ("shim", shim.on_train_batch_end)):
                start = time.perf_counter()
                for b in range(steps):
                    hook(b)
                per[key].append((time.perf_counter() - start) / steps)
        shim.on_train_end()
        return {"s": min(per["shim"]) - min(per["empty"]), "bytes": 0, "files": [directory]}

    return [
        Row("k_none", _OVERHEAD_LABELS["k_none"], fit(None), pause=False),
        Row("k_none2", _OVERHEAD_LABELS["k_none2"], fit(None), pause=False),
        Row("k_ours", _OVERHEAD_LABELS["k_ours"], fit(keras_ckpt.ModelCheckpoint), pause=False),
        Row("k_stock", _OVERHEAD_LABELS["k_stock"], fit(keras.callbacks.ModelCheckpoint),
            pause=False),
        Row("k_hooks", _OVERHEAD_LABELS["k_hooks"], keras_hooks, pause=False),
        Row("t_none", _OVERHEAD_LABELS["t_none"], loop(False), pause=False),
        Row("t_ours", _OVERHEAD_LABELS["t_ours"], loop(True), pause=False),
        Row("t_hooks", _OVERHEAD_LABELS["t_hooks"], torch_hooks, pause=False),
    ]


_OVERHEAD_ROUNDS = 3  # times --rounds
_HOOK_BLOCKS = 20  # alternating blocks of --steps hook calls per round; the fastest of each


def _per_step(stamps: list[float], block: int) -> float:
    return min(b - a for a, b in zip(stamps, stamps[1:])) / block


def overhead_lines(r: dict[str, list[dict]]) -> list[Line]:
    lines = []
    for key, base in (("k_none", None), ("k_none2", "k_none"), ("k_ours", "k_none"),
                      ("k_stock", "k_none"), ("k_hooks", "k_none"),
                      ("t_none", None), ("t_ours", "t_none"), ("t_hooks", "t_none")):
        s = med(r, key)
        line = Line("overhead", _OVERHEAD_LABELS[key], seconds=s, rate=f"{s * 1e3:.3f} ms/step")
        if base is not None:
            line.ratio, line.ref = med(r, base) / s, "x no callback"
        if key.endswith("hooks"):
            # A cost added to the step: the ratio is the step's over the step plus it.
            step = med(r, base)
            line.seconds, line.rate = None, f"{s * 1e6:.2f} us/step"
            line.ratio = step / (step + s)
            line.target, line.met = ">= 0.99 (< 1%)", verdict(line.ratio, 0.99)
            line.note = f"{100 * s / step:.3f}% of the step"
            if key == "k_hooks":
                dispatch = "a thread" if r[key][0]["async"] else "the training thread"
                line.note += f"; Keras calls batch ends on {dispatch}"
        lines.append(line)
    return lines


_OVERHEAD_LABELS = {
    "k_none": "Keras fit step, no callback",
    "k_none2": "  the same again (A/A: the noise of a fit ratio)",
    "k_ours": "Keras fit step + keras_ckpt.ModelCheckpoint",
    "k_stock": "Keras fit step + keras.callbacks.ModelCheckpoint",
    "k_hooks": "  keras_ckpt's batch hooks via fit's CallbackList",
    "t_none": "torch step, bare loop",
    "t_ours": "torch step + shim on_train_batch_end",
    "t_hooks": "  the shim's on_train_batch_end itself",
}


# -- disk bytes -------------------------------------------------------------------------------

# val_loss per epoch: the best (epoch 2) is not the latest, so latest-1 ∪ best-1 is two files.
_VAL_LOSS = (0.5, 0.3, 0.4, 0.45, 0.6)


def disk_lines(env: Env) -> list[Line]:
    import keras_ckpt
    import keras_ckpt.torch

    lines = []
    root = os.path.join(env.root, "disk")
    model, opt = torch_model(env)
    for fmt, make in (
        (".keras", lambda d: keras_ckpt.ModelCheckpoint(
            os.path.join(d, "ckpt-{epoch:03d}.keras"), monitor="val_loss", max_to_keep=1,
            keep_best=1)),
        (".pt", lambda d: keras_ckpt.torch.ModelCheckpoint(
            os.path.join(d, "ckpt-{epoch:03d}.pt"), monitor="val_loss", max_to_keep=1,
            keep_best=1, model=model, optimizer=opt)),
    ):
        directory = os.path.join(root, fmt.strip("."))
        ckpt = make(directory)
        with _quiet():
            if fmt == ".keras":
                ckpt.set_model(keras_model(env))
            ckpt.on_train_begin()
            for epoch, loss in enumerate(_VAL_LOSS):
                ckpt.on_epoch_end(epoch, {"val_loss": loss})
            ckpt.on_train_end()
        one = os.path.getsize(ckpt.latest_path)
        total = files_bytes(directory)
        kept = len(ckpt.checkpoints)
        lines.append(Line("disk", f"latest-1 + best-1 {fmt}, {len(_VAL_LOSS)} epochs",
                          total / 1e6, rate=f"{kept} kept", ratio=total / one,
                          ref="x one ckpt (size)", note="all files incl. manifest"))
        remove(directory)
    return lines


# -- the table --------------------------------------------------------------------------------


def machine(args: argparse.Namespace, root: str, argv: list[str]) -> list[str]:
    import keras

    versions = [f"keras {keras.__version__} ({keras.backend.backend()})"]
    for name in ("tensorflow", "torch", "numpy", "h5py"):
        with contextlib.suppress(ImportError):
            versions.append(f"{name} {__import__(name).__version__}")
    import keras_ckpt

    mount = _mount_of(root)
    return [
        f"command: python -m benchmarks {' '.join(argv)}".rstrip(),
        f"machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, {_mem_gib()} GiB RAM, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at start",
        "versions: " + ", ".join(versions) + f", keras_ckpt {keras_ckpt.__version__}",
        f"filesystem: {mount} (writing in {root})",
    ]


def _mount_of(path: str) -> str:
    path = os.path.realpath(path)
    best = ("?", "", "?", "?")
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            dev, point, fstype, opts = line.split()[:4]
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(
                best[1]
            ):
                best = (dev, point, fstype, opts)
    return f"{best[2]} on {best[1] or '?'} ({best[0]}, {best[3]})"


def _mem_gib() -> str:
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        return f"{int(f.readline().split()[1]) / 2**20:.0f}"
    return "?"


def render(lines: list[Line]) -> str:
    head = (f"{'section':8} {'row':52} {'MB':>7} {'median s':>9} {'figure':>16} {'ratio':>6}  "
            f"{'of':19} {'target':20} {'met':4} note")
    out = [head, "-" * len(head)]
    for ln in lines:
        out.append(
            f"{ln.section:8} {ln.label:52} {'' if ln.mb is None else f'{ln.mb:.1f}':>7} "
            f"{'' if ln.seconds is None else f'{ln.seconds:.3f}':>9} {ln.rate:>16} "
            f"{'' if ln.ratio is None else f'{ln.ratio:.2f}':>6}  {ln.ref:19} {ln.target:20} "
            f"{ln.met:4} {ln.note}".rstrip()
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="a small model and 2 rounds, no pause: a smoke test, not figures")
    parser.add_argument("--only", choices=SECTIONS, help="run one section")
    parser.add_argument("--pause", type=float, default=None,
                        help="idle seconds before each timed save (default 3; 0 with --quick)")
    parser.add_argument("--params", type=float, default=None, help="model parameters (~50e6)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (2 if quick else 5)
    args.pause = (0.0 if quick else 3.0) if args.pause is None else args.pause
    args.params = args.params or (1e6 if quick else 50e6)
    args.width = 512 if quick else 2048
    args.torch_width = 256 if quick else 4096
    args.steps = 200 if quick else 1000
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1; received {args.rounds}")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sections = [args.only] if args.only else list(SECTIONS)

    root = tempfile.mkdtemp(prefix="keras_ckpt-bench-", dir=args.dir)
    env = Env(args, root)
    lines: list[Line] = []
    started = time.perf_counter()
    took: list[str] = []

    def done(name: str, since: list[float]) -> None:
        now = time.perf_counter()
        took.append(f"{name} {now - since[0]:.0f} s")
        print(f"{name}: done, {now - since[0]:.0f} s", file=sys.stderr, flush=True)
        since[0] = now

    since = [started]
    try:
        header = machine(args, root, argv)
        if "save" in sections or "async" in sections:
            rows = save_rows(env)
            if "async" in sections:
                rows += async_rows(env)
            r = run_rounds(env, rows, args.rounds)
            lines += save_lines(r, "save" in sections, "async" in sections)
            done("save+async" if "async" in sections else "save", since)
        if "resume" in sections:
            lines += resume_lines(run_rounds(env, resume_rows(env), args.rounds, shuffle=9))
            done("resume", since)
        if "overhead" in sections:
            # Two groups: TF's threads spin for a while after a Keras step, which would slow
            # whichever torch row came right after a Keras one.
            rows = overhead_rows(env)
            rounds = args.rounds * _OVERHEAD_ROUNDS  # short rows: more rounds to beat the noise
            r = run_rounds(env, [x for x in rows if x.key.startswith("k_")], rounds)
            r.update(run_rounds(env, [x for x in rows if x.key.startswith("t_")], rounds))
            lines += overhead_lines(r)
            done("overhead", since)
        if "disk" in sections:
            lines += disk_lines(env)
            done("disk", since)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    keras_m = env.cache.get("keras_model")
    sizes = ""
    if keras_m is not None:
        n = sum(int(v.numpy().size) if hasattr(v, "numpy") else 0 for v in keras_m.weights)
        sizes = f"{n / 1e6:.1f}M params + Adam"
    print("\n".join(f"# {h}" for h in header))
    print(f"# {sizes or 'model'}; {args.rounds} interleaved rounds after a warm-up round "
          f"(overhead: {args.rounds * _OVERHEAD_ROUNDS}), medians; "
          f"{args.pause:g} s idle before each timed save")
    print(f"# took {time.perf_counter() - started:.0f} s ({', '.join(took)}); load average at end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("# ratio: a throughput ratio, the row's bytes/s (steps/s) over the reference's in "
          "'of' (higher is better;\n#   for equal bytes, the reference's time over the row's); "
          "disk rows: bytes over one checkpoint's.")
    print(render(lines))
    return 0
