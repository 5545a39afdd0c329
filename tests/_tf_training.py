"""A small real TF2 training loop for the CheckpointManager tests (and the jobs they start).

A Keras model trained eagerly with a ``GradientTape`` and Adam, a step counter and a ``tf.data``
iterator: what a TF2 custom loop puts in its ``tf.train.Checkpoint``.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


class TFLoop:
    """``inputs`` -> ``width`` -> ``width`` -> 1 dense layers; ``width`` sets the checkpoint's size
    (``3 * 4 * (inputs * width + width * width)`` bytes, roughly, with Adam's two slots)."""

    def __init__(self, inputs: int = 8, width: int = 16, seed: int = 0) -> None:
        keras.utils.set_random_seed(seed)
        self.model = keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(width),
                                       keras.layers.Dense(width), keras.layers.Dense(1)])
        self.optimizer = keras.optimizers.Adam(0.01)
        self.optimizer.build(self.model.trainable_variables)
        self.step = tf.Variable(0, dtype=tf.int64)
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(64, inputs)).astype("float32")
        data = tf.data.Dataset.from_tensor_slices((x, x[:, :1] * 2.0))
        self.iterator = iter(data.shuffle(64, seed=seed).repeat().batch(8))

    def checkpoint(self) -> tf.train.Checkpoint:
        """A new ``tf.train.Checkpoint`` (its own ``save_counter``) over this loop's objects."""
        return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, step=self.step,
                                   iterator=self.iterator)

    def train(self) -> float:
        x, y = next(self.iterator)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self.model(x) - y))
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        self.step.assign_add(1)
        return float(loss)

    def variables(self) -> list:
        """Every variable the checkpoint holds: weights, the optimizer's, the step counter."""
        return [*self.model.weights, *self.optimizer.variables, self.step]

    def values(self) -> list[np.ndarray]:
        return [np.array(keras.ops.convert_to_numpy(v)) for v in self.variables()]
