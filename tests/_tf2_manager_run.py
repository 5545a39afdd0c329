"""Resume with keras_ckpt.tf.CheckpointManager in a fresh process, then save more checkpoints.

Used by tests/test_tf_manager.py. Prints one JSON line: the restored prefix, the values restored
(before training on), and the manager's prefixes afterwards.
"""

from __future__ import annotations

import argparse
import json

import tensorflow as tf

from keras_ckpt.tf import CheckpointManager


def make_state() -> tuple[tf.train.Checkpoint, dict[str, tf.Variable]]:
    """Weights, a momentum slot and a step counter: the state an optimizer loop resumes."""
    state = {
        "w": tf.Variable([0.5, -1.0, 2.0]),
        "momentum": tf.Variable([0.0, 0.0, 0.0]),
        "step": tf.Variable(0, dtype=tf.int64),
    }
    return tf.train.Checkpoint(**state), state


def train_step(state: dict[str, tf.Variable]) -> None:
    """One SGD-with-momentum step on ||w||^2 (deterministic)."""
    state["momentum"].assign(0.9 * state["momentum"] + 2.0 * state["w"])
    state["w"].assign_sub(0.01 * state["momentum"])
    state["step"].assign_add(1)


def make_manager(checkpoint: tf.train.Checkpoint, state: dict, directory: str) -> CheckpointManager:
    return CheckpointManager(
        checkpoint, directory, max_to_keep=2, keep_best=2, monitor="val_loss",
        step_counter=state["step"],
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--val-losses", type=float, nargs="*", default=[])
    args = parser.parse_args()
    checkpoint, state = make_state()
    manager = make_manager(checkpoint, state, args.dir)
    restored = manager.restore_or_initialize()
    values = {k: v.numpy().tolist() for k, v in state.items()}
    values["save_counter"] = int(checkpoint.save_counter.numpy())
    for val_loss in args.val_losses:
        train_step(state)
        manager.save(metrics={"val_loss": val_loss})
    print(json.dumps({"restored": restored, "values": values, "checkpoints": manager.checkpoints}))


if __name__ == "__main__":
    main()
