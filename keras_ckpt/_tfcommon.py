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

import errno
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import tensorflow as tf
from google.protobuf import text_format

from keras_ckpt import manifest as mf
from keras_ckpt import storage
from keras_ckpt.engine import Engine, Transaction
from keras_ckpt.manifest import Record
from keras_ckpt.policy import (
    EVERY_N_HOURS,
    RecordLike,
    RetentionPolicy,
    resolve_mode,
    score,
    undecidable_mode,
)

STATE_FILE = "checkpoint"
# The series-state key (checkpoints.json) of TF's ``last_preserved_timestamp``: the anchor
# ``keep_checkpoint_every_n_hours`` measures from, committed with the records it decided on.
LAST_PRESERVED = "tf_last_preserved_timestamp"
_DATA_SHARD = re.compile(r"\.data-(\d{5})-of-(\d{5})")
# Failures of a file operation that TF's writers report as an OpError ending in the OS's reason.
_IO_ERRNOS = tuple(getattr(errno, name) for name in
                   ("ENOSPC", "EDQUOT", "EFBIG", "EIO", "EROFS", "EACCES") if hasattr(errno, name))


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


def validate_directory(argname: str, value: Any) -> str:
    """``value`` as a path string; a TypeError naming ``argname`` when it is not a path."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise TypeError(f"{argname} must be a directory path. Received: {argname}={value!r}")
    path = os.fspath(value)
    if not isinstance(path, str):
        raise TypeError(f"{argname} must be a str path, not bytes. Received: {argname}={value!r}")
    return path


def validate_basename(argname: str, value: Any) -> None:
    """A checkpoint prefix base is one file name: it names files inside the directory."""
    if not isinstance(value, str) or not value or os.path.basename(value) != value or value in (".", ".."):
        raise ValueError(
            f"{argname} must be a non-empty file name (no directory part). "
            f"Received: {argname}={value!r}"
        )


def warn_if_unscored(metrics: Mapping[str, Any], policy: RetentionPolicy, where: str) -> None:
    """Keras's warning when best-N needs the monitor and this checkpoint lacks it (or it is NaN)."""
    if not policy.keep_best or score(metrics, policy.monitor) is not None:
        return
    if policy.monitor in metrics:
        message = f"{policy.monitor} is NaN: {where} is never ranked best."
    else:
        message = f"Can save best model only with {policy.monitor} available ({where})."
    warnings.warn(message, stacklevel=3)


def _prefix_files(names: Sequence[str], base: str) -> list[str] | None:
    """The files of checkpoint prefix ``base`` among ``names``, ``.index`` first (the record's main
    file); None unless they form one complete TF checkpoint (the index and every data shard)."""
    if base + ".index" not in names:
        return None
    shards = [n for n in names if n.startswith(base + ".data-")]
    parsed = [_DATA_SHARD.fullmatch(n[len(base):]) for n in shards]
    if not shards or not all(parsed):
        return None
    totals = {int(m.group(2)) for m in parsed}  # type: ignore[union-attr]
    indices = {int(m.group(1)) for m in parsed}  # type: ignore[union-attr]
    if len(totals) != 1 or indices != set(range(totals.pop())):
        return None
    files = [base + ".index", *sorted(shards)]
    if base + ".meta" in names:  # a TF1 Saver's graph
        files.append(base + ".meta")
    return files


def _as_os_error(error: tf.errors.OpError) -> OSError | None:
    """The ``OSError`` every other save raises for this failure (a full disk), or None if it is
    not a failed file operation."""
    for code in _IO_ERRNOS:
        if os.strerror(code) in (error.message or ""):
            return OSError(code, os.strerror(code))
    return None


def _staged_files(staged_prefix: str) -> list[str]:
    """The files a TF writer produced for ``staged_prefix``: ``.index`` first (the record's main file)."""
    directory, base = os.path.split(staged_prefix)
    names = storage.LocalStorage(directory).list()
    files = _prefix_files(names, base)
    if files is None:
        raise RuntimeError(f"the TF writer produced no complete {base} checkpoint in {directory}")
    return files


