"""The directory's ``checkpoints.json``: committed records, series state, the commit in flight.

Schema (format 1) is the one in DESIGN.md, plus what the write-ahead commit needs:

- each record has ``seq`` (commit order, unique in the manifest) and ``run`` (which run of its
  series wrote it);
- ``series[s]`` has ``run`` (the current run), ``baseline`` (the best value no listed record
  holds: ``initial_value_threshold``, a best carried from another directory, a best whose file a
  later save replaced) and ``policy`` (the retention policy, so ``keras-ckpt prune`` applies what
  training applied);
- ``intent``: the one commit in flight (the incoming record, its temporaries, the records it
  drops), written before anything becomes visible, so a crash at any instant is finished or
  rolled back at the next open;
- ``deleting``: files the last commit dropped, deleted after it (again at the next open);
- ``history``: the last ``HISTORY_MAX`` saves (name, series, seq, run, epoch, step, time,
  metrics), also those whose files retention deleted, for ``keras-ckpt plot``.

The manifest is untrusted input: every field is checked on load, every path must be a plain
file name inside the directory, and errors name the file, the record and the field. Readers
ignore keys they do not know and refuse a manifest written in a newer format.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from keras_ckpt import storage

FILENAME = "checkpoints.json"
FORMAT = 1
MAX_BYTES = 256 << 20  # a manifest of a million checkpoints is ~400 MB: far past any real one
_KNOWN_EXTENSIONS = (
    ".weights.h5", ".keras", ".h5", ".pth.tar", ".pt", ".pth", ".index", ".meta", ".json",
)
_HEX128 = re.compile(r"[0-9a-f]{32}")
_TF_SHARD = re.compile(r"(.+)\.data-\d{5}-of-\d{5}")


class ManifestError(RuntimeError):
    """The manifest cannot be used: not valid, not keras_ckpt's, or of a newer format."""


def writer_id() -> str:
    from keras_ckpt._version import __version__

    return f"keras_ckpt {__version__}"


def checkpoint_name(path: str) -> str:
    """A checkpoint's name: its file name without the extension (TF's ``.data-*`` included)."""
    base = os.path.basename(path)
    for ext in _KNOWN_EXTENSIONS:
        if base.endswith(ext) and len(base) > len(ext):
            return base[: -len(ext)]
    shard = _TF_SHARD.fullmatch(base)
    if shard:
        return shard.group(1)
    return os.path.splitext(base)[0]


# -- reading untrusted JSON -------------------------------------------------------------------------


class _Where:
    """Names the place in the manifest a value came from, for error messages."""

    def __init__(self, path: str, at: str = "") -> None:
        self.path, self.at = path, at

    def sub(self, at: str) -> _Where:
        return _Where(self.path, f"{self.at}{at}" if self.at else at)

    def error(self, what: str, value: Any) -> ManifestError:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return ManifestError(f"{self.path}: {self.at}: {what}. Received: {shown}")


def _int(d: Mapping[str, Any], key: str, where: _Where, default: int | None = None) -> int:
    if key not in d and default is not None:
        return default
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise where.sub(f".{key}").error("must be an integer >= 0", value)
    return value


def _str(d: Mapping[str, Any], key: str, where: _Where, default: str | None = None) -> str:
    if key not in d and default is not None:
        return default
    value = d.get(key)
    if not isinstance(value, str):
        raise where.sub(f".{key}").error("must be a string", value)
    return value


def _opt_str(d: Mapping[str, Any], key: str, where: _Where) -> str | None:
    value = d.get(key)
    if value is not None and not isinstance(value, str):
        raise where.sub(f".{key}").error("must be a string or null", value)
    return value


