"""Checkpoint directories written by each front-end, for the keras-ckpt command's tests.

Each builder trains a tiny model with the real front-end and returns nothing: the directory is
the product. Imported by tests/test_cli_*.py inside fixtures, so a missing framework skips
only the tests that need it.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

VAL_LOSSES = [0.9, 0.4, 0.7, 0.5, 0.8]  # scripted, so the best is known: epoch 2


def keras_dir(directory: str) -> None:
    """Two series in one directory (".keras" latest-2 + best-1, ".weights.h5" latest-1), written
    by a first fit of 3 epochs and a resumed one to epoch 5."""
    import keras

    import keras_ckpt

    class Script(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_loss"] = VAL_LOSSES[epoch]

    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    for epochs, resume in ((3, False), (5, True)):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        callbacks = [
            Script(),
            keras_ckpt.ModelCheckpoint(os.path.join(directory, "ck-{epoch:02d}.keras"),
                                       monitor="val_loss", max_to_keep=2, keep_best=1, resume=resume),
            keras_ckpt.ModelCheckpoint(os.path.join(directory, "w-{epoch:02d}.weights.h5"),
                                       save_weights_only=True, max_to_keep=1, resume=resume),
        ]
        model.fit(x, y, batch_size=8, epochs=epochs, callbacks=callbacks, verbose=0)


def torch_dir(directory: str) -> None:
    """One series, two runs: 3 epochs keeping latest-2 + best-1, then a fresh start
    (resume=False) of 2 epochs keeping all: ck-03 of run 1 stays, ck-01 and ck-02 are run 2's."""
    import torch

    from keras_ckpt.torch import ModelCheckpoint

    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    y = x.sum(dim=1, keepdim=True)
    for run, epochs in enumerate((3, 2)):
        torch.manual_seed(run)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        ckpt = ModelCheckpoint(os.path.join(directory, "ck-{epoch:02d}.pt"), monitor="val_loss",
                               max_to_keep=2 if run == 0 else None, keep_best=1, model=model,
                               optimizer=opt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "a new run over earlier checkpoints": intended here
            start = ckpt.on_train_begin()
        for epoch in range(start, epochs):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            ckpt.on_epoch_end(epoch, logs={"loss": loss.item(),
                                           "val_loss": VAL_LOSSES[epoch] + run * 0.05})
        ckpt.on_train_end()


def tf_dir(directory: str) -> None:
    """keras_ckpt.tf.CheckpointManager, latest-2 + best-1 by val_loss, 5 saves."""
    import tensorflow as tf

    from keras_ckpt.tf import CheckpointManager

    w = tf.Variable([0.5, -1.0, 2.0])
    step = tf.Variable(0, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(w=w, step=step)
    manager = CheckpointManager(checkpoint, directory, max_to_keep=2, keep_best=1,
                                monitor="val_loss", step_counter=step)
    manager.restore_or_initialize()
    for val_loss in VAL_LOSSES:
        w.assign_sub(0.1 * w)
        step.assign_add(1)
        manager.save(metrics={"val_loss": val_loss, "loss": float(tf.reduce_sum(w * w))})
