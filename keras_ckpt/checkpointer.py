"""The lifecycle shared by the ``ModelCheckpoint`` front-ends (Keras, PyTorch).

A front-end forwards its training events here; this class validates the arguments, decides when
a save is due (``save_freq``, ``save_every_n_seconds``, ``save_best_only``), names the file the way
Keras does, builds the framework-neutral training state, and hands the payload writer a
transaction from the engine. The front-end only captures and restores framework objects.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Callable, TypeVar

from keras_ckpt import manifest as mf
from keras_ckpt import rng
from keras_ckpt._async import BackgroundWriter
from keras_ckpt.config import CheckpointConfig, LogValues
from keras_ckpt.engine import Engine, Transaction, locate
from keras_ckpt.manifest import Record
from keras_ckpt.policy import (
    RetentionPolicy,
    resolve_mode,
    score,
    undecidable_mode,
)
from keras_ckpt.preemption import PreemptionGuard
from keras_ckpt.storage import HeldFile, StreamedRead

STATE_FORMAT = 1
T = TypeVar("T")



@dataclass(frozen=True)
class Payload:
    """One checkpoint's content, captured from the framework objects, ready to stream.

    ``write(tx)`` streams it into the engine's transaction. ``detached``: it holds its own copy
    of the state (snapshot buffers), so it may be written on the background writer while
    training goes on; otherwise it reads the live objects and is written before the save returns.
    """

    write: Callable[[Transaction], None]
    detached: bool


# Captures the payload: (rendered path, training state, snapshot?) -> Payload. With snapshot
# True the front-end copies the state into its reusable host buffers (``async_save``).
Capture = Callable[[str, dict, bool], Payload]


def scalar_logs(logs: Mapping[str, Any] | None) -> dict[str, float]:
    """The scalar numeric entries of ``logs`` as floats (numpy/tensor scalars included)."""
    out: dict[str, float] = {}
    for key, value in (logs or {}).items():
        shape = getattr(value, "shape", ())
        if shape not in ((), None) and tuple(shape) != ():
            continue
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def check_state(path: str, state: Mapping[str, Any] | None) -> None:
    """ValueError naming ``path`` if the training state's counters are damaged; front-ends call
    it before assigning anything, so that a refused file leaves no variable loaded."""
    if state is not None and not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a damaged training state: a mapping was expected. "
                         f"Received: {type(state).__name__}")
    for key in ("epoch", "step", "batch"):
        value = (state or {}).get(key, None if key == "batch" else 0)
        # A mid-epoch resume skips ``batch`` + 1 batches: garbage here would train the wrong
        # batches (or fail deep inside the framework), so the file is refused before training.
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise ValueError(
                f"{path} holds a damaged training state: {key} must be a non-negative "
                f"integer{' or None' if key == 'batch' else ''}. Received: {key}={value!r}"
            )


class Checkpointer:
    """Framework-neutral core of a ``ModelCheckpoint``.

    Args:
        config: the validated public arguments.
        framework: recorded in the manifest's series.
        print_fn: where verbose messages go.
    """

    def __init__(
        self, config: CheckpointConfig, *, framework: str, print_fn: Callable[[str], None] = print
    ) -> None:
        self.config = config
        self.filepath = config.filepath
        self.monitor = config.monitor
        self.verbose = config.verbose
        self.save_best_only = config.save_best_only
        self.mode = config.mode
        self.save_freq = config.save_freq
        self.resume = config.resume
        self.schedule = config.schedule
        self.print_fn = print_fn
        self.engine = Engine(
            self.filepath, framework=framework, policy=config.policy,
            initial_best=config.initial_value_threshold,
        )
        self.restored_path: str | None = None
        # resume=<another directory>: (the file, its record, the file held open since it verified)
        self._import: tuple[str, Record | None, HeldFile | None] | None = None
        self._verify_on_load: Record | None = None  # what load() checksums as it reads
        self._renamed_warned = False
        self._began = False
        self.restored_state: dict | None = None
        self.epochs_done = 0
        self.start_batch = 0
        # The global RNGs as the running epoch began (before its batch order was drawn), saved
        # in mid-epoch checkpoints so that a resume draws the same order again.
        self.epoch_rng: dict[str, Any] | None = None
        self.step = 0
        self._running_epoch = 0
        self._batches_since_save = 0
        self._last_batch_seen: int | None = None
        self._last_save = time.monotonic()
        # save_on_preemption: installed by the front-end at train begin, acted on at batch ends.
        self.preemption = PreemptionGuard(config.preemption_signals)
        self.async_save = config.async_save
        # async_save: the one save in flight (see keras_ckpt._async for who owns what meanwhile).
        self._writer = BackgroundWriter()

    # -- what the front-ends expose ------------------------------------------------------------

    @property
    def needs_batch_events(self) -> bool:
        return self.schedule.every_n_batches is not None or (
            self.schedule.every_n_seconds is not None and self.schedule.seconds_at_batch
        )

    @property
    def policy(self) -> RetentionPolicy:
        return self.engine.policy

    @property
    def best(self) -> float | None:
        return self.engine.best

    @property
    def best_path(self) -> str | None:
        return self.engine.best_path

    @property
    def latest_path(self) -> str | None:
        return self.engine.latest_path

    @property
    def checkpoints(self) -> list[Record]:
        return self.engine.records

    # -- lifecycle ----------------------------------------------------------------------------

    def begin(self, infer_mode: Callable[[], str | None] | None = None) -> str | None:
        """Become the directory's writer, check the monitor's direction; return the path to
        restore from, if any."""
        self._writer.wait()  # a fit that raised may have left its last save in flight
        self.engine.open("filepath")
        try:
            return self._begin(infer_mode)
        except BaseException:
            self.engine.close()
            raise

    def _begin(self, infer_mode: Callable[[], str | None] | None) -> str | None:
        mode = resolve_mode(self.mode, self.monitor)
        if mode is None and infer_mode is not None:
            mode = infer_mode()
        if mode is None:
            raise undecidable_mode(self.monitor)
        self.engine.set_policy(replace(self.engine.policy, mode=mode))
        self._last_save = time.monotonic()
        self._last_batch_seen = None
        self._batches_since_save = 0
        self._release_import()
        self._verify_on_load = None
        first_begin, self._began = not self._began, True
        if self.resume is False:
            if first_begin and self.engine.records:
                self._warn_earlier_run()
            if first_begin:
                self.engine.start_run()
            return None
        self.engine.continue_run()
        if self.resume is True:
            if self.engine.has_foreign_checkpoints():
                warnings.warn(
                    f"resume=True: {self.engine.directory} holds checkpoint files but no "
                    "checkpoints.json (not written by keras_ckpt); starting fresh and leaving "
                    "those files alone.",
                    stacklevel=3,
                )
            # Checksummed while it loads (load()): the file is read once.
            record = self._verify_on_load = self.engine.latest_plausible()
            return self.engine.path_of(record) if record else None
        own = self.engine.latest_valid() if self.engine.records else None
        if os.path.realpath(os.fspath(self.resume)) == os.path.realpath(self.engine.directory):
            return self.engine.path_of(own) if own else None
        path, record, held = locate(os.fspath(self.resume), series=self.engine.series)
        if own is not None and (record is None or own.step >= record.step):
            # A restarted job of a chain: its own output went on past what it was seeded with.
            if held is not None:
                held.close()
            self._say(f"resume={self.resume!r}: continuing from this directory's newer "
                      f"checkpoint {own.name} (step {own.step}) instead")
            return self.engine.path_of(own)
        self._import = (path, record, held)
        return path

    def _release_import(self) -> None:
        held = self._import[2] if self._import is not None else None
        self._import = None
        if held is not None:
            held.close()

    def load(self, path: str, load_file: Callable[[str, StreamedRead | None], T]) -> tuple[str, T]:
        """Load the checkpoint :meth:`begin` returned: ``load_file(path, stream)``.

        With ``resume=True`` the file's checksum is verified as it loads, from the ``stream``
        ``load_file`` reads it through, and a corrupt one is replaced by the previous good
        checkpoint (:meth:`keras_ckpt.engine.Engine.restore_newest`); returns the path loaded and
        what ``load_file`` returned. With ``resume=<path>`` the file was verified when it was
        located and is read from the descriptor held since, through ``stream``; otherwise (this
        directory's own newer checkpoint, a bare file) ``stream`` is None.
        """
        start, self._verify_on_load = self._verify_on_load, None
        held = self._import[2] if self._import is not None and self._import[0] == path else None
        if held is not None:
            with held.stream() as stream:
                try:
                    loaded = load_file(path, stream)
                except Exception:  # the loader's refusal of bytes that no longer match
                    if stream.finish() is None:
                        raise
                problem = stream.finish()
            if problem is not None:
                raise ValueError(f"resume={self.resume!r}: {path} changed after it was verified, "
                                 f"while it was loaded ({problem})")
            return path, loaded
        if start is None or self.engine.path_of(start) != path:
            return path, load_file(path, None)
        record, loaded = self.engine.restore_newest(start, load_file)
        return self.engine.path_of(record), loaded  # type: ignore[return-value]

    def end(self) -> None:
        """Training ended (or failed): let other processes write this directory again, and
        put back the signal handlers ``save_on_preemption`` replaced (a signal that arrived is
        kept for :meth:`PreemptionGuard.redeliver`). Waits for the save in flight first and
        raises its error, if it failed, once the directory is released."""
        try:
            self._writer.wait()
        finally:
            self._release_import()
            self.preemption.restore()
            self.engine.close()

    def wait(self) -> None:
        """Wait for the save in flight (``async_save``); raise its error if it failed."""
        self._writer.wait()

    def saved_current_step(self) -> bool:
        """Whether the newest committed checkpoint holds the current step (nothing to add)."""
        self._writer.wait()
        records = self.engine.records
        return bool(records) and records[-1].step == self.step

    def _warn_earlier_run(self) -> None:
        """A new run into a series with checkpoints, without resume: usually a forgotten flag."""
        records = [r for r in self.engine.records if self.engine.store.stat(r.path).kind == "file"]
        if not records:
            return
        same = self.engine.state.monitor == self.monitor
        best = "" if self.engine.best is None or not same else (
            f" (best {self.monitor} so far: {self.engine.best:g})")
        warnings.warn(
            f"resume=False, but {self.engine.directory} already holds {len(records)} checkpoint(s) "
            f"of this filepath from an earlier run, the newest {records[-1].name!r}{best}. This "
            "starts a new run: best starts afresh, those checkpoints stay listed but no longer "
            "compete for best-N, and latest-N rotates them out as this run saves. Pass "
            "resume=True to continue that run, or another filepath to keep them apart.",
            stacklevel=5,
        )

    def restored(self, path: str, state: Mapping[str, Any] | None) -> None:
        """Adopt the training state loaded from ``path`` (epoch, step, RNG, best)."""
        self.restored_path = path
        self.restored_state = dict(state) if state else None
        if not state:
            return
        check_state(path, state)
        self.epochs_done = int(state.get("epoch", 0))
        self.step = int(state.get("step", 0))
        batch = state.get("batch")
        # ``batch`` is the 0-based index of the last batch trained before a mid-epoch save.
        self.start_batch = 0 if batch is None else int(batch) + 1
        self.epoch_rng = state.get("epoch_rng") if batch is not None else None
        if self.start_batch:
            # The batches before start_batch are trained and saved: none counts towards the next
            # save (the straight run's count restarted at the same save).
            self._last_batch_seen = self.start_batch - 1
        self._running_epoch = self.epochs_done
        if state.get("rng"):
            rng.restore(state["rng"])
        if self._import is not None:
            # First: if the copied checkpoint is itself the best, it is the best here too.
            self._import_restored(state)
        monitor_state = state.get("monitor") or {}
        if monitor_state.get("monitor") == self.monitor and monitor_state.get("mode") in (
            None, self.engine.policy.mode
        ):
            self.engine.adopt_best(monitor_state.get("best"))

    def _import_restored(self, state: Mapping[str, Any]) -> None:
        """Copy the checkpoint restored from another directory into this series (job chains)."""
        source, record, held = self._import  # type: ignore[misc]
        try:
            metrics = dict(record.metrics) if record is not None else {}
            batch = state.get("batch")
            epoch = max(self.epochs_done - (1 if batch is None else 0), 0)
            dest = os.path.join(self.engine.directory, os.path.basename(
                self.render(epoch, batch, LogValues(metrics))
            ))
            if os.path.splitext(dest)[1] != os.path.splitext(source)[1]:
                return  # another format than this series writes: nothing to carry over
            copied = self.engine.import_checkpoint(
                source, record, dest, epoch=self.epochs_done, step=self.step, metrics=metrics,
                held=held,
            )
        finally:
            self._release_import()
        self._say(f"Copied {source} into this run's output as {copied.name}")

    def mark_epoch_begin(self, framework_rng: Mapping[str, Any] | None = None) -> None:
        """An epoch is about to draw its batch order: remember the global RNGs as they are now.

        ``framework_rng`` adds the front-end's own generators (torch's) in the form its files
        store them. A mid-epoch checkpoint carries this as ``epoch_rng``.
        """
        self.epoch_rng = {"rng": rng.capture(), **(framework_rng or {})}

    def enter_epoch_rng(
        self,
        restore: Callable[[Mapping[str, Any]], None],
        capture: Callable[[], Mapping[str, Any]],
    ) -> bool:
        """Put back the global RNGs as the resumed mid-epoch checkpoint's epoch began.

        Called just before the resumed epoch draws its batch order, so that it draws the
        interrupted run's. ``restore`` applies an ``epoch_rng`` (the front-end's generators
        included), ``capture`` returns the current state in the same form. Returns False, with
        a warning, if the checkpoint holds none (an older keras_ckpt wrote it) or one that does
        not apply (a damaged file): the RNGs are then left as they are and the epoch's order is
        drawn anew.
        """
        saved = self.epoch_rng
        if saved is None:
            reason = "it holds no epoch-begin RNG state (written by an older keras_ckpt)"
        else:
            current = capture()
            try:
                restore(saved)
                return True
            # What the RNG setters raise for a state of the wrong type, shape or range.
            except (AttributeError, TypeError, ValueError, KeyError, IndexError, OverflowError,
                    RuntimeError) as e:
                restore(current)
                self.epoch_rng = None  # the epoch's later saves must not carry it on
                reason = f"its epoch-begin RNG state (epoch_rng) is damaged ({e})"
        warnings.warn(
            f"Resuming {self.restored_path}: {reason}; the interrupted epoch's batch order is "
            "drawn anew, not the interrupted run's.",
            stacklevel=4,
        )
        return False

    def input_ran_out(self, skipped: int) -> None:
        """Warn that the resumed epoch's input has fewer batches than the interrupted run trained."""
        warnings.warn(
            f"Resuming {self.restored_path}: the input ran out after {skipped} of the "
            f"{self.start_batch} batches to skip (different data than the interrupted run?); "
            "the epoch ends here.",
            stacklevel=4,
        )

    def training_state(self, batch: int | None) -> dict[str, Any]:
        """What every checkpoint file carries besides the framework objects."""
        state = {
            "keras_ckpt": STATE_FORMAT,
            "epoch": self.epochs_done,
            "step": self.step,
            "batch": batch,
            "monitor": {
                "monitor": self.monitor,
                "mode": self.engine.policy.mode,
                "best": self.engine.best,
            },
            "rng": rng.capture(),
        }
        if batch is not None and self.epoch_rng is not None:
            state["epoch_rng"] = self.epoch_rng
        return state

    def on_epoch_begin(self, epoch: int) -> None:
        self._running_epoch = epoch

    def batch_due(self, batch: int) -> bool:
        """Count a finished batch (Keras's ``steps_per_execution`` jumps included); is a save due?"""
        if self._last_batch_seen is None or batch <= self._last_batch_seen:
            added = batch + 1
        else:
            added = batch - self._last_batch_seen
        self._last_batch_seen = batch
        self._batches_since_save += added
        due = self.schedule.due_at_batch_end(
            self._batches_since_save, time.monotonic() - self._last_save
        )
        if due:
            self._batches_since_save = 0
        return due

    def epoch_due(self, epoch: int) -> bool:
        self.epochs_done = epoch + 1
        return self.schedule.due_at_epoch_end(self.epochs_done, time.monotonic() - self._last_save)

    # -- saving -------------------------------------------------------------------------------

    def render(self, epoch: int, batch: int | None, logs: Mapping[str, Any]) -> str:
        """Keras's file naming: ``{epoch}`` is 1-based, ``{batch}`` too, log keys by name."""
        if batch is None and self._last_batch_seen is not None:
            # An epoch-end save under a {batch} template (a preemption at the epoch's end, with
            # an integer save_freq): named after the epoch's last batch, whose state it holds.
            batch = self._last_batch_seen
        try:
            if batch is None or "batch" in logs:
                return self.filepath.format(epoch=epoch + 1, **logs)
            return self.filepath.format(epoch=epoch + 1, batch=batch + 1, **logs)
        except KeyError as e:
            raise KeyError(
                f'Failed to format this callback filepath: "{self.filepath}". Reason: {e}'
            ) from e

    def save(
        self, epoch: int, batch: int | None, logs: Mapping[str, Any] | None, capture: Capture
    ) -> Record | None:
        """Save now unless ``save_best_only`` says no; return the committed record.

        With ``async_save`` the state is captured into the front-end's snapshot buffers here and
        written, committed and pruned on the background writer; this returns None then (the
        record is in ``checkpoints`` once committed). A preemption save is always synchronous.
        Either way a save still in flight is waited for first, so every decision below reads
        committed state, and its error, if it failed, is raised here.
        """
        self._writer.wait()
        logs = dict(logs or {})
        path = self._unique(self.render(epoch, batch, logs))
        metrics = scalar_logs(logs)
        uses_monitor = self.save_best_only or self.engine.policy.keep_best > 0
        if uses_monitor and score(metrics, self.monitor) is None:
            if self.monitor in metrics:  # NaN: never an improvement (Keras does not save it)
                if self.save_best_only:
                    self._say(f"\nEpoch {epoch + 1}: {self.monitor} is NaN, not saving")
                    return None
                warnings.warn(f"{self.monitor} is NaN: this checkpoint is never ranked best.",
                              stacklevel=3)
            elif not self.preemption.requested:  # Keras's text; like Keras it saves anyway
                # (A preemption save comes mid-epoch, where a validation metric cannot be.)
                warnings.warn(f"Can save best model only with {self.monitor} available.",
                              stacklevel=3)
        elif self.save_best_only:
            current = metrics[self.monitor]
            best_str = "None" if self.best is None or math.isinf(self.best) else f"{self.best:.5f}"
            if not self.engine.is_improvement(current):
                self._say(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {best_str}")
                return None
            self._say(
                f"\nEpoch {epoch + 1}: {self.monitor} improved from {best_str} to "
                f"{current:.5f}, saving model to {path}"
            )
        if not self.save_best_only:
            self._say(f"\nEpoch {epoch + 1}: saving model to {path}")
        state = self.training_state(batch)
        value = score(metrics, self.monitor)
        if self.engine.is_improvement(value):
            # The file is written before the engine commits its record: carry the best it will
            # have, so ``resume=<this file>`` elsewhere starts from the right best.
            state["monitor"]["best"] = value
        background = self.async_save and not self.preemption.requested
        payload = capture(path, state, background)
        epochs_done, step = self.epochs_done, self.step

        def commit() -> Transaction:
            with self.engine.transaction(path, epoch=epochs_done, step=step, metrics=metrics) as tx:
                payload.write(tx)
            return tx

        def saved(tx: Transaction) -> None:
            for gone in tx.deleted:
                self._say(f"Epoch {epoch + 1}: removed checkpoint {gone.name} (retention)", level=2)
            self._say(f"\nEpoch {epoch + 1}: finished saving model to {path}")

        self._batches_since_save = 0
        if background and payload.detached:
            self._last_save = time.monotonic()
            self._writer.submit(commit, saved)
            return None
        tx = commit()
        self._last_save = time.monotonic()
        saved(tx)
        return tx.record

    def _unique(self, path: str) -> str:
        """Never replace the committed best with another training state under the same name.

        A templated name renders again after a resume from a mid-epoch checkpoint (the epoch's
        batches are counted from 0 again); such a save gets a run-unique name,
        ``<name>.step<step><ext>``. Single-file names (no placeholder) are replaced, as users of
        ``best.keras`` / ``last.pt`` expect.
        """
        if self.config.single_file:
            return path
        stem = mf.checkpoint_name(path)
        existing = self.engine.record_named(stem)
        if existing is None or existing.step == self.step or "best" not in existing.kept:
            return path
        base = os.path.basename(path)
        unique = os.path.join(os.path.dirname(path), f"{stem}.step{self.step}{base[len(stem):]}")
        if not self._renamed_warned:
            self._renamed_warned = True
            warnings.warn(
                f"{os.path.basename(path)} already holds the best checkpoint (step {existing.step}); "
                f"saving step {self.step} as {os.path.basename(unique)} instead of replacing it.",
                stacklevel=4,
            )
        return unique

    def _say(self, message: str, level: int = 1) -> None:
        if self.verbose >= level:
            self.print_fn(message)


class CheckpointAttributes:
    """The attributes every ``ModelCheckpoint`` front-end exposes, read from its Checkpointer."""

    _core: Checkpointer

    @property
    def best(self) -> float | None:
        """The best ``monitor`` value so far (this series, across restarts), or None."""
        return self._core.best

    @property
    def best_path(self) -> str | None:
        """The file of the best checkpoint that is still kept, or None."""
        return self._core.best_path

    @property
    def latest_path(self) -> str | None:
        """The newest committed checkpoint's file, or None."""
        return self._core.latest_path

    @property
    def checkpoints(self) -> list[Record]:
        """This series' manifest records, oldest first."""
        return self._core.checkpoints

    @property
    def restored_path(self) -> str | None:
        """The file ``on_train_begin`` restored from, or None."""
        return self._core.restored_path

    @property
    def preempted(self) -> bool:
        """Whether the last training run saved and stopped for a preemption signal."""
        return self._core.preemption.preempted
