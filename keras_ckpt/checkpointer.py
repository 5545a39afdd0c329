"""The lifecycle shared by the ``ModelCheckpoint`` front-ends (Keras, PyTorch).

A front-end forwards its training events here; this class validates the arguments, decides when
a save is due (``save_freq``, ``save_every_n_seconds``, ``save_best_only``), names the file the way
Keras does, builds the framework-neutral training state, and hands the payload writer a
transaction from the engine. The front-end only captures and restores framework objects.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import string
import time
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Callable

from keras_ckpt import manifest as mf
from keras_ckpt import rng
from keras_ckpt.engine import Engine, Transaction, locate
from keras_ckpt.manifest import Record
from keras_ckpt.policy import (
    UNSET,
    RetentionPolicy,
    SaveSchedule,
    resolve_mode,
    resolve_preset,
    score,
    undecidable_mode,
    validate_positive_number,
)

STATE_FORMAT = 1
_TEMPLATE = re.compile(r"\{(epoch|batch)(?:[:!][^}]*)?\}")

# Writes the payload: (transaction, rendered path, training state) -> None.
PayloadWriter = Callable[[Transaction, str, dict], None]


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


class _Fill(dict):
    """Log values for rendering a name where the logs are not known: missing keys read as NaN."""

    def __missing__(self, key: str) -> float:
        return float("nan")


_PLACEHOLDER_NAMES = ("epoch", "batch")


def check_template(filepath: str) -> None:
    """Render ``filepath`` once with stand-in values so a broken template fails at construction.

    Catches bad format specs (``{epoch:zz}``), unbalanced braces, positional fields, and names
    that are a typo of ``epoch``/``batch`` (``{epcoh}``); other names are log keys, known only
    once training logs them.
    """
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(filepath) if f is not None]
    except ValueError as e:
        raise ValueError(f"filepath is not a valid template ({e}). Received: filepath={filepath!r}") from None
    for name in fields:
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not root or root.isdigit():
            raise ValueError(
                "filepath placeholders must be named ({epoch}, {batch} or a log key such as "
                f"{{val_loss:.3f}}). Received: filepath={filepath!r}"
            )
        close = difflib.get_close_matches(root, _PLACEHOLDER_NAMES, n=1, cutoff=0.6)
        if root not in _PLACEHOLDER_NAMES and close and not root.startswith(("val_", "loss")):
            raise ValueError(
                f"filepath has a placeholder {{{root}}}: did you mean {{{close[0]}}}? "
                f"Received: filepath={filepath!r}"
            )
    try:
        filepath.format_map(_Fill(epoch=1, batch=1))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"filepath cannot be rendered ({e}). Received: filepath={filepath!r}") from None


def check_resume_path(resume: str) -> None:
    """``resume=<path>`` must exist and hold something to restore; ValueError naming it else."""
    if not os.path.exists(resume):
        raise ValueError(
            f"resume must be True, False or an existing checkpoint file or directory; this path "
            f"does not exist. Received: resume={resume!r}"
        )
    if os.path.isdir(resume):
        try:
            m = mf.load(resume)
        except mf.ManifestError as e:
            raise ValueError(f"resume={resume!r}: {e}") from e
        if not m.checkpoints:
            raise ValueError(
                f"resume={resume!r} is a directory without keras_ckpt checkpoints (no records in "
                f"{mf.FILENAME}); pass the path of a checkpoint file to restore from it."
            )
    elif not os.path.isfile(resume):
        raise ValueError(f"resume must name a regular file or a directory. Received: resume={resume!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool) and value not in (0, 1):
        raise TypeError(f"{name} must be True or False. Received: {name}={value!r}")


class Checkpointer:
    """Framework-neutral core of a ``ModelCheckpoint``.

    Args:
        filepath: file name template (``{epoch}``, ``{batch}`` and log keys, as Keras).
        framework: recorded in the manifest's series.
        owner: the front-end's class name, used in Keras's warning texts.
        print_fn: where verbose messages go.
        The remaining arguments are the public ``ModelCheckpoint`` ones (see DESIGN.md).
    """

    def __init__(
        self,
        filepath: str,
        *,
        framework: str,
        owner: str = "ModelCheckpoint",
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_freq: str | int = "epoch",
        mode: str = "auto",
        initial_value_threshold: float | None = None,
        max_to_keep: Any = UNSET,
        keep_best: Any = UNSET,
        keep_every_n_epochs: Any = UNSET,
        keep_every_n_hours: Any = UNSET,
        save_every_n_seconds: Any = UNSET,
        resume: bool | str | os.PathLike = False,
        preset: str | None = None,
        print_fn: Callable[[str], None] = print,
    ) -> None:
        if not isinstance(filepath, (str, os.PathLike)):
            raise TypeError(f"filepath must be a str or os.PathLike. Received: filepath={filepath!r}")
        self.filepath = os.fspath(filepath)
        if not isinstance(self.filepath, str) or not self.filepath:
            raise TypeError(f"filepath must be a non-empty str path. Received: filepath={filepath!r}")
        check_template(self.filepath)
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor must be a non-empty string. Received: monitor={monitor!r}")
        if isinstance(verbose, bool) or not isinstance(verbose, int) or verbose < 0:
            raise TypeError(f"verbose must be an integer >= 0 (0, 1 or 2). Received: verbose={verbose!r}")
        _check_bool("save_best_only", save_best_only)
        self.monitor = monitor
        self.verbose = verbose
        self.save_best_only = bool(save_best_only)
        self.print_fn = print_fn
        if mode not in ("auto", "min", "max"):
            warnings.warn(f"{owner} mode '{mode}' is unknown, fallback to auto mode.", stacklevel=3)
            mode = "auto"
        self.mode = mode
        if save_freq != "epoch" and (
            isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq <= 0
        ):
            raise ValueError(
                "save_freq must be 'epoch' or an integer > 0 (a number of batches). "
                f"Received: save_freq={save_freq!r}"
            )
        self.save_freq = save_freq
        if initial_value_threshold is not None:
            try:
                initial_value_threshold = float(initial_value_threshold)
            except (TypeError, ValueError):
                raise ValueError(
                    "initial_value_threshold must be a number or None. "
                    f"Received: initial_value_threshold={initial_value_threshold!r}"
                ) from None
        if not isinstance(resume, (bool, str, os.PathLike)):
            raise ValueError(
                "resume must be True, False or a path to a checkpoint file or directory. "
                f"Received: resume={resume!r}"
            )
        if not isinstance(resume, bool):
            resume = os.fspath(resume)
            check_resume_path(resume)
        self.resume = resume
        opts = resolve_preset(
            preset,
            {
                "max_to_keep": max_to_keep,
                "keep_best": keep_best,
                "keep_every_n_epochs": keep_every_n_epochs,
                "keep_every_n_hours": keep_every_n_hours,
                "save_every_n_seconds": save_every_n_seconds,
            },
        )
        validate_positive_number("save_every_n_seconds", opts["save_every_n_seconds"])
        policy = RetentionPolicy(
            max_to_keep=opts["max_to_keep"],
            keep_best=opts["keep_best"],
            keep_every_n_epochs=opts["keep_every_n_epochs"],
            keep_every_n_hours=opts["keep_every_n_hours"],
            monitor=monitor,
            mode=resolve_mode(mode, monitor) or "min",
        )
        directory, base = os.path.split(self.filepath)
        if "{" in directory:
            raise ValueError(
                "filepath may use placeholders in its file name only, not in its directory. "
                f"Received: filepath={self.filepath!r}"
            )
        rotates = (policy.max_to_keep is not None and policy.max_to_keep > 1) or policy.keep_best > 0
        if rotates and not _TEMPLATE.search(base):
            raise ValueError(
                "filepath names a single file (no {epoch} or {batch} placeholder), so it cannot "
                f"hold max_to_keep={policy.max_to_keep} / keep_best={policy.keep_best} "
                f"checkpoints. Add '{{epoch:03d}}' to the name. Received: filepath={self.filepath!r}"
            )
        self.schedule = SaveSchedule(
            every_n_epochs=opts["save_every_n_epochs"] if save_freq == "epoch" else None,
            every_n_batches=save_freq if save_freq != "epoch" else None,
            every_n_seconds=opts["save_every_n_seconds"],
            # The "long" preset checks the clock at epoch ends only; an explicit argument is per batch.
            seconds_at_batch=save_every_n_seconds is not UNSET,
        )
        self.engine = Engine(
            self.filepath, framework=framework, policy=policy, initial_best=initial_value_threshold
        )
        self.restored_path: str | None = None
        self._import: tuple[str, Record | None] | None = None
        self._renamed_warned = False
        self._began = False
        self.restored_state: dict | None = None
        self.epochs_done = 0
        self.start_batch = 0
        self.step = 0
        self._running_epoch = 0
        self._batches_since_save = 0
        self._last_batch_seen: int | None = None
        self._last_save = time.monotonic()

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
        self._import = None
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
            record = self.engine.latest_valid()
            return self.engine.path_of(record) if record else None
        own = self.engine.latest_valid() if self.engine.records else None
        if os.path.realpath(os.fspath(self.resume)) == os.path.realpath(self.engine.directory):
            return self.engine.path_of(own) if own else None
        path, record = locate(os.fspath(self.resume), series=self.engine.series)
        if own is not None and (record is None or own.step >= record.step):
            # A restarted job of a chain: its own output went on past what it was seeded with.
            self._say(f"resume={self.resume!r}: continuing from this directory's newer "
                      f"checkpoint {own.name} (step {own.step}) instead")
            return self.engine.path_of(own)
        self._import = (path, record)
        return path

    def end(self) -> None:
        """Training ended (or failed): let other processes write this directory again."""
        self.engine.close()

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
        self.epochs_done = int(state.get("epoch", 0))
        self.step = int(state.get("step", 0))
        batch = state.get("batch")
        # ``batch`` is the 0-based index of the last batch trained before a mid-epoch save.
        self.start_batch = 0 if batch is None else int(batch) + 1
        self._running_epoch = self.epochs_done
        if state.get("rng"):
            rng.restore(state["rng"])
        monitor_state = state.get("monitor") or {}
        if monitor_state.get("monitor") == self.monitor and monitor_state.get("mode") in (
            None, self.engine.policy.mode
        ):
            self.engine.adopt_best(monitor_state.get("best"))
        if self._import is not None:
            self._import_restored(state)

    def _import_restored(self, state: Mapping[str, Any]) -> None:
        """Copy the checkpoint restored from another directory into this series (job chains)."""
        source, record = self._import  # type: ignore[misc]
        self._import = None
        metrics = dict(record.metrics) if record is not None else {}
        batch = state.get("batch")
        epoch = max(self.epochs_done - (1 if batch is None else 0), 0)
        dest = os.path.join(self.engine.directory, os.path.basename(
            self.render(epoch, batch, _Fill(metrics))
        ))
        if os.path.splitext(dest)[1] != os.path.splitext(source)[1]:
            return  # another format than this series writes: nothing to carry over
        copied = self.engine.import_checkpoint(
            source, record, dest, epoch=self.epochs_done, step=self.step, metrics=metrics
        )
        self._say(f"Copied {source} into this run's output as {copied.name}")

    def training_state(self, batch: int | None) -> dict[str, Any]:
        """What every checkpoint file carries besides the framework objects."""
        return {
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
        try:
            if batch is None or "batch" in logs:
                return self.filepath.format(epoch=epoch + 1, **logs)
            return self.filepath.format(epoch=epoch + 1, batch=batch + 1, **logs)
        except KeyError as e:
            raise KeyError(
                f'Failed to format this callback filepath: "{self.filepath}". Reason: {e}'
            ) from e

    def save(
        self, epoch: int, batch: int | None, logs: Mapping[str, Any] | None, write: PayloadWriter
    ) -> Record | None:
        """Save now unless ``save_best_only`` says no; return the committed record."""
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
            else:  # Keras's text; like Keras it saves anyway
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
        with self.engine.transaction(
            path, epoch=self.epochs_done, step=self.step, metrics=metrics
        ) as tx:
            write(tx, path, state)
        self._last_save = time.monotonic()
        self._batches_since_save = 0
        for gone in tx.deleted:
            self._say(f"Epoch {epoch + 1}: removed checkpoint {gone.name} (retention)", level=2)
        self._say(f"\nEpoch {epoch + 1}: finished saving model to {path}")
        return tx.record

    def _unique(self, path: str) -> str:
        """Never replace the committed best with another training state under the same name.

        A templated name renders again after a resume from a mid-epoch checkpoint (the epoch's
        batches are counted from 0 again); such a save gets a run-unique name,
        ``<name>.step<step><ext>``. Single-file names (no placeholder) are replaced, as users of
        ``best.keras`` / ``last.pt`` expect.
        """
        if "{" not in os.path.basename(self.filepath):
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