def _number(value: Any, where: _Where, *, allow_none: bool = True) -> float | None:
    """A JSON number, ``"inf"``/``"-inf"`` (JSON has no infinity), or null (NaN was written so)."""
    if value is None and allow_none:
        return None
    if value in ("inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise where.error("must be a number", value)
    return float(value)


def _dict(value: Any, where: _Where) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise where.error("must be an object", value)
    return value


def _list(value: Any, where: _Where) -> list:
    if not isinstance(value, list):
        raise where.error("must be a list", value)
    return value


def _file_name(value: Any, where: _Where) -> str:
    if not storage.is_plain_name(value) or value in (FILENAME, storage.LOCK_NAME):
        raise where.error(
            "must be a plain file name inside the checkpoint directory (no directory part, "
            "nothing absolute or climbing out)", value,
        )
    return value


def _series_name(value: Any, where: _Where, *, empty: bool = False) -> str:
    """A series is named by its file-name template: a plain name, so it never points elsewhere."""
    if empty and value == "":
        return value
    if storage.is_plain_name(value) and value not in (FILENAME, storage.LOCK_NAME):
        return value
    raise where.error("must be a file-name template inside the checkpoint directory (no directory part)",
                      value)


def _json_number(value: float | None) -> Any:
    # JSON has no infinity or NaN; keep the manifest standard so any tool can read it. NaN is
    # null: it must never read back as a value that could rank as best.
    if value is None or math.isnan(value):
        return None
    if math.isfinite(value):
        return value
    return "inf" if value > 0 else "-inf"


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float | None]:
    """JSON-safe metrics: numbers as floats, NaN as null (so it can never rank as best)."""
    out: dict[str, float | None] = {}
    for key, value in (metrics or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        out[str(key)] = None if math.isnan(number) else number
    return out


# -- the schema -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: a plain name in the manifest's directory, its size and checksum."""

    path: str
    bytes: int
    xxh3_128: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "xxh3_128": self.xxh3_128}

    @classmethod
    def from_json(cls, d: Any, where: _Where) -> FileEntry:
        d = _dict(d, where)
        digest = _str(d, "xxh3_128", where)
        if not _HEX128.fullmatch(digest):
            raise where.sub(".xxh3_128").error("must be 32 lowercase hex digits", digest)
        return cls(
            path=_file_name(d.get("path"), where.sub(".path")),
            bytes=_int(d, "bytes", where),
            xxh3_128=digest,
        )


@dataclass(frozen=True)
class Record:
    """One committed checkpoint. ``epoch`` = epochs completed; ``step`` = optimizer steps.

    ``seq`` orders commits (wall-clock ``time`` may step back); ``run`` is the run of the series
    that wrote it (see "Runs within a series" in DESIGN.md).
    """

    name: str
    series: str
    epoch: int
    step: int
    time: float
    metrics: Mapping[str, Any] = field(default_factory=dict)
    files: tuple[FileEntry, ...] = ()
    kept: tuple[str, ...] = ()
    pending: bool = False
    seq: int = 0
    run: int = 0

    @property
    def path(self) -> str:
        """The main file's path relative to the manifest directory."""
        return self.files[0].path if self.files else self.name

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "series": self.series,
            "seq": self.seq,
            "run": self.run,
            "epoch": self.epoch,
            "step": self.step,
            "time": self.time,
            "metrics": {k: _json_number(v) for k, v in self.metrics.items()},
            "files": [f.to_json() for f in self.files],
            "kept": list(self.kept),
        }
        if self.pending:
            d["pending"] = True
        return d

    @classmethod
    def from_json(cls, d: Any, where: _Where, *, seq: int = 0) -> Record:
        d = _dict(d, where)
        name = _str(d, "name", where)
        where = _Where(where.path, f"{where.at} ({name!r})")
        time_ = _number(d.get("time", 0.0), where.sub(".time"), allow_none=False)
        if not math.isfinite(time_):  # type: ignore[arg-type]
            raise where.sub(".time").error("must be a finite number", d.get("time"))
        metrics = {}
        for key, value in _dict(d.get("metrics") or {}, where.sub(".metrics")).items():
            metrics[str(key)] = _number(value, where.sub(f".metrics[{key!r}]"))
        files = tuple(
            FileEntry.from_json(f, where.sub(f".files[{i}]"))
            for i, f in enumerate(_list(d.get("files", []), where.sub(".files")))
        )
        if not files:
            raise where.sub(".files").error("must list at least one file", d.get("files"))
        kept = _list(d.get("kept", []), where.sub(".kept"))
        if not all(isinstance(k, str) for k in kept):
            raise where.sub(".kept").error("must be a list of strings", kept)
        return cls(
            name=name,
            series=_series_name(_str(d, "series", where, default=""), where.sub(".series"), empty=True),
            epoch=_int(d, "epoch", where, default=0),
            step=_int(d, "step", where, default=0),
            time=time_,  # type: ignore[arg-type]
            metrics=metrics,
            files=files,
            kept=tuple(kept),
            pending=bool(d.get("pending", False)),
            seq=_int(d, "seq", where, default=seq),
            run=_int(d, "run", where, default=0),
        )

    def with_metrics(self, metrics: Mapping[str, Any] | None) -> Record:
        return replace(self, metrics=_clean_metrics(metrics))


