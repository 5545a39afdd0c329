"""``async_save`` for the TF2 ``CheckpointManager``: a snapshot that TF's own saver writes later.

On the training thread, :meth:`Snapshots.take` asks the ``tf.train.Checkpoint`` for exactly what
``Checkpoint.write`` would save (the object graph and each trackable's tensors, a variable read
without a copy) and copies every numeric tensor into a host buffer of
:class:`keras_ckpt._async.ReusableBuffers` (two threads, :func:`keras_ckpt._async.copy_all`). On
the background writer, :meth:`Snapshot.write` hands the same structure, over those buffers, to the
saver ``Checkpoint.write`` uses: the files are byte for byte those of a synchronous write.

The buffers reach TF through DLPack, without a copy. Tensors that are not numeric (the object
graph, strings, a ``tf.data`` iterator's state) are values TF computed during the gather and
never changes; they are written as they are. A tensor of a dtype that numpy cannot export or
this TF cannot import through DLPack (bfloat16; bool before TF 2.16) is kept as TF read it: TF
copies a variable before its next update while that read still holds its memory, so it stays
the value at the save, and the next training step pays for the copy.

Why not TF's own ``tf.train.CheckpointOptions(experimental_enable_async_checkpoint=True)``
(measured with TF 2.21, a ``tf.train.Checkpoint(model=..., optimizer=...)`` of a Keras 3
model): its second save fails (``ValueError`` from Keras's ``_copy_trackable_to_cpu``, which
creates a ``tf.Variable`` inside TF's ``tf.function``); the checkpoints it does write hold its
own internal ``save_counter`` (0) instead of the checkpoint's, so they neither restore the same
state nor have the same bytes as a synchronous write; ``Checkpoint.sync()`` returns normally
after a background write failed on a full disk (the next async write raises it); and its
writer is a daemon thread that exit waits for at most 300 s. Its stall is near zero because it
shares the variables' memory copy-on-write, which moves a copy of every updated variable into
the next training step (docs/performance.md has the figures).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import tensorflow as tf

from keras_ckpt import _compat
from keras_ckpt._async import ReusableBuffers, copy_all

_ALIGN = 64  # what TF's CPU allocator guarantees its own tensors


def _aligned(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + nbytes]


@functools.cache
def _through_dlpack(dtype: np.dtype) -> bool:
    """Whether an array of ``dtype`` becomes a TF tensor through DLPack (numpy exports it, TF
    imports it)."""
    try:
        tf.experimental.dlpack.from_dlpack(np.zeros(1, dtype).__dlpack__())
    except (BufferError, TypeError, ValueError, tf.errors.OpError):
        return False
    return True


def unavailable(checkpoint: Any, options: tf.train.CheckpointOptions | None) -> str | None:
    """Why ``checkpoint`` cannot be snapshotted (so it is written synchronously), or None."""
    if not all(_compat.available(api) for api in _compat.TF_SNAPSHOT):
        return "this TensorFlow lacks the private saver API it needs (keras_ckpt/_compat.py)"
    saver = getattr(checkpoint, "_saver", None)
    if not callable(getattr(saver, "_gather_serialized_tensors", None)):
        return f"{type(checkpoint).__name__} is not a tf.train.Checkpoint"
    if options is not None and options.experimental_write_callbacks:
        return "options.experimental_write_callbacks run on the written checkpoint"
    return None


class Snapshot:
    """One checkpoint's tensors, independent of the live variables; written by :meth:`write`."""

    def __init__(self, serialized: Any) -> None:
        self._serialized = serialized

    def write(self, prefix: str, options: tf.train.CheckpointOptions | None = None) -> None:
        """Write the checkpoint ``prefix`` (``.index``, ``.data-*``) as ``Checkpoint.write`` does."""
        from tensorflow.python.checkpoint import functional_saver

        with tf.device("/cpu:0"):
            prefix_tensor = tf.constant(prefix)
        functional_saver.MultiDeviceSaver(self._serialized).save(prefix_tensor, options=options)


class Snapshots:
    """Takes :class:`Snapshot` s of checkpoints into host buffers reused from one to the next."""

    def __init__(self) -> None:
        self._buffers: ReusableBuffers[np.ndarray] = ReusableBuffers(_aligned)

    def take(self, checkpoint: Any) -> Snapshot | None:
        """Copy what ``checkpoint.write`` would save now; None if part of it cannot be (objects
        with a registered saver, which TF writes from the live objects).

        The buffers of the previous snapshot are overwritten: its write must be finished.
        """
        serialized, _, registered, _ = checkpoint._saver._gather_serialized_tensors(None)
        if registered:
            return None
        pairs: list[tuple[np.ndarray, np.ndarray]] = []
        for trackable in list(serialized):
            serialized[trackable] = {
                key: ({spec: self._copy(key, spec, leaf, pairs) for spec, leaf in value.items()}
                      if isinstance(value, dict) else self._copy(key, "", value, pairs))
                for key, value in serialized[trackable].items()
            }
        copy_all(pairs)
        self._buffers.end()
        return Snapshot(serialized)

    def _copy(self, key: str, spec: str, leaf: Any,
              pairs: list[tuple[np.ndarray, np.ndarray]]) -> Any:
        """``leaf`` (a tensor, or a SaveSpec whose callable reads a variable) as a SaveSpec of its
        value now: of a snapshot buffer where it can be, else of the tensor TF read. The device
        stays the leaf's: it decides the checkpoint's shards."""
        from tensorflow.python.training.saving.saveable_object import SaveSpec

        # A variable's callable reads it now, without a copy.
        tensor = leaf.tensor if isinstance(leaf, SaveSpec) else leaf
        value = tensor if tensor is None else self._buffered(key, spec, tensor, pairs)
        return SaveSpec(value, spec, key, dtype=leaf.dtype, device=leaf.device)

    def _buffered(self, key: str, spec: str, tensor: Any,
                  pairs: list[tuple[np.ndarray, np.ndarray]]) -> Any:
        """A callable that makes a tensor of ``tensor``'s snapshot buffer (filled by ``pairs``),
        or ``tensor`` itself where its dtype has no buffer."""
        if tensor.dtype == tf.string or not tensor.dtype.is_numpy_compatible:
            return tensor
        source = np.asarray(tensor)  # a view of the tensor's memory
        if not _through_dlpack(source.dtype):
            return tensor
        buffer = self._buffers.take((key, spec), source.nbytes)
        pairs.append((buffer, source.reshape(-1).view(np.uint8)))
        value = buffer.view(source.dtype).reshape(source.shape)
        return lambda: tf.experimental.dlpack.from_dlpack(value.__dlpack__())
