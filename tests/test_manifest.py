"""The manifest schema on its own: round trips, what a reader tolerates, what it refuses."""

from __future__ import annotations

import json
import os
import re

import pytest

from keras_ckpt import manifest as mf
from keras_ckpt.manifest import FileEntry, Intent, Manifest, ManifestError, Record, SeriesState

H = "0123456789abcdef0123456789abcdef"


def record(name="ck-001", seq=1, **kw):
    kw.setdefault("files", (FileEntry(f"{name}.keras", 10, H),))
    return mf.make_record(name, "ck-{epoch:03d}.keras", epoch=kw.pop("epoch", 1), step=kw.pop("step", 5),
                          time=kw.pop("time", 100.0), metrics=kw.pop("metrics", {"val_loss": 0.5}),
                          seq=seq, **kw)


def roundtrip(m: Manifest) -> Manifest:
    return mf.parse(mf.dumps(m), "checkpoints.json")


def test_full_round_trip_keeps_every_field():
    state = SeriesState("keras", "val_loss", "min", 0.25, "ck-002", run=3, baseline=(float("inf"), -1),
                        policy={"max_to_keep": 2}, extra={"tf_last_preserved_timestamp": 7.0})
    r1 = record(metrics={"val_loss": float("-inf"), "acc": float("nan")}, run=3)
    r2 = record("ck-002", seq=2, pending=True, run=3, epoch=2, step=10)
    intent = Intent(series="ck-{epoch:03d}.keras", record=record("ck-003", seq=3), state=state,
                    moves=((".keras_ckpt-tmp-x-ck-003.keras", "ck-003.keras"),
                           (".keras_ckpt-tmp-y-staging/a.index", "a.index")),
                    drop=("ck-001",), writer="w", kept={"ck-002": ("latest", "best")})
    m = Manifest(series={"ck-{epoch:03d}.keras": state}, checkpoints=[r1, r2], seq=3, intent=intent,
                 deleting=["ck-000.keras"], extra={"future_key": [1, 2]})
    back = roundtrip(m)
    assert back.series == m.series and back.checkpoints[1] == r2 and back.intent == intent
    assert back.checkpoints[0].metrics["val_loss"] == float("-inf")
    assert back.checkpoints[0].metrics["acc"] is None  # NaN is written as null: never best
    assert back.deleting == ["ck-000.keras"] and back.extra == {"future_key": [1, 2]}
    assert back.seq == 3 and back.next_seq() == 4
    text = mf.dumps(m).decode()
    assert "Infinity" not in text and "NaN" not in text  # standard JSON for any tool


def test_records_are_in_commit_order_and_old_manifests_get_seq_from_position():
    data = {"format": 1, "checkpoints": [
        {"name": "b", "series": "s", "files": [{"path": "b.pt", "bytes": 1, "xxh3_128": H}]},
        {"name": "a", "series": "s", "files": [{"path": "a.pt", "bytes": 1, "xxh3_128": H}]},
    ]}
    m = mf.parse(json.dumps(data).encode(), "x")
    assert [(r.name, r.seq, r.run) for r in m.records("s")] == [("b", 1, 0), ("a", 2, 0)]
    m.checkpoints.reverse()
    assert [r.name for r in m.records("s")] == ["b", "a"]
    assert m.listed_files() == {"a.pt", "b.pt"}


@pytest.mark.parametrize("bad", [
    {"format": 2}, {"format": "1"}, {"format": True}, [], {"no": "format"},
])
def test_other_formats_are_refused(bad):
    with pytest.raises(ManifestError) as err:
        mf.parse(json.dumps(bad).encode(), "dir/checkpoints.json")
    assert "dir/checkpoints.json" in str(err.value)


