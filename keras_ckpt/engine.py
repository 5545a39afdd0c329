"""The framework-neutral save/restore pipeline, with a write-ahead commit.

A front-end opens a :class:`Transaction` for each save and streams its payload into the file
objects or temporary paths it hands out. When the ``with`` block exits cleanly:

1. every temporary is fsynced and checksummed (a failure here changes nothing: the temporaries
   are removed and the error raised);
2. the manifest records the *intent* — the incoming record, its temporaries, the records the
   commit drops — durably, before anything becomes visible. From here on the checkpoint is
   committed: all its bytes are durable, and any open of the directory finishes the commit;
3. the temporaries are renamed into place and the directory fsynced;
4. the manifest commits (record listed, dropped records gone, files to delete noted);
5. the dropped files are deleted.

A crash at any instant leaves either the previous state (before 2) or an intent that the next
:meth:`Engine.open` finishes (rename what is still a temporary, commit); if the intent's bytes
are gone (a file deleted by hand), it is rolled back. Deletions cut short are finished at the
next open. So after the next open the directory holds only files the manifest lists.

In-memory state (``records``, ``best``) changes only once the manifest is durable. Exactly one
process writes a directory at a time (:func:`keras_ckpt.storage.acquire_writer`).

Best has one owner: :func:`keras_ckpt.policy.best_of` over the current run's records in commit
order, and best-N retention ranks with the same order.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import IO, Any, TypeVar

from keras_ckpt import manifest as mf
from keras_ckpt import storage
from keras_ckpt.manifest import FileEntry, Intent, Manifest, Record, SeriesState
from keras_ckpt.policy import BEST, RetentionPolicy, best_of, is_improvement, score
from keras_ckpt.policy import Candidate as _Candidate

_CHECKPOINT_SUFFIXES = (".keras", ".h5", ".pt", ".pth", ".pth.tar", ".index", ".ckpt")
_COPY_CHUNK = 16 << 20
T = TypeVar("T")


class Transaction:
    """One checkpoint being written. Its files become visible only when the block exits cleanly."""

    def __init__(
        self,
        engine: Engine,
        final_path: str,
        *,
        epoch: int,
        step: int,
        metrics: Mapping[str, Any] | None,
        pending: bool,
    ) -> None:
        self._engine = engine
        self._store = engine.store
        self.path = os.path.abspath(final_path)
        self.name = mf.checkpoint_name(self.path)
        self._epoch, self._step, self._metrics, self._pending = epoch, step, metrics, pending
        # (temp name, final name, hashing writer or None, raw file or None), in creation order
        self._files: list[tuple[str, str, storage.HashingWriter | None, IO[bytes] | None]] = []
        self._side: list[tuple[str, Callable[[SeriesState], bytes]]] = []  # committed, not listed
        self._side_temps: list[str] = []
        self._dirs: list[str] = []
        self._handed_over = False
        self.record: Record | None = None
        self.deleted: list[Record] = []

    def _final(self, path: str | None) -> str:
        final = self.path if path is None else os.path.join(self._engine.directory, path)
        if os.path.dirname(os.path.abspath(final)) != self._engine.directory:
            raise ValueError(f"checkpoint files must live in {self._engine.directory!r}: {final!r}")
        return os.path.basename(final)

    def open(self, path: str | None = None) -> storage.HashingWriter:
        """A binary file object for ``path`` (default: the checkpoint's own path), hashed as it streams."""
        final = self._final(path)
        try:
            tmp, raw = self._store.open_temp(final)  # closed at commit or exit
        except OSError as e:
            raise _named(e, self._engine.directory, final) from e
        writer = storage.HashingWriter(raw)
        self._files.append((tmp, final, writer, raw))
        return writer

    def temp_path(self, path: str | None = None) -> str:
        """A temporary path for a writer that needs a file name (h5py); hashed after it is written."""
        final = self._final(path)
        try:
            tmp = self._store.new_temp(final)
        except OSError as e:
            raise _named(e, self._engine.directory, final) from e
        self._files.append((tmp, final, None, None))
        return self._store.path(tmp)

    def staging_dir(self) -> str:
        """A temporary directory for writers that pick their own file names (TF's Saver)."""
        d = self._store.new_staging_dir()
        self._dirs.append(d)
        return self._store.path(d)

    def adopt(self, staged_path: str, path: str) -> None:
        """Commit ``staged_path`` (written by the caller, e.g. in :meth:`staging_dir`) as ``path``."""
        self._files.append((self._store.name_of(staged_path), self._final(path), None, None))

    def side_file(self, path: str, content: Callable[[SeriesState], bytes]) -> None:
        """Commit a file together with the checkpoint, unlisted (TF's ``checkpoint`` state file).

        ``content(state)`` is asked for the bytes once retention has decided, with the series
        state the commit makes durable, and is written before the intent: the file changes in
        the same commit as the manifest, or not at all.
        """
        self._side.append((self._final(path), content))

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
            elif isinstance(exc, OSError) and not getattr(exc, "filename", None):
                # The payload writer ran out of disk (or met an I/O error): say where.
                raise _named(exc, self._engine.directory, os.path.basename(self.path)) from exc
        finally:
            for _, _, writer, raw in self._files:
                if raw is not None and not raw.closed:
                    # On a full disk closing flushes, and fails again: the first error is the one
                    # to raise, and the temporaries below must go whatever happens here.
                    with contextlib.suppress(OSError):
                        raw.close()
                if writer is not None:
                    # Closed here, not by IOBase's finalizer: that one runs our flush() and
                    # silently drops what it raises, a KeyboardInterrupt arriving then included
                    # (a Ctrl-C at the end of a save was lost, once in many).
                    writer.close()
            if not self._handed_over:  # once the intent is durable, the engine owns the temporaries
                staged = [tmp for tmp, _, _, _ in self._files if "/" not in tmp]  # the rest: in _dirs
                for tmp in [*staged, *self._side_temps, *self._dirs]:
                    self._remove(tmp)
            elif self.record is not None:
                for d in self._dirs:  # committed: what they held was renamed out, they are empty
                    self._remove(d)

    def _remove(self, name: str) -> None:
        try:
            self._store.remove_temp(name)
        except OSError:
            pass  # swept at the next open

    def _commit(self) -> None:
        if not self._files:
            raise RuntimeError(f"checkpoint {self.name!r} wrote no file")
        entries = []
        for tmp, final, writer, raw in self._files:
            try:
                if raw is not None:
                    self._store.finish(raw)
                    raw.close()
                digest = writer.digest() if writer is not None else None
                if digest is None:
                    # Hashed from the page cache right after the write; fsync makes it durable.
                    state = self._store.stat(tmp)
                    digest, problem = self._store.hash(tmp, state.size)
                    if problem is not None:
                        raise OSError(f"checkpoint file {final} could not be read back: {problem}")
                    self._store.sync_file(tmp)
                    size = state.size
                else:
                    size = writer.size  # type: ignore[union-attr]
            except OSError as e:
                raise _named(e, self._engine.directory, final) from e
            entries.append(FileEntry(final, size, digest))
        moves = tuple((tmp, final) for tmp, final, _, _ in self._files)
        self.record, self.deleted = self._engine._commit(
            name=self.name,
            epoch=self._epoch,
            step=self._step,
            metrics=self._metrics,
            pending=self._pending,
            files=tuple(entries),
            moves=moves,
            side=self._write_side_files,
            handed_over=self._hand_over,
        )

    def _write_side_files(self, state: SeriesState) -> tuple[tuple[str, str], ...]:
        moves = []
        for final, content in self._side:
            try:
                tmp = self._store.write_temp(final, content(state))
            except OSError as e:
                raise _named(e, self._engine.directory, final) from e
            self._side_temps.append(tmp)
            moves.append((tmp, final))
        return tuple(moves)

    def _hand_over(self) -> None:
        self._handed_over = True


def _named(e: OSError, directory: str, name: str) -> OSError:
    """The same OSError, saying which checkpoint file and directory it happened to."""
    reason = e.strerror or str(e)
    err = OSError(e.errno, f"saving checkpoint file {name} in {directory} failed: {reason}")
    err.filename = os.path.join(directory, name)
    return err


def _template_pattern(series: str) -> re.Pattern[str]:
    """File names a series may own: its template with any text for each placeholder.

    Deleting only names that match is the last line of defence against a crafted manifest that
    lists a file of someone else's under this series.
    """
    parts = re.split(r"(\{[^{}]*\})", series)
    body = "".join(".+" if p.startswith("{") and p.endswith("}") else re.escape(p) for p in parts)
    stem, ext = _split_ext(body)
    # TF prefixes (``model.ckpt`` → ``model.ckpt-60.index``/``.data-…``/``.meta``) and the
    # run-unique names of re-rendered saves (``ckpt-1-10.step345.keras``).
    return re.compile(rf"(?:{stem}(?:\.step\d+)?{ext}|{body}-\d+\.(?:index|meta|data-\d+-of-\d+))")


def _split_ext(body: str) -> tuple[str, str]:
    for ext in ("\\.weights\\.h5", "\\.pth\\.tar"):
        if body.endswith(ext):
            return body[: -len(ext)], ext
    m = re.search(r"(\\\.[A-Za-z0-9]+)$", body)
    return (body[: m.start()], m.group(1)) if m else (body, "")


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
        self.store = storage.LocalStorage(self.directory)
        self.framework = framework
        self.policy = policy
        self._initial_best = initial_best
        self._pattern = _template_pattern(self.series)
        self.state = SeriesState(framework, policy.monitor, policy.mode, baseline=self._threshold())
        self._records: list[Record] = []
        self._writing = False
        self._finalizer: weakref.finalize | None = None

    def _threshold(self) -> tuple[float, int] | None:
        return None if self._initial_best is None else (float(self._initial_best), -1)

    # -- set-up -------------------------------------------------------------------------------

    def open(self, argname: str = "filepath", value: str | None = None) -> None:
        """Become this directory's writer, finish whatever a crash left, and load the series.

        Raises ValueError naming ``argname`` (and ``value``, by default the filepath) if the
        directory cannot be created or written, and :class:`keras_ckpt.storage.DirectoryLocked`
        if another live process writes here.
        """
        self.store.ensure(argname, self.filepath if value is None else value)
        if not self._writing:
            self.store.acquire()
            self._writing = True
            self._finalizer = weakref.finalize(self, storage.release_writer, self.directory)
        try:
            with storage.directory_lock(self.directory):
                m = self._recovered()
                self.store.sweep()
        except BaseException:
            self.close()  # e.g. a damaged manifest: refuse, and leave the directory to others
            raise
        self._load(m)

    def close(self) -> None:
        """Stop being the directory's writer (train end); :meth:`open` again to write more."""
        if self._writing:
            self._writing = False
            if self._finalizer is not None:
                self._finalizer.detach()
            self.store.release()

    def reload(self) -> None:
        """Re-read the manifest (what another run of this process may have committed)."""
        with storage.directory_lock(self.directory):
            m = self._recovered() if self._writing else (mf.read(self.store) or Manifest())
        self._load(m)

    def _load(self, m: Manifest) -> None:
        self._records = m.records(self.series)
        saved = m.series.get(self.series)
        if saved is not None:
            self.state = replace(saved, extra=dict(saved.extra))
            self.state.framework = self.framework
            if not self.state.run:  # written before runs existed: one run so far
                self.state.run = max((r.run for r in self._records), default=0) or 1
        self._refresh_best()

    def start_run(self) -> None:
        """Begin a new run of the series: best starts again from ``initial_best`` (or nothing).

        The earlier runs' checkpoints stay listed, no longer compete for best-N, and are rotated
        out by latest-N as this run saves.
        """
        self.state.run = max([self.state.run, *(r.run for r in self._records)]) + 1
        self.state.baseline = self._threshold()
        self._sync_ranking()

    def continue_run(self) -> None:
        """Continue the newest run (``resume``), unless the monitor or mode changed: then warn
        and start a new one, since the old values measure something else."""
        before = (self.state.monitor, self.state.mode)
        now = (self.policy.monitor, self.policy.mode)
        if self._records and before != (None, None) and before != now:
            warnings.warn(
                f"keras_ckpt: the series {self.series!r} in {self.directory} ranked checkpoints by "
                f"monitor={before[0]!r}, mode={before[1]!r}; this run ranks by monitor={now[0]!r}, "
                f"mode={now[1]!r}. Best starts afresh: earlier checkpoints are not compared with "
                "the new metric.",
                stacklevel=3,
            )
            self.start_run()
            return
        self.state.run = self.state.run or 1
        if self._initial_best is not None and (
            self.state.baseline is None
            or is_improvement(self._initial_best, self.state.baseline[0], self.policy.mode)
        ):
            self.state.baseline = self._threshold()
        self._sync_ranking()

    def set_policy(self, policy: RetentionPolicy) -> None:
        """Replace the policy (e.g. once ``mode="auto"`` is resolved)."""
        self.policy = policy
        self._refresh_best()

    def _sync_ranking(self) -> None:
        self.state.monitor, self.state.mode = self.policy.monitor, self.policy.mode
        self._refresh_best()

    def adopt_best(self, best: float | None) -> None:
        """Carry a best value over from another directory's checkpoint (``resume=<path>``)."""
        if best is None or not self.is_improvement(best):
            return  # a record here already holds it (or better): that record stays best
        self.state.baseline = (float(best), 0)
        self._refresh_best()

    def _refresh_best(self) -> None:
        winner = self._best_of(self._records, self.state.baseline)
        self.state.best = None if winner is None else winner.value
        self.state.best_name = None if winner is None else winner.name

    def _best_of(self, records: Sequence[Record], baseline: tuple[float, int] | None) -> _Candidate | None:
        run = [r for r in records if r.run == self.state.run]
        return best_of(run, self.policy.monitor, self.policy.mode, _baseline(baseline))

    # -- what is there ------------------------------------------------------------------------

    @property
    def records(self) -> list[Record]:
        """This series' committed records, in commit order."""
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
        if mf.exists(self.directory) or not self.store.is_dir():
            return False
        return any(n.endswith(_CHECKPOINT_SUFFIXES) for n in self.store.list())

    def is_improvement(self, value: float | None) -> bool:
        return is_improvement(value, self.state.best, self.policy.mode)

    def owns(self, name: str) -> bool:
        """Whether ``name`` is a file name this series' template can produce."""
        return bool(self._pattern.fullmatch(name))

    # -- saving -------------------------------------------------------------------------------

    def transaction(
        self,
        path: str,
        *,
        epoch: int,
        step: int,
        metrics: Mapping[str, Any] | None = None,
        pending: bool = False,
    ) -> Transaction:
        """Begin writing the checkpoint whose main file is ``path`` (inside this directory)."""
        return Transaction(self, path, epoch=epoch, step=step, metrics=metrics, pending=pending)

    def _require_writer(self) -> None:
        if not self._writing:
            self.open()

    def _commit(
        self,
        *,
        name: str,
        epoch: int,
        step: int,
        metrics: Mapping[str, Any] | None,
        pending: bool,
        files: tuple[FileEntry, ...],
        moves: tuple[tuple[str, str], ...],
        side: Callable[[SeriesState], tuple[tuple[str, str], ...]],
        handed_over: Callable[[], None],
    ) -> tuple[Record, list[Record]]:
        self._require_writer()
        with storage.directory_lock(self.directory):
            m = self._recovered()
            seq = m.next_seq()
            state = self._state_copy()
            record = mf.make_record(
                name, self.series, epoch=epoch, step=step, time=time.time(), metrics=metrics,
                files=files, pending=pending, seq=seq, run=state.run,
            )
            series = [r for r in m.records(self.series) if r.name != name]
            replaced = next((r for r in m.records(self.series) if r.name == name), None)
            state.baseline = self._baseline_after_replacing(replaced, state)
            kept, dropped = self._retain([*series, record], state)
            moves = moves + side(state)
            intent = Intent(
                series=self.series, record=record, state=state, moves=moves,
                drop=tuple(r.name for r in dropped), writer=storage.writer_identity(),
                kept=kept,
            )
            before = mf.Manifest(series=dict(m.series), checkpoints=list(m.checkpoints), seq=m.seq,
                                 deleting=list(m.deleting), history=m.history, extra=m.extra)
            before.intent = intent
            before.seq = seq
            self._write(before)  # the write-ahead point: from here the checkpoint is committed
            handed_over()
            try:
                for tmp, final in moves:
                    self.store.rename(tmp, final)
                self.store.sync()
                after, gone = _apply(before)
                self._write(after)
            except OSError as e:
                raise OSError(
                    e.errno,
                    f"checkpoint {name} in {self.directory} is written, but committing it failed "
                    f"({e.strerror or e}); it is finished at the next save or start.",
                ) from e
            self._load(after)
            committed = self.record_named(name) or record
            self._delete(gone)
        return committed, dropped

    def _baseline_after_replacing(
        self, replaced: Record | None, state: SeriesState
    ) -> tuple[float, int] | None:
        """A best whose file a new save replaces lives on as the baseline (as Keras's ``best``)."""
        value = None if replaced is None else score(replaced.metrics, self.policy.monitor)
        if value is None or replaced.run != state.run:  # type: ignore[union-attr]
            return state.baseline
        winner = best_of([], self.policy.monitor, self.policy.mode,
                         _Candidate(value, replaced.seq, None),  # type: ignore[union-attr]
                         _baseline(state.baseline))
        return None if winner is None else (winner.value, winner.seq)

    def _retain(
        self, series: list[Record], state: SeriesState, protect: Mapping[str, str] | None = None
    ) -> tuple[dict[str, tuple[str, ...]], list[Record]]:
        """(kept name -> reasons, dropped records) for ``series`` (commit order) under ``state``."""
        run = [r for r in series if r.run == state.run]
        winner = best_of(run, self.policy.monitor, self.policy.mode, _baseline(state.baseline))
        state.best = None if winner is None else winner.value
        state.best_name = None if winner is None else winner.name
        guard = dict(protect or {})
        if state.best_name is not None:
            guard.setdefault(state.best_name, BEST)
        keep = self.policy.retain(series, run=state.run, protect=guard)
        state.extra.update(self.state.extra)  # a front-end's policy may note state there (TF's anchor)
        return keep, [r for r in series if r.name not in keep]

    def _write(self, m: Manifest) -> None:
        try:
            mf.write(self.store, m)
        except OSError as e:
            raise _named(e, self.directory, mf.FILENAME) from e

    def _delete(self, names: Sequence[str]) -> None:
        for name in names:
            if self.owns(name):
                try:
                    self.store.delete(name)
                except OSError:
                    pass  # listed in ``deleting``: tried again at the next open
        if names:
            self.store.sync()

    def _recovered(self) -> Manifest:
        """The manifest with any commit a crash left finished (or rolled back) and deletions done."""
        m = mf.read(self.store) or Manifest()
        if not self._writing:
            return m
        if m.intent is not None:
            m = _recover(self.store, m)
            self._write(m)
        if m.deleting:  # cleared in memory: the caller's next write records it
            listed = m.listed_files()
            self._delete([n for n in m.deleting if n not in listed])
            # Another series' leftovers wait for that series' next open.
            m.deleting = [n for n in m.deleting if not self.owns(n) and n not in listed]
        return m

    def report(self, name: str, metrics: Mapping[str, Any]) -> Record:
        """Attach metrics to a committed record (clearing ``pending``) and re-apply retention."""
        self._require_writer()
        with storage.directory_lock(self.directory):
            m = self._recovered()
            for i, r in enumerate(m.checkpoints):
                if r.series == self.series and r.name == name:
                    m.checkpoints[i] = replace(r.with_metrics({**r.metrics, **metrics}), pending=False)
                    m.history = [mf.Save.of(m.checkpoints[i]) if (h.series, h.seq) == (r.series, r.seq)
                                 else h for h in m.history]
                    break
            else:
                raise KeyError(name)
            self._rewrite(m)
        return self.record_named(name)  # type: ignore[return-value]

    def prune(self, *, dry_run: bool = False) -> list[Record]:
        """Apply the policy now (``keras-ckpt prune``, or after a policy change).

        Verifies first: the newest checkpoint whose files verify is never deleted, and a series
        in which none verifies loses nothing.
        """
        self._require_writer()
        with storage.directory_lock(self.directory):
            m = self._recovered()
            good = newest_valid(self.store, m.records(self.series), quiet=True)
            if good is None:
                return []
            protect = {good.name: "verified"}
            if dry_run:
                return self._retain(m.records(self.series), self._state_copy(), protect)[1]
            return self._rewrite(m, protect)

    def _state_copy(self) -> SeriesState:
        state = replace(self.state, extra=dict(self.state.extra))
        state.monitor, state.mode = self.policy.monitor, self.policy.mode
        state.policy = self.policy.to_json()
        state.run = state.run or 1
        return state

    def _rewrite(self, m: Manifest, protect: Mapping[str, str] | None = None) -> list[Record]:
        """Re-apply retention to ``m`` for this series, commit it, delete what it drops."""
        state = self._state_copy()
        kept, dropped = self._retain(m.records(self.series), state, protect)
        gone = {r.name for r in dropped}
        m.series[self.series] = state
        m.checkpoints = [
            r if r.series != self.series
            else replace(r, kept=tuple(k for k in kept[r.name] if k != "verified"))
            for r in m.checkpoints if r.series != self.series or r.name not in gone
        ]
        m.deleting = sorted(({f.path for r in dropped for f in r.files} | set(m.deleting)) - m.listed_files())
        self._write(m)
        self._load(m)
        self._delete(m.deleting)
        return dropped

    def adopt_existing(self, records: Sequence[Record], extra: Mapping[str, Any] | None = None) -> None:
        """List checkpoints another tool wrote here, in place (TF's own saver and manager).

        Their files stay where they are (nothing is renamed, so a failed commit removes none of
        them); the records are appended in the order given with fresh commit numbers.
        """
        self._require_writer()
        with storage.directory_lock(self.directory):
            m = self._recovered()
            if m.records(self.series):
                self._load(m)
                return
            seq = m.next_seq()
            state = self._state_copy()
            state.extra.update(extra or {})
            for i, r in enumerate(records):
                m.checkpoints.append(replace(r, series=self.series, seq=seq + i, run=state.run))
            m.seq = seq + len(records) - 1
            m.series[self.series] = state
            self._write(m)
            self._load(m)

    def import_checkpoint(
        self, source: str, record: Record | None, dest: str, *, epoch: int, step: int,
        metrics: Mapping[str, Any] | None, held: storage.HeldFile | None = None,
    ) -> Record:
        """Copy another directory's checkpoint (``resume=<path>``) into this series, verified.

        The bytes are hashed as they are copied and must match the source's manifest entry, so
        the output of every job holds the checkpoint it continued from. ``held``: the file as
        :func:`locate` verified and held it (read from there even if its writer removed it).
        """
        src = storage.LocalStorage(os.path.dirname(source))
        name = os.path.basename(source)
        expected = next((f for f in record.files if f.path == name), None) if record else None
        want = held.digest if held is not None else expected.xxh3_128 if expected else None
        with self.transaction(dest, epoch=epoch, step=step, metrics=metrics) as tx:
            out = tx.open()
            digest = held.copy_to(out) if held is not None else src.copy_to(
                name, out, None if expected is None else expected.bytes)
            if want is not None and digest != want:
                raise ValueError(f"{source} changed while it was copied (checksum mismatch)")
        return tx.record  # type: ignore[return-value]

    # -- restoring ----------------------------------------------------------------------------

    def latest_valid(self) -> Record | None:
        """The newest record of this series whose files verify (a warning names each bad one)."""
        return newest_valid(self.store, self._records)

    def latest_plausible(self) -> Record | None:
        """The newest record whose files are there with their sizes, read no further (a warning
        names each one skipped): where :meth:`restore_newest` starts."""
        for record in sorted(self._records, key=lambda r: r.seq, reverse=True):
            problem = next(filter(None, (self.store.check(f.path, f.bytes) for f in record.files)), None)
            if problem is None:
                return record
            _warn_skipped(self.store, record, problem)
        return None

    def restore_newest(
        self, start: Record, load: Callable[[str, storage.StreamedRead | None], T]
    ) -> tuple[Record, T]:
        """Load ``start`` or, if it turns out corrupt, the newest earlier record that verifies.

        Each file is read once: the :class:`~keras_ckpt.storage.StreamedRead` reads and
        checksums it from the moment it is opened, and ``load(path, stream)`` takes its bytes
        from :meth:`~keras_ckpt.storage.StreamedRead.verified`, which returns them only once they
        match (so ``load`` must assign nothing before it); an error ``load`` raises for a corrupt
        file is that file's corruption (a warning names it, the previous record is tried), one
        from a good file is raised. Records of several files (TF's) are verified first and
        loaded with ``stream=None``.

        Raises:
            ValueError: no record from ``start`` back verifies (resume=True never starts fresh
                silently).
        """
        for record in sorted(self._records, key=lambda r: r.seq, reverse=True):
            if record.seq > start.seq:
                continue
            path = self.path_of(record)
            if len(record.files) != 1:
                problem = verify(self.store, record)
                if problem is None:
                    return record, load(path, None)
            else:
                entry = record.files[0]
                stream, problem = self.store.stream(entry.path, entry.bytes, entry.xxh3_128)
                if stream is not None:
                    with stream:
                        try:
                            result = load(path, stream)
                        except Exception:
                            problem = stream.finish()
                            if problem is None:
                                raise
                        else:
                            problem = stream.finish()
                            if problem is None:
                                return record, result
            _warn_skipped(self.store, record, problem)
        raise ValueError(
            f"resume: no checkpoint of {self.series} in {self.directory} verifies (nothing was "
            "loaded). Pass resume=False to start fresh (or put a good copy of a checkpoint "
            "back). Received: resume=True"
        )


def _baseline(stored: tuple[float, int] | None) -> _Candidate | None:
    """A series' stored baseline (value, seq) as a candidate for best, held by no record."""
    return None if stored is None else _Candidate(stored[0], stored[1], None)


def _apply(m: Manifest) -> tuple[Manifest, list[str]]:
    """``m`` with its intent committed; and the files that commit leaves unlisted."""
    it = m.intent
    assert it is not None
    out = Manifest(series=dict(m.series), seq=max(m.seq, it.record.seq), history=list(m.history),
                   extra=m.extra)
    out.remember(it.record)
    removed: set[str] = set()
    records = []
    for r in m.checkpoints:
        if r.series == it.series and (r.name == it.record.name or r.name in it.drop):
            removed.update(f.path for f in r.files)
            continue
        if r.series == it.series:
            r = replace(r, kept=it.kept.get(r.name, r.kept))
        records.append(r)
    records.append(replace(it.record, kept=it.kept.get(it.record.name, ())))
    out.checkpoints = records
    out.series[it.series] = it.state
    gone = sorted((removed | set(m.deleting)) - out.listed_files())
    out.deleting = gone
    return out, gone


# Files a commit may bring in besides the ones its series' template names: TF's state file.
SIDE_FILES = ("checkpoint",)


def _recover(store: storage.LocalStorage, m: Manifest) -> Manifest:
    """Finish the commit a crash interrupted, or roll it back if its bytes are gone.

    An intent that would rename onto a file its series does not own, or whose temporaries are
    not ours (a staging directory that is a symlink), is not ours either: rolled back.
    """
    it = m.intent
    assert it is not None
    owns = _template_pattern(it.series).fullmatch
    why = "lost its files (deleted by hand?)"
    complete = all(owns(final) or final in SIDE_FILES for _, final in it.moves)
    if not complete:
        why = "names files its series does not own (a damaged or crafted manifest)"
    incoming = {f.path: f for f in it.record.files}
    pending = []
    for tmp, final in it.moves if complete else ():
        try:
            if store.stat(tmp).kind == "file":
                pending.append((tmp, final))
                continue
        except ValueError:  # not a temporary of ours after all
            complete, why = False, "names temporaries that are not keras_ckpt's"
            break
        entry = incoming.get(final)
        if entry is None:  # a side file: present is enough
            complete &= store.stat(final).kind == "file"
        else:
            digest, _ = store.hash(final, entry.bytes)
            complete &= digest == entry.xxh3_128
    if complete:
        for tmp, final in pending:
            store.rename(tmp, final)
        store.sync()
        out, _ = _apply(m)
        return out
    for tmp, _ in it.moves:
        with contextlib.suppress(ValueError, OSError):
            if store.stat(tmp).kind != "missing":
                store.remove_temp(tmp.split("/")[0])
    m.intent = None
    warnings.warn(
        f"keras_ckpt: an interrupted save of {it.record.name!r} in {store.directory} {why}; it "
        "was rolled back.",
        stacklevel=4,
    )
    return m


def verify(directory: str | storage.LocalStorage, record: Record,
           incoming: Mapping[str, FileEntry] | None = None) -> str | None:
    """None if every file of ``record`` is present with its size and checksum; else why not.

    ``incoming`` (from a commit in flight, for readers that cannot finish it) are accepted as
    an alternative version of a listed file; a checkpoint whose files mix the two versions is
    corrupt.
    """
    store = directory if isinstance(directory, storage.LocalStorage) else storage.LocalStorage(directory)
    versions = set()
    for f in record.files:
        digest, problem = store.hash(f.path, f.bytes)
        if digest == f.xxh3_128:
            versions.add("committed")
            continue
        alt = (incoming or {}).get(f.path)
        if alt is not None and store.hash(f.path, alt.bytes)[0] == alt.xxh3_128:
            versions.add("incoming")
            continue
        return problem or f"{f.path} does not match its checksum"
    if {"committed", "incoming"} <= versions:
        return "its files mix two saves (an overwrite was interrupted)"
    return None


def newest_valid(
    directory: str | storage.LocalStorage, records: Sequence[Record], *, quiet: bool = False,
    incoming: Mapping[str, FileEntry] | None = None,
) -> Record | None:
    """The newest of ``records`` (commit order) whose files verify; a warning names each bad one."""
    store = directory if isinstance(directory, storage.LocalStorage) else storage.LocalStorage(directory)
    for record in sorted(records, key=lambda r: r.seq, reverse=True):
        problem = verify(store, record, incoming)
        if problem is None:
            return record
        if not quiet:
            _warn_skipped(store, record, problem)
    return None


def _warn_skipped(store: storage.LocalStorage, record: Record, problem: str | None) -> None:
    warnings.warn(
        f"keras_ckpt: skipping checkpoint {record.name!r} in {store.directory}: {problem} "
        "(corrupt or incomplete); trying the previous one.",
        stacklevel=4,
    )


def in_flight(m: Manifest) -> dict[str, FileEntry]:
    """The files a commit in flight is bringing in (readers accept them, see :func:`verify`)."""
    return {} if m.intent is None else {f.path: f for f in m.intent.record.files}


# A directory whose writer still runs may rotate the newest file away between a read of its
# manifest and the open of that file: so many fresh reads of the manifest before settling.
_LOCATE_TRIES = 5


def locate(
    path: str, series: str | None = None, argname: str = "resume"
) -> tuple[str, Record | None, storage.HeldFile | None]:
    """Resolve a ``resume=<path>``: a checkpoint file, or a directory holding a manifest.

    Returns the main file to load, its record (None for a bare file that no manifest lists),
    and that file held open from the moment it verified (None for a bare file or a record of
    several files): load and copy it through the :class:`~keras_ckpt.storage.HeldFile`, then
    close it. In a directory, the series named ``series`` is used, else its only series;
    several candidates are refused. The newest in commit order that verifies is chosen. Reads
    only: another process may be writing that directory meanwhile.
    """
    path = os.path.abspath(os.fspath(path))
    kind = storage.path_kind(path)
    if kind == "dir":
        store = storage.LocalStorage(path)
        for attempt in range(_LOCATE_TRIES):
            m = mf.load(path)
            record, held, skipped = _hold_newest(store, choose_series(m, series, path, argname),
                                                 in_flight(m))
            try:
                settled = not skipped or attempt == _LOCATE_TRIES - 1 or mf.load(path) == m
            except BaseException:
                if held is not None:
                    held.close()
                raise
            if settled:
                break
            if held is not None:  # the writer moved on meanwhile: take its newer checkpoint
                held.close()
        for bad, problem in skipped:
            _warn_skipped(store, bad, problem)
        if record is None:
            raise ValueError(f"{argname}={path!r}: no checkpoint there passes its checksum")
        return os.path.join(path, record.path), record, held
    if kind == "missing":
        raise ValueError(f"{argname} must be an existing checkpoint file or directory. Received: "
                         f"{argname}={path!r}")
    # The caller's own path: a link they keep (latest.pt) names the file to load, verified by
    # the manifest beside that file. Only names read from a manifest are never followed.
    real = os.path.realpath(path) if os.path.islink(path) else path
    directory, base = os.path.split(real)
    m = mf.load(directory) if mf.exists(directory) else Manifest()
    record = next((r for r in m.checkpoints if any(f.path == base for f in r.files)), None)
    if record is None:
        return real, None, None
    record, held, skipped = _hold_newest(storage.LocalStorage(directory), [record], in_flight(m))
    if skipped:
        raise ValueError(f"{argname}={path!r} is corrupt: {skipped[0][1]}")
    return real, record, held


def _hold_newest(
    store: storage.LocalStorage, records: Sequence[Record], incoming: Mapping[str, FileEntry],
) -> tuple[Record | None, storage.HeldFile | None, list[tuple[Record, str | None]]]:
    """The newest of ``records`` that verifies, its file held open where it has one file; and
    the newer ones skipped, with why."""
    skipped: list[tuple[Record, str | None]] = []
    for record in sorted(records, key=lambda r: r.seq, reverse=True):
        if len(record.files) != 1:
            problem = verify(store, record, incoming)
            if problem is None:
                return record, None, skipped
        else:
            entry = record.files[0]
            held, problem = store.hold(entry.path, entry.bytes, [entry.xxh3_128])
            alt = incoming.get(entry.path)
            if held is None and alt is not None:  # the version a commit in flight brings in
                held = store.hold(entry.path, alt.bytes, [alt.xxh3_128])[0]
            if held is not None:
                return record, held, skipped
        skipped.append((record, problem))
    return None, None, skipped


def choose_series(m: Manifest, series: str | None, where: str, argname: str = "resume") -> list[Record]:
    """The records of ``series`` in ``m``, else of its only series; ValueError if ambiguous."""
    names = sorted({r.series for r in m.checkpoints})
    if not names:
        raise ValueError(f"{argname}={where!r} holds no keras_ckpt checkpoints (no records in "
                         f"{mf.FILENAME})")
    if series is not None and series in names:
        return m.records(series)
    if len(names) == 1:
        return m.records(names[0])
    raise ValueError(
        f"{argname}={where!r} holds several series ({', '.join(names)}) and none is named "
        f"{series!r}: pass the path of the checkpoint file to resume from."
    )
