"""The directory's ``checkpoints.json``: one record per committed checkpoint, plus series state.

Schema (format 1) is the one in DESIGN.md. Readers ignore keys they do not know and refuse a
manifest written in a newer format rather than guess at it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from keras_ckpt import storage

FILENAME = "checkpoints.json"
FORMAT = 1
_KNOWN_EXTENSIONS = (".weights.h5", ".keras", ".h5", ".pt", ".pth", ".index", ".meta", ".json")


class ManifestError(RuntimeError):
    """The manifest cannot be read (newer format, or not a keras_ckpt manifest)."""


def writer_id() -> str:
    from keras_ckpt import __version__

    return f"keras_ckpt {__version__}"


def checkpoint_name(path: str) -> str:
    """A checkpoint's name: its file name without the extension (TF's ``.data-*`` included)."""
    base = os.path.basename(path)
    for ext in _KNOWN_EXTENSIONS:
        if base.endswith(ext):
            return base[: -len(ext)]
    if ".data-" in base:
        return base[: base.index(".data-")]
    return os.path.splitext(base)[0] if "." in base else base


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint. ``replacing`` is set only while a save overwrites this file.

    A rename over a listed file cannot happen in the same instant as the manifest commit, so
    the engine first records the incoming file's (bytes, checksum) here: whichever version a
    crash leaves on disk then verifies.
    """

    path: str
    bytes: int
    xxh3_128: str
    replacing: tuple[int, str] | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "bytes": self.bytes, "xxh3_128": self.xxh3_128}
        if self.replacing is not None:
            d["replacing"] = {"bytes": self.replacing[0], "xxh3_128": self.replacing[1]}
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FileEntry:
        r = d.get("replacing")
        return cls(
            path=d["path"],
            bytes=int(d["bytes"]),
            xxh3_128=d["xxh3_128"],
            replacing=(int(r["bytes"]), r["xxh3_128"]) if r else None,
        )


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """JSON-safe metrics: numbers as floats, NaN as null (so it can never rank as best)."""
    out: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        out[str(key)] = None if math.isnan(number) else number
    return out


def _json_number(value: float) -> Any:
    # JSON has no infinity; keep the manifest standard so any tool can read it.
    if value is None or math.isfinite(value):
        return value
    return "inf" if value > 0 else "-inf"


def _from_json_number(value: Any) -> float | None:
    if value in ("inf", "-inf"):
        return float(value)
    return None if value is None else float(value)


@dataclass(frozen=True)
class Record:
    """One committed checkpoint. ``epoch`` = epochs completed; ``step`` = optimizer steps."""

    name: str
    series: str
    epoch: int
    step: int
    time: float
    metrics: Mapping[str, Any] = field(default_factory=dict)
    files: tuple[FileEntry, ...] = ()
    kept: tuple[str, ...] = ()
    pending: bool = False

    @property
    def path(self) -> str:
        """The main file's path relative to the manifest directory."""
        return self.files[0].path if self.files else self.name

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "series": self.series,
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
    def from_json(cls, d: Mapping[str, Any]) -> Record:
        return cls(
            name=d["name"],
            series=d.get("series", ""),
            epoch=int(d.get("epoch", 0)),
            step=int(d.get("step", 0)),
            time=float(d.get("time", 0.0)),
            metrics={k: _from_json_number(v) for k, v in (d.get("metrics") or {}).items()},
            files=tuple(FileEntry.from_json(f) for f in d.get("files", ())),
            kept=tuple(d.get("kept", ())),
            pending=bool(d.get("pending", False)),
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
) -> Record:
    return Record(
        name=name,
        series=series,
        epoch=int(epoch),
        step=int(step),
        time=float(time),
        metrics=_clean_metrics(metrics),
        files=files,
        pending=pending,
    )


@dataclass
class SeriesState:
    """What one checkpointer remembers across restarts besides its records."""

    framework: str = ""
    monitor: str | None = None
    mode: str | None = None
    best: float | None = None
    best_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update(
            framework=self.framework,
            monitor=self.monitor,
            mode=self.mode,
            best=_json_number(self.best),
            best_name=self.best_name,
        )
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SeriesState:
        known = {"framework", "monitor", "mode", "best", "best_name"}
        return cls(
            framework=d.get("framework", ""),
            monitor=d.get("monitor"),
            mode=d.get("mode"),
            best=_from_json_number(d.get("best")),
            best_name=d.get("best_name"),
            extra={k: v for k, v in d.items() if k not in known},
        )


@dataclass
class Manifest:
    series: dict[str, SeriesState] = field(default_factory=dict)
    checkpoints: list[Record] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def records(self, series: str) -> list[Record]:
        return [r for r in self.checkpoints if r.series == series]

    def to_json(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update(
            format=FORMAT,
            writer=writer_id(),
            series={k: v.to_json() for k, v in self.series.items()},
            checkpoints=[r.to_json() for r in self.checkpoints],
        )
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = FILENAME) -> Manifest:
        if not isinstance(d, Mapping) or "format" not in d:
            raise ManifestError(f"{where} is not a keras_ckpt manifest (no 'format' key).")
        fmt = d["format"]
        if not isinstance(fmt, int) or fmt > FORMAT:
            raise ManifestError(
                f"{where} has format {fmt!r}, newer than this keras_ckpt understands ({FORMAT}); "
                f"it was written by {d.get('writer', 'an unknown writer')}. Upgrade keras_ckpt."
            )
        known = {"format", "writer", "series", "checkpoints"}
        return cls(
            series={k: SeriesState.from_json(v) for k, v in (d.get("series") or {}).items()},
            checkpoints=[Record.from_json(r) for r in d.get("checkpoints") or ()],
            extra={k: v for k, v in d.items() if k not in known},
        )


def manifest_path(directory: str) -> str:
    return os.path.join(directory, FILENAME)


def exists(directory: str) -> bool:
    return os.path.exists(manifest_path(directory))


def load(directory: str) -> Manifest:
    """The manifest of ``directory``, or an empty one where there is none."""
    path = manifest_path(directory)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return Manifest()
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from e
    return Manifest.from_json(data, where=path)


def save(directory: str, manifest: Manifest) -> None:
    """Replace the manifest atomically: readers see the old one or the new one, never a mix."""
    text = json.dumps(manifest.to_json(), indent=1, allow_nan=False)
    storage.atomic_write_bytes(manifest_path(directory), text.encode("utf-8"))
