"""The private TensorFlow APIs keras_ckpt names in _compat.TENSORFLOW exist as the code expects.

Runs under TF 2.21 and under the TF 2.15 + tensorflow-estimator environment.
"""

from __future__ import annotations

import importlib.util
import inspect
import os

import pytest

tf = pytest.importorskip("tensorflow")

from keras_ckpt import _compat  # noqa: E402
from keras_ckpt import manifest as mf  # noqa: E402
from keras_ckpt.estimator import CheckpointHook  # noqa: E402

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_mts_train.py")
_STEPS_PER_RUN = next(a for a in _compat.TENSORFLOW if a.name.endswith("._set_steps_per_run"))


def _helper():
    spec = importlib.util.spec_from_file_location("_mts_train", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("api", _compat.TENSORFLOW, ids=lambda a: f"{a.module}.{a.name}")
def test_private_tf_api_exists_with_the_expected_signature(api):
    _compat.check(api)
    assert _compat.available(api)


def test_the_hook_overrides_what_tf_calls_with_a_compatible_signature():
    ours = inspect.signature(CheckpointHook._set_steps_per_run)
    assert list(ours.parameters) == ["self", *_STEPS_PER_RUN.params]
    assert "_set_steps_per_run" in vars(CheckpointHook)


def test_hook_needs_none_of_checkpointsaverhooks_private_state(tmp_path, monkeypatch):
    # A TF release whose CheckpointSaverHook keeps other private attributes, or drops
    # _set_steps_per_run: the hook still saves on schedule and still takes TPUEstimator's call.
    base = tf.compat.v1.train.CheckpointSaverHook
    monkeypatch.setattr(base, "__init__", lambda self, *args, **kwargs: None)
    monkeypatch.delattr(base, "_set_steps_per_run")
    assert not _compat.available(_STEPS_PER_RUN)

    hook = CheckpointHook(tmp_path, save_steps=10, max_to_keep=None)
    hook._set_steps_per_run(1)
    with tf.Graph().as_default():
        train_op, _ = _helper().build_graph()
        stop = tf.compat.v1.train.StopAtStepHook(last_step=25)
        with tf.compat.v1.train.MonitoredTrainingSession(
            checkpoint_dir=str(tmp_path), hooks=[hook, stop], save_checkpoint_secs=None,
            save_summaries_steps=None, log_step_count_steps=None,
        ) as sess:
            while not sess.should_stop():
                sess.run(train_op)
    names = [r.name for r in mf.load(str(tmp_path)).checkpoints]
    assert names == ["model.ckpt-10", "model.ckpt-20", "model.ckpt-25"]
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.ckpt-25")
