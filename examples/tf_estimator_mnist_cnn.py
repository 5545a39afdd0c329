"""The classic tf.estimator MNIST CNN, checkpointed with keras_ckpt: train an epoch, evaluate, keep the best.

Needs TensorFlow <= 2.15 with tensorflow-estimator (tf.estimator left TensorFlow in 2.16):

    pip install "tensorflow==2.15.1" "tensorflow-estimator==2.15.0" "keras==2.15.0" scikit-learn
    pip install keras-ckpt

    python examples/tf_estimator_mnist_cnn.py                         # digits (8x8), 5 epochs
    python examples/tf_estimator_mnist_cnn.py --data DIR              # MNIST: mnist.npz or IDX files
    python examples/tf_estimator_mnist_cnn.py --epochs 8              # continues where it stopped
    python examples/tf_estimator_mnist_cnn.py --output runs/b --resume-from /readonly/runs/a

One ``CheckpointHook`` does the checkpointing: it saves at the end of each epoch, waits for the
epoch's evaluation (``hook.report``), keeps the newest ``--max-to-keep`` checkpoints plus the
``--keep-best`` best by evaluation accuracy, and points TF's ``checkpoint`` file at the newest, so
Estimator itself resumes from it (weights, Adam slots, global step). Running again with more
``--epochs`` continues; the best-N state lives in ``checkpoints.json`` and survives restarts.
The same command restarted after a preemption (SIGTERM: the hook saves where training stopped)
continues, evaluating first a checkpoint the job saved but did not get to evaluate.
``--resume-from`` starts a new output directory from a copy of an earlier one's checkpoints and
never writes into that earlier directory (it may be read-only); it is ignored once the output
has checkpoints of its own (a restarted job of a chain). Output: one line per epoch, then
``keras-ckpt ls`` of the output directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import warnings

# Before TensorFlow loads: its C++ start-up messages (level 3 also hides the harmless "Unable to
# register cuDNN factory" errors of TF 2.15) would otherwise bury the one line per epoch.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _data  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_ckpt import cli, manifest  # noqa: E402
from keras_ckpt.estimator import CheckpointHook  # noqa: E402

# Estimator logs every step and session at INFO, and deprecation notices (Estimator, tf.layers:
# this is the classic code on purpose) at WARNING; keras_ckpt's own warnings still show.
tf.get_logger().setLevel("ERROR")
warnings.filterwarnings("ignore", message=r"`tf\.layers\.", category=UserWarning)


def cnn_model_fn(features, labels, mode, params):
    """Two conv+pool blocks, a dense layer with dropout, softmax over 10 classes."""
    training = mode == tf.estimator.ModeKeys.TRAIN
    layers = tf.compat.v1.layers
    net = layers.conv2d(features, 32, 5, padding="same", activation=tf.nn.relu)
    net = layers.max_pooling2d(net, 2, 2)
    net = layers.conv2d(net, 64, 5, padding="same", activation=tf.nn.relu)
    net = layers.max_pooling2d(net, 2, 2)
    net = layers.dense(layers.flatten(net), params["dense_units"], activation=tf.nn.relu)
    net = layers.dropout(net, rate=0.4, training=training)
    logits = layers.dense(net, 10)
    predictions = tf.argmax(logits, axis=1)
    if mode == tf.estimator.ModeKeys.PREDICT:
        return tf.estimator.EstimatorSpec(mode, predictions={"classes": predictions})
    loss = tf.compat.v1.losses.sparse_softmax_cross_entropy(labels=labels, logits=logits)
    if mode == tf.estimator.ModeKeys.EVAL:
        accuracy = tf.compat.v1.metrics.accuracy(labels, predictions)
        return tf.estimator.EstimatorSpec(mode, loss=loss, eval_metric_ops={"accuracy": accuracy})
    optimizer = tf.compat.v1.train.AdamOptimizer(params["learning_rate"])
    train_op = optimizer.minimize(loss, global_step=tf.compat.v1.train.get_global_step())
    return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op)


def copy_checkpoints(source: str, output: str) -> None:
    """Start ``output`` from the checkpoints of ``source``, which is only read."""
    records = manifest.load(source).checkpoints
    if not records:
        raise SystemExit(f"--resume-from {source}: no keras_ckpt checkpoints there.")
    os.makedirs(output, exist_ok=True)
    for record in records:
        for f in record.files:
            shutil.copyfile(os.path.join(source, f.path), os.path.join(output, f.path))
    # The manifest last: an interrupted copy leaves no manifest, and the hook starts fresh.
    shutil.copyfile(manifest.manifest_path(source), manifest.manifest_path(output))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="directory with mnist.npz or the MNIST IDX files; default: digits")
    parser.add_argument("--output", default="runs/tf_estimator_mnist_cnn")
    parser.add_argument("--resume-from", help="an earlier --output to start from (read only)")
    parser.add_argument("--epochs", type=int, default=5, help="total epochs, resumed ones included")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps-per-epoch", type=int, help="default: one pass over the data")
    parser.add_argument("--max-to-keep", type=int, default=3)
    parser.add_argument("--keep-best", type=int, default=1)
    parser.add_argument("--dense-units", type=int, default=1024)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--stop-after-epoch", type=int, help="send this process SIGTERM once this "
                        "epoch's checkpoint is saved, before its evaluation (a preemption)")
    args = parser.parse_args()

    (x_train, y_train), (x_test, y_test) = _data.load(args.data)
    x_train, x_test = x_train[..., None], x_test[..., None]  # a channel axis for conv2d
    steps_per_epoch = args.steps_per_epoch or max(1, len(x_train) // args.batch_size)
    # A restarted job (the same command) finds its own checkpoints and continues from them.
    if args.resume_from and not manifest.exists(args.output):
        copy_checkpoints(args.resume_from, args.output)
        print(f"copied the checkpoints of {args.resume_from} into {args.output}")

    def train_input_fn():
        data = tf.data.Dataset.from_tensor_slices((x_train, y_train))
        return data.shuffle(len(x_train), seed=0).repeat().batch(args.batch_size)

    def eval_input_fn():
        return tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(256)

    estimator = tf.estimator.Estimator(
        cnn_model_fn,
        model_dir=args.output,
        params={"dense_units": args.dense_units, "learning_rate": args.learning_rate},
        config=tf.estimator.RunConfig(tf_random_seed=0, log_step_count_steps=steps_per_epoch),
    )
    # Saves at each epoch's end (and in end(), should training stop mid-epoch, e.g. on SIGTERM);
    # each checkpoint waits, protected from rotation, for its evaluation.
    hook = CheckpointHook(
        args.output,
        save_steps=steps_per_epoch,
        max_to_keep=args.max_to_keep,
        keep_best=args.keep_best,
        monitor="accuracy",
        monitor_reduce="report",
        mode="max",
    )

    def unevaluated() -> bool:
        """The newest checkpoint ends an epoch but has no evaluation: the job stopped between."""
        latest = hook.records[-1] if hook.records else None
        return (latest is not None and latest.step % steps_per_epoch == 0
                and "accuracy" not in latest.metrics)

    step = hook.records[-1].step if hook.records else 0
    if step:
        print(f"resumed from {hook.latest_checkpoint} at global step {step}")
    while step < args.epochs * steps_per_epoch or unevaluated():
        if not unevaluated():
            # To the end of the current epoch (a run stopped mid-epoch saved where it stopped).
            estimator.train(train_input_fn, steps=steps_per_epoch - step % steps_per_epoch,
                            hooks=[hook])
            step = hook.records[-1].step
            if step // steps_per_epoch == args.stop_after_epoch:
                print(f"epoch {step // steps_per_epoch}/{args.epochs}: global step {step}, saved "
                      f"{hook.records[-1].name}; SIGTERM before its evaluation", flush=True)
                signal.raise_signal(signal.SIGTERM)  # the hook is done: the default action
        results = estimator.evaluate(eval_input_fn)
        record = hook.report(results)
        step = int(results["global_step"])
        print(
            f"epoch {step // steps_per_epoch}/{args.epochs}: global step {step}, "
            f"eval accuracy {results['accuracy']:.4f}, loss {results['loss']:.4f}, "
            f"saved {record.name if record else '-'}, kept {' '.join(r.name for r in hook.records)}",
            flush=True,
        )
    print(f"best: {hook.best_checkpoint} (accuracy {hook.best})")
    cli.main(["ls", args.output])


if __name__ == "__main__":
    main()