def make_record(
    name: str,
    series: str,
    *,
    epoch: int,
    step: int,
    time: float,
    metrics: Mapping[str, Any] | None,
    files: tuple[FileEntry, ...],
    pending: bool = False,
    seq: int = 0,
    run: int = 0,
) -> Record:
    return Record(
        name=name, series=series, epoch=int(epoch), step=int(step), time=float(time),
        metrics=_clean_metrics(metrics), files=files, pending=pending, seq=seq, run=run,
    )


@dataclass
class SeriesState:
    """What one checkpointer remembers across restarts besides its records.

    ``best``/``best_name`` are derived (the engine recomputes them from the records of the
    current ``run`` and ``baseline``) and stored for readers such as the CLI.
    """

    framework: str = ""
    monitor: str | None = None
    mode: str | None = None
    best: float | None = None
    best_name: str | None = None
    run: int = 0
    baseline: tuple[float, int] | None = None
    policy: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("framework", "monitor", "mode", "best", "best_name", "run", "baseline", "policy")

    def to_json(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update(
            framework=self.framework,
            monitor=self.monitor,
            mode=self.mode,
            best=_json_number(self.best),
            best_name=self.best_name,
            run=self.run,
            baseline=None if self.baseline is None
            else {"value": _json_number(self.baseline[0]), "seq": self.baseline[1]},
            policy=self.policy,
        )
        return d

    @classmethod
    def from_json(cls, d: Any, where: _Where) -> SeriesState:
        d = _dict(d, where)
        mode = _opt_str(d, "mode", where)
        if mode not in (None, "min", "max"):
            raise where.sub(".mode").error("must be 'min', 'max' or null", mode)
        baseline = None
        if d.get("baseline") is not None:
            b = _dict(d["baseline"], where.sub(".baseline"))
            value = _number(b.get("value"), where.sub(".baseline.value"), allow_none=False)
            raw_seq = b.get("seq")
            if isinstance(raw_seq, bool) or not isinstance(raw_seq, int):
                raise where.sub(".baseline.seq").error("must be an integer", raw_seq)
            baseline = (value, raw_seq)
        policy = d.get("policy")
        if policy is not None:
            policy = dict(_dict(policy, where.sub(".policy")))
        return cls(
            framework=_str(d, "framework", where, default=""),
            monitor=_opt_str(d, "monitor", where),
            mode=mode,
            best=_number(d.get("best"), where.sub(".best")),
            best_name=_opt_str(d, "best_name", where),
            run=_int(d, "run", where, default=0),
            baseline=baseline,  # type: ignore[arg-type]
            policy=policy,
            extra={k: v for k, v in d.items() if k not in cls._KNOWN},
        )


@dataclass(frozen=True)
class Intent:
    """The commit in flight: what the manifest becomes once the temporaries are renamed.

    Written (durably) after every temporary is complete and fsynced and before the first rename,
    so the next open can always finish it: rename what is still a temporary, then commit.
    ``moves`` pairs each temporary with its final name (the record's files and side files such
    as TF's ``checkpoint``); ``drop`` names the records of ``series`` the commit removes.
    """

    series: str
    record: Record
    state: SeriesState
    moves: tuple[tuple[str, str], ...]
    drop: tuple[str, ...] = ()
    writer: str = ""
    kept: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "series": self.series,
            "writer": self.writer,
            "record": self.record.to_json(),
            "state": self.state.to_json(),
            "moves": [{"temp": t, "path": p} for t, p in self.moves],
            "drop": list(self.drop),
            "kept": {k: list(v) for k, v in self.kept.items()},
        }

    @classmethod
    def from_json(cls, d: Any, where: _Where) -> Intent:
        d = _dict(d, where)
        moves = []
        for i, m in enumerate(_list(d.get("moves"), where.sub(".moves"))):
            w = where.sub(f".moves[{i}]")
            m = _dict(m, w)
            temp = m.get("temp")
            if not storage.is_temp_name(temp):
                raise w.sub(".temp").error("must name a keras_ckpt temporary", temp)
            moves.append((temp, _file_name(m.get("path"), w.sub(".path"))))
        drop = _list(d.get("drop", []), where.sub(".drop"))
        if not all(isinstance(n, str) for n in drop):
            raise where.sub(".drop").error("must be a list of record names", drop)
        kept = {}
        for name, why in _dict(d.get("kept") or {}, where.sub(".kept")).items():
            if not isinstance(why, list) or not all(isinstance(w, str) for w in why):
                raise where.sub(f".kept[{name!r}]").error("must be a list of strings", why)
            kept[str(name)] = tuple(why)
        record = Record.from_json(d.get("record"), where.sub(".record"))
        series = _series_name(_str(d, "series", where), where.sub(".series"))
        if record.series != series:
            raise where.sub(".record.series").error(f"must be the intent's series {series!r}", record.series)
        return cls(
            kept=kept,
            series=series,
            writer=_str(d, "writer", where, default=""),
            record=record,
            state=SeriesState.from_json(d.get("state"), where.sub(".state")),
            moves=tuple(moves),
            drop=tuple(drop),
        )


