"""What the two TensorFlow front-ends share: TF checkpoint prefixes committed by the engine.

A TF checkpoint is a *prefix* (``model.ckpt-60``) naming several files (``.index``,
``.data-*-of-*``, for TF1 Savers a ``.meta``). TF's writers pick those names themselves, so they
write into a staging directory the engine owns and each file is adopted under its own name. After
every commit, TF's own ``checkpoint`` state file is pointed at the newest checkpoint, so
``tf.train.latest_checkpoint`` and everything built on it (Estimator, MonitoredTrainingSession)
resume natively.

Used by :mod:`keras_ckpt.estimator` (TF1 graph mode, TF <= 2.15 with tensorflow-estimator, or
``tf.compat.v1`` in any TF 2.x) and :mod:`keras_ckpt.tf` (TF2 eager). Imports TensorFlow, never
Keras.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import tensorflow as tf
from google.protobuf import text_format

from keras_ckpt import manifest as mf
from keras_ckpt import storage
from keras_ckpt.engine import Engine, Transaction
from keras_ckpt.manifest import Record
from keras_ckpt.policy import RetentionPolicy, resolve_mode, score, undecidable_mode

STATE_FILE = "checkpoint"


def build_policy(
    *,
    max_to_keep: Any,
    keep_best: Any,
    keep_every_n_hours: Any,
    monitor: str | None,
    mode: str,
) -> RetentionPolicy:
    """Validate the retention arguments (ValueErrors name the argument) and build the policy."""
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max'. Received: mode={mode!r}")
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        raise ValueError(f"monitor must be a non-empty string or None. Received: monitor={monitor!r}")
    resolved = resolve_mode(mode, monitor)
    if resolved is None:
        raise undecidable_mode(monitor)
    policy = RetentionPolicy(
        max_to_keep=max_to_keep,
        keep_best=keep_best,
        keep_every_n_hours=keep_every_n_hours,
        monitor=monitor,
        mode=resolved,
    )
    if policy.keep_best and monitor is None:
        raise ValueError(
            "keep_best > 0 ranks checkpoints by a metric: pass monitor=... as well. "
            f"Received: keep_best={keep_best!r}, monitor=None"
        )
    return policy


def warn_if_unscored(metrics: Mapping[str, Any], policy: RetentionPolicy, where: str) -> None:
    """Keras's warning when best-N needs the monitor and this checkpoint lacks it (or it is NaN)."""
    if not policy.keep_best or score(metrics, policy.monitor) is not None:
        return
    if policy.monitor in metrics:
        message = f"{policy.monitor} is NaN: {where} is never ranked best."
    else:
        message = f"Can save best model only with {policy.monitor} available ({where})."
    warnings.warn(message, stacklevel=3)


def _staged_files(staged_prefix: str) -> list[str]:
    """The files a TF writer produced for ``staged_prefix``: ``.index`` first (the record's main file)."""
    directory, base = os.path.split(staged_prefix)
    names = [
        n
        for n in os.listdir(directory)
        if n == base + ".index" or n == base + ".meta" or n.startswith(base + ".data-")
    ]
    if base + ".index" not in names:
        raise RuntimeError(f"the TF writer produced no {base}.index in {directory}")
    return sorted(names, key=lambda n: (not n.endswith(".index"), n.endswith(".meta"), n))


class SeriesAttributes:
    """The read-only attributes both TF front-ends expose over their ``_series``."""

    _series: PrefixSeries

    @property
    def records(self) -> list[Record]:
        """This series' manifest records, oldest first."""
        return self._series.engine.records

    @property
    def best(self) -> float | None:
        """The best monitored value so far (None before one is known)."""
        return self._series.engine.best

    @property
    def best_checkpoint(self) -> str | None:
        """The prefix of the best checkpoint, or None."""
        engine = self._series.engine
        return self._series.prefix(engine.record_named(engine.state.best_name))


