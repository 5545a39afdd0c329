"""A tiny Keras training job run in its own process by the tests (restart = new process).

usage: keras_job.py OUT_DIR EPOCHS [--resume] [--template NAME] [--dump FILE] [--extra-fit]
Prints one JSON line: the epochs this process trained and the restored path.
"""

from __future__ import annotations

import argparse
import json
import os
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
    hist = model.fit(x, y, batch_size=16, epochs=args.epochs, shuffle=True, validation_split=0.25,
                     callbacks=[ckpt], verbose=0)
    report = {"epochs": hist.epoch, "restored": ckpt.restored_path, "best": ckpt.best,
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


if __name__ == "__main__":
    main()
