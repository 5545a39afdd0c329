"""The framework-neutral save/restore pipeline: write -> commit manifest -> prune.

A front-end opens a :class:`Transaction` for each save, streams its payload into the file objects
or temporary paths the transaction hands out, and leaves the ``with`` block; the transaction then
fsyncs and renames the files into place, commits the manifest record (with checksums), and only
after that deletes what retention no longer keeps. Restore walks the other way: the newest record
whose files verify.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import IO, Any

from keras_ckpt import manifest as mf
from keras_ckpt import storage
from keras_ckpt.manifest import FileEntry, Manifest, Record, SeriesState
from keras_ckpt.policy import RetentionPolicy, is_improvement, score

_CHECKPOINT_SUFFIXES = (".keras", ".h5", ".pt", ".pth", ".index", ".ckpt")


class Transaction:
    """One checkpoint being written. Files become visible only when the block exits cleanly."""

    def __init__(
        self,
        engine: Engine,
        final_path: str,
        *,
        epoch: int,
        step: int,
        metrics: Mapping[str, Any] | None,
        pending: bool,
        on_commit: Callable[[Record], None] | None = None,
    ) -> None:
        self._engine = engine
        self._on_commit = on_commit
        self.path = os.path.abspath(final_path)
        self.name = mf.checkpoint_name(self.path)
        self._epoch, self._step, self._metrics, self._pending = epoch, step, metrics, pending
        # (temp path, final path, streaming writer or None), in the order the caller created them
        self._files: list[tuple[str, str, storage.HashingWriter | None, IO[bytes] | None]] = []
        self._dirs: list[str] = []
        self.record: Record | None = None
        self.deleted: list[Record] = []

    def _final(self, path: str | None) -> str:
        final = self.path if path is None else os.path.join(self._engine.directory, path)
        if os.path.dirname(os.path.abspath(final)) != self._engine.directory:
            raise ValueError(f"checkpoint files must live in {self._engine.directory!r}: {final!r}")
        return os.path.abspath(final)

    def open(self, path: str | None = None) -> storage.HashingWriter:
        """A binary file object for ``path`` (default: the checkpoint's own path), hashed as it streams."""
        final = self._final(path)
        tmp = storage.temp_path(self._engine.directory, os.path.basename(final))
        raw = open(tmp, "r+b")
        writer = storage.HashingWriter(raw)
        self._files.append((tmp, final, writer, raw))
        return writer

    def temp_path(self, path: str | None = None) -> str:
        """A temporary path for a writer that needs a file name (h5py); hashed after it is written."""
        final = self._final(path)
        tmp = storage.temp_path(self._engine.directory, os.path.basename(final))
        self._files.append((tmp, final, None, None))
        return tmp

    def staging_dir(self) -> str:
        """A temporary directory for writers that pick their own file names (TF's Saver)."""
        d = storage.temp_dir(self._engine.directory)
        self._dirs.append(d)
        return d

    def adopt(self, staged_path: str, path: str) -> None:
        """Commit ``staged_path`` (written by the caller, e.g. in :meth:`staging_dir`) as ``path``."""
        self._files.append((staged_path, self._final(path), None, None))

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            for tmp, _, _, raw in self._files:
                if raw is not None and not raw.closed:
                    raw.close()
                if self.record is None:
                    storage.remove_quietly(tmp)
            for d in self._dirs:
                storage.remove_quietly(d)

    def _commit(self) -> None:
        if not self._files:
            raise RuntimeError(f"checkpoint {self.name!r} wrote no file")
        entries = []
        for tmp, final, writer, raw in self._files:
            if raw is not None:
                raw.flush()
                os.fsync(raw.fileno())
                raw.close()
            digest = writer.digest() if writer is not None else None
            if digest is None:
                # Hashed from the page cache right after the write; fsync below makes it durable.
                digest, size = storage.hash_file(tmp)
                storage.fsync_path(tmp)
            else:
                size = writer.size  # type: ignore[union-attr]
            entries.append(FileEntry(os.path.basename(final), size, digest))
        self._engine._announce_replacements(entries)
        for tmp, final, _, _ in self._files:
            os.replace(tmp, final)
        storage.fsync_dir(self._engine.directory)
        record = mf.make_record(
            self.name,
            self._engine.series,
            epoch=self._epoch,
            step=self._step,
            time=time.time(),
            metrics=self._metrics,
            files=tuple(entries),
            pending=self._pending,
        )
        self.record, self.deleted = self._engine._commit(record, self._on_commit)


class Engine:
    """Checkpoints of one series (one ``filepath`` template) in one directory.

    Args:
        filepath: the template the front-end renders (``runs/a/ckpt-{epoch:03d}.pt``); its
            directory holds the manifest, its base name names the series.
        framework: recorded in the series state (``keras``, ``torch``, ``tf``, ``estimator``).
        policy: the retention policy; its ``monitor``/``mode`` also rank ``best``.
        initial_best: Keras's ``initial_value_threshold``: a checkpoint is best only if it beats it.
    """

    def __init__(
        self,
        filepath: str,
        *,
        framework: str,
        policy: RetentionPolicy,
        initial_best: float | None = None,
    ) -> None:
        self.filepath = os.fspath(filepath)
        self.directory = os.path.dirname(os.path.abspath(self.filepath))
        self.series = os.path.basename(self.filepath)
        self.framework = framework
        self.policy = policy
        self._initial_best = initial_best
        self.state = SeriesState(framework, policy.monitor, policy.mode, initial_best)
        self._records: list[Record] = []

    # -- set-up -------------------------------------------------------------------------------

    def open(self, argname: str = "filepath") -> None:
        """Create the directory (a ValueError naming ``argname`` if impossible) and load state."""
        storage.ensure_directory(self.directory, argname, self.filepath)
        storage.sweep_temporaries(self.directory)
        self.reload()

    def reload(self) -> None:
        m = mf.load(self.directory)
        self._records = m.records(self.series)
        saved = m.series.get(self.series)
        if saved is not None:
            saved.framework = self.framework
            saved.monitor, saved.mode = self.policy.monitor, self.policy.mode
            if saved.best is None and self._initial_best is not None:
                saved.best = self._initial_best
            self.state = saved

    def set_policy(self, policy: RetentionPolicy) -> None:
        """Replace the policy (e.g. once ``mode="auto"`` is resolved)."""
        self.policy = policy
        self.state.monitor, self.state.mode = policy.monitor, policy.mode

    def adopt_best(self, best: float | None) -> None:
        """Carry a best value over from another directory's checkpoint (``resume=<path>``)."""
        if best is not None and is_improvement(best, self.state.best, self.policy.mode):
            self.state.best = best
            self.state.best_name = None

    # -- what is there ------------------------------------------------------------------------

    @property
    def records(self) -> list[Record]:
        """This series' committed records, oldest first."""
        return list(self._records)

    @property
    def best(self) -> float | None:
        return self.state.best

    def path_of(self, record: Record | None) -> str | None:
        return None if record is None else os.path.join(self.directory, record.path)

    def record_named(self, name: str | None) -> Record | None:
        return next((r for r in self._records if r.name == name), None)

    @property
    def best_path(self) -> str | None:
        return self.path_of(self.record_named(self.state.best_name))

    @property
    def latest_path(self) -> str | None:
        return self.path_of(self._records[-1]) if self._records else None

    def has_foreign_checkpoints(self) -> bool:
        """Checkpoint-looking files but no manifest: another tool's directory (never pruned)."""
        if mf.exists(self.directory) or not os.path.isdir(self.directory):
            return False
        return any(n.endswith(_CHECKPOINT_SUFFIXES) for n in os.listdir(self.directory))

    def is_improvement(self, value: float | None) -> bool:
        return is_improvement(value, self.state.best, self.policy.mode)

    # -- saving -------------------------------------------------------------------------------

    def transaction(
        self,
        path: str,
        *,
        epoch: int,
        step: int,
        metrics: Mapping[str, Any] | None = None,
        pending: bool = False,
        on_commit: Callable[[Record], None] | None = None,
    ) -> Transaction:
        """Begin writing the checkpoint whose main file is ``path`` (inside this directory).

        ``on_commit(record)`` runs once the manifest lists the new checkpoint and before
        retention deletes anything (TF's own state file is re-pointed there, so it never names
        deleted files).
        """
        return Transaction(
            self, path, epoch=epoch, step=step, metrics=metrics, pending=pending, on_commit=on_commit
        )

    def _commit(
        self, record: Record, on_commit: Callable[[Record], None] | None = None
    ) -> tuple[Record, list[Record]]:
        with storage.directory_lock(self.directory):
            m = mf.load(self.directory)
            m.series[self.series] = self.state
            m.checkpoints = [
                r for r in m.checkpoints if not (r.series == self.series and r.name == record.name)
            ]
            m.checkpoints.append(record)
            value = score(record.metrics, self.policy.monitor)
            if self.is_improvement(value):
                self.state.best, self.state.best_name = value, record.name
            elif record.name == self.state.best_name:
                # The best checkpoint's bytes were just replaced by a worse save: no file holds
                # ``best`` any more (the value stays, as Keras's ``best`` does).
                self.state.best_name = None
            deleted = self._apply_retention(
                m, before_delete=None if on_commit is None else lambda: on_commit(record)
            )
        committed = self.record_named(record.name)
        return committed or record, deleted

    def _announce_replacements(self, incoming: Sequence[FileEntry]) -> None:
        """Before renaming over files the manifest lists, let their entries accept the new bytes."""
        new = {f.path: (f.bytes, f.xxh3_128) for f in incoming}
        if not any(f.path in new for r in self._records for f in r.files):
            return
        with storage.directory_lock(self.directory):
            m = mf.load(self.directory)
            m.checkpoints = [
                replace(r, files=tuple(
                    replace(f, replacing=new[f.path]) if f.path in new else f for f in r.files
                ))
                for r in m.checkpoints
            ]
            mf.save(self.directory, m)

    def report(self, name: str, metrics: Mapping[str, Any]) -> Record:
        """Attach metrics to a committed record (clearing ``pending``) and re-apply retention."""
        with storage.directory_lock(self.directory):
            m = mf.load(self.directory)
            m.series[self.series] = self.state
            for i, r in enumerate(m.checkpoints):
                if r.series == self.series and r.name == name:
                    merged = {**r.metrics, **metrics}
                    m.checkpoints[i] = replace(r.with_metrics(merged), pending=False)
                    break
            else:
                raise KeyError(name)
            # Best is decided in chronological order so a late report cannot undo "ties keep the
            # earlier checkpoint".
            value = score(m.checkpoints[i].metrics, self.policy.monitor)
            if self.is_improvement(value):
                self.state.best, self.state.best_name = value, name
            self._apply_retention(m)
        return self.record_named(name)  # type: ignore[return-value]

    def prune(self) -> list[Record]:
        """Apply the current policy now (``keras-ckpt prune``, or after a policy change)."""
        with storage.directory_lock(self.directory):
            m = mf.load(self.directory)
            m.series[self.series] = self.state
            return self._apply_retention(m)

    def _apply_retention(
        self, m: Manifest, before_delete: Callable[[], None] | None = None
    ) -> list[Record]:
        series = m.records(self.series)
        keep = self.policy.retain(series)
        if self.state.best_name is not None and self.state.best_name in {r.name for r in series}:
            # The value behind ``best`` may predate a restart or a policy change: never drop it.
            keep.setdefault(self.state.best_name, ("best",))
        kept_records: list[Record] = []
        dropped: list[Record] = []
        for r in m.checkpoints:
            if r.series != self.series:
                kept_records.append(r)
            elif r.name in keep:
                kept_records.append(replace(r, kept=keep[r.name]))
            else:
                dropped.append(r)
        m.checkpoints = kept_records
        mf.save(self.directory, m)
        self._records = m.records(self.series)
        if before_delete is not None:
            before_delete()
        still_listed = {f.path for r in m.checkpoints for f in r.files}
        for r in dropped:
            for f in r.files:
                if f.path not in still_listed:
                    storage.remove_quietly(os.path.join(self.directory, f.path))
        if dropped:
            storage.fsync_dir(self.directory)
        return dropped

    # -- restoring ----------------------------------------------------------------------------

    def latest_valid(self) -> Record | None:
        """The newest record of this series whose files verify (a warning names each bad one)."""
        return newest_valid(self.directory, self._records)


def verify(directory: str, record: Record) -> str | None:
    """None if every file of ``record`` is present with its size and checksum; else why not.

    While an overwrite is in flight a file may hold its ``replacing`` version instead; a
    checkpoint whose files mix committed and incoming versions (a multi-file overwrite cut
    short) is corrupt.
    """
    versions = set()
    for f in record.files:
        path = os.path.join(directory, f.path)
        try:
            digest, size = storage.hash_file(path)
        except FileNotFoundError:
            return f"{f.path} is missing"
        if (size, digest) == (f.bytes, f.xxh3_128):
            versions.add("committed" if f.replacing != (size, digest) else "either")
        elif (size, digest) == f.replacing:
            versions.add("incoming")
        elif size != f.bytes:
            return f"{f.path} has {size} bytes, the manifest says {f.bytes}"
        else:
            return f"{f.path} does not match its checksum"
    if {"committed", "incoming"} <= versions:
        return "its files mix two saves (an overwrite was interrupted)"
    return None


def newest_valid(directory: str, records: Sequence[Record]) -> Record | None:
    for record in reversed(records):
        problem = verify(directory, record)
        if problem is None:
            return record
        warnings.warn(
            f"keras_ckpt: skipping checkpoint {record.name!r} in {directory}: {problem} "
            "(corrupt or incomplete); trying the previous one.",
            stacklevel=3,
        )
    return None


def locate(path: str, series: str | None = None) -> tuple[str, Record | None]:
    """Resolve a ``resume=<path>``: a checkpoint file, or a directory holding a manifest.

    Returns the main file to load and its record (None for a bare file that no manifest lists).
    Reads only; nothing in that directory is written or deleted.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        m = mf.load(path)
        records = m.records(series) if series and m.records(series) else m.checkpoints
        if not m.checkpoints:
            raise FileNotFoundError(f"no keras_ckpt checkpoints (checkpoints.json) in {path!r}")
        records = sorted(records, key=lambda r: r.time)
        record = newest_valid(path, records)
        if record is None:
            raise FileNotFoundError(f"no checkpoint in {path!r} passes its checksum")
        return os.path.join(path, record.path), record
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume path does not exist: {path!r}")
    directory, base = os.path.split(path)
    m = mf.load(directory) if mf.exists(directory) else Manifest()
    record = next((r for r in m.checkpoints if any(f.path == base for f in r.files)), None)
    if record is not None:
        problem = verify(directory, record)
        if problem is not None:
            raise ValueError(f"resume checkpoint {path!r} is corrupt: {problem}")
    return path, record
