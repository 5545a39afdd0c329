"""Tiny tf.estimator models for tests/test_estimator.py, and the evaluate-report loop as a script.

As a script (a restarted process), it runs more epochs of the loop and prints one JSON line with
the evaluation accuracy of each epoch.
"""

from __future__ import annotations

import argparse
import functools
import json

import numpy as np
import tensorflow as tf

from keras_ckpt.estimator import CheckpointHook

STEPS_PER_EPOCH = 10


def regression_model_fn(features, labels, mode):
    """Linear regression trained with Adam; the loss is scaled down 1000x for global steps 10-19.

    The scaling makes the checkpoint at step 20 (mean loss over steps 10-19) the best by far, so
    latest-N and best-N retention keep different checkpoints.
    """
    gs = tf.compat.v1.train.get_global_step()
    w = tf.compat.v1.get_variable("w", [3, 1])
    scale = tf.where((gs >= 10) & (gs < 20), 0.001, 1.0)
    loss = tf.identity(tf.reduce_mean((tf.matmul(features, w) - labels) ** 2) * scale, name="loss")
    train_op = tf.compat.v1.train.AdamOptimizer(0.05).minimize(loss, global_step=gs)
    return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op)


def regression_input_fn():
    x = np.random.RandomState(0).randn(64, 3).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5]], dtype="float32")
    return tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(8)


def classifier_model_fn(features, labels, mode):
    """Logistic regression on 2-D points."""
    w = tf.compat.v1.get_variable("w", [2, 1], initializer=tf.compat.v1.zeros_initializer())
    b = tf.compat.v1.get_variable("b", [1], initializer=tf.compat.v1.zeros_initializer())
    logits = tf.squeeze(tf.matmul(features, w) + b, axis=1)
    loss = tf.reduce_mean(
        tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(labels, tf.float32), logits=logits)
    )
    if mode == tf.estimator.ModeKeys.EVAL:
        predictions = tf.cast(logits > 0, tf.int64)
        accuracy = tf.compat.v1.metrics.accuracy(labels, predictions)
        return tf.estimator.EstimatorSpec(mode, loss=loss, eval_metric_ops={"accuracy": accuracy})
    optimizer = tf.compat.v1.train.GradientDescentOptimizer(2.0)
    train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
    return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op)


def classifier_input_fn(flip: bool = False, repeat: bool = True):
    """Two separable clusters; ``flip`` swaps the labels (a bad epoch that ruins accuracy)."""
    rng = np.random.RandomState(1)
    x = np.concatenate([rng.randn(32, 2) + 3, rng.randn(32, 2) - 3]).astype("float32")
    y = np.array([1] * 32 + [0] * 32, dtype="int64")
    if flip:
        y = 1 - y
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    return (dataset.repeat() if repeat else dataset).batch(16)


def report_hook(model_dir: str) -> CheckpointHook:
    return CheckpointHook(
        model_dir, save_steps=STEPS_PER_EPOCH, max_to_keep=1, keep_best=1, monitor="accuracy",
        monitor_reduce="report", mode="max",
    )


def run_epochs(model_dir: str, flips: list[bool]) -> list[float]:
    """Train one epoch, evaluate, report: the classic loop, once per entry of ``flips``."""
    config = tf.estimator.RunConfig(tf_random_seed=1, log_step_count_steps=None)
    estimator = tf.estimator.Estimator(classifier_model_fn, model_dir=model_dir, config=config)
    hook = report_hook(model_dir)
    accuracies = []
    for flip in flips:
        train_input_fn = functools.partial(classifier_input_fn, flip)
        estimator.train(train_input_fn, steps=STEPS_PER_EPOCH, hooks=[hook])
        results = estimator.evaluate(lambda: classifier_input_fn(repeat=False))
        hook.report(results)
        accuracies.append(float(results["accuracy"]))
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--flips", required=True, help="one 0/1 per epoch, e.g. 0,1,1")
    args = parser.parse_args()
    flips = [bool(int(f)) for f in args.flips.split(",")]
    print(json.dumps(run_epochs(args.dir, flips)))


if __name__ == "__main__":
    main()
