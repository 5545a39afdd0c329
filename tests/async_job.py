"""Training jobs with ``async_save=True`` that tests/test_async_save.py kills or lets exit.

    python tests/async_job.py kill-torch DIR       two epochs; the second epoch's save is held in
                                                   flight (prints "IN FLIGHT"), the test kills -9
    python tests/async_job.py exit-after-fit DIR   Keras fit, then os._exit(0) the moment fit returns
    python tests/async_job.py exit-after-end DIR   the torch shim, os._exit(0) after on_train_end
    python tests/async_job.py fit-raises DIR       fit raises while epoch 1's save is in flight
    python tests/async_job.py preempt-torch DIR    SIGTERM while a batch-end save is in flight
    python tests/async_job.py kill-tf DIR          keras_ckpt.tf.CheckpointManager: the second
                                                   save held in flight, the test kills -9
    python tests/async_job.py tf-exit DIR          the TF2 manager: save, then the script ends
    python tests/async_job.py tf-close DIR         the TF2 manager: save, close(), os._exit(0)
    python tests/async_job.py term-at-end-keras DIR   SIGTERM while on_train_end waits for the
    python tests/async_job.py term-at-end-torch DIR   last epoch's save (prints "SURVIVED" if the
                                                      process outlives it)
    python tests/async_job.py exit-in-flight DIR   the torch shim's script ends (no on_train_end)
                                                   right after an epoch's save was submitted

A save is held in flight by holding ``keras_ckpt.storage.directory_lock`` (the lock the writer
takes to commit the manifest) on the training thread: the writer streams and fsyncs the file,
then waits for it, deterministically. The jobs print what they observed as lines of JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time


def _say(**report) -> None:
    print(json.dumps(report), flush=True)


def _torch_setup(directory: str, width: int, inputs: int = 32, name: str = "ckpt-{epoch}.pt",
                 depth: int = 0, **kwargs):
    import torch

    from keras_ckpt.torch import ModelCheckpoint

    torch.manual_seed(0)
    hidden = [torch.nn.Linear(width, width) for _ in range(depth)]
    model = torch.nn.Sequential(torch.nn.Linear(inputs, width), torch.nn.ReLU(), *hidden,
                                torch.nn.Linear(width, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ckpt = ModelCheckpoint(os.path.join(directory, name), model=model, optimizer=opt,
                           monitor="loss", async_save=True, **kwargs)
    x, y = torch.randn(64, inputs), torch.randint(0, 2, (64,))

    def step() -> float:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return ckpt, step


def kill_torch(directory: str) -> None:
    from keras_ckpt import storage

    ckpt, step = _torch_setup(directory, width=4096)
    ckpt.on_train_begin()
    ckpt.on_epoch_end(0, logs={"loss": step()})
    while not ckpt.checkpoints:  # epoch 1's save commits in the background
        time.sleep(0.01)
    loss = step()
    with storage.directory_lock(directory):
        ckpt.on_epoch_end(1, logs={"loss": loss})
        _say(event="IN FLIGHT", committed=[r.name for r in ckpt.checkpoints])
        time.sleep(600)  # killed here


def exit_after_fit(directory: str) -> None:
    import keras
    import numpy as np

    import keras_ckpt

    keras.utils.set_random_seed(0)
    # ~50 MB per file: far longer to write and fsync than the instant from fit's end to exit.
    model = keras.Sequential([keras.Input((2048,)), keras.layers.Dense(2048), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(size=(32, 2048)).astype("float32")
    ckpt = keras_ckpt.ModelCheckpoint(os.path.join(directory, "ckpt-{epoch}.keras"),
                                      monitor="loss", async_save=True)
    model.fit(x, x[:, :2], epochs=2, batch_size=16, verbose=0, callbacks=[ckpt])
    _say(event="FIT RETURNED", committed=[r.name for r in ckpt.checkpoints])
    os._exit(0)  # no thread joins, no atexit: only what fit waited for is committed


def exit_after_end(directory: str) -> None:
    # ~100 MB per file: far longer to write and fsync than the instant from on_train_end to exit.
    ckpt, step = _torch_setup(directory, width=4096, inputs=2048)
    ckpt.on_train_begin()
    for epoch in range(2):
        ckpt.on_epoch_end(epoch, logs={"loss": step()})
    ckpt.on_train_end()
    _say(event="TRAIN END", committed=[r.name for r in ckpt.checkpoints])
    os._exit(0)


def fit_raises(directory: str) -> None:
    import keras
    import numpy as np

    import keras_ckpt
    from keras_ckpt import storage

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    ckpt = keras_ckpt.ModelCheckpoint(os.path.join(directory, "ckpt-{epoch}.keras"),
                                      monitor="loss", async_save=True)

    class Boom(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                _say(event="RAISING", committed=[r.name for r in ckpt.checkpoints])
                raise RuntimeError("boom")

    # Held until fit raises: epoch 1's save cannot commit before that.
    with storage.directory_lock(directory):
        model.fit(x, x[:, :2], epochs=3, batch_size=16, verbose=0, callbacks=[Boom(), ckpt])


def preempt_torch(directory: str) -> None:
    from keras_ckpt import storage

    ckpt, step = _torch_setup(directory, width=64, name="ckpt-{epoch}-{batch}.pt", save_freq=2)
    ckpt.on_train_begin()
    marker = os.path.join(directory, "..", "signalled")
    for batch in range(8):
        loss = step()
        if batch == 3:  # the second save: in flight while the signal arrives
            while not ckpt.checkpoints:  # the first one committed (the second waits for it)
                time.sleep(0.01)
            with storage.directory_lock(directory):
                ckpt.on_train_batch_end(batch, logs={"loss": loss})
                _say(event="IN FLIGHT", committed=[r.name for r in ckpt.checkpoints])
                while not os.path.exists(marker):
                    time.sleep(0.01)
            continue
        ckpt.on_train_batch_end(batch, logs={"loss": loss})
    _say(event="NOT PREEMPTED")


def _tf_setup(directory: str, width: int, **kwargs):
    from _tf_training import TFLoop

    from keras_ckpt.tf import CheckpointManager

    loop = TFLoop(inputs=width, width=width)
    manager = CheckpointManager(loop.checkpoint(), directory, async_save=True, **kwargs)
    return loop, manager


def kill_tf(directory: str) -> None:
    from keras_ckpt import storage

    loop, manager = _tf_setup(directory, width=1024, max_to_keep=1)
    loop.train()
    manager.save()
    manager.sync()
    loop.train()
    with storage.directory_lock(directory):
        manager.save()
        _say(event="IN FLIGHT", committed=[os.path.basename(p) for p in manager.checkpoints])
        time.sleep(600)  # killed here


def tf_exit(directory: str) -> None:
    # ~100 MB per checkpoint: far longer to write and fsync than the instant the script takes
    # to end after save() returns.
    loop, manager = _tf_setup(directory, width=2048, max_to_keep=None)
    for _ in range(2):
        loop.train()
        manager.save()
    _say(event="SAVED", committed=[os.path.basename(p) for p in manager.checkpoints])


def tf_close(directory: str) -> None:
    loop, manager = _tf_setup(directory, width=2048, max_to_keep=None)
    for _ in range(2):
        loop.train()
        manager.save()
    manager.close()
    _say(event="CLOSED", committed=[os.path.basename(p) for p in manager.checkpoints])
    os._exit(0)  # no thread joins, no atexit: only what close() waited for is committed


def _signal_while_waiting(directory: str) -> threading.Event:
    """Hold the save about to be submitted in flight; once the main thread waits for it, send
    this process SIGTERM, then let the save commit. Set the returned event before that wait."""
    from keras_ckpt import _async, storage

    held, ending = threading.Event(), threading.Event()
    main = threading.main_thread().ident

    def waiting() -> bool:
        frame = sys._current_frames().get(main)
        while frame is not None:
            if frame.f_code is _async.BackgroundWriter.wait.__code__:
                return True
            frame = frame.f_back
        return False

    def hold() -> None:
        with storage.directory_lock(directory):
            held.set()
            ending.wait()
            while not waiting():
                time.sleep(0.01)
            _say(event="SIGNALLING")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler runs while the save is still held

    threading.Thread(target=hold).start()
    held.wait()
    return ending


def term_at_end_keras(directory: str) -> None:
    import keras
    import numpy as np

    import keras_ckpt

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    ckpt = keras_ckpt.ModelCheckpoint(os.path.join(directory, "ckpt-{epoch}.keras"),
                                      monitor="loss", async_save=True)

    class Hold(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # runs before the checkpoint callback's
            if epoch == 1:
                while not ckpt.checkpoints:  # epoch 0's save commits (it would wait for the hold)
                    time.sleep(0.01)
                self.ending = _signal_while_waiting(directory)

        def on_train_end(self, logs=None):
            self.ending.set()

    model.fit(x, x[:, :2], epochs=2, batch_size=16, verbose=0, callbacks=[Hold(), ckpt])
    _say(event="SURVIVED", committed=[r.name for r in ckpt.checkpoints])


def term_at_end_torch(directory: str) -> None:
    ckpt, step = _torch_setup(directory, width=64)
    ckpt.on_train_begin()
    ckpt.on_epoch_end(0, logs={"loss": step()})
    loss = step()
    while not ckpt.checkpoints:  # epoch 0's save commits (it would wait for the hold)
        time.sleep(0.01)
    ending = _signal_while_waiting(directory)
    ckpt.on_epoch_end(1, logs={"loss": loss})
    ending.set()
    ckpt.on_train_end()
    _say(event="SURVIVED", committed=[r.name for r in ckpt.checkpoints])


def exit_in_flight(directory: str) -> None:
    # Tensors of 4 MB (~100 MB with Adam's state): each is a zip record whose CRC is computed
    # aside; the interpreter starts shutting down while the first records are written.
    ckpt, step = _torch_setup(directory, width=1024, inputs=1024, depth=8)
    ckpt.on_train_begin()
    ckpt.on_epoch_end(0, logs={"loss": step()})
    _say(event="RETURNING", committed=[r.name for r in ckpt.checkpoints])


if __name__ == "__main__":
    job, directory = sys.argv[1], sys.argv[2]
    {"kill-torch": kill_torch, "exit-after-fit": exit_after_fit, "exit-after-end": exit_after_end,
     "fit-raises": fit_raises, "preempt-torch": preempt_torch, "kill-tf": kill_tf,
     "tf-exit": tf_exit, "tf-close": tf_close,
     "term-at-end-keras": term_at_end_keras, "term-at-end-torch": term_at_end_torch,
     "exit-in-flight": exit_in_flight}[job](directory)
