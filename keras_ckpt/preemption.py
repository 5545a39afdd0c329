"""Save on preemption: signal handlers that only set a flag, and re-delivery afterwards.

Framework-neutral; the Keras callback, the PyTorch shim and the TF hook each decide *when* the
flag is acted on (the next batch end / step) and when the signal is re-delivered.

The handler never saves by itself: a signal can arrive in the middle of a train step or of a
save, and a second one must not interrupt the commit. It records the signal; the front-end saves
at its next batch end through the normal save path, restores the handlers that were installed
before, and re-delivers the signal with :func:`signal.raise_signal`, so the previous handler
runs as if ours had never been there (the default action ends the process with status
128 + signal, 143 for SIGTERM; a user's own handler runs).

Training that ends without the front-end's end hook (a Keras ``fit`` that raises skips
``on_train_end``) must not leave a handler behind that swallows the signal. At install time the
guard remembers the frame that runs the training loop (Keras's ``fit``, ``Estimator.train``, the
caller of the shim's ``on_train_begin``); when a signal arrives and that frame is no longer on
the main thread's stack, training is over: the handler restores the previous handlers and
re-delivers at once. The next install also restores a stale installation first.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

__all__ = ["DEFAULT_SIGNALS", "PreemptionGuard", "interrupts_deferred", "signals_from"]

# Kubernetes / spot VMs send SIGTERM; SLURM can send SIGUSR1 first (``--signal=USR1@120``).
DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)
_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}

_log = logging.getLogger(__name__)


def signals_from(value: Any, name: str = "save_on_preemption") -> tuple[signal.Signals, ...]:
    """The signals ``save_on_preemption=value`` handles: ``()`` for False; a ValueError else.

    Args:
        value: True (SIGTERM and SIGUSR1), False (none), or a tuple of signal numbers /
            ``signal.Signals``.
        name: the argument's name, for the error message.
    """
    if isinstance(value, bool):
        return DEFAULT_SIGNALS if value else ()
    if not isinstance(value, tuple) or not value:
        raise ValueError(
            f"{name} must be True, False or a non-empty tuple of signals (e.g. "
            f"(signal.SIGTERM,)). Received: {name}={value!r}"
        )
    out: list[signal.Signals] = []
    for item in value:
        try:
            if isinstance(item, bool) or not isinstance(item, int):
                raise ValueError
            sig = signal.Signals(item)
        except ValueError:
            raise ValueError(
                f"{name} must hold signal numbers or signal.Signals; {item!r} is not one. "
                f"Received: {name}={value!r}"
            ) from None
        if sig in _UNCATCHABLE:
            raise ValueError(
                f"{name}: {sig.name} cannot be caught, so no checkpoint can be saved on it. "
                f"Received: {name}={value!r}"
            )
        if sig not in out:
            out.append(sig)
    return tuple(out)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a SIGINT that arrives inside the block until it ends, then deliver it.

    h5py calls a Python file object's methods from C (our in-memory HDF5 images): a
    KeyboardInterrupt raised inside one of them is not propagated but replaced by an
    AttributeError from h5py's next call (``'_SparseImage' object has no attribute 'flush'``),
    so a Ctrl-C during a save ended the run with that error. Off the main thread no handler
    runs, and a handler not installed from Python cannot be put back: nothing is deferred then.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)  # the restored handler runs, as if never held


def _module(frame: FrameType) -> str:
    return frame.f_globals.get("__name__", "") or ""


def _within(module: str, packages: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def loop_frame(
    frame: FrameType | None, *, through: tuple[str, ...] = (), loop: tuple[str, ...] = ()
) -> FrameType | None:
    """The frame that stays on the stack for the whole training run, found from ``frame`` out.

    Walks past keras_ckpt's own frames and those of the ``through`` packages; the result is the
    outermost frame of a ``loop`` package met on the way (Keras's ``fit``, ``Estimator.train``),
    or else the first frame outside them all (a hand-written loop calling the shim, the code
    that opened a ``MonitoredTrainingSession``).
    """
    outermost_loop = None
    while frame is not None:
        module = _module(frame)
        if _within(module, loop):
            outermost_loop = frame
        elif not _within(module, ("keras_ckpt", *through)):
            break
        frame = frame.f_back
    return outermost_loop or frame


class PreemptionGuard:
    """Handlers for ``signals`` that only record what arrived, while training runs.

    Args:
        signals: the signals to handle (``signals_from(save_on_preemption)``); empty: the guard
            never touches a handler.
    """

    def __init__(self, signals: tuple[signal.Signals, ...]) -> None:
        self.signals = signals
        self.received: list[signal.Signals] = []  # distinct signals, in arrival order
        self.preempted = False  # set by the front-end once it saved and stopped for a signal
        self._previous: dict[signal.Signals, Any] = {}
        self._loop: FrameType | None = None

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    @property
    def requested(self) -> bool:
        """A signal arrived and was not acted on yet."""
        return bool(self.received) and not self.preempted

    def install(self, caller: FrameType | None, *, through: tuple[str, ...] = (),
                loop: tuple[str, ...] = ()) -> bool:
        """Install the handlers (main thread only; elsewhere do nothing). True if installed.

        Args:
            caller: the front-end hook's frame (``inspect.currentframe()``), where
                :func:`loop_frame` starts.
            through, loop: see :func:`loop_frame`.
        """
        self.restore()  # a run that ended without its end hook (fit raised) left ours behind
        self.received = []
        self.preempted = False
        if not self.signals:
            return False
        if threading.current_thread() is not threading.main_thread():
            _log.debug("keras_ckpt: training runs outside the main thread; save_on_preemption "
                       "installs no signal handler (Python allows them in the main thread only)")
            return False
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if previous is None:  # installed from C: ours could not hand the signal back to it
                _log.debug("keras_ckpt: %s has a handler not installed from Python; leaving it",
                           sig.name)
                continue
            signal.signal(sig, self._handle)
            self._previous[sig] = previous
        self._loop = loop_frame(caller, through=through, loop=loop)
        return self.installed

    def restore(self) -> None:
        """Put the previous handlers back (where ours is still the one installed)."""
        previous, self._previous, self._loop = self._previous, {}, None
        for sig, handler in previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, handler)

    def redeliver(self) -> None:
        """Restore the previous handlers, then send them the signals that arrived.

        The default action of SIGTERM ends the process here (status 143 in a shell; a
        ``subprocess`` sees returncode -15); a Python handler runs right after this returns.
        """
        received, self.received = self.received, []
        self.restore()
        for sig in received:
            signal.raise_signal(sig)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if sig not in self.received:
            self.received.append(sig)
        if not self._training(frame):
            self.redeliver()

    def _training(self, frame: FrameType | None) -> bool:
        """Whether the training loop's frame is still running on the main thread's stack."""
        if self._loop is None or frame is None:
            return True
        while frame is not None:
            if frame is self._loop:
                return True
            frame = frame.f_back
        return False
