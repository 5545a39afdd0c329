"""A tiny Keras training job run in its own process by the tests (restart = new process).

usage: keras_job.py OUT_DIR EPOCHS [--resume] [--template NAME] [--dump FILE] [--extra-fit]
                    [--save-freq N] [--log FILE] [--kill-at-step K]
Prints one JSON line: the epochs this process trained, the restored path, the history.
``--log FILE`` gets the optimizer's iteration count after each batch (one line each);
``--kill-at-step K`` SIGKILLs the process itself right after batch K's end (after a save due
there is committed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("epochs", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--template", default="ckpt-{epoch:02d}.keras")
    ap.add_argument("--dump")
    ap.add_argument("--extra-fit", action="store_true")
    ap.add_argument("--save-freq", default="epoch")
    ap.add_argument("--log")
    ap.add_argument("--kill-at-step", type=int)
    ap.add_argument("--input", choices=["numpy", "pydataset", "tfdata"], default="numpy")
    args = ap.parse_args()

    import keras

    import keras_ckpt

    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.4),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    save_freq = args.save_freq if args.save_freq == "epoch" else int(args.save_freq)
    rotates = "{" in args.template  # a single-file name is overwritten in place instead
    ckpt = keras_ckpt.ModelCheckpoint(
        os.path.join(args.out, args.template), monitor="val_loss",
        max_to_keep=2 if rotates else None, keep_best=1 if rotates else 0,
        resume=args.resume, save_freq=save_freq, save_weights_only=args.template.endswith(".weights.h5"),
    )
    class Steps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            with open(args.log, "a") as f:
                f.write(f"{step}\n")
            if step == args.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks = [ckpt, Steps()] if args.log or args.kill_at_step else [ckpt]
    if args.input == "numpy":
        data = {"x": x, "y": y, "batch_size": 16, "validation_split": 0.25}
    else:  # the same 72 training samples, 5 batches an epoch, the last 24 for validation
        data = {"x": _dataset(args.input, x[:72], y[:72]), "validation_data": (x[72:], y[72:])}
    hist = model.fit(**data, epochs=args.epochs, shuffle=True, callbacks=callbacks, verbose=0)
    report = {"epochs": hist.epoch, "restored": ckpt.restored_path, "best": ckpt.best,
              "history": hist.history,
              "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations))}
    if args.dump:
        arrays = {f"w{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.weights)}
        arrays.update({f"o{i}": keras.ops.convert_to_numpy(v)
                       for i, v in enumerate(model.optimizer.variables)})
        np.savez(args.dump, **arrays)
    if args.extra_fit:
        report["extra_epochs"] = model.fit(x, y, batch_size=16, epochs=1, verbose=0).epoch
    print(json.dumps(report))
    sys.stdout.flush()


def _dataset(kind: str, x: np.ndarray, y: np.ndarray):
    import keras

    if kind == "tfdata":  # shuffled once, in its own seeded order (the same every epoch)
        import tensorflow as tf

        ds = tf.data.Dataset.from_tensor_slices((x, y))
        return ds.shuffle(72, seed=3, reshuffle_each_iteration=False).batch(16)

    class Batches(keras.utils.PyDataset):  # fit(shuffle=True) shuffles its batch order
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16]

    return Batches()


if __name__ == "__main__":
    main()