def test_not_json_is_refused_with_the_file_name():
    with pytest.raises(ManifestError, match="x/checkpoints.json is not valid JSON"):
        mf.parse(b"{oops", "x/checkpoints.json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        mf.parse(b"\xff\xfe", "x/checkpoints.json")


@pytest.mark.parametrize("field,value,needle", [
    ("epoch", -1, ".epoch: must be an integer >= 0"),
    ("step", 1.5, ".step: must be an integer >= 0"),
    ("seq", True, ".seq: must be an integer >= 0"),
    ("time", "now", ".time: must be a number"),
    ("time", "inf", ".time: must be a finite number"),
    ("name", 3, ".name: must be a string"),
    ("kept", "latest", ".kept: must be a list"),
    ("kept", [1], ".kept: must be a list of strings"),
    ("files", {}, ".files: must be a list"),
])
def test_each_record_field_is_checked(field, value, needle):
    d = record().to_json()
    d[field] = value
    with pytest.raises(ManifestError) as err:
        mf.parse(json.dumps({"format": 1, "checkpoints": [d]}).encode(), "cp.json")
    assert needle in str(err.value) and "cp.json: checkpoints[0]" in str(err.value)


@pytest.mark.parametrize("path", ["../x", "/abs", "a/b", "a\\b", "..", ".", "", "checkpoints.json",
                                  ".checkpoints.lock", "C:x", "x\0y", 7, None])
def test_file_paths_must_be_plain_names(path):
    d = record().to_json()
    d["files"][0]["path"] = path
    with pytest.raises(ManifestError, match=r"files\[0\]\.path: must be a plain file name"):
        mf.parse(json.dumps({"format": 1, "checkpoints": [d]}).encode(), "cp.json")


def test_series_state_fields_are_checked():
    for series, needle in [
        ({"mode": "up"}, ".mode"), ({"run": -2}, ".run"),
        ({"baseline": {"value": "x", "seq": 1}}, ".baseline.value"),
        ({"baseline": {"value": 1.0, "seq": "1"}}, ".baseline.seq"), ({"policy": 3}, ".policy"),
        ({"monitor": 4}, ".monitor"), ({"best": "high"}, ".best"),
    ]:
        with pytest.raises(ManifestError, match=needle.replace(".", r"\.")):
            mf.parse(json.dumps({"format": 1, "series": {"s": series}}).encode(), "cp.json")


def test_intent_temporaries_must_be_ours():
    good = Intent("ck-{epoch:03d}.keras", record(), SeriesState(),
                  ((".keras_ckpt-tmp-a-b", "b.keras"),)).to_json()
    for temp in ["/tmp/x", "../.keras_ckpt-tmp-a", "x.keras", ".keras_ckpt-tmp-a/b/c"]:
        bad = json.loads(json.dumps(good))
        bad["moves"][0]["temp"] = temp
        with pytest.raises(ManifestError, match=r"intent\.moves\[0\]\.temp"):
            mf.parse(json.dumps({"format": 1, "intent": bad}).encode(), "cp.json")


def test_checkpoint_names_strip_every_known_extension():
    assert mf.checkpoint_name("a/ck-3.weights.h5") == "ck-3"
    assert mf.checkpoint_name("ck-3.pth.tar") == "ck-3"
    assert mf.checkpoint_name("ck-3.pth") == "ck-3" and mf.checkpoint_name("ck-3.pt") == "ck-3"
    assert mf.checkpoint_name("model.ckpt-60.data-00000-of-00001") == "model.ckpt-60"
    assert mf.checkpoint_name("model.ckpt-60.index") == "model.ckpt-60"
    assert mf.checkpoint_name("noext") == "noext" and mf.checkpoint_name("x.bin") == "x"
    assert mf.checkpoint_name(".keras") == ".keras"  # a name is never empty


def test_unknown_keys_survive_a_rewrite():
    data = {"format": 1, "new_top": {"a": 1}, "series": {"s": {"framework": "k", "future": 2}},
            "checkpoints": [dict(record().to_json(), later_field=True)]}
    m = mf.parse(json.dumps(data).encode(), "cp.json")
    again = json.loads(mf.dumps(m))
    assert again["new_top"] == {"a": 1} and again["series"]["s"]["future"] == 2
    assert isinstance(m.checkpoints[0], Record)


# -- every refusal names the file, the place and what was received ---------------------------------


def refusal(data) -> str:
    with pytest.raises(ManifestError) as err:
        mf.parse(json.dumps(data).encode(), "cp.json")
    return str(err.value)


def with_record(**changes):
    d = record().to_json()
    for key, value in changes.items():
        if value is KeyError:
            del d[key]
        else:
            d[key] = value
    return {"format": 1, "checkpoints": [d]}


def with_file(**changes):
    data = with_record()
    data["checkpoints"][0]["files"][0].update(changes)
    return data


def good_intent():
    return Intent("ck-{epoch:03d}.keras", record(), SeriesState(),
                  ((".keras_ckpt-tmp-a-b", "b.keras"),)).to_json()


def with_intent(**changes):
    d = good_intent()
    for key, value in changes.items():
        if value is KeyError:
            del d[key]
        else:
            d[key] = value
    return {"format": 1, "intent": d}


REC = "cp.json: checkpoints[0] ('ck-001')"
PLAIN = ("must be a plain file name inside the checkpoint directory (no directory part, nothing absolute "
         "or climbing out)")


@pytest.mark.parametrize("data, message", [
    ({"format": 1, "checkpoints": [3]}, "cp.json: checkpoints[0]: must be an object. Received: 3"),
    ({"format": 1, "checkpoints": {"a": 1}}, "cp.json: checkpoints: must be a list. Received: {'a': 1}"),
    (with_record(name=None), "cp.json: checkpoints[0].name: must be a string. Received: None"),
    (with_record(series=3), f"{REC}.series: must be a string. Received: 3"),
    (with_record(run=-1), f"{REC}.run: must be an integer >= 0. Received: -1"),
    (with_record(time=None), f"{REC}.time: must be a number. Received: None"),
    (with_record(time="inf"), f"{REC}.time: must be a finite number. Received: 'inf'"),
    (with_record(metrics=[1]), f"{REC}.metrics: must be an object. Received: [1]"),
    (with_record(metrics={"val_loss": "low"}),
     f"{REC}.metrics['val_loss']: must be a number. Received: 'low'"),
    (with_record(files=[]), f"{REC}.files: must list at least one file. Received: []"),
    (with_record(files=KeyError), f"{REC}.files: must list at least one file. Received: None"),
    (with_record(files=[3]), f"{REC}.files[0]: must be an object. Received: 3"),
    (with_record(kept=[1]), f"{REC}.kept: must be a list of strings. Received: [1]"),
    (with_file(xxh3_128="ABC"), f"{REC}.files[0].xxh3_128: must be 32 lowercase hex digits. Received: 'ABC'"),
    (with_file(xxh3_128=None), f"{REC}.files[0].xxh3_128: must be a string. Received: None"),
    (with_file(bytes=-1), f"{REC}.files[0].bytes: must be an integer >= 0. Received: -1"),
    (with_file(path="../x"), f"{REC}.files[0].path: {PLAIN}. Received: '../x'"),
    ({"format": 1, "series": [1]}, "cp.json: series: must be an object. Received: [1]"),
    ({"format": 1, "series": {"s": 3}}, "cp.json: series['s']: must be an object. Received: 3"),
    ({"format": 1, "series": {"s": {"mode": "up"}}},
     "cp.json: series['s'].mode: must be 'min', 'max' or null. Received: 'up'"),
    ({"format": 1, "series": {"s": {"mode": 3}}},
     "cp.json: series['s'].mode: must be a string or null. Received: 3"),
    ({"format": 1, "series": {"s": {"best_name": 3}}},
     "cp.json: series['s'].best_name: must be a string or null. Received: 3"),
    ({"format": 1, "series": {"s": {"framework": 3}}},
     "cp.json: series['s'].framework: must be a string. Received: 3"),
    ({"format": 1, "series": {"s": {"best": "high"}}},
     "cp.json: series['s'].best: must be a number. Received: 'high'"),
    ({"format": 1, "series": {"s": {"baseline": 5}}},
     "cp.json: series['s'].baseline: must be an object. Received: 5"),
    ({"format": 1, "series": {"s": {"baseline": {"value": None, "seq": 1}}}},
     "cp.json: series['s'].baseline.value: must be a number. Received: None"),
    ({"format": 1, "series": {"s": {"baseline": {"value": 1.0, "seq": "1"}}}},
     "cp.json: series['s'].baseline.seq: must be an integer. Received: '1'"),
    ({"format": 1, "series": {"s": {"policy": 3}}},
     "cp.json: series['s'].policy: must be an object. Received: 3"),
    ({"format": 1, "seq": -1}, "cp.json: .seq: must be an integer >= 0. Received: -1"),
    ({"format": 1, "deleting": "x"}, "cp.json: deleting: must be a list. Received: 'x'"),
    ({"format": 1, "deleting": ["ok", "../x"]}, f"cp.json: deleting[1]: {PLAIN}. Received: '../x'"),
    ({"format": 1, "intent": 3}, "cp.json: intent: must be an object. Received: 3"),
    (with_intent(series=KeyError), "cp.json: intent.series: must be a string. Received: None"),
    (with_intent(writer=3), "cp.json: intent.writer: must be a string. Received: 3"),
    (with_intent(record=KeyError), "cp.json: intent.record: must be an object. Received: None"),
    (with_intent(state=KeyError), "cp.json: intent.state: must be an object. Received: None"),
    (with_intent(moves=KeyError), "cp.json: intent.moves: must be a list. Received: None"),
    (with_intent(moves=["x"]), "cp.json: intent.moves[0]: must be an object. Received: 'x'"),
    (with_intent(moves=[{"temp": "x.keras", "path": "x.keras"}]),
     "cp.json: intent.moves[0].temp: must name a keras_ckpt temporary. Received: 'x.keras'"),
    (with_intent(moves=[{"temp": ".keras_ckpt-tmp-a-b", "path": "/abs"}]),
     f"cp.json: intent.moves[0].path: {PLAIN}. Received: '/abs'"),
    (with_intent(drop="a"), "cp.json: intent.drop: must be a list. Received: 'a'"),
    (with_intent(drop=[1]), "cp.json: intent.drop: must be a list of record names. Received: [1]"),
    (with_intent(kept=[1]), "cp.json: intent.kept: must be an object. Received: [1]"),
    (with_intent(kept={"a": "latest"}),
     "cp.json: intent.kept['a']: must be a list of strings. Received: 'latest'"),
    (with_intent(kept={"a": [1]}), "cp.json: intent.kept['a']: must be a list of strings. Received: [1]"),
])
def test_each_refusal_names_the_place_the_rule_and_the_value(data, message):
    assert refusal(data) == message


def test_a_checkpoint_listed_twice_in_a_series_is_refused_but_other_series_may_reuse_the_name():
    d = record("a").to_json()
    assert refusal({"format": 1, "checkpoints": [d, dict(d, seq=2)]}) == (
        "cp.json: checkpoints[1] ('a'): lists a checkpoint name twice in one series. Received: 'a'"
    )
    m = mf.parse(json.dumps({"format": 1, "checkpoints": [d, dict(d, seq=2, series="other")]}).encode(), "x")
    assert [r.series for r in m.checkpoints] == ["ck-{epoch:03d}.keras", "other"]


def test_two_checkpoints_with_one_commit_number_are_refused_even_in_two_series():
    # Harm: resume=<dir> took whichever of the tied records was listed first as "newest".
    a, b = record("a", seq=3).to_json(), record("b", seq=3).to_json()
    assert refusal({"format": 1, "checkpoints": [a, b]}) == (
        "cp.json: checkpoints[1] ('b').seq: repeats another checkpoint's commit number. Received: 3"
    )
    assert refusal({"format": 1, "checkpoints": [a, dict(b, series="other")]}).endswith("Received: 3")
    m = mf.parse(json.dumps({"format": 1, "checkpoints": [a, dict(b, seq=4)]}).encode(), "x")
    assert [r.seq for r in m.checkpoints] == [3, 4]


def test_long_received_values_are_cut_to_80_characters():
    def shown(value):
        return refusal(with_record(metrics={"val_loss": value})).split("Received: ", 1)[1]

    fits = "x" * 78  # its repr, quotes included, is 80 characters: shown whole
    assert shown(fits) == repr(fits)
    long = "y" * 79
    assert shown(long) == repr(long)[:77] + "..." and len(shown(long)) == 80


def test_a_newer_format_names_its_writer():
    assert refusal({"format": 2, "writer": "keras_ckpt 9.0"}) == (
        "cp.json has format 2, newer than this keras_ckpt understands (1); it was written by "
        "keras_ckpt 9.0. Upgrade keras_ckpt."
    )
    assert "written by an unknown writer." in refusal({"format": 2})


# -- what a reader fills in, and what survives a round trip -------------------------------------------


def test_missing_optional_fields_take_their_documented_defaults():
    data = {"format": 1, "series": {"s": {}}, "checkpoints": [
        {"name": "a", "files": [{"path": "a.pt", "bytes": 1, "xxh3_128": H}]}]}
    m = mf.parse(json.dumps(data).encode(), "x")
    (r,) = m.checkpoints
    assert (r.series, r.epoch, r.step, r.time, r.run, r.seq) == ("", 0, 0, 0.0, 0, 1)
    assert (r.metrics, r.kept, r.pending) == ({}, (), False)
    s = m.series["s"]
    assert (s.framework, s.monitor, s.mode, s.best, s.run, s.baseline, s.policy) == ("", None, None, None, 0,
                                                                                      None, None)
    assert m.seq == 0 and m.next_seq() == 2 and m.intent is None and m.deleting == []
    assert Manifest().next_seq() == 1  # a fresh directory's first commit is number 1


def test_an_intent_without_optional_fields_reads_with_empty_defaults():
    d = good_intent()
    for key in ("writer", "drop", "kept"):
        del d[key]
    intent = mf.parse(json.dumps({"format": 1, "intent": d}).encode(), "x").intent
    assert (intent.writer, intent.drop, dict(intent.kept)) == ("", (), {})


def test_kept_reasons_pending_run_and_max_mode_round_trip():
    r = record("ck-007", seq=7, run=2, pending=True)
    r = Record(**{**r.__dict__, "kept": ("every_n_epochs", "latest")})
    state = SeriesState("torch", "acc", "max", 0.9, "ck-007", run=2, baseline=(0.8, 3))
    back = roundtrip(Manifest(series={"s": state}, checkpoints=[r], seq=7))
    assert back.checkpoints == [r] and back.series == {"s": state}
    assert back.checkpoints[0].kept == ("every_n_epochs", "latest")


def test_make_record_keeps_numbers_drops_what_is_not_and_carries_its_arguments():
    r = mf.make_record("a", "s", epoch=2, step=9, time=1.5, metrics={"note": "text", "lr": None,
                       "val_loss": 0.25, "acc": float("nan")}, files=(), pending=True, seq=4, run=3)
    assert dict(r.metrics) == {"val_loss": 0.25, "acc": None}  # a text entry does not hide the rest
    assert (r.pending, r.seq, r.run) == (True, 4, 3)
    plain = mf.make_record("b", "s", epoch=1, step=1, time=0.0, metrics=None, files=())
    assert (plain.pending, plain.seq, plain.run, dict(plain.metrics)) == (False, 0, 0, {})
    reported = plain.with_metrics({"val_loss": 1, "x": float("nan")})
    assert dict(reported.metrics) == {"val_loss": 1.0, "x": None}


def test_the_written_manifest_names_its_writer():
    from keras_ckpt import __version__

    assert json.loads(mf.dumps(Manifest()))["writer"] == f"keras_ckpt {__version__}"


# -- on disk ----------------------------------------------------------------------------------------


def test_write_then_read_load_and_exists_on_a_real_directory(tmp_path):
    from keras_ckpt import storage

    d = str(tmp_path)
    assert not mf.exists(d) and mf.load(d) == Manifest() and mf.read(storage.LocalStorage(d)) is None
    m = Manifest(series={"s": SeriesState("keras")}, checkpoints=[record()], seq=1)
    mf.write(storage.LocalStorage(d), m)
    assert mf.exists(d) and mf.manifest_path(d) == os.path.join(d, "checkpoints.json")
    assert os.listdir(d) == ["checkpoints.json"]
    back = mf.load(d)
    assert back.checkpoints == m.checkpoints and back.series == m.series and back.seq == 1
    assert mf.read(storage.LocalStorage(d)).checkpoints == m.checkpoints


def test_reading_a_broken_manifest_names_its_path(tmp_path):
    path = tmp_path / "checkpoints.json"
    path.write_bytes(b"{oops")
    with pytest.raises(ManifestError, match=f"^{re.escape(str(path))} is not valid JSON"):
        mf.load(str(tmp_path))
    path.unlink()
    path.mkdir()
    with pytest.raises(ManifestError, match=f"^{re.escape(str(path))} is not a regular file"):
        mf.load(str(tmp_path))


# -- bugs found by mutation testing ---------------------------------------------------------------


def test_names_with_data_in_them_stay_distinct():
    # Two epochs of ``run.data-{epoch}.ckpt`` must be two checkpoints, not one named "run".
    assert mf.checkpoint_name("run.data-3.ckpt") == "run.data-3"
    assert mf.checkpoint_name("model.data-v2.data-00000-of-00001") == "model.data-v2"  # as its .index


def test_a_nan_written_directly_is_stored_as_null_never_as_a_best_value():
    r = Record("a", "s", 1, 1, 0.0, metrics={"val_loss": float("nan")}, files=(FileEntry("a.pt", 1, H),))
    assert r.to_json()["metrics"] == {"val_loss": None}
    assert SeriesState(best=float("nan")).to_json()["best"] is None


def test_nan_or_infinity_literals_are_refused_at_load_not_mid_commit():
    with pytest.raises(ManifestError, match="NaN is not standard JSON"):
        mf.parse(b'{"format": 1, "future": NaN}', "cp.json")
    with pytest.raises(ManifestError, match="Infinity is not standard JSON"):
        mf.parse(b'{"format": 1, "future": [-Infinity]}', "cp.json")


def test_an_intent_for_another_series_than_its_record_is_refused():
    d = good_intent()
    d["series"] = "other-{epoch}.keras"
    with pytest.raises(ManifestError, match=r"intent\.record\.series: must be the intent's series"):
        mf.parse(json.dumps({"format": 1, "intent": d}).encode(), "cp.json")


@pytest.mark.parametrize("name", ["../victim/ck-{epoch}.bin", "/etc/x", "a/b", "checkpoints.json"])
def test_series_names_must_be_templates_inside_the_directory(name):
    with pytest.raises(ManifestError, match=r"must be a file-name template inside the checkpoint directory"):
        mf.parse(json.dumps({"format": 1, "series": {name: {}}}).encode(), "cp.json")
    d = record().to_json()
    d["series"] = name
    with pytest.raises(ManifestError, match=r"checkpoints\[0\] \('ck-001'\)\.series"):
        mf.parse(json.dumps({"format": 1, "checkpoints": [d]}).encode(), "cp.json")


def test_the_save_history_outlives_retention_and_is_capped():
    m = Manifest()
    for i in range(1, mf.HISTORY_MAX + 6):
        m.remember(record(f"ck-{i:05d}", seq=i, epoch=i, metrics={"val_loss": 1.0 / i}))
    assert len(m.history) == mf.HISTORY_MAX and m.history[0].seq == 6  # the oldest go first
    back = roundtrip(m)
    assert back.history == m.history
    assert back.saves() == m.history  # nothing listed: the history is every save known
    listed = record("ck-99999", seq=99999)
    back.checkpoints = [listed]  # a listed record the history lacks (an older manifest)
    assert back.saves()[-1].name == "ck-99999"


def test_history_entries_are_checked_like_records():
    bad = {"format": 1, "history": [{"name": "a", "series": "../x", "seq": 1}]}
    with pytest.raises(ManifestError, match=r"history\[0\]\.series"):
        mf.parse(json.dumps(bad).encode(), "cp.json")
    with pytest.raises(ManifestError, match=r"history\[0\]\.epoch: must be an integer"):
        mf.parse(json.dumps({"format": 1, "history": [{"name": "a", "epoch": "x"}]}).encode(), "cp.json")
