"""The state of the other callbacks of the same ``fit``, saved and restored by the Keras front-end.

A resumed run must continue the whole training loop, not just the model: EarlyStopping's patience,
ReduceLROnPlateau's plateau and CSVLogger's file. :class:`Siblings` finds the callbacks that run
beside the checkpoint callback, captures their state into each checkpoint and puts it back on
resume:

* ``EarlyStopping``: ``wait``, ``stopped_epoch``, ``best``, ``best_epoch`` and, with
  ``restore_best_weights``, ``best_weights``. A run that EarlyStopping ended is not trained
  further when resumed (its ``on_train_end`` still restores the best weights).
* ``ReduceLROnPlateau``: ``wait``, ``cooldown_counter``, ``best`` and the learning rate it set
  (also restored when ``save_optimizer=False`` leaves the optimizer variables out).
* ``CSVLogger``: appends on resume; the rows of epochs that the resumed run trains again (those
  logged after the checkpoint) are cut from the file first, so every epoch appears once.
* any callback with ``state_dict()`` / ``load_state_dict()`` (the torch convention): its dict.

The state is JSON inside the checkpoint's training state; numpy arrays in it (best_weights, or
arrays in a ``state_dict``) are HDF5 datasets beside it (:data:`keras_ckpt._kerasio.ARRAYS_GROUP`),
never JSON. Callbacks are matched across runs by class name and position among the callbacks of
that class (``EarlyStopping``, ``EarlyStopping#1``...).

How the siblings are found: Keras's ``CallbackList`` calls each callback's ``set_model`` from its
own ``set_model`` (and fit builds one for its callbacks), so the calling frame's ``self`` is the
list; it is used only when it is a ``CallbackList`` whose ``.callbacks`` holds the checkpoint
callback (``_compat.KERAS_CALLBACK_LIST``). There the checkpoint callback also moves itself behind
the callbacks whose state it saves, so that an epoch's checkpoint holds their state after that
epoch (in a fresh list object: the one being iterated is left alone).
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from keras_ckpt import _compat

_ARRAY_REF = "__ndarray__"


class Siblings:
    """The stateful callbacks of one ``fit`` beside the checkpoint callback ``owner``."""

    def __init__(self, owner: keras.callbacks.Callback) -> None:
        self._owner = owner
        self._callbacks: list[keras.callbacks.Callback] = []
        self._csv_append: list[tuple[keras.callbacks.CSVLogger, bool]] = []
        self._warned = False
        self.finished = False
        """Whether the restored state says EarlyStopping had ended the run."""

    # -- finding them -------------------------------------------------------------------------

    def attach(self, caller: types.FrameType | None, resume: bool) -> None:
        """Called from the owner's ``set_model``: ``caller`` is the frame that called it."""
        self.end()  # a fit that raised never reached on_train_end
        self._callbacks = []
        holder = caller.f_locals.get("self") if caller is not None else None
        if not isinstance(holder, keras.callbacks.CallbackList):
            return  # set_model called by hand (a custom loop): there are no siblings to find
        listed = getattr(holder, "callbacks", None)
        if not _compat.available(_compat.KERAS_CALLBACK_LIST) or not (
            isinstance(listed, list) and any(cb is self._owner for cb in listed)
        ):
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "keras_ckpt cannot find the other callbacks of this fit() in this Keras "
                    "version: their state (EarlyStopping, ReduceLROnPlateau, CSVLogger, "
                    "state_dict()) is neither saved nor restored.",
                    stacklevel=3,
                )
            return
        self._callbacks = [cb for cb in listed if cb is not self._owner and _stateful(cb)]
        if not self._callbacks:
            return
        mine = next(i for i, cb in enumerate(listed) if cb is self._owner)
        last = max(i for i, cb in enumerate(listed) if any(cb is s for s in self._callbacks))
        if last > mine:
            order = [cb for cb in listed if cb is not self._owner]
            order.insert(last, self._owner)  # right behind the last one whose state is saved
            holder.callbacks = order
        if resume:
            # CSVLogger opens its file in its on_train_begin, which may run before ours (before
            # we know whether a checkpoint is found): append now, truncate in :meth:`begin`.
            for cb in self._callbacks:
                if isinstance(cb, keras.callbacks.CSVLogger):
                    self._csv_append.append((cb, cb.append))
                    cb.append = True

    # -- saving -------------------------------------------------------------------------------

    def capture(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able state by callback key, arrays by dataset name) of every sibling."""
        state: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}
        for key, cb in self._keyed():
            if isinstance(cb, keras.callbacks.CSVLogger) and not _has_state_dict(cb):
                continue  # nothing to save: its file is its state
            try:
                state[key] = _encode(_state_of(cb), f"{key}/", arrays)
            except TypeError as e:
                raise TypeError(
                    f"The state of callback {key} ({type(cb).__name__}) cannot be saved: {e}. "
                    "state_dict() may hold numbers, strings, bools, None, lists, dicts with "
                    "string keys and numpy arrays."
                ) from None
        return state, arrays

    # -- restoring ----------------------------------------------------------------------------

    def restore(
        self, saved: dict[str, Any] | None, read_arrays: Callable[[], dict[str, np.ndarray]]
    ) -> None:
        """Put ``saved`` (from :meth:`capture`) back; ``read_arrays`` reads the datasets."""
        self.finished = False
        if saved is None:
            return  # a checkpoint from before callbacks' state was saved: they start fresh
        keyed = dict(self._keyed())
        arrays: dict[str, np.ndarray] | None = None
        for key, value in saved.items():
            cb = keyed.get(key)
            if cb is None:
                continue  # that callback is not in this fit
            if _needs_arrays(value) and arrays is None:
                arrays = read_arrays()
            _load_state(cb, _decode(value, arrays or {}))
            if isinstance(cb, keras.callbacks.EarlyStopping) and cb.stopped_epoch > 0:
                self.finished = True
        fresh = [k for k, cb in keyed.items() if k not in saved and _saves_state(cb)]
        if fresh:
            warnings.warn(
                f"The checkpoint holds no state for callback(s) {', '.join(fresh)} of this fit() "
                "(not in the run that saved it): they start fresh.",
                stacklevel=4,
            )

    def begin(self, resumed_epochs: int | None) -> None:
        """After the checkpoint is chosen: make each CSVLogger's file what its epochs need.

        ``resumed_epochs``: the epochs done in the restored checkpoint, None for a fresh start.
        """
        for cb, user_append in self._csv_append:
            if resumed_epochs is not None:
                _cut_csv(cb, keep_below=resumed_epochs)
            elif not user_append:
                _cut_csv(cb, keep_below=None)  # a fresh start overwrites, as CSVLogger would

    def end(self) -> None:
        """Give each CSVLogger back its own ``append`` (the next fit decides again)."""
        for cb, user_append in self._csv_append:
            cb.append = user_append
        self._csv_append = []

    def _keyed(self) -> list[tuple[str, keras.callbacks.Callback]]:
        seen: dict[str, int] = {}
        out = []
        for cb in self._callbacks:
            name = type(cb).__name__
            n = seen.get(name, 0)
            seen[name] = n + 1
            out.append((name if n == 0 else f"{name}#{n}", cb))
        return out


# -- what each kind of callback saves ----------------------------------------------------------


def _has_state_dict(cb: Any) -> bool:
    return callable(getattr(cb, "state_dict", None)) and callable(
        getattr(cb, "load_state_dict", None)
    )


def _saves_state(cb: Any) -> bool:
    return _has_state_dict(cb) or isinstance(
        cb, (keras.callbacks.EarlyStopping, keras.callbacks.ReduceLROnPlateau)
    )


def _stateful(cb: Any) -> bool:
    return _saves_state(cb) or isinstance(cb, keras.callbacks.CSVLogger)


def _optimizers(cb: keras.callbacks.Callback) -> list[Any]:
    optimizer = cb.model.optimizer
    return list(getattr(optimizer, "optimizers", None) or [optimizer])  # as ReduceLROnPlateau


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _state_of(cb: Any) -> Any:
    if _has_state_dict(cb):  # the callback's own word comes first, also for subclasses
        return cb.state_dict()
    if isinstance(cb, keras.callbacks.EarlyStopping):
        weights = getattr(cb, "best_weights", None)
        return {
            "wait": int(cb.wait),
            "stopped_epoch": int(cb.stopped_epoch),
            "best": _number(cb.best),
            "best_epoch": int(getattr(cb, "best_epoch", 0)),
            "best_weights": None if weights is None else [np.asarray(w) for w in weights],
        }
    return {  # ReduceLROnPlateau
        "wait": int(cb.wait),
        "cooldown_counter": int(cb.cooldown_counter),
        "best": _number(cb.best),
        "learning_rates": [
            float(keras.ops.convert_to_numpy(opt.learning_rate)) for opt in _optimizers(cb)
        ],
    }


def _load_state(cb: Any, state: Any) -> None:
    if _has_state_dict(cb):
        cb.load_state_dict(state)
        return
    cb.wait, cb.best = state["wait"], state["best"]
    if isinstance(cb, keras.callbacks.EarlyStopping):
        cb.stopped_epoch, cb.best_epoch = state["stopped_epoch"], state["best_epoch"]
        cb.best_weights = state["best_weights"]
        return
    cb.cooldown_counter = state["cooldown_counter"]
    for opt, rate in zip(_optimizers(cb), state["learning_rates"]):
        opt.learning_rate = rate  # how ReduceLROnPlateau itself sets it


# -- JSON with arrays beside it ------------------------------------------------------------------


def _encode(value: Any, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    """``value`` as JSON-able data; numpy arrays go to ``arrays`` and leave a reference."""
    if isinstance(value, np.ndarray):
        name = f"{prefix}{len([k for k in arrays if k.startswith(prefix)])}"
        arrays[name] = np.ascontiguousarray(value)
        return {_ARRAY_REF: name}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_encode(v, prefix, arrays) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"a dict key is not a string: {list(value)!r}")
        if _ARRAY_REF in value:
            raise TypeError(f"the key {_ARRAY_REF!r} is reserved")
        return {k: _encode(v, prefix, arrays) for k, v in value.items()}
    raise TypeError(f"a {type(value).__name__} value: {value!r}")


def _needs_arrays(value: Any) -> bool:
    if isinstance(value, dict):
        return _ARRAY_REF in value or any(_needs_arrays(v) for v in value.values())
    if isinstance(value, list):
        return any(_needs_arrays(v) for v in value)
    return False


def _decode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY_REF}:
            return arrays[value[_ARRAY_REF]]
        return {k: _decode(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    return value


# -- CSVLogger's file ----------------------------------------------------------------------------


def _cut_csv(cb: keras.callbacks.CSVLogger, keep_below: int | None) -> None:
    """Cut the trailing rows of epochs >= ``keep_below`` from ``cb``'s file (None: all of it).

    In place (a suffix is truncated away), so a CSVLogger that already opened the file for
    appending writes on at the new end. A file left without rows is emptied, header too, and the
    logger writes a header again (the metrics of this run may differ).
    """
    path = cb.filename
    if not os.path.isfile(path):
        return  # not written yet, or a remote path (left as it is)
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    keep = len(lines)
    if keep_below is not None:
        sep = cb.sep.encode()
        while keep > 1 and _epoch_of(lines[keep - 1], sep) >= keep_below:
            keep -= 1
    if keep_below is None or keep <= 1:
        keep = 0
    os.truncate(path, sum(len(line) for line in lines[:keep]))
    if keep == 0:
        cb.append_header = True


def _epoch_of(line: bytes, sep: bytes) -> float:
    try:
        return int(line.split(sep, 1)[0])
    except ValueError:  # a blank or foreign line: not an epoch row, cut it with the ones after
        return float("inf")