HISTORY_MAX = 2000  # saves remembered for `keras-ckpt plot`; the manifest is rewritten every save


@dataclass(frozen=True)
class Save:
    """One save in the history, kept after retention deleted its files (for plots across runs)."""

    name: str
    series: str
    seq: int
    run: int
    epoch: int
    step: int
    time: float
    metrics: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, r: Record) -> Save:
        return cls(r.name, r.series, r.seq, r.run, r.epoch, r.step, r.time, dict(r.metrics))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "series": self.series, "seq": self.seq, "run": self.run,
                "epoch": self.epoch, "step": self.step, "time": self.time,
                "metrics": {k: _json_number(v) for k, v in self.metrics.items()}}

    @classmethod
    def from_json(cls, d: Any, where: _Where) -> Save:
        d = _dict(d, where)
        time_ = _number(d.get("time", 0.0), where.sub(".time"), allow_none=False)
        metrics = {
            str(k): _number(v, where.sub(f".metrics[{k!r}]"))
            for k, v in _dict(d.get("metrics") or {}, where.sub(".metrics")).items()
        }
        return cls(
            name=_str(d, "name", where),
            series=_series_name(_str(d, "series", where, default=""), where.sub(".series"), empty=True),
            seq=_int(d, "seq", where, default=0),
            run=_int(d, "run", where, default=0),
            epoch=_int(d, "epoch", where, default=0),
            step=_int(d, "step", where, default=0),
            time=time_,  # type: ignore[arg-type]
            metrics=metrics,
        )


