"""The manifest schema on its own: round trips, what a reader tolerates, what it refuses."""

from __future__ import annotations

import json
import math

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
    ("time", math.inf, ".time: must be a finite number"),
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
    good = Intent("s", record(), SeriesState(), ((".keras_ckpt-tmp-a-b", "b.keras"),)).to_json()
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
