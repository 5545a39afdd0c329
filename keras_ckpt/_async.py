"""``async_save``: one background writer, and host buffers reused from one snapshot to the next.

Who owns what while a save is in flight (the Keras callback and the torch shim alike; the TF2
``CheckpointManager`` takes the Checkpointer's place in what follows, its snapshot is
:mod:`keras_ckpt._tfsnapshot`):

- The training thread owns the :class:`keras_ckpt.checkpointer.Checkpointer` (schedule counters,
  step, epoch) and takes the snapshot. Before it decides anything that reads the engine's state
  (``save_best_only``, the best value written into the next file, a name's uniqueness), and
  before it takes the next snapshot, it calls :meth:`BackgroundWriter.wait`: decisions are taken
  on committed state only, and the snapshot buffers are never overwritten while a write reads
  them.
- The writer thread owns the engine from ``submit`` until its job returns: it opens the
  transaction, streams the snapshot into it, commits the manifest and prunes (the engine's own
  protocol, unchanged). The engine attributes that the training thread may read meanwhile
  (``records``, ``best``, ``best_path``, ``latest_path``) change only once the manifest is
  durable, so they never show a checkpoint that is not.
- A front-end's snapshot buffers (:class:`ReusableBuffers`) belong to the save in flight until
  ``wait`` returns.

At most one writer thread runs at a time, and it is not a daemon: the interpreter waits for it at
exit, so a script that returns (or raises) right after ``fit`` still commits its last save.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import numpy as np

__all__ = ["BackgroundWriter", "ReusableBuffers", "copy_all"]

T = TypeVar("T")
B = TypeVar("B")

_writers: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()


class BackgroundWriter:
    """Runs one save at a time on a writer thread; its error is raised by the next :meth:`wait`.

    Args:
        name: the writer thread's name (shows in tracebacks and ``py-spy``).
    """

    def __init__(self, name: str = "keras_ckpt-writer") -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._result: Any = None
        self._error: BaseException | None = None
        self._done: Callable[[Any], None] | None = None
        _writers.add(self)

    @property
    def in_flight(self) -> bool:
        """Whether a save was submitted and :meth:`wait` has not collected it yet."""
        return self._thread is not None

    def submit(self, job: Callable[[], T], done: Callable[[T], None] | None = None) -> None:
        """Run ``job()`` on a new writer thread; ``done(result)`` runs in the next :meth:`wait`.

        A save still in flight is waited for first (its error, if any, is raised here and
        ``job`` does not run): there is never more than one.
        """
        self.wait()
        self._done = done
        self._thread = threading.Thread(target=self._run, args=(job,), name=self._name)
        self._thread.start()

    def _run(self, job: Callable[[], Any]) -> None:
        try:
            self._result = job()
        except BaseException as e:  # handed to the training thread, which raises it
            self._error = e

    def wait(self) -> None:
        """Wait for the save in flight, then raise its error or report it done, on this thread."""
        thread = self._thread
        if thread is None:
            return
        thread.join()
        self._thread = None
        error, self._error = self._error, None
        result, self._result = self._result, None
        done, self._done = self._done, None
        if error is not None:
            raise error
        if done is not None:
            done(result)

    def poll(self) -> None:
        """Collect the save in flight if it has finished (as :meth:`wait`); never waits.

        For a call that decides not to save: a failure in the background is raised at the first
        chance, without stalling training for a write that is still going on.
        """
        thread = self._thread
        if thread is not None and not thread.is_alive():
            self.wait()

    def _unreported(self) -> BaseException | None:
        return self._error if self._thread is not None and not self._thread.is_alive() else None


@atexit.register
def _report_lost_errors() -> None:
    # Non-daemon writer threads are joined before atexit runs: an error still held here was never
    # raised (training stopped without on_train_end), so it must at least be seen.
    for writer in list(_writers):
        error = writer._unreported()
        if error is not None:
            print(f"keras_ckpt: a background checkpoint save failed and training ended before the "
                  f"error could be raised: {type(error).__name__}: {error}", file=sys.stderr)


_COPY_THREADS = 2
_copy_pool: ThreadPoolExecutor | None = None
_copy_lock = threading.Lock()


def copy_all(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """``np.copyto(dst, src)`` for each pair, the bytes split over two threads.

    The snapshot is the time a save stops training; one thread copying is bound by one core's
    memory bandwidth, and numpy's copy releases the GIL.
    """
    total = sum(dst.nbytes for dst, _ in pairs)
    if total < (64 << 20) or len(pairs) < 2:
        for dst, src in pairs:
            np.copyto(dst, src)
        return
    halves: list[list[tuple[np.ndarray, np.ndarray]]] = [[], []]
    lead = 0  # bytes of the first half minus the second's
    for pair in sorted(pairs, key=lambda p: -p[0].nbytes):  # largest first, to the lighter half
        first = lead <= 0
        halves[0 if first else 1].append(pair)
        lead += pair[0].nbytes if first else -pair[0].nbytes
    global _copy_pool
    with _copy_lock:
        if _copy_pool is None:
            _copy_pool = ThreadPoolExecutor(_COPY_THREADS, thread_name_prefix="keras_ckpt-copy")
        pool = _copy_pool
    for future in [pool.submit(_copy, half) for half in halves]:
        future.result()


def _copy(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for dst, src in pairs:
        np.copyto(dst, src)


def _forget_copy_pool() -> None:
    global _copy_pool, _copy_lock
    _copy_pool, _copy_lock = None, threading.Lock()  # a forked child has no pool threads


os.register_at_fork(after_in_child=_forget_copy_pool)


class ReusableBuffers(Generic[B]):
    """Host buffers kept from one snapshot to the next, by key (a variable's place in the file).

    A snapshot allocates each buffer once (the first save pays the page faults) and later ones
    copy into it again; a buffer whose key a snapshot did not take is dropped at :meth:`end`.

    Args:
        allocate: a new buffer of ``nbytes`` bytes.
    """

    def __init__(self, allocate: Callable[[int], B]) -> None:
        self._allocate = allocate
        self._buffers: dict[Any, tuple[int, B]] = {}
        self._taken: set[Any] = set()

    def take(self, key: Any, nbytes: int) -> B:
        """The buffer for ``key``, ``nbytes`` long (the previous one if its size still fits)."""
        held = self._buffers.get(key)
        if held is None or held[0] != nbytes:
            held = (nbytes, self._allocate(nbytes))
            self._buffers[key] = held
        self._taken.add(key)
        return held[1]

    def end(self) -> None:
        """One snapshot is complete: forget the buffers it did not use (the model changed)."""
        for key in set(self._buffers) - self._taken:
            del self._buffers[key]
        self._taken = set()
