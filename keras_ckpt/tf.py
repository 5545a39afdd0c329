"""TF2 eager: ``CheckpointManager``, a drop-in for ``tf.train.CheckpointManager`` with best-N."""

from __future__ import annotations

import dataclasses
import numbers
import os
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import tensorflow as tf

from keras_ckpt import _tfsnapshot, storage
from keras_ckpt._async import BackgroundWriter
from keras_ckpt._tfcommon import (
    HoursAnchor,
    PrefixSeries,
    SeriesAttributes,
    TFHoursPolicy,
    build_policy,
    validate_basename,
    validate_directory,
    warn_if_unscored,
)
from keras_ckpt.checkpointer import scalar_logs
from keras_ckpt.config import check_bool
from keras_ckpt.policy import EVERY_N_HOURS, validate_count, validate_positive_number

_FOREIGN_HINT = (
    "Use one manager per directory, and do not call checkpoint.save() into it: "
    "tf.train.CheckpointManager and Checkpoint.save rotate or list files by their own rules."
)


def _check_save_arguments(checkpoint_number: Any, metrics: Any, options: Any) -> None:
    """TypeError naming the first bad argument of ``save``, before anything it changes."""
    number = checkpoint_number
    dtype = getattr(number, "dtype", None)
    if not (number is None or (isinstance(number, numbers.Integral) and not isinstance(number, bool))
            or (isinstance(dtype, tf.DType) and dtype.is_integer)):
        raise TypeError("checkpoint_number must be an integer, a tf.Variable holding one, or None. "
                        f"Received: checkpoint_number={number!r}")
    if metrics is not None and not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of names to scalars, or None. Received: "
                        f"metrics={metrics!r}")
    if options is not None and not isinstance(options, tf.train.CheckpointOptions):
        raise TypeError(f"options must be a tf.train.CheckpointOptions or None. Received: "
                        f"options={options!r}")


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

    ``keep_checkpoint_every_n_hours`` works as TF's: a checkpoint rotating out of the latest-N
    set is preserved when it is at least N hours newer than the last preserved one (before any
    was: than the creation of the first manager of the directory); a preserved checkpoint is
    never deleted, also by a later manager without ``keep_checkpoint_every_n_hours``, and is left
    out of ``checkpoints`` as TF does. When the clock is behind the last preserved timestamp
    (it went backwards), the manager warns, as TF does, and never deletes the checkpoints that
    existed then.

    Switching a job from TF's manager: on construction, a directory whose manifest has no
    records of this ``checkpoint_name`` adopts the complete TF checkpoints named
    ``<checkpoint_name>-<N>`` (written by ``tf.train.Checkpoint.save`` or
    ``tf.train.CheckpointManager``) into ``checkpoints.json``, with a warning: they are hashed,
    ordered by TF's ``checkpoint`` state file (else by number), restored from, and from then on
    rotated by this manager's retention (those TF's manager had preserved stay). Other
    checkpoints in the directory (another name, an incomplete set of files, or anything once the
    series has records) are never adopted nor deleted; while nothing of ours can be restored,
    ``latest_checkpoint`` is the one TF's state file names, as with TF's manager.

    Differences from TF's: ``max_to_keep=0`` keeps only the newest (TF refuses 0);
    ``checkpoints`` also lists the ones kept for best-N; TF's ``checkpoint`` state file names
    only the newest checkpoint, without per-checkpoint timestamps (so no TF saver opened here
    later rotates ours away); saving works in eager mode only (use
    :class:`keras_ckpt.estimator.CheckpointHook` in graph mode).

    With ``async_save=True``, ``save`` copies the checkpoint's values into host buffers
    (allocated at the first save and reused) and returns; one background thread writes them as
    ``checkpoint.write`` would (the same bytes), checksums, fsyncs, commits and prunes. At most
    one save is in flight: the next ``save`` (and ``restore_or_initialize``, ``sync``,
    ``close``) waits for it and raises its error if it failed (a full disk: an ``OSError``
    naming the checkpoint); a ``save`` that ``checkpoint_interval`` skips raises such an error
    only if the write is already over, without waiting. ``checkpoints``, ``latest_checkpoint``,
    ``records``, TF's ``checkpoint`` state file and rotation only ever show committed
    checkpoints. Interpreter exit waits for the save in flight. Several threads may share a
    manager: its calls run one at a time. This is keras_ckpt's own writer, not TF's
    ``CheckpointOptions(experimental_enable_async_checkpoint=True)``, which
    fails on the second save of a Keras 3 model and writes another ``save_counter`` than the
    checkpoint's (see ``keras_ckpt/_tfsnapshot.py``).

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
        keep_checkpoint_every_n_hours: preserve, as TF does, a checkpoint rotating out of the
            latest-N set when it is N hours newer than the last one preserved (spaced by the
            manifest's save times, measured from the first manager's creation).
        checkpoint_name: the prefix base name; checkpoints are ``<checkpoint_name>-<number>``.
        step_counter: a ``tf.Variable`` holding the training step; recorded as each checkpoint's
            ``step``, and required with ``checkpoint_interval``.
        checkpoint_interval: ``save`` skips unless ``step_counter`` advanced this many steps
            since the previous save.
        init_fn: called by ``restore_or_initialize`` when there is nothing to restore.
        last_checkpoint_step: the ``step_counter`` value of the last checkpoint saved, where
            ``checkpoint_interval`` starts counting (None: the first ``save`` saves).
        keep_best: also keep the N best checkpoints by ``monitor``/``mode``.
        monitor: the key of ``save(metrics=...)`` ranked for best-N.
        mode: ``"min"``, ``"max"``, or ``"auto"`` (inferred from the monitor's name).
        async_save: ``True``: ``save`` snapshots the values into reused host buffers and the
            write, checksum, fsync, commit and rotation happen on a background thread.

    Attributes:
        last_checkpoint_step: the ``step_counter`` value at the last save or restore (with
            ``checkpoint_interval``), as in TF.
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
        last_checkpoint_step: int | None = None,
        *,
        keep_best: int = 0,
        monitor: str | None = None,
        mode: str = "auto",
        async_save: bool = False,
    ) -> None:
        if not all(callable(getattr(checkpoint, m, None)) for m in ("write", "restore")):
            raise TypeError(
                "checkpoint must be a tf.train.Checkpoint (the object whose variables are "
                f"saved). Received: checkpoint={checkpoint!r}"
            )
        async_save = check_bool("async_save", async_save)
        validate_positive_number("keep_checkpoint_every_n_hours", keep_checkpoint_every_n_hours)
        validate_count("checkpoint_interval", checkpoint_interval, minimum=1)
        if checkpoint_interval is not None and step_counter is None:
            raise ValueError(
                "checkpoint_interval counts steps of step_counter: pass step_counter=<a "
                f"tf.Variable> as well. Received: checkpoint_interval={checkpoint_interval!r}, "
                "step_counter=None"
            )
        if last_checkpoint_step is not None and (
            isinstance(last_checkpoint_step, bool) or not isinstance(last_checkpoint_step, int)
        ):
            raise TypeError(
                "last_checkpoint_step must be an integer step or None. "
                f"Received: last_checkpoint_step={last_checkpoint_step!r}"
            )
        if init_fn is not None and not callable(init_fn):
            raise TypeError(f"init_fn must be callable or None. Received: init_fn={init_fn!r}")
        directory = validate_directory("directory", directory)
        validate_basename("checkpoint_name", checkpoint_name)
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
        self._closed = False
        self._snapshots = _tfsnapshot.Snapshots() if async_save else None
        self._warned_synchronous = False
        # The one save in flight (keras_ckpt._async says who owns what meanwhile). It sets
        # _latest once its checkpoint is committed: a reference, read here in one step.
        self._writer = BackgroundWriter()
        # One save (or restore, sync, close) at a time, whichever thread calls: the snapshot
        # buffers, the writer's one slot and TF's lazily created save_counter are not shared safely.
        self._lock = threading.RLock()  # init_fn may save
        # TF keeps it only with checkpoint_interval; so do we (it is what the interval counts from).
        self._last_checkpoint_step = last_checkpoint_step if checkpoint_interval is not None else None
        created = time.time()
        self._series = PrefixSeries(
            self._directory,
            checkpoint_name,
            framework="tf",
            policy=policy,
            argname="directory",
            foreign_hint=_FOREIGN_HINT,
        )
        try:
            self._latest = self._series.open(adopt=True)
        except storage.ReadOnlyDirectory as e:
            # As TF's manager: an evaluation job restores from a read-only mount. A save goes
            # through _closed: it tries to become the writer, and that error says why it cannot.
            self._latest = self._series.open_read_only()
            self._closed = True
            why = e.__cause__.strerror if isinstance(e.__cause__, OSError) else None
            warnings.warn(f"keras_ckpt: directory {self._directory!r} cannot be written ({why or e}): "
                          "this CheckpointManager restores from it, and save() raises.", stacklevel=2)
        self._hours = self._start_hours_anchor(policy, created)
        self._foreign_latest = None if self._latest is not None else self._state_file_latest()

    def _start_hours_anchor(self, policy: Any, created: float) -> HoursAnchor:
        """Set up TF's every-N-hours bookkeeping: the anchor, and TF's guard for a clock reset."""
        engine = self._series.engine
        anchor = HoursAnchor(engine)
        if anchor.value is None:
            # As TF: a first manager measures from its creation (a second early, against races).
            anchor.value = created - 1.0
        elif created < anchor.value:
            warnings.warn(
                f"time.time() returned a value {anchor.value - created:f} seconds behind the last "
                f"preserved checkpoint timestamp (in {self._series.directory}): the clock went "
                "backwards. The checkpoints there now are kept (never deleted by rotation).",
                stacklevel=3,
            )
            anchor.value = created
            anchor.preserved = frozenset(r.name for r in engine.records)
        engine.set_policy(TFHoursPolicy(**{
            f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)
        }, anchor=anchor))
        return anchor

    def _state_file_latest(self) -> str | None:
        """The checkpoint TF's state file names, when it exists (TF's ``latest_checkpoint``)."""
        state = self._series.read_state()
        if state is None or not state.model_checkpoint_path:
            return None
        path = state.model_checkpoint_path
        if not tf.io.gfile.exists(path + ".index"):
            return None
        if os.path.dirname(path) == self._series.directory:
            # Spelled as TF's manager spells it: joined to the directory as given.
            return os.path.join(self._directory, os.path.basename(path))
        return path

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
    def last_checkpoint_step(self) -> int | None:
        """The ``step_counter`` value at the last save or restore (with ``checkpoint_interval``)."""
        return self._last_checkpoint_step

    @property
    def latest_checkpoint(self) -> str | None:
        """The prefix of the newest checkpoint (at construction: the newest that verifies).

        While this manager has none, the checkpoint TF's state file names (as TF's manager).
        """
        if self._latest is None:
            return self._foreign_latest
        return self._series.prefix(self._latest)

    @property
    def checkpoints(self) -> list[str]:
        """The prefixes of the managed checkpoints (latest-N and best-N), oldest first.

        As in TF, checkpoints preserved by ``keep_checkpoint_every_n_hours`` (or kept because
        the clock went backwards) are not listed.
        """
        return [
            self._series.prefix(r)  # type: ignore[misc]
            for r in self._series.engine.records
            if not (set(r.kept) <= {EVERY_N_HOURS} and r.kept) and r.name not in self._hours.preserved
        ]

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
            The new checkpoint's prefix (with ``async_save``: the prefix it has once committed;
            ``sync()`` waits for that), or None when ``checkpoint_interval`` skipped the save.
        """
        _check_save_arguments(checkpoint_number, metrics, options)
        with self._lock:
            return self._save(checkpoint_number, check_interval, options, metrics)

    def _save(
        self,
        checkpoint_number: int | tf.Variable | None,
        check_interval: bool,
        options: tf.train.CheckpointOptions | None,
        metrics: Mapping[str, Any] | None,
    ) -> str | None:
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
                self._writer.poll()
                return None
        # A save in flight first (its error is raised here): never two, and nothing below
        # changes for a save that does not happen.
        self._writer.wait()
        if self._closed:  # become the directory's writer again before anything is staged there
            self._series.engine.open("directory", self._directory)
            self._closed = False
        if self._checkpoint_interval is not None:
            self._last_checkpoint_step = step
        counter = self._checkpoint.save_counter
        counter.assign_add(1)
        number = _as_int(counter if checkpoint_number is None else checkpoint_number)
        values = scalar_logs(metrics)
        warn_if_unscored(values, self._series.engine.policy, f"checkpoint number {number}")
        self._series.check_foreign()  # here, not on the writer: its warning is this call's
        write, background = self._capture(options)

        def commit() -> None:
            tx = self._series.commit(number, write, step=step, metrics=values)
            self._latest = tx.record

        if background:
            self._writer.submit(commit)
        else:
            commit()
        return os.path.join(self._directory, f"{self._series.basename}-{number}")

    def _capture(
        self, options: tf.train.CheckpointOptions | None
    ) -> tuple[Callable[[str], None], bool]:
        """How this save writes its files, and whether that may happen on the writer thread:
        from a snapshot taken now (``async_save``), else from the live variables."""
        if self._snapshots is not None:
            reason = _tfsnapshot.unavailable(self._checkpoint, options)
            snapshot = self._snapshots.take(self._checkpoint) if reason is None else None
            if snapshot is not None:
                return (lambda prefix: snapshot.write(prefix, options)), True
            self._warn_synchronous(reason or "the checkpoint holds objects with a registered "
                                   "saver, which TF writes from the live objects")

        def write(prefix: str) -> None:
            self._checkpoint.write(prefix, options=options)
            # The engine commits complete files only: wait for an asynchronous write.
            self._checkpoint.sync()

        return write, False

    def _warn_synchronous(self, reason: str) -> None:
        if not self._warned_synchronous:
            self._warned_synchronous = True
            warnings.warn(f"async_save: saving synchronously, because {reason}.", stacklevel=4)

    def restore_or_initialize(self) -> str | None:
        """Restore the newest checkpoint that verifies, or call ``init_fn`` when there is none.

        Returns:
            The restored prefix, or None.
        """
        with self._lock:
            self._writer.wait()
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
        """Wait for the save in flight (``async_save``) and raise its error if it failed; then
        for TF's own outstanding checkpoint operations."""
        with self._lock:
            self._writer.wait()
            self._checkpoint.sync()

    def close(self) -> None:
        """Wait for the save in flight, then let other processes write the directory.

        The save's error, if it failed, is raised once the directory is released. A later
        ``save`` takes the directory again.
        """
        with self._lock:
            try:
                self._writer.wait()
            finally:
                self._series.engine.close()
                self._closed = True
