"""Pure checkpoint decisions: when to save and which checkpoints to keep.

Nothing here touches a file. Retention is a function from plain records (anything with
``name``, ``epoch``, ``time``, ``metrics`` and ``pending`` attributes, oldest first) to the set of
names to keep and why, so every rule is testable without a filesystem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

LATEST = "latest"
BEST = "best"
EVERY_N_EPOCHS = "every_n_epochs"
EVERY_N_HOURS = "every_n_hours"
PENDING = "pending"


class _Unset:
    """Marks an argument the caller did not pass, so a preset may fill it in."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()


class RecordLike(Protocol):
    name: str
    epoch: int
    time: float
    metrics: Mapping[str, Any]
    pending: bool


def resolve_mode(mode: str, monitor: str | None) -> str | None:
    """Map Keras's ``mode`` (``min``/``max``/``auto``) to ``min``/``max``.

    Returns None when ``auto`` cannot infer a direction from the monitor's name; front-ends then
    consult the compiled metrics. An unknown mode falls back to ``auto``, as Keras does (the caller
    warns with Keras's message).
    """
    if mode in ("min", "max"):
        return mode
    if monitor is None:
        return "min"
    name = monitor[4:] if monitor.startswith("val_") else monitor
    if name.endswith("loss") or name in ("mse", "mae", "mape", "msle", "error"):
        return "min"
    if "acc" in name or name.startswith("fmeasure") or name in ("auc", "precision", "recall"):
        return "max"
    return None


def undecidable_mode(monitor: str | None) -> ValueError:
    """The error for a ``mode="auto"`` whose direction neither the name nor the metrics tell."""
    return ValueError(
        f"mode='auto' cannot tell whether monitor={monitor!r} should be minimized or "
        "maximized. Pass mode='min' or mode='max'. Received: mode='auto'"
    )


def score(metrics: Mapping[str, Any] | None, monitor: str | None) -> float | None:
    """The record's monitored value, or None when it is missing or not a finite-or-inf number.

    NaN counts as missing: a diverged run must never become "best".
    """
    if monitor is None or not metrics or monitor not in metrics:
        return None
    value = metrics[monitor]
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def is_improvement(value: float | None, best: float | None, mode: str) -> bool:
    """Strict improvement, as Keras's ``ModelCheckpoint``: a tie keeps the earlier best."""
    if value is None or math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def validate_count(name: str, value: Any, *, allow_none: bool = True, minimum: int = 0) -> None:
    """Raise a ValueError naming ``name`` and the value received unless it is a valid count."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}. "
            f"Received: {name}={value!r}"
        )


def validate_positive_number(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0 or None. Received: {name}={value!r}")


@dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints of one series to keep: latest-N ∪ best-N ∪ every-N-epochs ∪ one per N hours.

    Args:
        max_to_keep: keep the N newest (None: keep all). The newest is kept even with 0.
        keep_best: keep the N best by ``monitor``/``mode``. When rotation is on
            (``max_to_keep`` is not None), the single best is protected even with 0, so rotation
            never deletes the best checkpoint.
        keep_every_n_epochs: keep the first checkpoint recorded with an epoch count divisible by
            N (the end-of-epoch save; mid-epoch saves of the next epoch carry the same count).
        keep_every_n_hours: keep one checkpoint per N hours, spaced by the records' wall-clock
            ``time`` (so the spacing survives restarts): walking oldest first, the first record is
            kept and then each first one at least N hours after the previous kept one.
        monitor: the metric name ranked for best-N.
        mode: ``"min"`` or ``"max"``.
    """

    max_to_keep: int | None = None
    keep_best: int = 0
    keep_every_n_epochs: int | None = None
    keep_every_n_hours: float | None = None
    monitor: str | None = None
    mode: str = "min"

    def __post_init__(self) -> None:
        validate_count("max_to_keep", self.max_to_keep)
        validate_count("keep_best", self.keep_best, allow_none=False)
        validate_count("keep_every_n_epochs", self.keep_every_n_epochs, minimum=1)
        validate_positive_number("keep_every_n_hours", self.keep_every_n_hours)
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max'. Received: mode={self.mode!r}")

    def best_names(self, records: Sequence[RecordLike], n: int) -> list[str]:
        """The ``n`` best scored records' names, best first; ties favour the older record."""
        scored = [(score(r.metrics, self.monitor), i, r.name) for i, r in enumerate(records)]
        scored = [s for s in scored if s[0] is not None]
        sign = 1.0 if self.mode == "min" else -1.0
        scored.sort(key=lambda s: (sign * s[0], s[1]))
        return [name for _, _, name in scored[:n]]

    def retain(self, records: Sequence[RecordLike]) -> dict[str, tuple[str, ...]]:
        """Map each record to keep (by name) to the reasons it is kept; absent names may go."""
        reasons: dict[str, list[str]] = {}

        def keep(name: str, why: str) -> None:
            bucket = reasons.setdefault(name, [])
            if why not in bucket:
                bucket.append(why)

        if not records:
            return {}
        if self.max_to_keep is None:
            latest = list(records)
        else:
            latest = list(records[-self.max_to_keep:]) if self.max_to_keep else []
        latest.append(records[-1])  # the newest is never deleted
        for r in latest:
            keep(r.name, LATEST)

        n_best = self.keep_best if self.keep_best or self.max_to_keep is None else 1
        for name in self.best_names(records, n_best):
            keep(name, BEST)

        if self.keep_every_n_epochs:
            first_of_epoch: dict[int, str] = {}
            for r in records:
                if r.epoch > 0 and r.epoch % self.keep_every_n_epochs == 0:
                    # The first record of an epoch count is its end-of-epoch save; mid-epoch saves
                    # of the next epoch carry the same count.
                    first_of_epoch.setdefault(r.epoch, r.name)
            for name in first_of_epoch.values():
                keep(name, EVERY_N_EPOCHS)

        if self.keep_every_n_hours:
            interval = self.keep_every_n_hours * 3600.0
            anchor: float | None = None
            for r in records:
                if anchor is None or r.time >= anchor + interval:
                    anchor = r.time
                    keep(r.name, EVERY_N_HOURS)

        for r in records:
            if r.pending:
                keep(r.name, PENDING)

        order = {r.name: i for i, r in enumerate(records)}
        return {name: tuple(why) for name, why in sorted(reasons.items(), key=lambda kv: order[kv[0]])}


