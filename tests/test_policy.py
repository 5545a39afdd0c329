"""Retention and save decisions, over plain records (no filesystem)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_ckpt.policy import (
    UNSET,
    Candidate,
    KeepBest,
    KeepEveryNEpochs,
    KeepEveryNHours,
    KeepLatest,
    KeepPending,
    RetentionPolicy,
    SaveSchedule,
    best_of,
    is_improvement,
    ranked,
    resolve_mode,
    resolve_preset,
    undecidable_mode,
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


# -- the composable rules, each alone ------------------------------------------------------------


@dataclass(frozen=True)
class RR:
    """A record with the optional fields (commit order, run, reasons kept so far)."""

    name: str
    epoch: int = 0
    time: float = 0.0
    metrics: dict = field(default_factory=dict)
    pending: bool = False
    seq: int = 0
    run: int = 1
    kept: tuple = ()


def test_keep_latest_alone():
    recs = [RR(f"c{i}") for i in range(5)]
    assert KeepLatest(2).select(recs) == ["c3", "c4"]
    assert KeepLatest(0).select(recs) == []
    assert KeepLatest(None).select(recs) == [r.name for r in recs]
    assert KeepLatest(9).select(recs) == [r.name for r in recs]


def test_keep_best_ranks_only_its_run_and_breaks_ties_by_commit_order():
    recs = [
        RR("old", metrics={"m": 0.1}, seq=1, run=1),
        RR("a", metrics={"m": 0.5}, seq=3, run=2),
        RR("b", metrics={"m": 0.3}, seq=2, run=2),  # listed out of commit order on purpose
        RR("c", metrics={"m": 0.3}, seq=4, run=2),
        RR("nan", metrics={"m": float("nan")}, seq=5, run=2),
    ]
    assert KeepBest(2, "m", "min", run=2).select(recs) == ["b", "c"]
    assert KeepBest(1, "m", "max", run=2).select(recs) == ["a"]
    assert KeepBest(1, "m", "min").select(recs) == ["old"]  # any run
    assert KeepBest(3, "other", "min").select(recs) == []


def test_keep_every_n_epochs_never_keeps_epoch_zero_and_keeps_the_epoch_end():
    recs = [RR("e0", 0), RR("e1", 1), RR("e2", 2), RR("e2-mid", 2), RR("e3", 3), RR("e4", 4)]
    assert KeepEveryNEpochs(2).select(recs) == ["e2", "e4"]
    assert KeepEveryNEpochs(1).select(recs) == ["e1", "e2", "e3", "e4"]
    assert KeepEveryNEpochs(5).select(recs) == []


def test_keep_every_n_hours_spacing_anchor_and_clock_steps():
    h = 3600.0
    recs = [RR(f"t{i}", time=t * h) for i, t in enumerate([0, 0.5, 1.0, 1.2, 2.5, 3.4])]
    assert KeepEveryNHours(1).select(recs) == ["t0", "t2", "t4"]
    assert KeepEveryNHours(1, since=0.9 * h).select(recs) == ["t4"]  # TF: from creation
    # A record kept hourly before stays, and restarts the spacing.
    sticky = [RR("a", time=0), RR("b", time=0.2 * h, kept=("every_n_hours",)), RR("c", time=1.1 * h)]
    assert KeepEveryNHours(1).select(sticky) == ["a", "b"]
    # The clock stepped back 5 hours: spacing restarts from the earlier time instead of stalling.
    back = [RR("x", time=10 * h), RR("y", time=5 * h), RR("z", time=6.1 * h)]
    assert KeepEveryNHours(1).select(back) == ["x", "z"]


def test_keep_pending_alone():
    assert KeepPending().select([RR("a"), RR("b", pending=True)]) == ["b"]


def test_archive_reasons_stick_when_the_policy_changes():
    recs = [RR("a", kept=("every_n_epochs",)), RR("b", kept=("every_n_hours",)), RR("c", kept=("latest",)),
            RR("d")]
    keep = RetentionPolicy(max_to_keep=1).retain(recs)
    assert keep == {"a": ("every_n_epochs",), "b": ("every_n_hours",), "d": ("latest",)}


def test_protect_adds_a_reason_only_for_listed_names():
    recs = [RR("a"), RR("b"), RR("c")]
    keep = RetentionPolicy(max_to_keep=1).retain(recs, protect={"a": "verified", "zz": "x"})
    assert keep == {"a": ("verified",), "c": ("latest",)}


def test_best_of_baseline_wins_ties_only_when_earlier():
    recs = [RR("a", metrics={"m": 0.5}, seq=3), RR("b", metrics={"m": 0.4}, seq=4)]
    assert best_of(recs, "m", "min") == Candidate(0.4, 4, "b")
    assert best_of(recs, "m", "min", Candidate(0.4, -1, None)) == Candidate(0.4, -1, None)
    assert best_of(recs, "m", "min", Candidate(0.4, 9, None)) == Candidate(0.4, 4, "b")
    assert best_of(recs, "m", "min", Candidate(0.45, -1, None)).name == "b"
    assert best_of(recs, "m", "max", Candidate(0.45, -1, None)).name == "a"
    assert best_of([], "m", "min") is None
    assert best_of([RR("n", metrics={"m": None})], "m", "min") is None


def test_ranked_agrees_with_best_of_and_with_best_n():
    vals = [0.3, 0.1, 0.1, 0.7, None, 0.2]
    recs = [RR(f"r{i}", metrics={} if v is None else {"m": v}, seq=i + 1) for i, v in enumerate(vals)]
    order = [c.name for c in ranked(recs, "m", "min")]
    assert order == ["r1", "r2", "r5", "r0", "r3"]
    assert best_of(recs, "m", "min").name == order[0]
    assert RetentionPolicy(keep_best=3, monitor="m", max_to_keep=0).best_names(recs, 3) == order[:3]


def test_policy_round_trips_through_its_stored_form_and_overrides_win():
    p = RetentionPolicy(max_to_keep=3, keep_best=2, keep_every_n_epochs=5, keep_every_n_hours=1.5,
                        monitor="m", mode="max")
    stored = p.to_json()
    assert RetentionPolicy.from_json(stored, monitor="m", mode="max") == p
    q = RetentionPolicy.from_json({**stored, "unknown": 1}, monitor="m", mode="max", max_to_keep=1,
                                  keep_best=UNSET)
    assert q.max_to_keep == 1 and q.keep_best == 2 and q.keep_every_n_epochs == 5
    with pytest.raises(ValueError, match="max_to_keep"):
        RetentionPolicy.from_json({"max_to_keep": "3"}, monitor="m", mode="min")


def test_retain_with_run_keeps_only_the_current_runs_best():
    recs = [RR("old", metrics={"m": 0.01}, seq=1, run=1), RR("n1", metrics={"m": 0.5}, seq=2, run=2),
            RR("n2", metrics={"m": 0.6}, seq=3, run=2), RR("n3", metrics={"m": 0.7}, seq=4, run=2)]
    keep = RetentionPolicy(max_to_keep=1, keep_best=1, monitor="m").retain(recs, run=2)
    assert keep == {"n1": ("best",), "n3": ("latest",)}


# -- boundaries and messages (each test kills mutants that `mutmut run` showed surviving) ---------


def test_unset_shows_as_unset_in_signatures_and_is_falsy():
    assert repr(UNSET) == "UNSET"  # what help(ModelCheckpoint) prints for an argument not passed
    assert not UNSET and type(UNSET)() is UNSET


@pytest.mark.parametrize("monitor, mode", [
    ("loss", "min"), ("val_loss", "min"), ("mse", "min"), ("val_mse", "min"), ("mae", "min"),
    ("mape", "min"), ("msle", "min"), ("val_error", "min"), (None, "min"),
    ("acc", "max"), ("val_accuracy", "max"), ("auc", "max"), ("val_auc", "max"), ("precision", "max"),
    ("val_recall", "max"), ("fmeasure", "max"), ("val_fmeasure_1", "max"),
    ("val_custom", None), ("val_", None), ("mse_scaled", None),
])
def test_mode_auto_reads_the_direction_from_keras_metric_names(monitor, mode):
    assert resolve_mode("auto", monitor) == mode


def test_explicit_modes_win_over_the_metric_name():
    assert resolve_mode("max", "val_loss") == "max" and resolve_mode("min", "val_accuracy") == "min"
    assert resolve_mode("sideways", "val_loss") == "min"  # an unknown mode means auto, as in Keras


def test_undecidable_mode_tells_the_user_what_to_pass():
    assert str(undecidable_mode("val_custom")) == (
        "mode='auto' cannot tell whether monitor='val_custom' should be minimized or maximized. "
        "Pass mode='min' or mode='max'. Received: mode='auto'"
    )


@pytest.mark.parametrize("value, best, mode, improved", [
    (0.4, 0.5, "min", True), (0.6, 0.5, "min", False), (0.5, 0.5, "min", False),
    (0.6, 0.5, "max", True), (0.4, 0.5, "max", False), (0.5, 0.5, "max", False),
    (None, 0.5, "min", False), (-math.inf, 0.5, "min", True), (math.inf, None, "max", True),
])
def test_improvement_is_strict_in_both_directions(value, best, mode, improved):
    assert is_improvement(value, best, mode) is improved


@pytest.mark.parametrize("kwargs, message", [
    ({"max_to_keep": -1}, "max_to_keep must be an integer >= 0 or None. Received: max_to_keep=-1"),
    ({"max_to_keep": True}, "max_to_keep must be an integer >= 0 or None. Received: max_to_keep=True"),
    ({"keep_best": None}, "keep_best must be an integer >= 0. Received: keep_best=None"),
    ({"keep_best": 1.0}, "keep_best must be an integer >= 0. Received: keep_best=1.0"),
    ({"keep_every_n_epochs": 0},
     "keep_every_n_epochs must be an integer >= 1 or None. Received: keep_every_n_epochs=0"),
    ({"keep_every_n_hours": 0},
     "keep_every_n_hours must be a number > 0 or None. Received: keep_every_n_hours=0"),
    ({"keep_every_n_hours": True},
     "keep_every_n_hours must be a number > 0 or None. Received: keep_every_n_hours=True"),
    ({"keep_every_n_hours": "1"},
     "keep_every_n_hours must be a number > 0 or None. Received: keep_every_n_hours='1'"),
    ({"mode": "auto"}, "mode must be 'min' or 'max'. Received: mode='auto'"),
])
def test_bad_arguments_get_the_whole_message(kwargs, message):
    with pytest.raises(ValueError) as err:
        RetentionPolicy(**kwargs)
    assert str(err.value) == message


def test_the_smallest_valid_values_are_accepted():
    p = RetentionPolicy(max_to_keep=0, keep_best=0, keep_every_n_epochs=1, keep_every_n_hours=1e-9)
    assert p.keep_every_n_epochs == 1 and p.keep_every_n_hours == 1e-9


def test_without_seq_a_records_position_is_its_commit_number_against_a_baseline():
    # Plain records carry no ``seq``: the third listed is commit 3, so a baseline from commit 2
    # with the same value came first and stays best; one from commit 4 came after and loses.
    recs = [R("a", 1, metrics={"m": 0.5}), R("b", 2, metrics={"m": 0.9}), R("c", 3, metrics={"m": 0.3})]
    assert best_of(recs, "m", "min", Candidate(0.3, 2, None)) == Candidate(0.3, 2, None)
    assert best_of(recs, "m", "min", Candidate(0.3, 4, None)) == Candidate(0.3, 3, "c")


def test_records_without_a_run_count_as_run_zero():
    # Records of a manifest written before runs existed rank for best in run 0.
    recs = series([0.2, 0.5, 0.7])
    keep = RetentionPolicy(max_to_keep=1, keep_best=1, monitor="val_loss").retain(recs, run=0)
    assert keep == {"c000": ("best",), "c002": ("latest",)}


def test_keep_every_n_hours_equal_timestamps_do_not_restart_the_spacing():
    h = 3600.0
    recs = [RR("a", time=0), RR("b", time=0.5 * h), RR("c", time=0.5 * h), RR("d", time=1.0 * h)]
    assert KeepEveryNHours(1).select(recs) == ["a", "d"]  # exactly one hour after "a" is due


def test_keep_every_n_hours_after_a_step_back_waits_a_full_interval():
    h = 3600.0
    back = [RR("x", time=10 * h), RR("y", time=5 * h), RR("z", time=5.5 * h), RR("w", time=6 * h)]
    assert KeepEveryNHours(1).select(back) == ["x", "w"]


def test_policy_measures_hours_from_keep_every_n_hours_since():
    h = 3600.0
    recs = [RR(f"t{i}", time=t * h) for i, t in enumerate([0, 0.5, 1.0, 1.2, 2.5, 3.4])]
    hourly = RetentionPolicy(max_to_keep=0, keep_every_n_hours=1)
    assert [n for n, why in hourly.retain(recs).items() if "every_n_hours" in why] == ["t0", "t2", "t4"]
    since = RetentionPolicy(max_to_keep=0, keep_every_n_hours=1, keep_every_n_hours_since=0.9 * h)
    assert [n for n, why in since.retain(recs).items() if "every_n_hours" in why] == ["t4"]
    assert RetentionPolicy.from_json(since.to_json(), monitor=None, mode="min") == since


def test_retain_lists_the_kept_in_commit_order_not_by_name():
    recs = [RR("zeta"), RR("alpha"), RR("mid")]
    assert list(RetentionPolicy().retain(recs)) == ["zeta", "alpha", "mid"]


def test_from_json_takes_monitor_and_mode_from_the_caller_not_the_stored_dict():
    stored = {"max_to_keep": 2, "monitor": "old_metric", "mode": "max"}
    p = RetentionPolicy.from_json(stored, monitor="val_loss", mode="min")
    assert (p.max_to_keep, p.monitor, p.mode) == (2, "val_loss", "min")
