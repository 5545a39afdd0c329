"""Train a tiny graph-mode model with MonitoredTrainingSession + CheckpointHook (one process).

Used by tests/test_tf_hook.py to restart training in a fresh process. Deterministic: fixed graph
seed, no dropout, and the input batch is picked by the global step (tf.data positions are not
checkpointed), so a resumed run sees exactly the batches an uninterrupted one would.

Writes ``--out`` (npz): ``losses`` for every step run, in order, and ``var:<name>`` for every
global variable's value right after the session was created (i.e. what was restored).
"""

from __future__ import annotations

import argparse

import numpy as np
import tensorflow as tf

from keras_ckpt.estimator import CheckpointHook


def build_graph() -> tuple[tf.Operation, tf.Tensor]:
    """A 3-8-1 MLP trained with Adam; the loss is scaled down 1000x for global steps 10-19.

    The scaling makes the checkpoint at step 20 (mean loss over steps 10-19) the best by far, so
    latest-N and best-N retention pick different checkpoints.
    """
    tf.compat.v1.set_random_seed(7)
    gs = tf.compat.v1.train.get_or_create_global_step()
    rng = np.random.RandomState(0)
    data = tf.constant(rng.randn(16, 4, 3).astype("float32"))
    x = tf.gather(data, gs % 16)
    target = tf.reduce_sum(x * [1.0, -2.0, 0.5], axis=1, keepdims=True)
    hidden = tf.nn.relu(tf.matmul(x, tf.compat.v1.get_variable("w1", [3, 8])))
    pred = tf.matmul(hidden, tf.compat.v1.get_variable("w2", [8, 1]))
    scale = tf.where((gs >= 10) & (gs < 20), 0.001, 1.0)
    loss = tf.identity(tf.reduce_mean((pred - target) ** 2) * scale, name="loss")
    train_op = tf.compat.v1.train.AdamOptimizer(0.01).minimize(loss, global_step=gs)
    return train_op, loss


class Recorder(tf.compat.v1.train.SessionRunHook):
    """Records the restored variables and each step's loss."""

    def __init__(self, loss: tf.Tensor) -> None:
        self._loss = loss
        self.losses: list[np.float32] = []
        self.restored: dict[str, np.ndarray] = {}

    def after_create_session(self, session, coord) -> None:
        variables = tf.compat.v1.global_variables()
        values = session.run(variables)
        self.restored = {v.op.name: value for v, value in zip(variables, values)}

    def before_run(self, run_context):
        return tf.compat.v1.train.SessionRunArgs(self._loss)

    def after_run(self, run_context, run_values) -> None:
        self.losses.append(run_values.results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--last-step", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with tf.Graph().as_default():
        train_op, loss = build_graph()
        hook = CheckpointHook(
            args.dir, save_steps=10, max_to_keep=2, keep_best=1, monitor="loss"
        )
        recorder = Recorder(loss)
        config = tf.compat.v1.ConfigProto(
            intra_op_parallelism_threads=1, inter_op_parallelism_threads=1
        )
        with tf.compat.v1.train.MonitoredTrainingSession(
            checkpoint_dir=args.dir,
            save_checkpoint_secs=None,
            save_summaries_steps=None,
            log_step_count_steps=None,
            config=config,
            hooks=[hook, recorder, tf.compat.v1.train.StopAtStepHook(last_step=args.last_step)],
        ) as sess:
            while not sess.should_stop():
                sess.run(train_op)
    np.savez(
        args.out,
        losses=np.array(recorder.losses, dtype=np.float32),
        **{f"var:{k}": v for k, v in recorder.restored.items()},
    )


if __name__ == "__main__":
    main()