@dataclass(frozen=True)
class SaveSchedule:
    """When to save: every N epochs, every N batches, every N seconds (checked per batch or epoch).

    Args:
        every_n_epochs: save at the end of every N-th epoch (Keras's ``save_freq="epoch"`` is 1).
        every_n_batches: save every N batches (Keras's integer ``save_freq``).
        every_n_seconds: save when this many seconds passed since the last save.
        seconds_at_batch: check the clock at every batch end (True) or at epoch ends only.
    """

    every_n_epochs: int | None = 1
    every_n_batches: int | None = None
    every_n_seconds: float | None = None
    seconds_at_batch: bool = True

    def due_at_epoch_end(self, epochs_done: int, seconds_since_save: float) -> bool:
        if self.every_n_epochs and epochs_done % self.every_n_epochs == 0:
            return True
        # A clock checked at every batch end was just checked at the epoch's last batch.
        return not self.seconds_at_batch and self._time_due(seconds_since_save)

    def due_at_batch_end(self, batches_since_save: int, seconds_since_save: float) -> bool:
        if self.every_n_batches and batches_since_save >= self.every_n_batches:
            return True
        return self.seconds_at_batch and self._time_due(seconds_since_save)

    def _time_due(self, seconds_since_save: float) -> bool:
        return bool(self.every_n_seconds) and seconds_since_save >= self.every_n_seconds


PRESETS: dict[str, dict[str, Any]] = {
    # From the classic frequency-vs-number-kept guidance for short, normal and long runs.
    "short": {"max_to_keep": 1, "keep_best": 1},
    "normal": {"max_to_keep": 10, "keep_best": 1},
    "long": {
        "max_to_keep": 20,
        "keep_best": 3,
        "keep_every_n_hours": 24,
        "save_every_n_epochs": 5,
        "save_every_n_seconds": 3600,
    },
}

DEFAULTS: dict[str, Any] = {
    "max_to_keep": None,
    "keep_best": 0,
    "keep_every_n_epochs": None,
    "keep_every_n_hours": None,
    "save_every_n_epochs": 1,
    "save_every_n_seconds": None,
}


def resolve_preset(preset: str | None, given: Mapping[str, Any]) -> dict[str, Any]:
    """Fill the arguments the caller left as ``UNSET`` from ``preset``, then from the defaults.

    ``given`` maps argument names (those in ``DEFAULTS``) to what the caller passed, ``UNSET``
    where nothing was passed; an explicit ``None`` (e.g. ``max_to_keep=None``: keep all) wins over
    the preset.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(
            f"preset must be one of {sorted(PRESETS)} or None. Received: preset={preset!r}"
        )
    fill = PRESETS.get(preset, {}) if preset else {}
    out = dict(DEFAULTS)
    out.update(fill)
    for key, value in given.items():
        if value is not UNSET:
            out[key] = value
    return out
