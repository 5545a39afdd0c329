"""Retention and save decisions, over plain records (no filesystem)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_ckpt.policy import (
    UNSET,
    RetentionPolicy,
    SaveSchedule,
    is_improvement,
    resolve_mode,
    resolve_preset,
)


@dataclass(frozen=True)
class R:
    name: str
    epoch: int
    time: float = 0.0
    metrics: dict = field(default_factory=dict)
    pending: bool = False


def series(values, monitor="val_loss", hours_apart=0.0):
    return [
        R(f"c{i:03d}", i + 1, i * hours_apart * 3600.0, {} if v is None else {monitor: v})
        for i, v in enumerate(values)
    ]


def test_latest_and_best_union_scripted():
    values = [0.9, 0.5, 0.7, 0.3, 0.8, 0.6, 0.4, 0.95, 0.85, 0.99]
    recs = series(values)
    keep = RetentionPolicy(max_to_keep=3, keep_best=2, monitor="val_loss", mode="min").retain(recs)
    assert set(keep) == {"c007", "c008", "c009", "c003", "c006"}
    assert keep["c003"] == ("best",) and keep["c009"] == ("latest",)


def test_max_mode_and_ties_keep_the_earlier():
    recs = series([0.5, 0.8, 0.8, 0.1], monitor="acc")
    policy = RetentionPolicy(max_to_keep=1, keep_best=1, monitor="acc", mode="max")
    assert set(policy.retain(recs)) == {"c001", "c003"}


def test_nan_and_missing_are_never_best():
    recs = series([float("nan"), None, 0.7, 0.9], monitor="val_loss")
    keep = RetentionPolicy(max_to_keep=1, keep_best=2, monitor="val_loss").retain(recs)
    assert set(keep) == {"c002", "c003"}
    assert "best" not in keep.get("c000", ()) and "best" not in keep.get("c001", ())


def test_newest_survives_max_to_keep_zero_and_all_kept_with_none():
    recs = series([0.1, 0.2, 0.3])
    assert set(RetentionPolicy(max_to_keep=0, monitor=None).retain(recs)) == {"c002"}
    assert set(RetentionPolicy(max_to_keep=None).retain(recs)) == {"c000", "c001", "c002"}


def test_rotation_protects_the_single_best_even_with_keep_best_zero():
    recs = series([0.1, 0.5, 0.6, 0.7])
    assert set(RetentionPolicy(max_to_keep=1, monitor="val_loss").retain(recs)) == {"c000", "c003"}


def test_every_n_epochs_and_hours():
    recs = series([1, 2, 3, 4, 5, 6, 7], hours_apart=0.5)
    keep = RetentionPolicy(max_to_keep=1, keep_every_n_epochs=3, monitor=None).retain(recs)
    assert set(keep) == {"c002", "c005", "c006"}
    keep = RetentionPolicy(max_to_keep=1, keep_every_n_hours=1.0, monitor=None).retain(recs)
    assert set(keep) == {"c000", "c002", "c004", "c006"}


def test_pending_records_are_protected():
    recs = series([0.1, 0.2, 0.3, 0.4])
    recs[1] = R("c001", 2, 0.0, {}, pending=True)
    keep = RetentionPolicy(max_to_keep=1, keep_best=1, monitor="val_loss").retain(recs)
    assert keep["c001"] == ("pending",)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"max_to_keep": -1}, "max_to_keep=-1"),
        ({"keep_best": -2}, "keep_best=-2"),
        ({"keep_every_n_epochs": 0}, "keep_every_n_epochs=0"),
        ({"keep_every_n_hours": -1.0}, "keep_every_n_hours=-1.0"),
        ({"max_to_keep": 2.5}, "max_to_keep=2.5"),
        ({"mode": "up"}, "mode='up'"),
    ],
)
def test_bad_counts_name_the_argument_and_value(kwargs, needle):
    with pytest.raises(ValueError, match="Received: " + needle.replace(".", r"\.")):
        RetentionPolicy(**kwargs)


def test_presets_fill_only_what_was_not_passed():
    long = resolve_preset("long", {"max_to_keep": UNSET, "keep_best": 5})
    assert long["max_to_keep"] == 20 and long["keep_best"] == 5
    assert long["save_every_n_epochs"] == 5 and long["save_every_n_seconds"] == 3600
    assert resolve_preset("normal", {"max_to_keep": None})["max_to_keep"] is None
    assert resolve_preset("short", {})["max_to_keep"] == 1
    with pytest.raises(ValueError, match="Received: preset='huge'"):
        resolve_preset("huge", {})


def test_mode_resolution_and_improvement():
    assert resolve_mode("auto", "val_loss") == "min"
    assert resolve_mode("auto", "val_accuracy") == "max"
    assert resolve_mode("auto", "val_custom") is None
    assert is_improvement(0.5, None, "min") and not is_improvement(0.5, 0.5, "min")
    assert not is_improvement(math.nan, None, "max")


def test_save_schedule():
    s = SaveSchedule(every_n_epochs=5, every_n_seconds=3600, seconds_at_batch=False)
    assert s.due_at_epoch_end(5, 0) and not s.due_at_epoch_end(3, 10)
    assert s.due_at_epoch_end(3, 3600) and not s.due_at_batch_end(10, 7200)
    b = SaveSchedule(every_n_epochs=None, every_n_batches=4)
    assert b.due_at_batch_end(4, 0) and not b.due_at_batch_end(3, 0)
    assert not b.due_at_epoch_end(1, 0)
    clock = SaveSchedule(every_n_epochs=None, every_n_batches=100, every_n_seconds=5)
    assert clock.due_at_batch_end(1, 6) and not clock.due_at_epoch_end(1, 6)


values = st.lists(
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=False, width=32)), min_size=1, max_size=30
)


@settings(max_examples=300, deadline=None)
@given(
    values,
    st.one_of(st.none(), st.integers(0, 6)),
    st.integers(0, 4),
    st.sampled_from(["min", "max"]),
    st.one_of(st.none(), st.integers(1, 4)),
)
def test_retention_invariants(vals, max_to_keep, keep_best, mode, every_n):
    recs = series(vals, hours_apart=0.3)
    policy = RetentionPolicy(
        max_to_keep=max_to_keep, keep_best=keep_best, keep_every_n_epochs=every_n,
        monitor="val_loss", mode=mode,
    )
    keep = policy.retain(recs)
    names = [r.name for r in recs]
    assert names[-1] in keep  # never the newest
    assert set(keep) <= set(names)
    if max_to_keep is not None:
        for name in names[-max_to_keep:] if max_to_keep else []:
            assert "latest" in keep[name]
    scored = [(v, i) for i, v in enumerate(vals) if v is not None and not math.isnan(v)]
    n_best = keep_best or (1 if max_to_keep is not None else 0)
    if scored and n_best:
        sign = 1 if mode == "min" else -1
        best_value, best_index = min(scored, key=lambda s: (sign * s[0], s[1]))
        assert "best" in keep[names[best_index]]  # never the best
        # nothing unscored is "best", and exactly min(n, #scored) records are
        best_marked = [n for n, why in keep.items() if "best" in why]
        assert len(best_marked) == min(n_best, len(scored))
        for n in best_marked:
            v = vals[names.index(n)]
            assert v is not None and not math.isnan(v)
    # Idempotent: applying the policy to what it kept keeps all of it (so pruning is stable).
    survivors = [r for r in recs if r.name in keep]
    again = policy.retain(survivors)
    assert set(again) == set(keep)
