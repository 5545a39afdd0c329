"""The Keras MNIST convnet, with checkpoints that survive preemption.

Keeps the 3 newest checkpoints and the 2 best by validation accuracy. Run as a job on a
scheduler would run it: it writes to ``--output`` and, restarted with the same command after a
preemption, continues there at the next epoch with the exact training state (weights, Adam
slots, dropout and shuffling RNG, the best-so-far). A later job of a chain starts from an
earlier job's output with ``--resume-from`` (only read, so it may be mounted read-only) and
writes its own ``--output``, which then holds the checkpoint it started from as well. Digits
from scikit-learn by default (8x8, no download); real MNIST with ``--data DIR`` (``mnist.npz``
or the four IDX files).

    python examples/keras_mnist_cnn.py --output runs/demo --epochs 6 --stop-after-epoch 3
    python examples/keras_mnist_cnn.py --output runs/demo --epochs 6      # continues at epoch 4
    python examples/keras_mnist_cnn.py --output runs/next --epochs 8 --resume-from runs/demo
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

# Before TensorFlow loads: its C++ start-up messages would otherwise bury the one line per
# epoch. oneDNN's notice ignores TF_CPP_MIN_LOG_LEVEL; turning oneDNN off also makes CPU results
# independent of its operation order. Set either variable yourself to override.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _data  # noqa: E402
import keras  # noqa: E402

import keras_ckpt  # noqa: E402
from keras_ckpt import cli  # noqa: E402


class Preempt(keras.callbacks.Callback):
    """Sends this process SIGTERM at the end of an epoch, as a scheduler preempting the job does.

    Listed before the checkpoint callback, so that callback sees the signal at this epoch's end:
    it saves the epoch, stops training and hands the signal back, which ends the process with
    SIGTERM's status (143 in a shell).
    """

    def __init__(self, after_epoch: int) -> None:
        super().__init__()
        self.after_epoch = after_epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch + 1 == self.after_epoch:
            signal.raise_signal(signal.SIGTERM)


class EpochLine(keras.callbacks.Callback):
    """One line per epoch: metrics and what the checkpoint callback (listed before it) kept."""

    def __init__(self, ckpt: keras_ckpt.ModelCheckpoint, epochs: int) -> None:
        super().__init__()
        self.ckpt, self.epochs = ckpt, epochs
        self._first = True

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self._first and self.ckpt.restored_path:
            print(f"resumed from {self.ckpt.restored_path}: continuing at epoch {epoch + 1}",
                  flush=True)
        self._first = False

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        kept = " ".join(r.name for r in self.ckpt.checkpoints)
        line = (f"epoch {epoch + 1}/{self.epochs}: loss {logs['loss']:.4f}, "
                f"val_accuracy {logs['val_accuracy']:.4f}; "
                f"saved {os.path.basename(self.ckpt.latest_path)}, kept {kept}")
        if self.ckpt.preempted:
            line += "; SIGTERM: checkpoint saved, stopping"
        print(line, flush=True)


def build(input_shape: tuple[int, int, int], classes: int) -> keras.Model:
    small = input_shape[0] < 16  # 8x8 digits: one pooling step only
    layers = [
        keras.Input(input_shape),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
    ]
    if not small:
        layers.append(keras.layers.MaxPooling2D(2))
    layers += [
        keras.layers.Flatten(),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(classes, activation="softmax"),
    ]
    model = keras.Sequential(layers)
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="directory with mnist.npz or the MNIST IDX files "
                    "(default: scikit-learn's 8x8 digits)")
    ap.add_argument("--output", default="runs/keras_mnist_cnn",
                    help="checkpoint directory; a restarted job continues from it")
    ap.add_argument("--resume-from", help="start from an earlier job's checkpoint directory or "
                    "file, which is only read (ignored once --output has newer checkpoints)")
    ap.add_argument("--epochs", type=int, default=6, help="total epochs, resumed ones included")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--stop-after-epoch", type=int,
                    help="send this process SIGTERM at the end of this epoch (a preemption)")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()

    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = _data.load(args.data)
    x_train, x_test = x_train[..., None], x_test[..., None]
    model = build(x_train.shape[1:], int(y_train.max()) + 1)

    ckpt = keras_ckpt.ModelCheckpoint(
        os.path.join(args.output, "ckpt-{epoch:03d}.keras"),
        monitor="val_accuracy",
        mode="max",
        max_to_keep=3,
        keep_best=2,
        # A path: restore from there, unless --output went on past it (a restarted chain job).
        resume=args.resume_from or True,
    )
    callbacks: list[keras.callbacks.Callback] = [ckpt, EpochLine(ckpt, args.epochs)]
    if args.stop_after_epoch:
        callbacks.insert(0, Preempt(args.stop_after_epoch))
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
              validation_split=0.1, callbacks=callbacks, verbose=0)
    _, acc = model.evaluate(x_test, y_test, verbose=0)
    best = "-" if ckpt.best is None else f"{ckpt.best:.4f}"
    where = os.path.basename(ckpt.best_path) if ckpt.best_path else "(not kept here)"
    print(f"test accuracy {acc:.4f}; best val_accuracy {best} in {where}")
    cli.main(["ls", args.output])


if __name__ == "__main__":
    main()
