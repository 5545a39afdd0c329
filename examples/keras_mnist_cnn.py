"""The Keras MNIST convnet, with checkpoints that survive preemption.

Keeps the 3 newest checkpoints and the 2 best by validation accuracy, and continues an
interrupted run at the next epoch with the exact training state (weights, Adam slots, dropout
and shuffling RNG, the best-so-far). Digits from scikit-learn by default; real MNIST with
``--data DIR`` (``mnist.npz`` or the four IDX files).

    python examples/keras_mnist_cnn.py --output runs/demo --epochs 6 --stop-after-epoch 3
    python examples/keras_mnist_cnn.py --output runs/demo --epochs 6 --resume
    keras-ckpt ls runs/demo
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _data  # noqa: E402
import keras  # noqa: E402

import keras_ckpt  # noqa: E402


class Preempt(keras.callbacks.Callback):
    """Kills the process after an epoch's checkpoint is committed, like a preempted VM."""

    def __init__(self, after_epoch: int) -> None:
        super().__init__()
        self.after_epoch = after_epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch + 1 == self.after_epoch:
            print(f"\n*** simulated preemption after epoch {epoch + 1} ***", flush=True)
            os._exit(3)


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
    ap.add_argument("--data", help="directory with mnist.npz or the MNIST IDX files")
    ap.add_argument("--output", default="runs/keras_mnist", help="checkpoint directory")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--resume", action="store_true", help="continue from --output's newest checkpoint")
    ap.add_argument("--resume-from", help="start from another run's checkpoint directory or file")
    ap.add_argument("--stop-after-epoch", type=int, help="simulate preemption after this epoch")
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
        resume=args.resume_from or args.resume,
        verbose=1,
    )
    callbacks: list[keras.callbacks.Callback] = [ckpt]
    if args.stop_after_epoch:
        callbacks.append(Preempt(args.stop_after_epoch))
    history = model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                        validation_split=0.1, callbacks=callbacks, verbose=2)
    if ckpt.restored_path:
        print(f"resumed from {ckpt.restored_path}; this run trained epochs "
              f"{[e + 1 for e in history.epoch]}")
    loss, acc = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy {acc:.4f}; best val_accuracy {ckpt.best:.4f} in {ckpt.best_path}")


if __name__ == "__main__":
    main()
