"""How long a save stops training, with ``async_save=True`` and without, beside one plain memcpy.

    python benchmarks/async_stall.py [--rounds 5] [--params 50e6] [--frameworks keras,torch]

For a ~50M-parameter model with Adam (~600 MB of state) and each front-end (the Keras callback
on the current backend, the torch shim), each round times, interleaved:

- ``memcpy``: one ``np.copyto`` of the state's bytes into a buffer allocated before (no page
  faults), the cost any snapshot that copies every byte pays at least;
- ``sync save``: ``on_epoch_end`` with ``async_save=False`` (returns once committed);
- ``async stall``: ``on_epoch_end`` with ``async_save=True`` (returns once the snapshot is taken;
  the snapshot buffers were allocated by an untimed warm-up save, as in training);
- ``next step (async)``: the training step right after the async save returned, while the writer
  runs; ``step``: a training step with no writer running, timed after the commit.

Medians over the rounds; the target (DESIGN.md "Async saving"): the stall <= 0.10x the
synchronous save, or <= 1.5x one memcpy (a snapshot that copies every byte is judged against the
copy). :func:`measure` returns the rows for a harness that prints its own table.
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
from collections.abc import Callable
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

WIDTH = 2048


def _timed(fn: Callable[..., Any], *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


class _Subject:
    """One front-end under test: its model, a training step, and a sync and an async callback."""

    name: str
    nbytes: int

    def step(self) -> None:
        raise NotImplementedError

    def save(self, ckpt: Any, epoch: int) -> None:
        raise NotImplementedError

    def arrays(self) -> list[Any]:
        raise NotImplementedError


class _Keras(_Subject):
    def __init__(self, params: float, directory: str) -> None:
        import keras
        import numpy as np

        import keras_ckpt

        self.name = f"keras ({keras.backend.backend()})"
        layers = max(1, round(params / (WIDTH * WIDTH + WIDTH)))
        self.model = keras.Sequential(
            [keras.Input((WIDTH,))] + [keras.layers.Dense(WIDTH) for _ in range(layers)]
        )
        self.model.compile(optimizer="adam", loss="mse")
        self.x = np.random.default_rng(0).normal(size=(8, WIDTH)).astype("float32")
        self.step()  # builds the optimizer's slots
        self.ckpts = {}
        for mode in (False, True):
            ckpt = keras_ckpt.ModelCheckpoint(
                os.path.join(directory, f"keras-{mode}", "c-{epoch}.weights.h5"),
                save_weights_only=True, max_to_keep=1, async_save=mode, save_on_preemption=False,
            )
            ckpt.set_model(self.model)
            ckpt.on_train_begin()
            self.ckpts[mode] = ckpt
        self.nbytes = sum(a.nbytes for a in self.arrays())

    def step(self) -> None:
        self.model.train_on_batch(self.x, self.x)

    def save(self, ckpt: Any, epoch: int) -> None:
        ckpt.on_epoch_end(epoch, logs={"loss": 1.0})

    def arrays(self) -> list[Any]:
        import numpy as np

        return [np.asarray(v) for v in [*self.model.weights, *self.model.optimizer.variables]]

    def close(self) -> None:
        for ckpt in self.ckpts.values():
            ckpt.on_train_end()


class _Torch(_Subject):
    def __init__(self, params: float, directory: str) -> None:
        import torch

        from keras_ckpt.torch import ModelCheckpoint

        self.name = "torch shim"
        layers = max(1, round(params / (WIDTH * WIDTH + WIDTH)))
        self.model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
        self.opt = torch.optim.Adam(self.model.parameters())
        self.x = torch.randn(8, WIDTH)
        self.step()
        self.ckpts = {}
        for mode in (False, True):
            ckpt = ModelCheckpoint(
                os.path.join(directory, f"torch-{mode}", "c-{epoch}.pt"), model=self.model,
                optimizer=self.opt, max_to_keep=1, async_save=mode, save_on_preemption=False,
            )
            ckpt.on_train_begin()
            self.ckpts[mode] = ckpt
        self.nbytes = sum(a.nbytes for a in self.arrays())

    def step(self) -> None:
        self.opt.zero_grad()
        ((self.model(self.x) - self.x) ** 2).mean().backward()
        self.opt.step()

    def save(self, ckpt: Any, epoch: int) -> None:
        ckpt.on_epoch_end(epoch, logs={"loss": 1.0})

    def arrays(self) -> list[Any]:
        tensors = list(self.model.state_dict().values())
        for state in self.opt.state.values():
            tensors += [t for t in state.values() if hasattr(t, "numpy")]
        return [t.detach().numpy() for t in tensors]

    def close(self) -> None:
        for ckpt in self.ckpts.values():
            ckpt.on_train_end()


def _measure_one(subject: _Subject, rounds: int) -> list[dict]:
    import numpy as np

    sources = [a.reshape(-1).view(np.uint8) for a in subject.arrays()]
    copies = [np.empty_like(s) for s in sources]
    for s, c in zip(sources, copies):  # page faults now, not in the timing
        np.copyto(c, s)

    def memcpy() -> None:
        for s, c in zip(sources, copies):
            np.copyto(c, s)

    sync, background = subject.ckpts[False], subject.ckpts[True]
    epoch = 0
    subject.save(background, epoch)  # allocates the snapshot buffers (a first save's cost)
    background._core.wait()
    times: dict[str, list[float]] = {k: [] for k in
                                     ("memcpy", "sync", "async", "next step", "step")}
    for _ in range(rounds):
        epoch += 1
        times["memcpy"].append(_timed(memcpy))
        subject.step()
        times["sync"].append(_timed(subject.save, sync, epoch))
        subject.step()
        times["async"].append(_timed(subject.save, background, epoch))
        times["next step"].append(_timed(subject.step))
        background._core.wait()  # untimed: the commit in the background
        times["step"].append(_timed(subject.step))
        gc.collect()
    med = {k: statistics.median(v) for k, v in times.items()}
    mb = subject.nbytes / 1e6
    stall = med["async"]
    ok = stall <= 0.10 * med["sync"] or stall <= 1.5 * med["memcpy"]
    name = subject.name
    return [
        {"row": f"{name}: memcpy of the state ({mb:.0f} MB)", "seconds_median": med["memcpy"]},
        {"row": f"{name}: sync save (on_epoch_end)", "seconds_median": med["sync"]},
        {"row": f"{name}: async stall (on_epoch_end)", "seconds_median": stall,
         "x_sync": stall / med["sync"], "x_memcpy": stall / med["memcpy"],
         "target": "<= 0.10x sync or <= 1.5x memcpy", "ok": ok},
        {"row": f"{name}: training step, no save", "seconds_median": med["step"]},
        {"row": f"{name}: next step after async save", "seconds_median": med["next step"],
         "x_step": med["next step"] / med["step"]},
    ]


def measure(rounds: int = 5, params: float = 50e6,
            frameworks: tuple[str, ...] = ("keras", "torch")) -> list[dict]:
    """The rows (``row``, ``seconds_median`` and ratios), medians of ``rounds`` interleaved rounds."""
    rows: list[dict] = []
    directory = tempfile.mkdtemp(prefix="async-stall-", dir=os.environ.get("BENCH_DIR"))
    try:
        for framework in frameworks:
            subject = {"keras": _Keras, "torch": _Torch}[framework](params, directory)
            try:
                rows += _measure_one(subject, rounds)
            finally:
                subject.close()
            del subject
            gc.collect()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--params", type=float, default=50e6)
    parser.add_argument("--frameworks", default="keras,torch")
    args = parser.parse_args()
    rows = measure(args.rounds, args.params, tuple(args.frameworks.split(",")))
    for r in rows:
        ratios = "  ".join(f"{k} {r[k]:.2f}" for k in ("x_sync", "x_memcpy", "x_step") if k in r)
        target = f"  target {r['target']}: {'ok' if r['ok'] else 'MISSED'}" if "target" in r else ""
        print(f"{r['row']:<52} {r['seconds_median'] * 1000:8.1f} ms  {ratios}{target}")


if __name__ == "__main__":
    main()