class PrefixSeries:
    """One series of TF checkpoint prefixes in one directory, committed through the engine.

    Args:
        directory: where the checkpoints, ``checkpoints.json`` and TF's ``checkpoint`` file live.
        basename: the prefix base (``model.ckpt``, ``ckpt``); checkpoints are ``basename-N``. It
            names the manifest series too.
        framework: recorded in the manifest's series state.
        policy: which checkpoints to keep.
        argname: the caller's argument that names ``directory`` (for error messages).
        foreign_hint: appended to the warning about checkpoints another saver wrote here.
    """

    def __init__(
        self,
        directory: str,
        basename: str,
        *,
        framework: str,
        policy: RetentionPolicy,
        argname: str,
        foreign_hint: str,
    ) -> None:
        self.engine = Engine(os.path.join(directory, basename), framework=framework, policy=policy)
        self.directory = self.engine.directory
        self._given_directory = directory
        self.basename = basename
        self._argname = argname
        self._foreign_hint = foreign_hint
        self._state_text: str | None = None  # what we last wrote into TF's state file
        self._warned_foreign = False

    # -- set-up and restore -------------------------------------------------------------------

    def open(self) -> Record | None:
        """Load the manifest and point TF's state file at the newest checkpoint that verifies.

        A corrupt newest checkpoint is skipped with a warning (the engine names it). Returns the
        record TF will restore from, or None.
        """
        self.engine.open(self._argname)
        record = self.engine.latest_valid()
        if record is not None:
            self.point_state_file(record.name)
        elif self.engine.records and self._state_names_ours():
            # Every checkpoint of ours is corrupt: TF must not try to restore one of them.
            storage.remove_quietly(os.path.join(self.directory, STATE_FILE))
        self.check_foreign()
        return record

    def prefix(self, record: Record | None) -> str | None:
        """The checkpoint prefix TF's readers take (``tf.train.load_checkpoint``, ``restore``).

        Joined to the directory as the caller spelled it, as TF's own managers do.
        """
        return None if record is None else os.path.join(self._given_directory, record.name)

    # -- saving -------------------------------------------------------------------------------

    def commit(
        self,
        number: int,
        write: Callable[[str], Any],
        *,
        step: int,
        metrics: Mapping[str, Any] | None = None,
        pending: bool = False,
    ) -> Transaction:
        """Write checkpoint ``basename-number`` with ``write(staged_prefix)`` and commit it.

        The engine renames the files into place and commits the record (files checksummed);
        TF's state file then names the new checkpoint, before retention deletes anything.
        """
        self.check_foreign()
        name = f"{self.basename}-{number}"
        main = os.path.join(self.directory, name + ".index")
        # Step-based TF saves have no epochs: epoch 0, step = the global step.
        with self.engine.transaction(
            main, epoch=0, step=step, metrics=metrics, pending=pending,
            on_commit=lambda record: self.point_state_file(record.name),
        ) as tx:
            staged = os.path.join(tx.staging_dir(), name)
            write(staged)
            for file_name in _staged_files(staged):
                tx.adopt(os.path.join(os.path.dirname(staged), file_name), file_name)
        return tx

    # -- TF's state file ----------------------------------------------------------------------

    def point_state_file(self, name: str) -> None:
        """Make TF's ``checkpoint`` file name ``name`` only.

        Only the newest is listed: TF's Saver adopts every path in ``all_model_checkpoint_paths``
        when it restores and later rotates them away. Paths are written relative (the directory is
        absolute here; TF resolves a relative ``save_dir`` against the current directory), so a
        copied directory still resolves to its own files. No timestamps are written, so a stock
        ``tf.train.CheckpointManager`` opened here later does not take them over either.
        """
        proto = tf.compat.v1.train.generate_checkpoint_state_proto(
            self.directory, name, all_model_checkpoint_paths=[name]
        )
        text = text_format.MessageToString(proto)
        self._state_text = text
        if self._read_state_file() != text:
            storage.atomic_write_bytes(os.path.join(self.directory, STATE_FILE), text.encode())

    def _read_state_file(self) -> str | None:
        with contextlib.suppress(FileNotFoundError):
            with open(os.path.join(self.directory, STATE_FILE), encoding="utf-8") as f:
                return f.read()
        return None

    def _state_names_ours(self) -> bool:
        state = tf.train.get_checkpoint_state(self.directory)
        names = {r.name for r in self.engine.records}
        return state is not None and os.path.basename(state.model_checkpoint_path) in names

    # -- another saver in the same directory --------------------------------------------------

    def check_foreign(self) -> None:
        """Warn (once) when another saver writes TF checkpoints or the state file here.

        Two rotation schemes in one directory delete each other's files; keras_ckpt itself never
        deletes a file its manifest does not list, so all it can do is say so.
        """
        if self._warned_foreign:
            return
        listed = {f.path for r in mf.load(self.directory).checkpoints for f in r.files}
        foreign = sorted(
            n[: -len(".index")]
            for n in os.listdir(self.directory)
            if n.endswith(".index") and n not in listed and not n.startswith(storage.TMP_PREFIX)
        )
        state = self._read_state_file()
        rewritten = self._state_text is not None and state is not None and state != self._state_text
        if not foreign and not rewritten:
            return
        self._warned_foreign = True
        what = []
        if foreign:
            what.append(f"checkpoints that checkpoints.json does not list ({', '.join(foreign)})")
        if rewritten:
            what.append(f"a '{STATE_FILE}' state file that keras_ckpt did not write")
        warnings.warn(
            f"keras_ckpt: {self.directory} holds {' and '.join(what)}: another saver writes here "
            "(or a save was interrupted). Two savers rotating in one directory delete each "
            f"other's files; keras_ckpt never deletes files it did not write. {self._foreign_hint}",
            stacklevel=3,
        )
