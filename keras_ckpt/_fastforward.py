"""Mid-epoch resume without replay for the Keras callback.

A checkpoint saved in the middle of an epoch holds, besides the model, the global RNGs as that
epoch began (``epoch_rng``: what its batch order was drawn from) and the epoch's running
metrics. When ``fit`` starts that epoch again, :func:`skip` makes its epoch iterator draw the same
order (the epoch-begin RNGs are set just before the data adapter shuffles), consume the batches
already trained without handing them to ``train_function`` — so no callback sees them and no
step runs — then put back the RNGs and metrics of the moment of the save, and go on at the next
batch with Keras's own step numbers.

The epoch iterator is ``fit``'s local ``epoch_iterator``; only its ``_enumerate_iterator`` is
wrapped, for one epoch (``_compat.KERAS_EPOCH_ITERATOR``). Skipped batches are still read from
the input (their data is produced and dropped): an input whose order does not come from the
global RNGs at epoch begin — a ``tf.data`` pipeline that reshuffles each iteration, a Python
generator with its own state, per-worker random augmentation — resumes in its own order.
"""

from __future__ import annotations

import inspect
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from keras_ckpt import _compat

# Frames between our on_epoch_begin and fit(): CallbackList.on_epoch_begin, maybe a wrapper.
_MAX_DEPTH = 8


@dataclass
class Resumed:
    """What a mid-epoch checkpoint says about the epoch it interrupted."""

    path: str
    epoch_rng: dict[str, Any] | None
    batch_rng: dict[str, Any]
    restore_rng: Callable[[dict[str, Any] | None], None]
    # Puts back the epoch-begin RNGs (Checkpointer.enter_epoch_rng: it warns if it cannot).
    enter_epoch: Callable[[], Any]
    # Warns that the input had only that many batches to skip (Checkpointer.input_ran_out).
    ran_out: Callable[[int], None]
    metrics: Any
    # The batch fit steps through again without training (the saved batch was the epoch's last).
    replayed: int | None = None


def metric_values(model: Any) -> list:
    """The running values of ``model``'s metrics (the loss tracker included), as JSON lists."""
    return [keras.ops.convert_to_numpy(v).tolist() for v in model.metrics_variables]


def _set_metrics(model: Any, values: list | None) -> bool:
    variables = list(model.metrics_variables)
    if not isinstance(values, list) or len(values) != len(variables):
        return False
    arrays = []
    for variable, value in zip(variables, values):
        try:  # read from the file: anything a JSON list can hold
            array = np.asarray(value, dtype=variable.dtype)
        except (TypeError, ValueError, OverflowError):
            return False
        if tuple(array.shape) != tuple(variable.shape):
            return False
        arrays.append(array)
    for variable, array in zip(variables, arrays):
        variable.assign(array)
    return True


def _epoch_iterator(frame: types.FrameType | None) -> Any:
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return None
        candidate = frame.f_locals.get("epoch_iterator")
        if callable(getattr(candidate, "_enumerate_iterator", None)):
            return candidate
        frame = frame.f_back
    return None


def skip(frame: types.FrameType | None, model: Any, resumed: Resumed, start_batch: int) -> None:
    """Make the epoch ``fit`` is about to iterate skip its first ``start_batch`` batches.

    ``frame`` is the caller's (``on_epoch_begin``); fit's frame is found above it.
    """
    found = _compat.available(_compat.KERAS_EPOCH_ITERATOR)
    iterator = _epoch_iterator(frame) if found else None
    if iterator is None:
        warnings.warn(
            f"{resumed.path} was saved in the middle of an epoch (after batch {start_batch}), but "
            "this Keras version's fit() cannot be fast-forwarded: that epoch restarts at batch 0.",
            stacklevel=4,
        )
        return
    original = iterator._enumerate_iterator
    total = getattr(iterator, "num_batches", None)

    def skipping() -> Iterator[tuple[int, int, Any]]:
        del iterator._enumerate_iterator  # this epoch only
        resumed.enter_epoch()  # the order is drawn as the epoch starts
        steps = original()
        done, sample = 0, None
        for begin, end, data in steps:
            if end < start_batch and not (total and end + 1 >= total):
                try:
                    for _ in range(end - begin + 1):
                        sample = next(data)
                except StopIteration:
                    resumed.ran_out(done)
                    break
                done = end + 1
                continue
            if end < start_batch:
                if end + 1 < start_batch:  # this input's epoch is shorter than the one saved
                    resumed.ran_out(end + 1)
                # The saved batch was the epoch's last: an epoch without a step would leave fit
                # without its logs (and jax's fit without a state), so this one step runs, but
                # only reads its data and returns the restored metrics.
                _resume_state(resumed, model, sample)
                # (The group's last batch numbers can run past the epoch's: Keras numbers the
                # short last group of steps_per_execution as a whole one.)
                _replay_without_training(model, iterator, resumed, end, min(end + 1, total) - begin)
                yield begin, end, data
                yield from steps
                return
            if done < start_batch:  # steps_per_execution does not divide the saved batch
                warnings.warn(
                    f"Resuming {resumed.path}: batches {done + 1}..{start_batch} of the "
                    f"interrupted epoch are trained again (steps_per_execution groups batches "
                    f"{begin + 1}..{end + 1} together).",
                    stacklevel=2,
                )
            _resume_state(resumed, model, sample)
            yield begin, end, data
            yield from steps
            return
        _resume_state(resumed, model, sample)

    iterator._enumerate_iterator = skipping


def _replay_without_training(
    model: Any, iterator: Any, resumed: Resumed, end: int, batches: int
) -> None:
    """Make fit's next ``train_function`` call consume its ``batches`` batches and train nothing."""
    train = model.train_function
    logs = model.get_metrics_result()
    resumed.replayed = end

    def replay(*args: Any) -> Any:
        model.train_function = train
        if _epoch_iterator(inspect.currentframe().f_back) is not iterator:
            # A later fit(): the resumed one raised before this step (in a batch-begin hook).
            return train(*args)
        data = args[-1]
        if hasattr(data, "__next__"):  # tensorflow, jax: the step pulls its batches itself
            for _ in range(batches):
                next(data)
        # jax's step is (state, data) -> (logs, state): the state goes back unchanged.
        return (logs, args[0]) if len(args) == 2 else logs

    model.train_function = replay


def _resume_state(resumed: Resumed, model: Any, sample: Any) -> None:
    resumed.restore_rng(resumed.batch_rng)
    compiled = getattr(model, "_compile_metrics", None)
    if sample is not None and compiled is not None and not compiled.built and _compat.available(
        _compat.KERAS_SYMBOLIC_BUILD
    ):
        # The tensorflow backend builds the compiled metrics when it traces the first step:
        # build them now, from a skipped batch, as the other backends' fit does at its start.
        model._symbolic_build(data_batch=sample)
    if not _set_metrics(model, resumed.metrics):
        what = ("holds no running metrics (written by an older keras_ckpt)"
                if resumed.metrics is None else "has running metrics that do not fit this model")
        warnings.warn(
            f"Resuming {resumed.path}: it {what}; the interrupted epoch's logged loss and "
            "metrics cover only the batches trained now.",
            stacklevel=3,
        )