@dataclass
class Manifest:
    series: dict[str, SeriesState] = field(default_factory=dict)
    checkpoints: list[Record] = field(default_factory=list)
    seq: int = 0  # the last commit number handed out
    intent: Intent | None = None
    deleting: list[str] = field(default_factory=list)
    history: list[Save] = field(default_factory=list)  # every save, oldest first (capped)
    extra: dict[str, Any] = field(default_factory=dict)

    _KNOWN = ("format", "writer", "series", "checkpoints", "seq", "intent", "deleting", "history")

    def remember(self, record: Record) -> None:
        """Add ``record``'s save to the history (a re-save of a name adds a new entry)."""
        self.history = [*self.history, Save.of(record)][-HISTORY_MAX:]

    def saves(self) -> list[Save]:
        """Every save known, in commit order: the history, plus listed records it lacks (older
        manifests, adopted checkpoints)."""
        known = {(h.series, h.seq) for h in self.history}
        extra = [Save.of(r) for r in self.checkpoints if (r.series, r.seq) not in known]
        return sorted([*self.history, *extra], key=lambda h: h.seq)

    def records(self, series: str) -> list[Record]:
        """This series' records in commit order."""
        return sorted((r for r in self.checkpoints if r.series == series), key=lambda r: r.seq)

    def listed_files(self) -> set[str]:
        return {f.path for r in self.checkpoints for f in r.files}

    def next_seq(self) -> int:
        return max([self.seq, *(r.seq for r in self.checkpoints)]) + 1

    def to_json(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update(
            format=FORMAT,
            writer=writer_id(),
            seq=self.seq,
            series={k: v.to_json() for k, v in self.series.items()},
            checkpoints=[r.to_json() for r in self.checkpoints],
        )
        if self.intent is not None:
            d["intent"] = self.intent.to_json()
        if self.deleting:
            d["deleting"] = list(self.deleting)
        if self.history:
            d["history"] = [h.to_json() for h in self.history]
        return d

    @classmethod
    def from_json(cls, d: Any, where: str = FILENAME) -> Manifest:
        if not isinstance(d, Mapping) or "format" not in d:
            raise ManifestError(f"{where} is not a keras_ckpt manifest (no 'format' key).")
        fmt = d["format"]
        if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt > FORMAT:
            raise ManifestError(
                f"{where} has format {fmt!r}, newer than this keras_ckpt understands ({FORMAT}); "
                f"it was written by {d.get('writer', 'an unknown writer')!s}. Upgrade keras_ckpt."
            )
        top = _Where(where)
        series = {
            _series_name(k, top.sub(f"series[{k!r}]")): SeriesState.from_json(v, top.sub(f"series[{k!r}]"))
            for k, v in _dict(d.get("series") or {}, top.sub("series")).items()
        }
        # Manifests written before ``seq`` existed list records in commit order.
        records = [
            Record.from_json(r, top.sub(f"checkpoints[{i}]"), seq=i + 1)
            for i, r in enumerate(_list(d.get("checkpoints") or [], top.sub("checkpoints")))
        ]
        seen: set[tuple[str, str]] = set()
        seqs: set[int] = set()
        for i, r in enumerate(records):
            if (r.series, r.name) in seen:
                raise top.sub(f"checkpoints[{i}] ({r.name!r})").error(
                    "lists a checkpoint name twice in one series", r.name
                )
            # seq is what "newest" means (resume, rotation): two records of one number would
            # leave which one is newer to the order they happen to be listed in.
            if r.seq in seqs:
                raise top.sub(f"checkpoints[{i}] ({r.name!r}).seq").error(
                    "repeats another checkpoint's commit number", r.seq
                )
            seen.add((r.series, r.name))
            seqs.add(r.seq)
        deleting = _list(d.get("deleting") or [], top.sub("deleting"))
        for i, name in enumerate(deleting):
            _file_name(name, top.sub(f"deleting[{i}]"))
        intent = d.get("intent")
        history = [
            Save.from_json(h, top.sub(f"history[{i}]"))
            for i, h in enumerate(_list(d.get("history") or [], top.sub("history")))
        ]
        return cls(
            series=series,
            checkpoints=records,
            history=history,
            seq=_int(d, "seq", top, default=0),
            intent=None if intent is None else Intent.from_json(intent, top.sub("intent")),
            deleting=list(deleting),
            extra={k: v for k, v in d.items() if k not in cls._KNOWN},
        )


def parse(data: bytes, where: str) -> Manifest:
    def not_standard(token: str) -> Any:
        # Python's json reads NaN/Infinity, which no other JSON reader does and which the next
        # rewrite (allow_nan=False) would fail on mid-commit.
        raise ValueError(f"{token} is not standard JSON")

    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=not_standard)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{where} is not valid JSON: {e}") from e
    return Manifest.from_json(obj, where=where)


def dumps(manifest: Manifest) -> bytes:
    return json.dumps(manifest.to_json(), indent=1, allow_nan=False).encode("utf-8")


def manifest_path(directory: str) -> str:
    return os.path.join(directory, FILENAME)


def read(store: storage.LocalStorage) -> Manifest | None:
    """The manifest of ``store``'s directory, or None where there is none."""
    where = manifest_path(store.directory)
    try:
        data = store.read(FILENAME, MAX_BYTES)
    except ValueError as e:
        raise ManifestError(str(e)) from e
    return None if data is None else parse(data, where)


def load(directory: str) -> Manifest:
    """The manifest of ``directory``, or an empty one where there is none."""
    return read(storage.LocalStorage(directory)) or Manifest()


def exists(directory: str) -> bool:
    return storage.LocalStorage(directory).stat(FILENAME).kind != "missing"


def write(store: storage.LocalStorage, manifest: Manifest) -> None:
    """Replace the manifest atomically: readers see the old one or the new one, never a mix."""
    store.write_atomic(FILENAME, dumps(manifest))
