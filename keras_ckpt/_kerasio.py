"""Fast Keras 3 checkpoint files (``.keras`` and ``.weights.h5``) with embedded training state.

Why this exists: stock ``model.save(".keras")`` builds the whole HDF5 weights file in a
``BytesIO``, copies it, CRCs it on one core and only then writes it, so it runs at a fraction of
the disk's speed; on the TensorFlow backend every variable is also copied once or twice on the
way (``variable.numpy()``, ``np.array`` over a ``tf.Variable``). Here the file is planned first
and streamed once:

1. Keras's own saving walk (``saving_lib._save_state``) runs against an HDF5 file that lives in a
   sparse in-memory image. Every large dataset is created with its storage allocated but never
   written, so HDF5 writes only its metadata (kilobytes) and tells us where each dataset's bytes
   go. Groups, dataset names, dtypes and attributes are therefore Keras's by construction.
2. The file is then written in one sequential pass: metadata gaps from the image, dataset bytes
   straight from the variables' own buffers (zero-copy views where the backend allows). For
   ``.keras`` the zip member's CRC-32 is computed at the same time from those same buffers, on
   another thread, by :class:`keras_ckpt._zip.ZipWriter` (the zip writer the torch front-end shares);
   the CRC goes into a data descriptor after the member, so nothing is ever seeked back over. A
   strictly sequential writer lets the caller hash the bytes as they stream, or write to a
   non-seekable target.
3. Each 16 MiB written is handed to the disk at once (:class:`keras_ckpt.storage.EarlyWriteback`),
   so the disk works while the rest is still being copied and checksummed.

Neither writer fsyncs: the engine does, after it checksums the file. Both read the variables in
place, without a snapshot: the model must not train while they run. An asynchronous save plans
the file on the training thread (:func:`plan_keras`, :func:`plan_weights_h5`), copies the large
datasets' bytes into reusable host buffers (:meth:`Planned.snapshot`) and streams the same
segments from those copies on the writer thread, so both produce the same bytes.

This module imports keras and h5py at import time; ``keras_ckpt`` imports it lazily, from the
Keras front-end only. The private Keras APIs it uses are resolved through
:mod:`keras_ckpt._compat`; when one is missing, :func:`fast_write_available` /
:func:`fast_read_available` say so and the front-end uses Keras's own writers and reader instead
(:func:`copy_keras_with_state`, :func:`add_state_h5`; ``model.load_weights``).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import io
import math
import os
import time
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from typing import IO, Any, Callable, NamedTuple

import h5py
import keras
import numpy as np

from keras_ckpt import _compat, _stream, _zip, preemption, storage
from keras_ckpt._async import ReusableBuffers, copy_all
from keras_ckpt._fileobj import Positioned

__all__ = [
    "ARRAYS_GROUP",
    "STATE_GROUP",
    "STATE_MEMBER",
    "Layouts",
    "Planned",
    "add_state_h5",
    "copy_keras_with_state",
    "fast_read_available",
    "fast_write_available",
    "file_format",
    "holds_optimizer",
    "load_into",
    "plan_keras",
    "plan_weights_h5",
    "read_arrays",
    "read_legacy_optimizer",
    "read_state",
    "write_keras",
    "write_weights_h5",
]

STATE_MEMBER = "keras_ckpt/state.json"
"""Path of the ``uint8`` HDF5 dataset holding the training state (JSON bytes), in a
``.weights.h5`` file and in the ``model.weights.h5`` member of a ``.keras`` archive alike.
Keras only opens the groups its model walk names, so it ignores this one. Not a zip member of
its own: (Keras 3.15) an archive with more than three members makes ``keras.models.load_model``
extract the whole archive, weights included, into a temporary directory (3.7x slower on a
600 MB model). A dataset, not an attribute: HDF5 caps attributes at 64 KiB."""

STATE_GROUP = "keras_ckpt"
"""The root group that :data:`STATE_MEMBER` lives in."""

ARRAYS_GROUP = "keras_ckpt/arrays"
"""The HDF5 group of the training state's arrays (e.g. EarlyStopping's best weights), one
dataset per array under the name the state's JSON refers to it by. Beside the JSON, not in it."""



def _private_or(api: _compat.PrivateAPI, default: Any) -> Any:
    return _compat.resolve(api) if _compat.available(api) else default


def fast_write_available() -> bool:
    """Whether this Keras has every private API the fast writers need (else: Keras's writers)."""
    return all(_compat.available(api) for api in _compat.KERAS_FAST_WRITE)


def fast_read_available() -> bool:
    """Whether this Keras has every private API :func:`load_into`'s in-place reader needs."""
    return all(_compat.available(api) for api in _compat.KERAS_FAST_READ)


_WEIGHTS_MEMBER = _private_or(_compat.KERAS_VARS_FNAME_H5, "model.weights.h5")
_CONFIG_MEMBER = _private_or(_compat.KERAS_CONFIG_FILENAME, "config.json")
_METADATA_MEMBER = _private_or(_compat.KERAS_METADATA_FILENAME, "metadata.json")
_ASSETS_DIR = _private_or(_compat.KERAS_ASSETS_DIRNAME, "assets")
# Without it the subclasses below still import; fast_*_available() keeps them unused.
_H5IOStore: type = _private_or(_compat.KERAS_H5_IO_STORE, object)
_OPTIMIZER_PATH = "optimizer"  # the Model attribute the walk stores the optimizer under
_LEGACY_OPTIMIZER_PATH = "optimizer_weights"  # where Keras's legacy .h5 writer puts them

# Smaller datasets are copied into the HDF5 metadata between the large ones: a segment of
# their own would cost more than the copy.
_PLAN_MIN_BYTES = 1 << 16
_DATA_ALIGN = 64
# The state's dataset is padded with spaces (JSON whitespace, stripped by read_state) to a
# multiple of this: a state a few bytes longer or shorter keeps the file's layout, so the next
# save of the model reuses it (Layouts).
_STATE_SLOT = 4096


# --- Planning the HDF5 file -------------------------------------------------------------------


