"""Pure checkpoint decisions: when to save and which checkpoints to keep.

Nothing here touches a file. Retention is a function from plain records (anything with
``name``, ``epoch``, ``time``, ``metrics`` and ``pending`` attributes, oldest first) to the set of
names to keep and why, so every rule is testable without a filesystem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

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
    """What the rules read of a record (``keras_ckpt.manifest.Record`` has more)."""

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


class Candidate(NamedTuple):
    """A value in the race for best: a record's score, or a baseline that no record holds."""

    value: float
    seq: int
    name: str | None


def ranked(records: Sequence[RecordLike], monitor: str | None, mode: str) -> list[Candidate]:
    """The scored records, best first: strict order by value, ties to the earlier commit.

    The one ordering behind ``best``, best-N retention and ``save_best_only``, so they can
    never disagree (an out-of-order ``report()`` included).
    """
    scored = [
        Candidate(v, _seq(r, i), r.name)
        for i, r in enumerate(records)
        if (v := score(r.metrics, monitor)) is not None
    ]
    return _in_rank_order(scored, mode)


def best_of(
    records: Sequence[RecordLike], monitor: str | None, mode: str, *baselines: Candidate | None
) -> Candidate | None:
    """Who is best: the first in :func:`ranked` order, unless a baseline beats or ties it.

    A baseline is a best value no listed record holds (``initial_value_threshold``, a best
    carried from another directory, a best whose file a later save replaced); it wins ties only
    when it came first (its ``seq``), as Keras's strict improvement does.
    """
    ranking = _in_rank_order([*ranked(records, monitor, mode), *(b for b in baselines if b)], mode)
    return ranking[0] if ranking else None


def _in_rank_order(candidates: list[Candidate], mode: str) -> list[Candidate]:
    sign = 1.0 if mode == "min" else -1.0
    return sorted(candidates, key=lambda c: (sign * c.value, c.seq))


def _seq(record: RecordLike, index: int) -> int:
    seq = getattr(record, "seq", 0)
    return seq if seq else index + 1


# -- retention: small rules, each a pure function of the records ---------------------------------


@dataclass(frozen=True)
class KeepLatest:
    """The ``n`` newest records (None: all). The newest one is kept by the policy regardless."""

    n: int | None
    reason = LATEST

    def select(self, records: Sequence[RecordLike]) -> list[str]:
        if self.n is None:
            return [r.name for r in records]
        return [r.name for r in records[-self.n :]] if self.n else []


@dataclass(frozen=True)
class KeepBest:
    """The ``n`` best records by ``monitor``/``mode`` among those of run ``run`` (None: any)."""

    n: int
    monitor: str | None
    mode: str
    run: int | None = None
    reason = BEST

    def select(self, records: Sequence[RecordLike]) -> list[str]:
        candidates = [r for r in records if self.run is None or getattr(r, "run", 0) == self.run]
        return [c.name for c in ranked(candidates, self.monitor, self.mode)[: self.n]]  # type: ignore[misc]


@dataclass(frozen=True)
class KeepEveryNEpochs:
    """The end-of-epoch checkpoint of every ``n``-th epoch, kept for good.

    Of the records carrying an epoch count divisible by ``n`` the first is that epoch's end
    (mid-epoch saves of the next epoch carry the same count). Epoch 0 (saves before any epoch
    ended) is no multiple of anything here. A record kept so once stays kept (an archive rule:
    changing the policy later does not delete it).
    """

    n: int
    reason = EVERY_N_EPOCHS

    def select(self, records: Sequence[RecordLike]) -> list[str]:
        first_of_epoch: dict[int, str] = {}
        for r in records:
            if r.epoch > 0 and r.epoch % self.n == 0:
                first_of_epoch.setdefault(r.epoch, r.name)
        return list(first_of_epoch.values())


@dataclass(frozen=True)
class KeepEveryNHours:
    """One record per ``hours`` of wall-clock time, kept for good.

    Walking in commit order, a record is kept when it is at least ``hours`` after the previous
    kept one (or after ``since``, where given: TF's manager measures from its creation; else the
    first record is kept). Records kept so earlier stay kept and restart the spacing; a clock
    that stepped back (a record older than the one before it) restarts it from that record.
    """

    hours: float
    since: float | None = None
    reason = EVERY_N_HOURS

    def select(self, records: Sequence[RecordLike]) -> list[str]:
        interval = self.hours * 3600.0
        anchor = self.since
        previous: float | None = None
        out = []
        for r in records:
            if EVERY_N_HOURS in getattr(r, "kept", ()) or anchor is None or r.time >= anchor + interval:
                out.append(r.name)
                anchor = r.time
            elif previous is not None and r.time < previous:  # the clock stepped back
                anchor = r.time
            previous = r.time
        return out


@dataclass(frozen=True)
class KeepPending:
    """Records waiting for their metrics (``report()``): never deleted before they are ranked."""

    reason = PENDING

    def select(self, records: Sequence[RecordLike]) -> list[str]:
        return [r.name for r in records if r.pending]


# Reasons that, once given, stay: these checkpoints are archives, not a rotating set.
STICKY = (EVERY_N_EPOCHS, EVERY_N_HOURS)


@dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints of one series to keep: latest-N ∪ best-N ∪ every-N-epochs ∪ one per N hours.

    A union of small rules (:class:`KeepLatest`, :class:`KeepBest`, :class:`KeepEveryNEpochs`,
    :class:`KeepEveryNHours`, :class:`KeepPending`), each a pure function of the records, plus two
    guarantees: the newest record is never deleted, and a record once kept for every-N-epochs or
    every-N-hours stays kept.

    Args:
        max_to_keep: keep the N newest (None: keep all). The newest is kept even with 0.
        keep_best: keep the N best by ``monitor``/``mode``. When rotation is on
            (``max_to_keep`` is not None), the single best is protected even with 0, so rotation
            never deletes the best checkpoint.
        keep_every_n_epochs: keep the end-of-epoch checkpoint of every N-th epoch.
        keep_every_n_hours: keep one checkpoint per N hours, spaced by the records' wall-clock
            ``time`` (so the spacing survives restarts).
        monitor: the metric name ranked for best-N.
        mode: ``"min"`` or ``"max"``.
        keep_every_n_hours_since: where the hourly spacing starts (None: at the first record).
    """

    max_to_keep: int | None = None
    keep_best: int = 0
    keep_every_n_epochs: int | None = None
    keep_every_n_hours: float | None = None
    monitor: str | None = None
    mode: str = "min"
    keep_every_n_hours_since: float | None = None

    def __post_init__(self) -> None:
        validate_count("max_to_keep", self.max_to_keep)
        validate_count("keep_best", self.keep_best, allow_none=False)
        validate_count("keep_every_n_epochs", self.keep_every_n_epochs, minimum=1)
        validate_positive_number("keep_every_n_hours", self.keep_every_n_hours)
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max'. Received: mode={self.mode!r}")

    def rules(self, run: int | None = None) -> list:
        """The rules this policy is the union of; best-N ranks only run ``run``'s records."""
        n_best = self.keep_best if self.keep_best or self.max_to_keep is None else 1
        rules: list = [KeepLatest(self.max_to_keep)]
        if n_best:
            rules.append(KeepBest(n_best, self.monitor, self.mode, run))
        if self.keep_every_n_epochs:
            rules.append(KeepEveryNEpochs(self.keep_every_n_epochs))
        if self.keep_every_n_hours:
            rules.append(KeepEveryNHours(self.keep_every_n_hours, self.keep_every_n_hours_since))
        rules.append(KeepPending())
        return rules

    def best_names(self, records: Sequence[RecordLike], n: int) -> list[str]:
        """The ``n`` best scored records' names, best first; ties favour the older record."""
        return [c.name for c in ranked(records, self.monitor, self.mode)[:n]]  # type: ignore[misc]

    def retain(
        self,
        records: Sequence[RecordLike],
        *,
        run: int | None = None,
        protect: Mapping[str, str] | None = None,
    ) -> dict[str, tuple[str, ...]]:
        """Map each record to keep (by name) to the reasons it is kept; absent names may go.

        ``records`` are one series' in commit order. ``run``: only that run's records compete
        for best-N. ``protect`` maps further names to a reason (the current best, the newest
        checkpoint that verifies).
        """
        if not records:
            return {}
        reasons: dict[str, list[str]] = {}

        def keep(name: str, why: str) -> None:
            bucket = reasons.setdefault(name, [])
            if why not in bucket:
                bucket.append(why)

        for rule in self.rules(run):
            for name in rule.select(records):
                keep(name, rule.reason)
        keep(records[-1].name, LATEST)  # the newest is never deleted
        for r in records:
            for why in getattr(r, "kept", ()):
                if why in STICKY:
                    keep(r.name, why)
        names = {r.name for r in records}
        for name, why in (protect or {}).items():
            if name in names:
                keep(name, why)
        order = {r.name: i for i, r in enumerate(records)}
        return {name: tuple(why) for name, why in sorted(reasons.items(), key=lambda kv: order[kv[0]])}

    def to_json(self) -> dict[str, Any]:
        """What the manifest stores, so ``keras-ckpt prune`` applies what training applied."""
        return {
            "max_to_keep": self.max_to_keep,
            "keep_best": self.keep_best,
            "keep_every_n_epochs": self.keep_every_n_epochs,
            "keep_every_n_hours": self.keep_every_n_hours,
            "keep_every_n_hours_since": self.keep_every_n_hours_since,
        }

    @classmethod
    def from_json(
        cls, d: Mapping[str, Any], *, monitor: str | None, mode: str, **overrides: Any
    ) -> RetentionPolicy:
        """The stored policy (unknown keys ignored), with ``overrides`` replacing fields.

        A stored value of the wrong type raises ValueError naming it, as an argument would.
        """
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k not in ("monitor", "mode")}
        fields.update({k: v for k, v in overrides.items() if v is not UNSET})
        return cls(monitor=monitor, mode=mode, **fields)


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
    fill = PRESETS.get(preset, {})
    out = dict(DEFAULTS)
    out.update(fill)
    for key, value in given.items():
        if value is not UNSET:
            out[key] = value
    return out
