"""TF2 eager: ``CheckpointManager``, a drop-in for ``tf.train.CheckpointManager`` with best-N."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Callable

import tensorflow as tf

from keras_ckpt._tfcommon import PrefixSeries, SeriesAttributes, build_policy, warn_if_unscored
from keras_ckpt.checkpointer import scalar_logs
from keras_ckpt.policy import validate_count, validate_positive_number

_FOREIGN_HINT = (
    "Use one manager per directory, and do not call checkpoint.save() into it: "
    "tf.train.CheckpointManager and Checkpoint.save rotate or list files by their own rules."
)


def _as_int(value: Any) -> int:
    """An int from a Python int, a tf.Variable or an eager tensor."""
    return int(value.numpy()) if hasattr(value, "numpy") else int(value)


class CheckpointManager(SeriesAttributes):
    """``tf.train.CheckpointManager`` that also keeps the best N checkpoints by a metric.

    Takes ``tf.train.CheckpointManager``'s arguments and methods (``save``,
    ``restore_or_initialize``, ``latest_checkpoint``, ``checkpoints``) and writes ordinary TF2
    checkpoints (``ckpt-N.index``, ``ckpt-N.data-*``) that ``tf.train.Checkpoint.restore`` and
    ``tf.train.load_checkpoint`` read. On top of TF's latest-N and every-N-hours it keeps the
    ``keep_best`` best checkpoints by ``save(metrics={...})[monitor]``; each save is committed
    atomically with checksums in ``checkpoints.json`` (the manifest every keras_ckpt front-end
    shares), so the best-N state survives restarts and a corrupt newest checkpoint is skipped, with
    a warning, for the previous good one. TF's ``checkpoint`` state file names the newest
    checkpoint, so ``tf.train.latest_checkpoint(directory)`` agrees with ``latest_checkpoint``.

    Differences from TF's: ``max_to_keep=0`` keeps only the newest (TF refuses 0);
    ``checkpoints`` lists every checkpoint kept for any reason, oldest first (TF leaves out the
    ones kept by ``keep_checkpoint_every_n_hours``); saving works in eager mode only (use
    :class:`keras_ckpt.estimator.CheckpointHook` in graph mode). Checkpoints that
    ``checkpoints.json`` does not list (another manager's) are never deleted nor restored: the
    manager warns about them and ``restore_or_initialize`` starts fresh.

    Example:

    ```python
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
    manager = CheckpointManager(ckpt, "runs/a", max_to_keep=3, keep_best=2,
                                monitor="val_loss", mode="min")
    manager.restore_or_initialize()
    for epoch in range(epochs):
        train_one_epoch()
        manager.save(metrics={"val_loss": evaluate()})
    ```

    Args:
        checkpoint: the ``tf.train.Checkpoint`` to save and restore.
        directory: where checkpoints, ``checkpoints.json`` and TF's ``checkpoint`` file live.
        max_to_keep: keep the N newest checkpoints (None: all). The newest is never deleted.
        keep_checkpoint_every_n_hours: never delete one checkpoint per N hours (spaced by the
            manifest's save times).
        checkpoint_name: the prefix base name; checkpoints are ``<checkpoint_name>-<number>``.
        step_counter: a ``tf.Variable`` holding the training step; recorded as each checkpoint's
            ``step``, and required with ``checkpoint_interval``.
        checkpoint_interval: ``save`` skips unless ``step_counter`` advanced this many steps
            since the previous save.
        init_fn: called by ``restore_or_initialize`` when there is nothing to restore.
        keep_best: also keep the N best checkpoints by ``monitor``/``mode``.
        monitor: the key of ``save(metrics=...)`` ranked for best-N.
        mode: ``"min"``, ``"max"``, or ``"auto"`` (inferred from the monitor's name).

    Attributes:
        records: the manifest records of this manager's checkpoints, oldest first.
        best: the best monitored value so far (None before one is known).
        best_checkpoint: the prefix of the best checkpoint, or None.
    """

    def __init__(
        self,
        checkpoint: tf.train.Checkpoint,
        directory: str | os.PathLike,
        max_to_keep: int | None,
        keep_checkpoint_every_n_hours: float | None = None,
        checkpoint_name: str = "ckpt",
        step_counter: tf.Variable | None = None,
        checkpoint_interval: int | None = None,
        init_fn: Callable[[], Any] | None = None,
        *,
        keep_best: int = 0,
        monitor: str | None = None,
        mode: str = "auto",
    ) -> None:
        validate_positive_number("keep_checkpoint_every_n_hours", keep_checkpoint_every_n_hours)
        validate_count("checkpoint_interval", checkpoint_interval, minimum=1)
        if checkpoint_interval is not None and step_counter is None:
            raise ValueError(
                "checkpoint_interval counts steps of step_counter: pass step_counter=<a "
                f"tf.Variable> as well. Received: checkpoint_interval={checkpoint_interval!r}, "
                "step_counter=None"
            )
        policy = build_policy(
            max_to_keep=max_to_keep,
            keep_best=keep_best,
            keep_every_n_hours=keep_checkpoint_every_n_hours,
            monitor=monitor,
            mode=mode,
        )
        self._checkpoint = checkpoint
        self._directory = os.fspath(directory)
        self._step_counter = step_counter
        self._checkpoint_interval = checkpoint_interval
        self._init_fn = init_fn
        self._last_checkpoint_step: int | None = None
        self._series = PrefixSeries(
            self._directory,
            checkpoint_name,
            framework="tf",
            policy=policy,
            argname="directory",
            foreign_hint=_FOREIGN_HINT,
        )
        self._latest = self._series.open()

    # -- TF's properties ----------------------------------------------------------------------

    @property
    def directory(self) -> str:
        return self._directory

    @property
    def checkpoint(self) -> tf.train.Checkpoint:
        return self._checkpoint

    @property
    def checkpoint_interval(self) -> int | None:
        return self._checkpoint_interval

    @property
    def latest_checkpoint(self) -> str | None:
        """The prefix of the newest checkpoint (at construction: the newest that verifies)."""
        return self._series.prefix(self._latest)

    @property
    def checkpoints(self) -> list[str]:
        """The prefixes of the kept checkpoints, oldest first."""
        return [self._series.prefix(r) for r in self._series.engine.records]

    # -- saving and restoring -----------------------------------------------------------------

    def save(
        self,
        checkpoint_number: int | tf.Variable | None = None,
        check_interval: bool = True,
        options: tf.train.CheckpointOptions | None = None,
        *,
        metrics: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Write a checkpoint, commit it, and prune by the retention policy.

        Args:
            checkpoint_number: numbers the checkpoint (default: ``checkpoint.save_counter``, which
                is incremented either way, as TF does).
            check_interval: with ``checkpoint_interval``, skip unless enough steps passed.
            options: ``tf.train.CheckpointOptions`` for the write.
            metrics: this checkpoint's metrics (scalars); ``metrics[monitor]`` ranks best-N.

        Returns:
            The new checkpoint's prefix, or None when ``checkpoint_interval`` skipped the save.
        """
        if not tf.executing_eagerly():
            raise RuntimeError(
                "keras_ckpt.tf.CheckpointManager saves in eager mode; in graph mode use "
                "keras_ckpt.estimator.CheckpointHook."
            )
        step = 0
        if self._step_counter is not None:
            step = _as_int(self._step_counter)
        if self._checkpoint_interval is not None:
            last = self._last_checkpoint_step
            if last is not None and (
                step == last or (check_interval and step < last + self._checkpoint_interval)
            ):
                return None
            self._last_checkpoint_step = step
        counter = self._checkpoint.save_counter
        counter.assign_add(1)
        number = _as_int(counter if checkpoint_number is None else checkpoint_number)
        values = scalar_logs(metrics)
        warn_if_unscored(values, self._series.engine.policy, f"checkpoint number {number}")

        def write(prefix: str) -> None:
            self._checkpoint.write(prefix, options=options)
            # The engine commits complete files only: wait for an asynchronous write.
            self._checkpoint.sync()

        tx = self._series.commit(number, write, step=step, metrics=values)
        self._latest = tx.record
        return self.latest_checkpoint

    def restore_or_initialize(self) -> str | None:
        """Restore the newest checkpoint that verifies, or call ``init_fn`` when there is none.

        Returns:
            The restored prefix, or None.
        """
        path = self.latest_checkpoint
        if path is None:
            if self._init_fn is not None:
                self._init_fn()
            return None
        self._checkpoint.restore(path)
        if self._checkpoint_interval is not None:
            self._last_checkpoint_step = _as_int(self._step_counter)
        return path

    def sync(self) -> None:
        """Wait for outstanding checkpoint operations (saves here are synchronous)."""
        self._checkpoint.sync()