class _SparseImage(Positioned):
    """Writable, seekable in-memory file that stores only the pages written to it.

    h5py writes an HDF5 file into it through its ``fileobj`` driver. Dataset storage that was
    allocated but never written costs nothing here, and reads of it give zeros, as on disk.
    """

    _PAGE = 4096

    def __init__(self) -> None:
        super().__init__()
        self._pages: dict[int, bytearray] = {}
        self.size = 0

    def _end(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def truncate(self, size: int | None = None) -> int:
        self.size = self._pos if size is None else size
        return self.size

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        pos = self._pos
        done = 0
        while done < len(view):
            page, start = divmod(pos + done, self._PAGE)
            take = min(self._PAGE - start, len(view) - done)
            buf = self._pages.setdefault(page, bytearray(self._PAGE))
            buf[start : start + take] = view[done : done + take]
            done += take
        self._pos = pos + done
        self.size = max(self.size, self._pos)
        return done

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.span(self._pos, min(self.size, self._pos + len(view)))
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def span(self, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of the image (zeros where nothing was written)."""
        out = bytearray(max(0, stop - start))
        pos = start
        while pos < stop:
            page, offset = divmod(pos, self._PAGE)
            take = min(self._PAGE - offset, stop - pos)
            buf = self._pages.get(page)
            if buf is not None:
                out[pos - start : pos - start + take] = buf[offset : offset + take]
            pos += take
        return bytes(out)


def _c_order(array: np.ndarray) -> np.ndarray:
    """``array`` in C order, copied only if needed (``np.ascontiguousarray`` turns 0-d into 1-d)."""
    return array if array.flags.c_contiguous else array.copy(order="C")


def _to_host(value: Any) -> np.ndarray:
    """A variable's value as a NumPy array, without copying where the backend allows.

    Keras's ``convert_to_numpy`` is ``np.array(tf_variable)`` on TensorFlow: two full copies of
    every variable, slower than writing the bytes to disk; on JAX it is ``np.array`` too, one
    copy. A read of a TF resource variable aliases its buffer, a CPU torch tensor shares memory
    with ``.numpy()``, and ``np.asarray`` of a CPU JAX array is a read-only view of its buffer
    (bfloat16 included, through ml_dtypes; off the CPU it is the one device-to-host copy).
    """
    if isinstance(value, np.ndarray):
        return _c_order(value)  # Keras's convert_to_numpy would copy it once more
    if isinstance(value, keras.Variable):
        tensor = value.value
        backend = keras.backend.backend()
        if backend == "tensorflow":
            if hasattr(tensor, "read_value"):
                tensor = tensor.value()  # one op; read_value() adds an identity
            return _c_order(np.asarray(tensor))
        # numpy has no bfloat16: that case keeps Keras's conversion (via float32).
        if backend == "torch" and value.dtype != "bfloat16":
            return _c_order(tensor.detach().cpu().numpy())
        if backend == "jax":
            return _c_order(np.asarray(tensor))
    return _c_order(keras.ops.convert_to_numpy(value))


def _plannable(array: np.ndarray) -> bool:
    """Whether the array's raw bytes are exactly what HDF5 would store (fixed-size numbers)."""
    numeric = array.dtype.kind in "iuf" or array.dtype.name == "bfloat16"
    return numeric and array.nbytes > 0


def _padded(state: bytes) -> bytes:
    return state.ljust(max(1, -(-len(state) // _STATE_SLOT)) * _STATE_SLOT, b" ")


class _Extent(NamedTuple):
    """Where one dataset's bytes lie in a planned file, and what they are read from."""

    offset: int
    name: str  # the dataset's HDF5 path
    dtype: np.dtype
    shape: tuple[int, ...]
    # A keras.Variable, _STATE, or an _ArrayName; None: a value only this save has.
    source: Any

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


_STATE = object()  # the source of the training state's dataset


class _ArrayName(NamedTuple):
    name: str  # the key in the ``arrays`` mapping


class _PlanningStore(_H5IOStore):
    """Keras's HDF5 weights store, but numeric datasets are only allocated, and recorded.

    Subclassing keeps Keras's group layout and metadata (and passes ``_save_state``'s type
    check); only the write of a dataset's bytes is deferred to :func:`_assemble`.
    """

    def __init__(self, h5_file: h5py.File) -> None:
        self._file = h5_file
        self._created: list[tuple[h5py.Dataset, np.ndarray, Any]] = []
        self._unplanned: list[tuple[h5py.Dataset, np.ndarray]] = []  # their bytes copied in
        self.extents: list[tuple[_Extent, np.ndarray]] = []
        self.reusable = True  # every dataset's bytes come from a variable, the state or arrays
        super().__init__("in-memory", mode="w")

    def _get_h5_file(self, path_or_io: Any, mode: str | None = None) -> h5py.File:
        return self._file

    def __setitem__(self, key: str, value: Any) -> None:
        array = _to_host(value)
        if not _plannable(array):
            keras.backend.standardize_dtype(array.dtype)  # refuses what Keras's own store refuses
        if not self._h5_entry_initialized:
            self._create_h5_group(self._h5_entry_path)
        self.put(self._h5_entry_group, key, array,
                 value if isinstance(value, keras.Variable) else None)

    def put(self, group: h5py.Group, name: str, array: np.ndarray, source: Any) -> None:
        """Create dataset ``name`` in ``group``; :meth:`allocate` gives it its place in the
        file, and its bytes (from ``source``) come later (copied now where not plannable)."""
        if not _plannable(array):
            self.reusable = self.reusable and array.size == 0
            if array.size == 0 or array.dtype.kind == "O":  # no storage, or a vlen type to infer
                group.create_dataset(name, data=array)
            else:  # bool, complex, bytes: written by allocate, else its storage splits the metadata
                self._unplanned.append((group.create_dataset(name, shape=array.shape,
                                                             dtype=array.dtype), array))
            return
        self.reusable = self.reusable and source is not None
        # "Never fill": HDF5 writes nothing where the bytes go, so the image stays small.
        dataset = group.create_dataset(name, shape=array.shape, dtype=array.dtype,
                                       fill_time="never")
        if array.dtype.name == "bfloat16":
            dataset.attrs["dtype"] = "bfloat16"  # as Keras marks it, so Keras reads it back
        self._created.append((dataset, array, source))

    def allocate(self) -> None:
        """Give every dataset created its storage, in creation order, after all the metadata.

        Storage allocated as each dataset is created (HDF5's early allocation) puts the
        metadata created after it behind it, spread through the file; a resume that parses the
        file as it arrives then waits for the middle of the file to open the root group (0.17 s
        of a 0.26 s read of the benchmark model). Writing one element allocates a contiguous
        dataset's whole storage at the end of the file; its bytes come from ``source`` later.
        """
        # Before the planned ones: the state and arrays, created last, stay in the last piece
        # of the file, which a resume reads first.
        for dataset, array in self._unplanned:
            dataset[()] = array
        for dataset, array, source in self._created:
            # The element's own bytes, in the file's type: h5py has no bfloat16 conversion.
            space = dataset.id.get_space()
            if array.ndim:
                space.select_hyperslab((0,) * array.ndim, (1,) * array.ndim)
            dataset.id.write(h5py.h5s.create_simple((1,)), space,
                             np.ascontiguousarray(array.reshape(-1)[:1]), mtype=dataset.id.get_type())
            offset = dataset.id.get_offset()
            if offset is None:  # not contiguous: its bytes are HDF5's to place
                dataset[()] = array
                self.reusable = False
                continue
            extent = _Extent(offset, dataset.name, array.dtype, array.shape, source)
            self.extents.append((extent, array))
        self._created = []
        self._unplanned = []


def _save_variables(optimizer: Any, store: Any) -> None:
    for i, variable in enumerate(optimizer.variables):
        store[str(i)] = variable


@contextlib.contextmanager
def _optimizers_without_copies(model: Any) -> Iterator[None]:
    """Let the walk hand the store the optimizers' variables instead of copies of them.

    Keras's ``Optimizer.save_own_variables`` stores ``variable.numpy()``: a full copy of every
    slot, two thirds of an Adam checkpoint. Optimizers that use that base method get, for the
    walk only, the same loop storing the variables themselves, which the store reads in place.
    """
    patched = []
    base_method = _private_or(_compat.KERAS_SAVE_OWN_VARIABLES, None)
    optimizer = getattr(model, "optimizer", None) if base_method is not None else None
    while optimizer is not None:
        if type(optimizer).save_own_variables is base_method:
            optimizer.save_own_variables = functools.partial(_save_variables, optimizer)
            patched.append(optimizer)
        optimizer = getattr(optimizer, "inner_optimizer", None)  # LossScaleOptimizer
    try:
        yield
    finally:
        for optimizer in patched:
            del optimizer.save_own_variables


def _repair_skipset_cache() -> None:
    """Make Keras's per-type attribute skip-set cache hit from the next walk on.

    Keras 3.15's ``get_attr_skipset`` stores its result under ``saving_attr_skipset_<type>``
    but looks it up under ``saving_attr_skiplist_<type>``, so every object a save or load
    visits builds a throwaway reference ``Layer()`` (about 3 ms: a third of a second per save
    of a 100-layer model). Copying each stored value to the key that is read fixes that with
    Keras's own values; once Keras fixes the typo this finds nothing to copy.
    """
    apis = (_compat.KERAS_GLOBAL_STATE_TRACKER, _compat.KERAS_GET_GLOBAL_ATTRIBUTE,
            _compat.KERAS_SET_GLOBAL_ATTRIBUTE)
    if not all(_compat.available(api) for api in apis):
        return  # only a speed-up
    state, get, put = (_compat.resolve(api) for api in apis)  # thread-local, like the cache
    for key, value in list(vars(state).items()):
        if key.startswith("saving_attr_skipset_"):
            read_key = "saving_attr_skiplist_" + key[len("saving_attr_skipset_") :]
            if get(read_key) is None:
                put(read_key, value)


def _skipped(model: Any, include_optimizer: bool) -> set[int]:
    """Object ids for the saving walk to skip (Keras's own ``objects_to_skip`` mechanism)."""
    optimizer = getattr(model, "optimizer", None)
    if include_optimizer or optimizer is None:
        return set()
    return {id(optimizer)}


class Planned:
    """A Keras checkpoint file planned on the training thread, written by :meth:`write`.

    Its bytes are a list of segments: HDF5 metadata and small datasets (copied into the plan
    already) and, for each large dataset, a view of the variable's own memory. :meth:`snapshot`
    replaces those views with copies in reusable buffers, after which the variables may change
    (train) while :meth:`write` streams the file from another thread; the bytes are the same.
    """

    def __init__(
        self, segments: list[memoryview], live: list[tuple[int, str]],
        emit: Callable[[IO[bytes], list[memoryview]], None],
    ) -> None:
        self._segments = segments
        self._live = live  # (segment index, HDF5 dataset name) of each view of a variable
        self._emit = emit

    def snapshot(self, buffers: ReusableBuffers[np.ndarray]) -> None:
        """Copy every segment that views live memory into ``buffers`` (keyed by dataset name)."""
        pairs = []
        for index, name in self._live:
            source = self._segments[index]
            copy = buffers.take(name, source.nbytes)
            pairs.append((copy, np.frombuffer(source, dtype=np.uint8)))
            self._segments[index] = memoryview(copy)
        copy_all(pairs)
        buffers.end()
        self._live = []

    def write(self, fileobj_or_path: str | os.PathLike[str] | IO[bytes]) -> None:
        """Stream the file, from the start of a given file object (flushed, not closed) or into
        a path. Not fsynced: the caller does that."""
        with _output(fileobj_or_path) as out:
            self._emit(out, self._segments)


class _Layout(NamedTuple):
    """A planned file but its datasets' bytes: what a save of an unchanged model reuses.

    ``parts`` is the file in order: the bytes between two large datasets (HDF5 metadata, and
    zeros where a small dataset goes: ``patches`` says where, as (part index, offset in the
    part, extent index)), or the index in ``extents`` of a large dataset.
    """

    parts: tuple[bytes | int, ...]
    patches: tuple[tuple[int, int, int], ...]
    extents: tuple[_Extent, ...]


def _layout(image: _SparseImage, extents: list[_Extent]) -> _Layout:
    parts: list[bytes | int] = []
    gaps: list[tuple[int, int]] = []  # (file offset, part index) of each run of bytes
    small: list[int] = []
    pos = 0
    for index, extent in enumerate(extents):
        if extent.offset < pos:
            raise RuntimeError(f"HDF5 placed overlapping datasets at offset {extent.offset}")
        if extent.nbytes < _PLAN_MIN_BYTES:
            small.append(index)
            continue
        if extent.offset > pos:
            gaps.append((pos, len(parts)))
            parts.append(image.span(pos, extent.offset))
        parts.append(index)
        pos = extent.offset + extent.nbytes
    if pos > image.size:
        raise RuntimeError("HDF5 file ends inside a dataset")
    if pos < image.size:
        gaps.append((pos, len(parts)))
        parts.append(image.span(pos, image.size))
    patches = []
    for index in small:
        offset = extents[index].offset
        gap = bisect.bisect_right(gaps, (offset, len(parts))) - 1
        start, part = gaps[gap] if gap >= 0 else (0, -1)
        if part < 0 or offset + extents[index].nbytes > start + len(parts[part]):  # type: ignore[arg-type]
            raise RuntimeError(f"HDF5 placed overlapping datasets at offset {offset}")
        patches.append((part, offset - start, index))
    return _Layout(tuple(parts), tuple(patches), tuple(extents))


def _flat_bytes(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1).view(np.uint8)  # bfloat16 has no buffer format


def _assemble(
    layout: _Layout, values: list[np.ndarray],
) -> tuple[list[memoryview], list[tuple[int, str]]]:
    """The file's segments (the small datasets copied into their part, the large ones views of
    ``values``), and the (segment index, dataset name) of those views."""
    copies: dict[int, bytearray] = {}
    for part, within, index in layout.patches:
        buffer = copies.get(part)
        if buffer is None:
            buffer = copies[part] = bytearray(layout.parts[part])  # type: ignore[arg-type]
        data = _flat_bytes(values[index])
        buffer[within : within + data.nbytes] = memoryview(data)
    segments: list[memoryview] = []
    live: list[tuple[int, str]] = []
    for at, part in enumerate(layout.parts):
        if isinstance(part, int):
            live.append((len(segments), layout.extents[part].name))
            segments.append(memoryview(_flat_bytes(values[part])))
        else:
            segments.append(memoryview(copies.get(at, part)))
    return segments, live


def _current_values(
    layout: _Layout, state: bytes | None, arrays: Mapping[str, np.ndarray],
) -> list[np.ndarray] | None:
    """Each extent's bytes as of now, or None if one no longer fits its place in the file."""
    values = []
    for extent in layout.extents:
        if extent.source is _STATE:
            value = None if state is None else np.frombuffer(state, dtype=np.uint8)
        elif isinstance(extent.source, _ArrayName):
            value = arrays.get(extent.source.name)
        else:
            value = _to_host(extent.source)
        if value is None or value.dtype != extent.dtype or value.shape != extent.shape:
            return None
        values.append(value)
    return values


# Keras 3.15's classes whose savers store nothing but the saveable's variables themselves
# (the optimizer's is replaced by _save_variables during the walk), under names that only a
# change of the model's variables changes, and whose loaders only assign those variables from
# the store. Dense and its kin store a computed kernel with LoRA or quantization: that value
# is not a variable, and a layout is then not kept.
_VARIABLE_ONLY_CLASSES = (
    "layers.layer.Layer", "layers.core.dense.Dense", "layers.core.einsum_dense.EinsumDense",
    "layers.core.embedding.Embedding", "layers.convolutional.base_conv.BaseConv",
    "optimizers.base_optimizer.BaseOptimizer",
)
_VARIABLE_SAVERS = frozenset(f"keras.src.{c}.save_own_variables" for c in _VARIABLE_ONLY_CLASSES)
# Under _HeldAssigns these loaders have no effect before apply(). Any other (a preprocessing
# layer's derived state, a torch module's load_state_dict, a user's override) may act on the
# values at once, so a model with one loads after the checksum.
_ASSIGNING_LOADERS = frozenset(f"keras.src.{c}.load_own_variables" for c in _VARIABLE_ONLY_CLASSES)


def _only_methods_in(model: Any, method: str, allowed: frozenset[str], *,
                     assets: bool = True) -> bool:
    """Whether every saveable of ``model`` that has ``method`` has one of ``allowed`` (by
    qualified name), and, with ``assets=False``, none saves assets; False where this Keras
    lacks the walk that finds them."""
    if not all(_compat.available(api) for api in (_compat.KERAS_WALK_SAVEABLE,
                                                   _compat.KERAS_SAVEABLE)):
        return False
    for obj in _saveables(model):
        function = getattr(type(obj), method, None)
        if function is not None and f"{function.__module__}.{function.__qualname__}" not in allowed:
            return False
        if not assets and hasattr(obj, "save_assets"):
            return False
    return True


def _saves_only_variables(model: Any) -> bool:
    return _only_methods_in(model, "save_own_variables", _VARIABLE_SAVERS, assets=False)


class Layouts:
    """The layout of a front-end's last planned file, reused by its next plan while the model
    is unchanged: Keras's saving walk and HDF5's metadata cost ~0.4 ms per variable (a third
    of a second per save of a 1000-variable model), the same every save.

    "Unchanged": the same model, optimizer and variables (by identity), every layer in the
    same place (:func:`_placement`), the same
    ``include_optimizer``, ``arrays`` of the same names, dtypes and shapes, a state that fits
    the same slot, and a model whose every saver stores its variables and nothing else
    (:data:`_VARIABLE_SAVERS`; a user's own ``save_own_variables`` is walked every save). A
    front-end clears it when training starts and ends (a new ``compile`` may change
    everything).
    """

    def __init__(self) -> None:
        self._key: tuple[tuple[Any, ...], tuple[Any, ...]] | None = None
        self._layout: _Layout | None = None

    def clear(self) -> None:
        self._key = self._layout = None

    def _get(self, key: tuple[tuple[Any, ...], tuple[Any, ...]]) -> _Layout | None:
        if self._key is None or self._key[1] != key[1] or len(self._key[0]) != len(key[0]):
            return None
        if any(a is not b for a, b in zip(self._key[0], key[0])):
            return None
        return self._layout

    def _put(self, key: tuple[tuple[Any, ...], tuple[Any, ...]], layout: _Layout | None) -> None:
        # Holding the objects keeps their ids from being reused by others while the key exists.
        self._key, self._layout = (key, layout) if layout is not None else (None, None)


def _layout_key(
    model: Any, include_optimizer: bool, state: bytes | None, arrays: Mapping[str, np.ndarray],
    archive: bool,
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    optimizer = getattr(model, "optimizer", None)
    layers, places = _placement(model)
    objects = (model, optimizer, *model.variables, *getattr(optimizer, "variables", ()), *layers)
    values = (
        archive, include_optimizer, None if state is None else len(state),
        tuple((name, array.dtype, array.shape) for name, array in arrays.items()), places,
    )
    return objects, values


def _placement(model: Any) -> tuple[list[Any], tuple[str, ...]]:
    """Every layer held in an attribute of the model or of a layer in it (in a list, tuple or
    dict too), and that attribute's name.

    Keras's walk names a layer's group in the file by where it is held: two layers swapped
    between attributes (a target network and the online one) keep every variable, in the same
    order, and make another file.
    """
    layers: list[Any] = []
    places: list[str] = []
    seen = {id(model)}
    pending = [model]
    while pending:
        for name, value in vars(pending.pop()).items():
            if isinstance(value, dict):
                value = tuple(value.values())
            for child in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(child, keras.layers.Layer):
                    layers.append(child)
                    places.append(name)
                    if id(child) not in seen:
                        seen.add(id(child))
                        pending.append(child)
    return layers, tuple(places)


def _segments(
    model: Any, include_optimizer: bool, state: bytes | None, assets_dir: Any,
    arrays: Mapping[str, np.ndarray] | None = None, layouts: Layouts | None = None,
) -> tuple[list[memoryview], list[tuple[int, str]]]:
    """The weights file as an ordered list of byte segments that concatenate to the file, and
    the (index, dataset name) of the segments that view a variable's memory.

    ``state`` goes into :data:`STATE_MEMBER`, ``arrays`` under :data:`ARRAYS_GROUP`.
    ``assets_dir`` is a Keras ``DiskIOStore`` for ``.keras`` files (layers such as lookups
    save vocabularies there). With ``layouts``, the last file's layout is reused where it
    still fits (see :class:`Layouts`) and this one's kept for the next.
    """
    state = None if state is None else _padded(state)
    arrays = {name: _c_order(np.asarray(array)) for name, array in (arrays or {}).items()}
    key = None
    if layouts is not None:
        key = _layout_key(model, include_optimizer, state, arrays, assets_dir is not None)
        layout = layouts._get(key)
        values = None if layout is None else _current_values(layout, state, arrays)
        if values is not None:
            return _assemble(layout, values)  # type: ignore[arg-type]
    image = _SparseImage()
    # Large datasets start on 64-byte boundaries (in a .keras archive the member does too), so
    # resume can hand TF views of the bytes it read, which TF takes only so aligned.
    # A Ctrl-C inside h5py's calls into the image would surface as another error.
    with preemption.interrupts_deferred(), h5py.File(
        image, "w", alignment_threshold=_PLAN_MIN_BYTES, alignment_interval=_DATA_ALIGN,
    ) as h5_file, _optimizers_without_copies(model):
        store = _PlanningStore(h5_file)
        _compat.resolve(_compat.KERAS_SAVE_STATE)(
            model,
            weights_store=store,
            assets_store=assets_dir,
            inner_path="",
            visited_saveables=_skipped(model, include_optimizer),
        )
        for name, array in arrays.items():
            store.put(h5_file, f"{ARRAYS_GROUP}/{name}", array, _ArrayName(name))
        # Last, so its bytes end the file: a resume reads the last piece first, and the state
        # before anything else (arrays such as EarlyStopping's best weights are a model's size).
        if state is not None:
            store.put(h5_file, STATE_MEMBER, np.frombuffer(state, dtype=np.uint8), _STATE)
        store.allocate()
    _repair_skipset_cache()
    store.extents.sort(key=lambda pair: pair[0].offset)
    layout = _layout(image, [extent for extent, _ in store.extents])
    if layouts is not None and key is not None:
        layouts._put(key, layout if store.reusable and _saves_only_variables(model) else None)
    return _assemble(layout, [array for _, array in store.extents])


# --- Writing ----------------------------------------------------------------------------------


def plan_weights_h5(
    model: Any, *, state: bytes, include_optimizer: bool = True,
    arrays: Mapping[str, np.ndarray] | None = None, layouts: Layouts | None = None,
) -> Planned:
    """:func:`write_weights_h5`'s file, planned (nothing written yet); ``layouts``: see
    :class:`Layouts`."""
    segments, live = _segments(model, include_optimizer, state, None, arrays, layouts)
    return Planned(segments, live, _write_plain)


def _write_plain(raw: IO[bytes], segments: list[memoryview]) -> None:
    out = storage.EarlyWriteback(raw)
    for segment in segments:
        out.write(segment)


def write_weights_h5(
    model: Any, fileobj_or_path: str | os.PathLike[str] | IO[bytes], *, state: bytes,
    include_optimizer: bool = True, arrays: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write ``model``'s weights (and optimizer variables) as a Keras ``.weights.h5`` file.

    The file loads with ``model.load_weights(path)`` exactly as one from ``save_weights``
    (build the optimizer first for its variables to load, or use :func:`load_into`), and
    carries ``state`` under :data:`STATE_GROUP` (``arrays`` under :data:`ARRAYS_GROUP`).
    Written strictly front to back in one pass, from the start of a given file object (flushed,
    not closed) or into a path. Not fsynced: the caller does that.
    """
    plan_weights_h5(
        model, state=state, include_optimizer=include_optimizer, arrays=arrays
    ).write(fileobj_or_path)


@contextlib.contextmanager
def _output(fileobj_or_path: str | os.PathLike[str] | IO[bytes]) -> Iterator[IO[bytes]]:
    """A path is opened for writing and closed after; a given file object is flushed after."""
    if isinstance(fileobj_or_path, (str, os.PathLike)):
        with open(fileobj_or_path, "wb", buffering=0) as out:
            yield out
    else:
        yield fileobj_or_path
        fileobj_or_path.flush()


def _asset_files(root: str) -> Iterator[tuple[str, str]]:
    """(member name, file path) of every file under ``root``, as Keras's zip writer adds them."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            path = os.path.join(dirpath, filename)
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            yield f"{_ASSETS_DIR}/{relative}", path


def plan_keras(
    model: Any, *, state: bytes, include_optimizer: bool = True,
    arrays: Mapping[str, np.ndarray] | None = None, layouts: Layouts | None = None,
) -> Planned:
    """:func:`write_keras`'s archive, planned (nothing written yet). The zip timestamp is the
    time of planning, and assets are collected now: the plan is the model as it is now.
    ``layouts``: see :class:`Layouts`."""
    config_json, metadata_json = _compat.resolve(_compat.KERAS_SERIALIZE_MODEL)(model)
    assets = _compat.resolve(_compat.KERAS_DISK_IO_STORE)(_ASSETS_DIR, mode="w")
    members = [(_METADATA_MEMBER, metadata_json.encode()), (_CONFIG_MEMBER, config_json.encode())]
    try:
        segments, live = _segments(model, include_optimizer, state, assets, arrays, layouts)
        for name, path in _asset_files(assets.working_dir):
            with open(path, "rb") as asset:
                members.append((name, asset.read()))
    finally:
        assets.close()
    return Planned(
        segments, live,
        functools.partial(_write_archive, members=members, timestamp=time.time()),
    )


def write_keras(
    model: Any, fileobj_or_path: str | os.PathLike[str] | IO[bytes], *, state: bytes,
    include_optimizer: bool = True, arrays: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write ``model`` as a ``.keras`` archive that ``keras.models.load_model`` opens.

    Members: ``metadata.json`` and ``config.json`` (Keras's own serialization), any assets,
    and ``model.weights.h5`` last, holding ``state`` at :data:`STATE_MEMBER` (and ``arrays``
    under :data:`ARRAYS_GROUP`). With
    ``include_optimizer=False`` the optimizer's variables are left out of the weights (Keras
    3's ``model.save`` ignores that flag for ``.keras``); the config still records the compile
    arguments, so ``load_model`` returns a compiled model with a fresh optimizer.

    The archive is written strictly sequentially (no seek, no read-back), from the file
    object's current position. A given file object is flushed, not closed; a path is opened,
    written and closed. Nothing is fsynced: the caller does that.
    """
    plan_keras(
        model, state=state, include_optimizer=include_optimizer, arrays=arrays
    ).write(fileobj_or_path)


def _write_archive(
    out: IO[bytes], segments: list[memoryview], *, members: list[tuple[str, bytes]],
    timestamp: float,
) -> None:
    # The header fields zipfile writes, as in Keras's own files.
    archive = _zip.ZipWriter(storage.EarlyWriteback(out), timestamp=timestamp, unix_mode=0o600)
    for name, data in members:
        archive.add(name, data)
    archive.add_streamed(_WEIGHTS_MEMBER, segments, align=_DATA_ALIGN)
    archive.finish()


# --- Reading ----------------------------------------------------------------------------------

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# HDF5 looks for its signature at 0 and at every power of two from 512 (after a user block).
_HDF5_SIGNATURE_OFFSETS = (0, 512, 1024, 2048, 4096)


def file_format(path: str, source: storage.StreamedRead | None = None) -> str | None:
    """What ``path`` holds: ``"keras"`` (a zip with Keras's weights member), ``"h5"`` or None.

    Reads only the few bytes that tell, so a file of another framework (a torch ``.pt`` is a zip
    too) or a text file is recognised before a loader fails on it with a low-level error. With
    ``source`` the file is read through its descriptor (see :func:`load_into`).
    """
    with _raw(path, source) as f:
        if f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
            return "h5"
        # The zip before the other signature offsets: an archive's stored weights member, an
        # HDF5 file, may begin at one of them (a small model's at 4096).
        try:
            with zipfile.ZipFile(f) as archive:
                return "keras" if _WEIGHTS_MEMBER in archive.namelist() else None
        except zipfile.BadZipFile:
            pass
        for offset in _HDF5_SIGNATURE_OFFSETS[1:]:
            f.seek(offset)
            if f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                return "h5"
        return None


def read_state(path: str, source: storage.StreamedRead | None = None) -> bytes | None:
    """The training state embedded in a ``.keras``, ``.weights.h5`` or ``.h5`` file, or None.

    In every format it is the dataset :data:`STATE_MEMBER` of the HDF5 weights (in a ``.keras``
    archive: inside ``model.weights.h5``, read in place).
    """
    with _weights(path, source) as weights:
        dataset = weights.file.get(STATE_MEMBER)
        if not isinstance(dataset, h5py.Dataset):
            return None
        return np.asarray(dataset[()], dtype=np.uint8).tobytes().rstrip(b" ")


def holds_optimizer(path: str, source: storage.StreamedRead | None = None) -> bool:
    """Whether the ``.keras``, ``.weights.h5`` or legacy ``.h5`` file holds optimizer variables."""
    with _weights(path, source) as weights:
        return _OPTIMIZER_PATH in weights.file or _LEGACY_OPTIMIZER_PATH in weights.file


def read_legacy_optimizer(path: str, source: storage.StreamedRead | None = None) -> list[np.ndarray]:
    """The optimizer variables a legacy ``.h5`` file holds, in the optimizer's order ([] if none).

    Read here rather than by ``keras.models.load_model(compile=True)``, whose compile step cannot
    deserialize ``loss="mse"`` (Keras 3.15) and which keeps a fresh optimizer, with only a
    warning, when the saved variables do not fit it."""
    with _weights(path, source) as weights:
        group = weights.file.get(_LEGACY_OPTIMIZER_PATH)
        if not isinstance(group, h5py.Group):
            return []
        try:
            names = _legacy_attribute(group, "weight_names")
            return [np.asarray(group[name][()]) for name in names]
        except (KeyError, OSError, RuntimeError, TypeError, ValueError) as e:  # h5py's
            raise ValueError(f"{path} is a damaged HDF5 file ({e}); nothing was loaded") from None


def _legacy_attribute(group: h5py.Group, name: str) -> list[str]:
    """A list attribute as Keras's legacy writer stores it: whole, or in chunks name0, name1..."""
    chunks = [name] if name in group.attrs else []
    while f"{name}{len(chunks)}" in group.attrs:
        chunks.append(f"{name}{len(chunks)}")
    return [item.decode("utf-8") if isinstance(item, bytes) else str(item)
            for chunk in chunks for item in group.attrs[chunk]]


def read_arrays(path: str, source: storage.StreamedRead | None = None) -> dict[str, np.ndarray]:
    """The arrays the training state refers to (:data:`ARRAYS_GROUP`), by name; {} if none."""
    found: dict[str, np.ndarray] = {}
    with _weights(path, source) as weights:
        group = weights.file.get(ARRAYS_GROUP)
        if isinstance(group, h5py.Group):
            group.visititems(
                lambda name, obj: found.__setitem__(name, obj[()])
                if isinstance(obj, h5py.Dataset) else None
            )
    return found


class _Window(Positioned):
    """Read-only view of ``[start, start + length)`` of a file, as a file of its own.

    h5py reads a stored zip member through it in place. Keras's own route reads through
    ``ZipExtFile``, whose seeks h5py makes often: 4.3 s instead of 0.7 s for a 600 MB member.
    """

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self._fd, self._start, self._length = fd, start, length

    def _end(self) -> int:
        return self._length

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self._length - self._pos))
        done = 0
        while done < want:
            # Straight into HDF5's buffer; one call may return less (Linux caps it near 2 GiB).
            got = os.preadv(self._fd, [view[done:want]], self._start + self._pos + done)
            if not got:
                raise EOFError("zip member ends before its recorded size")
            done += got
        self._pos += done
        return done


# Datasets that large are taken from the verified image in place (the rest h5py reads).
_IN_PLACE_MIN_BYTES = _PLAN_MIN_BYTES


def _dataset_extent(dataset: h5py.Dataset, length: int) -> tuple[int, np.dtype, tuple[int, ...]] | None:
    """(offset in the HDF5 file, dtype, shape) of ``dataset`` if its bytes are the array's raw
    bytes in one contiguous range of the ``length``-byte file, else None (h5py reads it).

    ValueError for a range outside the file: the offset comes from the file, never trusted.
    """
    if "dtype" in dataset.attrs:
        return None  # bfloat16 is marked so, and Keras converts it
    dtype, shape = dataset.dtype, tuple(dataset.shape)
    if dtype.kind not in "iuf" or not dtype.isnative:
        return None
    nbytes = dtype.itemsize * math.prod(shape)
    dcpl = dataset.id.get_create_plist()
    if (nbytes < _IN_PLACE_MIN_BYTES or dcpl.get_layout() != h5py.h5d.CONTIGUOUS
            or dcpl.get_nfilters() or dcpl.get_external_count()):
        return None
    offset = dataset.id.get_offset()
    if offset is None or dataset.id.get_storage_size() != nbytes:
        return None
    if not 0 <= offset <= length - nbytes:
        raise ValueError(
            f"dataset {dataset.name!r} claims bytes [{offset}, {offset + nbytes}) of an HDF5 "
            f"file of {length} bytes"
        )
    return offset, dtype, shape


class _Weights(NamedTuple):
    file: h5py.File
    image: np.ndarray | None  # the HDF5 file's bytes in memory, as they arrive
    wait_for: Callable[[int, int], None]  # returns once image[start:stop] has arrived


def _arrived(start: int, stop: int) -> None:
    """:attr:`_Weights.wait_for` of bytes that are all there."""


class _DamagedFile(ValueError):
    """HDF5 structure that h5py or :func:`_dataset_extent` refused, met by :class:`_ReadStore`
    during Keras's walk (told apart from a file that is sound but does not fit the model)."""


class _ReadStore(_H5IOStore):
    """Keras's HDF5 weights store over an already opened ``h5py.File``.

    Given the HDF5 file's bytes in memory (``image``: a slice of a verified
    :class:`keras_ckpt.storage.StreamedRead` image), every large dataset stored as plain bytes
    is handed to Keras's ``assign`` as a view of those bytes, not read again by h5py (which
    would allocate an array per variable and copy into it); on TF the variable adopts the view
    without a copy (DLPack), so the image becomes the variables' memory.

    Args:
        h5_file: the weights, open.
        image: the HDF5 file's bytes, or None (h5py reads everything).
        extents: :func:`_dataset_extent` of the file's datasets by path (:func:`_check_datasets`);
            None: each is found when Keras asks for it (a loader that assigns nothing before
            the walk ends need not check them all first, and so need not wait for the last).
        wait_for: returns once ``image[start:stop]`` has been read (:attr:`_Weights.wait_for`),
            so a value handed out holds its final bytes, whatever Keras computes from it.
    """

    def __init__(
        self, h5_file: h5py.File, image: np.ndarray | None = None,
        extents: Mapping[str, tuple[int, np.dtype, tuple[int, ...]] | None] | None = None,
        wait_for: Callable[[int, int], None] = _arrived,
    ) -> None:
        self._file = h5_file
        self._image = image
        self._extents = extents
        self._wait_for = wait_for
        self._lent: list[tuple[int, int]] = []  # (start, stop) of the views handed out, sorted
        super().__init__("in-memory", mode="r")

    def _get_h5_file(self, path_or_io: Any, mode: str | None = None) -> h5py.File:
        return self._file

    def __getitem__(self, key: str) -> Any:
        extent = self._extent(key) if self._image is not None else None
        if extent is None:
            return super().__getitem__(key)
        offset, dtype, shape = extent
        nbytes = dtype.itemsize * math.prod(shape)
        self._wait_for(offset, offset + nbytes)
        if self._overlaps_lent(offset, offset + nbytes):
            # Two datasets over the same bytes (a crafted file): views would make two variables
            # share memory, so this one gets a copy.
            array = _stream.aligned_buffer(nbytes)
            array[:] = self._image[offset : offset + nbytes]  # type: ignore[index]
        else:
            array = _stream.aligned_view(self._image, offset, nbytes)  # type: ignore[arg-type]
        array = array.view(dtype).reshape(shape)
        if keras.backend.backend() == "tensorflow":
            # TF copies a NumPy array twice on the way into a variable (a defensive copy, then
            # a fresh tensor). A tensor wrapping the buffer (64-byte aligned, DLPack) is
            # assigned without a copy: the variable keeps that buffer.
            import tensorflow as tf

            return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
        return array

    def _overlaps_lent(self, start: int, stop: int) -> bool:
        """Whether ``[start, stop)`` overlaps a view already handed out; if not, it is one now."""
        at = bisect.bisect(self._lent, (start, stop))
        if (at and self._lent[at - 1][1] > start) or (at < len(self._lent) and self._lent[at][0] < stop):
            return True
        self._lent.insert(at, (start, stop))
        return False

    def _extent(self, key: str) -> tuple[int, np.dtype, tuple[int, ...]] | None:
        """:func:`_dataset_extent` of dataset ``key`` of the current group, None if it is not one
        (Keras's own read handles it)."""
        group = self._h5_entry_group
        if not isinstance(group, h5py.Group) or "/" in key:
            return None
        if self._extents is not None:
            # Paths as the visit of hard links found them: a soft or external link (which
            # Keras's read refuses) or a second hard link to a dataset is not among them.
            return self._extents.get(f"{group.name.rstrip('/')}/{key}")
        if not isinstance(group.get(key, getlink=True), h5py.HardLink):
            return None  # missing (Keras's KeyError), or a link Keras's read refuses
        try:
            dataset = group[key]  # not get(): it answers None for a dataset h5py cannot open
            return _dataset_extent(dataset, len(self._image)) if isinstance(dataset, h5py.Dataset) else None  # type: ignore[arg-type]
        except (KeyError, OSError, RuntimeError, ValueError) as e:  # h5py's, _dataset_extent's
            if isinstance(e, _stream.CorruptFile):
                raise
            raise _DamagedFile(str(e)) from e


@contextlib.contextmanager
def _raw(path: str, source: storage.StreamedRead | None) -> Iterator[IO[bytes]]:
    """The file unbuffered: ``source``'s bytes as they arrive (not yet vouched for by the
    checksum: see :func:`load_into`), else the file by name."""
    if source is None:
        with open(path, "rb", buffering=0) as f:
            yield f
    else:
        yield _stream.ArrivingFile(source.image, source.wait_for)


@contextlib.contextmanager
def _weights(path: str, source: storage.StreamedRead | None) -> Iterator[_Weights]:
    """The HDF5 weights of a ``.keras``, ``.weights.h5`` or ``.h5`` file, open; and, read
    through ``source``, their bytes in memory (image None: not stored in place, a compressed
    member, or read by name). Through ``source`` h5py parses the bytes as they arrive, before
    the checksum has vouched for them: what is made of them must not reach the model before
    ``source.verified()``."""
    with _raw(path, source) as raw:
        image = source.image if source is not None else None
        size = len(image) if image is not None else os.fstat(raw.fileno()).st_size
        base, length, h5_file = 0, size, None
        if zipfile.is_zipfile(raw):
            with zipfile.ZipFile(raw) as archive:
                info = archive.getinfo(_WEIGHTS_MEMBER)
                if info.compress_type != zipfile.ZIP_STORED:
                    h5_file = h5py.File(io.BytesIO(archive.read(info)), "r")
                    image = None
                else:
                    pread = raw.pread if image is not None else raw.fileno()  # type: ignore[attr-defined]
                    base, length = _zip.member_data_offset(pread, info), info.file_size
                    if base + length > size:  # from the file: never trusted
                        raise zipfile.BadZipFile(
                            f"{_WEIGHTS_MEMBER} claims bytes [{base}, {base + length}) of an "
                            f"archive of {size} bytes"
                        )
        wait_for = _arrived
        if image is not None:
            image = image[base : base + length]
            if source is not None:
                wait_for = functools.partial(_shifted, source.wait_for, base)
        if h5_file is None:
            try:
                h5_file = h5py.File(_stream.ArrivingFile(image, wait_for) if image is not None
                                    else _Window(raw.fileno(), base, length), "r")
            except OSError as e:  # h5py's refusal of a damaged superblock names no file
                raise ValueError(f"{path} is a damaged HDF5 file ({e}); nothing was loaded") from None
        with h5_file:
            yield _Weights(h5_file, image, wait_for)


def _shifted(wait_for: Callable[[int, int], None], base: int, start: int, stop: int) -> None:
    wait_for(base + start, base + stop)


def load_into(model: Any, path: str, source: storage.StreamedRead | None = None) -> None:
    """Load weights and, where the file has them, optimizer variables into ``model``.

    Works on ``.keras`` archives (ours or Keras's) and ``.weights.h5`` files. Keras's trap:
    after ``compile()`` the optimizer has no variables until its first step, and
    ``load_weights`` then skips the saved ones with only a warning (the iteration count
    silently restarts at 0). So a compiled model's optimizer is built here first. Assets are not
    reloaded: the model object already holds its own, as with ``load_weights``.

    With ``source`` (the file being read and checksummed by
    :meth:`keras_ckpt.storage.LocalStorage.stream`), nothing is assigned before the whole file
    has been read and matched its checksum (:class:`keras_ckpt.storage.CorruptFile` else); the
    large variables then take their bytes from that one read in place. On the TensorFlow
    backend Keras's loading walk runs while the file is still being read, each variable's value
    taken as its bytes arrive and held back (:class:`_HeldAssigns`) until the checksum matched,
    so what is left after the read is the assigns themselves; and a file that does not fit the
    model (a variable's shape, a missing layer) is refused with nothing assigned.
    """
    if not model.built:
        raise ValueError(
            f"load_into needs a built model (call it on data or build() it first); "
            f"received an unbuilt {type(model).__name__} for path={path!r}"
        )
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    held = source is not None and fast_read_available() and _holds_assigns(model)
    if source is not None and not held:
        source.verified()
    if not fast_read_available():
        _load_with_keras(model, path, source)
        return
    with _stream.prompt_handoffs() if held else contextlib.nullcontext(), \
            _weights(path, source) as weights:
        # Held assigns: a dataset found damaged midway leaves nothing assigned, so they need not
        # all be checked first.
        extents = None if held else _check_datasets(path, weights.file, weights.image)
        # A file saved without the optimizer keeps the optimizer's fresh state, without
        # Keras's variable-count warning.
        skip = {id(optimizer)} if optimizer is not None and _OPTIMIZER_PATH not in weights.file else set()
        if not skip:
            _check_optimizer_fits(path, weights.file, optimizer)
        failed: set[int] = set()
        errors: dict[int, Any] = {}
        with _HeldAssigns() if held else contextlib.nullcontext() as assigns:
            _compat.resolve(_compat.KERAS_LOAD_STATE)(
                model,
                weights_store=_ReadStore(weights.file, weights.image, extents, weights.wait_for),
                assets_store=None,
                inner_path="",
                visited_saveables=skip,
                failed_saveables=failed,
                error_msgs=errors,
            )
        if source is not None:
            source.verified()  # a corrupt file is why it did not fit, if it is
    _repair_skipset_cache()
    if failed:
        # Only found during the walk when it is held (else _check_datasets refused it first).
        damaged = [e for _, e in errors.values() if isinstance(e, _DamagedFile)]
        if damaged:
            raise ValueError(f"{path} is a damaged HDF5 file ({damaged[0]}); nothing was loaded") from None
        try:
            _compat.resolve(_compat.KERAS_RAISE_LOADING_FAILURE)(errors)
        except ValueError as e:
            done = "nothing was loaded" if held else "the objects before these were loaded"
            raise ValueError(f"{path} could not be loaded into the model ({done}): {e}") from None
    if assigns is not None:
        assigns.apply()


class _HeldAssigns(keras.StatelessScope):
    """Keras's scope in which ``variable.assign(value)`` checks and converts ``value`` but
    only records it (:meth:`apply` assigns), here in the order the loading walk made them."""

    def __init__(self) -> None:
        super().__init__(initialize_variables=False)
        self._assigns: list[tuple[Any, Any]] = []

    def add_update(self, update: tuple[Any, Any]) -> None:
        super().add_update(update)
        self._assigns.append(update)

    def apply(self) -> None:
        for variable, value in self._assigns:
            variable.assign(value)


def _holds_assigns(model: Any) -> bool:
    """Whether :func:`load_into` can run Keras's loading walk while the file is read: TF
    backend (the in-place values are DLPack tensors over the image, so a held value costs no
    memory; other backends would hold a converted copy of every variable beside the old ones),
    and only loaders of :data:`_ASSIGNING_LOADERS` in the model's saveable tree."""
    if keras.backend.backend() != "tensorflow" or not _only_methods_in(
        model, "load_own_variables", _ASSIGNING_LOADERS
    ):
        return False
    # That walk built the reference objects Keras skips attributes by, once per type (they
    # create variables, which a stateless scope refuses); once they are cached, a walk creates
    # nothing. Whether it does is tried, not assumed.
    _repair_skipset_cache()
    try:
        with keras.StatelessScope(initialize_variables=False):
            for _ in _saveables(model):
                pass
    except ValueError:
        return False
    return True


def _saveables(model: Any) -> Iterator[Any]:
    """Every saveable Keras's loading walk can visit from ``model`` (its own walk), once."""
    walk = _compat.resolve(_compat.KERAS_WALK_SAVEABLE)
    saveable_type = _compat.resolve(_compat.KERAS_SAVEABLE)
    seen: set[int] = set()
    pending: list[Any] = [model]
    while pending:
        obj = pending.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, saveable_type):
            yield obj
            pending.extend(child for _, child in walk(obj))
        elif isinstance(obj, (list, tuple, set)):
            pending.extend(obj)
        elif isinstance(obj, dict):
            pending.extend(obj.values())


def _check_datasets(
    path: str, h5_file: h5py.File, image: np.ndarray | None,
) -> dict[str, tuple[int, np.dtype, tuple[int, ...]] | None]:
    """Open every dataset (and, read in place, check where its bytes lie) before anything is
    assigned: Keras assigns layer by layer, so damaged metadata found midway would leave a
    partly loaded model. Returns each dataset's :func:`_dataset_extent` by its path (read in
    place; else {}), for :class:`_ReadStore`, which so opens none of them again."""
    extents: dict[str, tuple[int, np.dtype, tuple[int, ...]] | None] = {}

    def check(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and image is not None:
            extents["/" + name] = _dataset_extent(obj, len(image))

    try:
        h5_file.visititems(check)
    except (OSError, KeyError, RuntimeError, ValueError) as e:  # h5py's, and _dataset_extent's
        raise ValueError(f"{path} is a damaged HDF5 file ({e}); nothing was loaded") from None
    return extents


def _check_optimizer_fits(path: str, h5_file: h5py.File, optimizer: Any) -> None:
    """A ValueError naming ``path`` if the file's optimizer variables are not as many as
    ``optimizer``'s: Keras's own loader then skips them with only a warning, so the weights
    would load and the run go on with a fresh optimizer (another optimizer's checkpoint)."""
    base_loader = keras.optimizers.Optimizer.load_own_variables
    if optimizer is None or type(optimizer).load_own_variables is not base_loader:
        return  # an optimizer's own loader decides what fits it
    try:
        saved = h5_file.get(f"{_OPTIMIZER_PATH}/vars")
        count = len(saved) if isinstance(saved, h5py.Group) else 0
    except (KeyError, OSError, RuntimeError, ValueError) as e:  # h5py's, over damaged metadata
        raise ValueError(f"{path} is a damaged HDF5 file ({e}); nothing was loaded") from None
    if count != len(optimizer.variables):
        raise ValueError(
            f"{path} could not be loaded into the model (nothing was loaded): its optimizer has "
            f"{count} variables, the model's {type(optimizer).__name__} has "
            f"{len(optimizer.variables)}. Compile with the optimizer the file was saved with; to "
            "go on with another one, load the weights yourself (model.load_weights) and start a "
            "new run (resume=False)"
        )


def _load_with_keras(model: Any, path: str, source: storage.StreamedRead | None = None) -> None:
    """The public route: ``model.load_weights`` (the optimizer is already built; ``source``
    verified)."""
    with _weights(path, source) as weights:
        has_optimizer = _OPTIMIZER_PATH in weights.file
        if has_optimizer:
            _check_optimizer_fits(path, weights.file, getattr(model, "optimizer", None))
    with warnings.catch_warnings():
        if not has_optimizer:
            # Saved without the optimizer: it keeps its fresh state, as on the in-place route.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(path)


# --- Adding the state to files Keras wrote (when the fast writers cannot run) -----------------


def add_state_h5(
    target: str | IO[bytes], state: bytes, *, drop_optimizer: bool,
    arrays: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Add ``state`` at :data:`STATE_MEMBER` (``arrays`` under :data:`ARRAYS_GROUP`) to an HDF5
    file Keras wrote (a path or file object).

    ``drop_optimizer`` removes the optimizer's variables, which Keras's ``.keras`` and
    ``.weights.h5`` writers always include.
    """
    with h5py.File(target, "a") as f:
        if drop_optimizer and _OPTIMIZER_PATH in f:
            del f[_OPTIMIZER_PATH]
        f.create_dataset(STATE_MEMBER, data=np.frombuffer(_padded(state), dtype=np.uint8))
        for name, array in (arrays or {}).items():
            f.create_dataset(f"{ARRAYS_GROUP}/{name}", data=array)


def copy_keras_with_state(
    source: str, target: str, *, state: bytes, include_optimizer: bool = True,
    arrays: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Copy the ``.keras`` archive ``source`` (from ``model.save``) to ``target``, adding ``state``.

    The result has the same members, in the same order, with ``state`` inside the weights
    member, exactly where :func:`write_keras` puts it.
    """
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == _WEIGHTS_MEMBER:
                weights = io.BytesIO(data)
                add_state_h5(
                    weights, state, drop_optimizer=not include_optimizer, arrays=arrays
                )
                data = weights.getvalue()
            dst.writestr(info, data)