class HoursAnchor:
    """TF's ``last_preserved_timestamp`` of one series, kept in its manifest series state.

    ``preserved`` names checkpoints that TF would never delete although no rule marked them yet
    (those that existed when the clock was found to have gone backwards).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.preserved: frozenset[str] = frozenset()

    @property
    def value(self) -> float | None:
        value = self._engine.state.extra.get(LAST_PRESERVED)
        return None if value is None else float(value)

    @value.setter
    def value(self, timestamp: float) -> None:
        # The engine writes its series state with the retention result: one manifest commit.
        self._engine.state.extra[LAST_PRESERVED] = float(timestamp)


@dataclass(frozen=True)
class TFHoursPolicy(RetentionPolicy):
    """The retention policy with ``keep_every_n_hours`` as ``tf.train.CheckpointManager`` does it.

    A checkpoint leaving the latest-N (and best-N) set is preserved when it is at least N hours
    newer than the last preserved one, or, before any was, than the anchor the first manager set
    at its creation (TF's ``last_preserved_timestamp``); the anchor then moves to it. Once
    preserved (recorded as ``kept: every_n_hours``), a checkpoint is never deleted again, whatever
    a later manager's ``keep_checkpoint_every_n_hours`` (TF drops it from its list instead).
    """

    anchor: HoursAnchor | None = field(default=None, compare=False, repr=False)

    def retain(
        self, records: Sequence[RecordLike], *, run: int | None = None,
        protect: Mapping[str, str] | None = None,
    ) -> dict[str, tuple[str, ...]]:
        rotation = replace(self, keep_every_n_hours=None)
        reasons = {
            n: list(w) for n, w in RetentionPolicy.retain(rotation, records, run=run, protect=protect).items()
        }
        preserved = self.anchor.preserved if self.anchor is not None else frozenset()
        interval = self.keep_every_n_hours * 3600.0 if self.keep_every_n_hours else None
        for r in records:  # oldest first, as TF's sweep pops them
            kept_before = EVERY_N_HOURS in getattr(r, "kept", ()) or r.name in preserved
            if not kept_before and (r.name in reasons or interval is None or self.anchor is None):
                continue
            if not kept_before:
                last = self.anchor.value  # type: ignore[union-attr]
                if last is not None and r.time - interval < last:  # type: ignore[operator]
                    continue
                self.anchor.value = r.time  # type: ignore[union-attr]
            bucket = reasons.setdefault(r.name, [])
            if EVERY_N_HOURS not in bucket:
                bucket.append(EVERY_N_HOURS)
        order = {r.name: i for i, r in enumerate(records)}
        return {n: tuple(w) for n, w in sorted(reasons.items(), key=lambda kv: order[kv[0]])}


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

    def open(self, *, adopt: bool = False) -> Record | None:
        """Load the manifest and point TF's state file at the newest checkpoint that verifies.

        With ``adopt``, a series that has no records yet first takes over the TF checkpoints of
        its name already in the directory (see :meth:`adopt_tf_checkpoints`). A corrupt newest
        checkpoint is skipped with a warning (the engine names it). Returns the record TF will
        restore from, or None.
        """
        self.engine.open(self._argname, self._given_directory)
        self.engine.continue_run()  # TF always continues the directory's checkpoints
        if adopt:
            self.adopt_tf_checkpoints()
        record = self.engine.latest_valid()
        if record is not None:
            self.point_state_file(record.name)
        elif self.engine.records and self._state_names_ours():
            # Every checkpoint of ours is corrupt: TF must not try to restore one of them.
            self.engine.store.delete(STATE_FILE)
        self.check_foreign()
        return record

    def open_read_only(self) -> Record | None:
        """Load the manifest without becoming the directory's writer (a directory this process
        may not write: see :class:`keras_ckpt.storage.ReadOnlyDirectory`). A commit a crash
        left unfinished stays unfinished, TF's state file is left as it is; returns the newest
        committed checkpoint that verifies, or None."""
        self.engine.reload()
        self.engine.continue_run()
        return self.engine.latest_valid()

    def read_state(self) -> Any:
        """TF's ``CheckpointState`` of the directory (absolute paths), or None if absent/unreadable."""
        try:
            return tf.train.get_checkpoint_state(self.directory)
        except (ValueError, tf.errors.OpError):  # a damaged state file: TF's readers refuse it too
            return None

    def adopt_tf_checkpoints(self) -> list[Record]:
        """List the complete TF checkpoints ``<basename>-<N>`` already here in the manifest.

        Only when this series has no records yet (its first use), and only prefixes whose name
        says they are this series' (``basename`` + ``-`` + a number) with their ``.index`` and
        every ``.data`` shard present: those are the checkpoints ``tf.train.Checkpoint.save`` or
        TF's own ``CheckpointManager`` wrote under the same name, so the job continues from them
        and retention then rotates them like its own. They are ordered as TF's state file lists
        them (those it no longer lists first, by number), with its timestamps where TF's manager
        wrote them (else the ``.index`` modification time), and hashed. The ones TF's manager
        had preserved for ``keep_checkpoint_every_n_hours`` (no longer in its list) stay
        preserved. Its ``last_preserved_timestamp`` becomes the series' hours anchor.

        Returns:
            The adopted records, oldest first (empty when there was nothing to adopt).
        """
        if self.engine.records:
            return []
        names = self.engine.store.list()
        listed = {f.path for r in mf.load(self.directory).checkpoints for f in r.files}
        pattern = re.compile(re.escape(self.basename) + r"-(\d+)\.index")
        found: dict[str, tuple[int, list[str]]] = {}
        for n in names:
            m = pattern.fullmatch(n)
            files = _prefix_files(names, n[: -len(".index")]) if m else None
            if m and files and not listed.intersection(files):
                found[n[: -len(".index")]] = (int(m.group(1)), files)
        if not found:
            return []
        state = self.read_state()
        in_state: list[str] = []
        stamps: dict[str, float] = {}
        by_manager = state is not None and bool(state.all_model_checkpoint_timestamps)
        if state is not None:
            paths = [p for p in state.all_model_checkpoint_paths]
            in_state = [os.path.basename(p) for p in paths if os.path.basename(p) in found]
            if by_manager:
                stamps = {os.path.basename(p): t for p, t in
                          zip(paths, state.all_model_checkpoint_timestamps)}
        rest = sorted((b for b in found if b not in in_state), key=lambda b: found[b][0])
        last_preserved = state.last_preserved_timestamp if by_manager else None
        records = []
        store = self.engine.store
        for base in rest + in_state:
            entries = []
            for file_name in found[base][1]:
                # Bounded, never through a symlink, never blocking on a FIFO: like any verify.
                size = store.stat(file_name).size
                digest, problem = store.hash(file_name, size)
                if problem is not None:
                    warnings.warn(f"keras_ckpt: not adopting {base}: {problem}", stacklevel=3)
                    break
                entries.append(mf.FileEntry(file_name, size, digest))
            if len(entries) != len(found[base][1]):
                continue
            when = stamps[base] if base in stamps else self.engine.store.stat(base + ".index").mtime
            record = mf.make_record(
                base, self.engine.series, epoch=0, step=0, time=when, metrics=None,
                files=tuple(entries),
            )
            # TF's manager never deletes what it preserved or no longer tracks (not in its
            # list, or not newer than its last preserved timestamp).
            if by_manager and (base not in in_state or when <= last_preserved):  # type: ignore[operator]
                record = replace(record, kept=(EVERY_N_HOURS,))
            records.append(record)
        if not records:
            return []
        self.engine.adopt_existing(
            records, None if last_preserved is None else {LAST_PRESERVED: float(last_preserved)}
        )
        warnings.warn(
            f"keras_ckpt: adopted {len(records)} TensorFlow checkpoint(s) of {self.directory} "
            f"({', '.join(r.name for r in records)}) into checkpoints.json: this manager restores "
            "the newest and rotates them by its retention from now on.",
            stacklevel=3,
        )
        return records

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
        TF's state file then names the new checkpoint, before retention deletes anything. A
        file operation of TF's writer that fails (a full disk) is raised as an ``OSError``
        naming the checkpoint, chained to TF's error.
        """
        self.check_foreign()
        name = f"{self.basename}-{number}"
        main = os.path.join(self.directory, name + ".index")
        # Step-based TF saves have no epochs: epoch 0, step = the global step.
        with self.engine.transaction(main, epoch=0, step=step, metrics=metrics, pending=pending) as tx:
            # TF's state file names the new checkpoint in the same commit as the manifest.
            tx.side_file(STATE_FILE, lambda state: self._state_bytes(name, state))
            staged = os.path.join(tx.staging_dir(), name)
            try:
                write(staged)
            except tf.errors.OpError as e:
                failed = _as_os_error(e)
                if failed is None:
                    raise
                raise failed from e  # the transaction names the file and the directory
            for file_name in _staged_files(staged):
                tx.adopt(os.path.join(os.path.dirname(staged), file_name), file_name)
        return tx

    # -- TF's state file ----------------------------------------------------------------------

    def point_state_file(self, name: str) -> None:
        """Make TF's ``checkpoint`` file name ``name`` only.

        Only the newest is listed: TF's Saver adopts every path in ``all_model_checkpoint_paths``
        when it restores and later rotates them away. Paths are written relative (the directory is
        absolute here; TF resolves a relative ``save_dir`` against the current directory), so a
        copied directory still resolves to its own files. No per-checkpoint timestamps are
        written, so a stock ``tf.train.CheckpointManager`` opened here later does not take them
        over either; the series' every-N-hours anchor is (TF's ``last_preserved_timestamp``).
        """
        data = self._state_bytes(name, self.engine.state)
        if self._read_state_file() != data.decode():
            self.engine.store.write_atomic(STATE_FILE, data)

    def _state_bytes(self, name: str, state: mf.SeriesState) -> bytes:
        anchor = state.extra.get(LAST_PRESERVED)
        proto = tf.compat.v1.train.generate_checkpoint_state_proto(
            self.directory,
            name,
            all_model_checkpoint_paths=[name],
            last_preserved_timestamp=None if anchor is None else float(anchor),
        )
        text = text_format.MessageToString(proto)
        self._state_text = text
        return text.encode()

    def _read_state_file(self) -> str | None:
        try:
            data = self.engine.store.read(STATE_FILE, 1 << 20)
        except ValueError:  # not a regular file, or absurdly large: not TF's
            return None
        return None if data is None else data.decode("utf-8", "replace")

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
            for n in self.engine.store.list()
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
