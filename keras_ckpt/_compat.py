"""Every private Keras, TensorFlow and torch API keras_ckpt uses, named in one place.

Private APIs change without notice between releases. Each one used anywhere in the package is
listed here with the parameters the calling code passes, and ``tests/test_compat_*.py`` assert each
exists with that signature in the installed frameworks, so an upgrade fails loudly naming the
symbol instead of misbehaving. Where a public path exists, the caller falls back to it when
:func:`available` says the private one is gone.

Importing this module imports no framework: entries are looked up on demand.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class PrivateAPI:
    """One private symbol: ``module`` + dotted ``name``, and the parameters our code passes.

    ``params`` are checked to be accepted by the callable (by name); empty for non-callables.
    ``fallback`` says what the calling code does when the symbol is missing ("" = none: fatal).
    """

    framework: str
    module: str
    name: str
    params: tuple[str, ...] = ()
    used_by: str = ""
    fallback: str = ""


_SAVING_LIB = "keras.src.saving.saving_lib"
_FAST_WRITE = "_kerasio fast .keras/.weights.h5 writer"
_WRITE_FALLBACK = "Keras's own model.save/save_weights into the transaction's temp path, state added"
_FAST_READ = "_kerasio.load_into (reads a .keras weights member in place)"
_READ_FALLBACK = "model.load_weights (Keras's own reader)"
_FORMAT_NAME = "the literal name (it is part of the .keras file format)"

KERAS_SAVE_STATE = PrivateAPI(
    "keras", _SAVING_LIB, "_save_state",
    ("saveable", "weights_store", "assets_store", "inner_path", "visited_saveables"),
    _FAST_WRITE, _WRITE_FALLBACK,
)
KERAS_SERIALIZE_MODEL = PrivateAPI(
    "keras", _SAVING_LIB, "_serialize_model_as_json", ("model",), _FAST_WRITE, _WRITE_FALLBACK
)
KERAS_DISK_IO_STORE = PrivateAPI(
    "keras", _SAVING_LIB, "DiskIOStore", ("root_path", "mode"),
    _FAST_WRITE + " (assets; reads .working_dir, calls .close())", _WRITE_FALLBACK,
)
KERAS_H5_IO_STORE = PrivateAPI(
    "keras", _SAVING_LIB, "H5IOStore", ("path_or_io", "mode"),
    "_kerasio._PlanningStore/_ReadStore subclass it (and use its _h5_entry_path, "
    "_h5_entry_group, _h5_entry_initialized attributes)",
    _WRITE_FALLBACK + "; " + _READ_FALLBACK,
)
KERAS_H5_GET_FILE = PrivateAPI(
    "keras", _SAVING_LIB, "H5IOStore._get_h5_file", ("path_or_io", "mode"),
    "_kerasio._PlanningStore/_ReadStore override it", _WRITE_FALLBACK + "; " + _READ_FALLBACK,
)
KERAS_H5_CREATE_GROUP = PrivateAPI(
    "keras", _SAVING_LIB, "H5IOStore._create_h5_group", ("path",),
    "_kerasio._PlanningStore.__setitem__", _WRITE_FALLBACK,
)
KERAS_H5_SETITEM = PrivateAPI(
    "keras", _SAVING_LIB, "H5IOStore.__setitem__", ("key", "value"),
    "_kerasio._PlanningStore.__setitem__ (small arrays)", _WRITE_FALLBACK,
)
KERAS_LOAD_STATE = PrivateAPI(
    "keras", _SAVING_LIB, "_load_state",
    ("saveable", "weights_store", "assets_store", "inner_path", "visited_saveables",
     "failed_saveables", "error_msgs"),
    _FAST_READ, _READ_FALLBACK,
)
KERAS_RAISE_LOADING_FAILURE = PrivateAPI(
    "keras", _SAVING_LIB, "_raise_loading_failure", ("error_msgs",), _FAST_READ, _READ_FALLBACK
)
_DEFERRED_READ = ("_kerasio.load_into: which saveables' loaders only assign variables, so they "
                  "run while the file is still being read, their assigns held back until the "
                  "checksum matched")
_DEFERRED_FALLBACK = "the variables are loaded after the checksum, one by one"
KERAS_WALK_SAVEABLE = PrivateAPI(
    "keras", _SAVING_LIB, "_walk_saveable", ("saveable",), _DEFERRED_READ, _DEFERRED_FALLBACK
)
KERAS_SAVEABLE = PrivateAPI(
    "keras", "keras.src.saving.keras_saveable", "KerasSaveable", (), _DEFERRED_READ,
    _DEFERRED_FALLBACK,
)
KERAS_VARS_FNAME_H5 = PrivateAPI(
    "keras", _SAVING_LIB, "_VARS_FNAME_H5", (), "_kerasio: the weights member's name",
    _FORMAT_NAME,
)
KERAS_CONFIG_FILENAME = PrivateAPI(
    "keras", _SAVING_LIB, "_CONFIG_FILENAME", (), "_kerasio: the config member's name",
    _FORMAT_NAME,
)
KERAS_METADATA_FILENAME = PrivateAPI(
    "keras", _SAVING_LIB, "_METADATA_FILENAME", (), "_kerasio: the metadata member's name",
    _FORMAT_NAME,
)
KERAS_ASSETS_DIRNAME = PrivateAPI(
    "keras", _SAVING_LIB, "_ASSETS_DIRNAME", (), "_kerasio: the assets directory's name",
    _FORMAT_NAME,
)
KERAS_SAVE_OWN_VARIABLES = PrivateAPI(
    "keras", "keras.src.optimizers.base_optimizer", "BaseOptimizer.save_own_variables",
    ("store",), "_kerasio._optimizers_without_copies (identity test of the base method)",
    "no patch: Keras's walk stores copies of the optimizer slots",
)
KERAS_GLOBAL_STATE_TRACKER = PrivateAPI(
    "keras", "keras.src.backend.common.global_state", "GLOBAL_STATE_TRACKER", (),
    "_kerasio._repair_skipset_cache", "no repair (saves and loads just run slower)",
)
KERAS_GET_GLOBAL_ATTRIBUTE = PrivateAPI(
    "keras", "keras.src.backend.common.global_state", "get_global_attribute", ("name",),
    "_kerasio._repair_skipset_cache; keras.py: the global SeedGenerator",
    "no repair; the global SeedGenerator is not saved (layers' own generators still are)",
)
KERAS_SET_GLOBAL_ATTRIBUTE = PrivateAPI(
    "keras", "keras.src.backend.common.global_state", "set_global_attribute", ("name", "value"),
    "_kerasio._repair_skipset_cache", "no repair (saves and loads just run slower)",
)
KERAS_GLOBAL_SEED_GENERATOR = PrivateAPI(
    "keras", "keras.src.random.seed_generator", "GLOBAL_SEED_GENERATOR", (),
    "keras.py: the global SeedGenerator's global-state key",
    "the global SeedGenerator is not saved (layers' own generators still are)",
)
KERAS_PRINT_MSG = PrivateAPI(
    "keras", "keras.src.utils.io_utils", "print_msg", ("message",),
    "keras.py: verbose messages, routed like Keras's own (absl logging when enabled)", "print",
)
KERAS_SET_MONITOR_OP = PrivateAPI(
    "keras", "keras.src.callbacks.monitor_callback", "MonitorCallback._set_monitor_op", (),
    "keras.py: mode='auto' from the compiled metric's direction",
    "mode='auto' from the monitor's name only (an undecidable one is a ValueError)",
)
KERAS_INITIAL_EPOCH = PrivateAPI(
    "keras", "keras.src.trainers.trainer", "Trainer",
    (), "keras.py: resume sets model._initial_epoch (every backend's fit() reads it; "
    "tests/test_compat_keras.py checks that fit honours it)",
    "warn that resume restored the state but fit() will not skip the done epochs",
)
KERAS_CALLBACK_LIST = PrivateAPI(
    "keras", "keras.src.callbacks.callback_list", "CallbackList.set_model", ("model",),
    "_callbacks.Siblings.attach: the other callbacks of a fit are the .callbacks list of the "
    "CallbackList whose set_model calls ours (the calling frame's self); the checkpoint callback "
    "moves itself behind the stateful ones by assigning a reordered list to .callbacks "
    "(tests/test_compat_keras.py checks both)",
    "no other callback's state is saved or restored (a warning once)",
)
KERAS_EPOCH_ITERATOR = PrivateAPI(
    "keras", "keras.src.trainers.epoch_iterator", "EpochIterator._enumerate_iterator", (),
    "_fastforward.skip: fit()'s local `epoch_iterator` (found in fit's frame) gets, for the "
    "resumed epoch only, an instance attribute wrapping this generator of (begin_step, "
    "end_step, iterator) that consumes the already-trained batches without yielding them "
    "(tests/test_compat_keras.py checks fit still calls it)",
    "the interrupted epoch restarts at batch 0 (a warning says so)",
)
KERAS_SYMBOLIC_BUILD = PrivateAPI(
    "keras", "keras.src.trainers.trainer", "Trainer._symbolic_build", ("data_batch",),
    "_fastforward: builds the compiled metrics (tensorflow builds them when it traces the first "
    "step) so a mid-epoch resume can put back their running values (checks "
    "model._compile_metrics.built first)",
    "the interrupted epoch's logged metrics cover only the batches trained after the resume "
    "(a warning); weights and optimizer are restored either way",
)

KERAS: tuple[PrivateAPI, ...] = (
    KERAS_SAVE_STATE, KERAS_SERIALIZE_MODEL, KERAS_DISK_IO_STORE, KERAS_H5_IO_STORE,
    KERAS_H5_GET_FILE, KERAS_H5_CREATE_GROUP, KERAS_H5_SETITEM, KERAS_LOAD_STATE,
    KERAS_RAISE_LOADING_FAILURE, KERAS_VARS_FNAME_H5, KERAS_CONFIG_FILENAME,
    KERAS_METADATA_FILENAME, KERAS_ASSETS_DIRNAME, KERAS_SAVE_OWN_VARIABLES,
    KERAS_GLOBAL_STATE_TRACKER, KERAS_GET_GLOBAL_ATTRIBUTE, KERAS_SET_GLOBAL_ATTRIBUTE,
    KERAS_GLOBAL_SEED_GENERATOR, KERAS_PRINT_MSG, KERAS_SET_MONITOR_OP, KERAS_INITIAL_EPOCH,
    KERAS_CALLBACK_LIST, KERAS_EPOCH_ITERATOR, KERAS_SYMBOLIC_BUILD, KERAS_WALK_SAVEABLE,
    KERAS_SAVEABLE,
)
KERAS_FAST_WRITE: tuple[PrivateAPI, ...] = (
    KERAS_SAVE_STATE, KERAS_SERIALIZE_MODEL, KERAS_DISK_IO_STORE, KERAS_H5_IO_STORE,
    KERAS_H5_GET_FILE, KERAS_H5_CREATE_GROUP, KERAS_H5_SETITEM,
)
"""All of these or none: the fast writers need every one."""
KERAS_FAST_READ: tuple[PrivateAPI, ...] = (
    KERAS_LOAD_STATE, KERAS_RAISE_LOADING_FAILURE, KERAS_H5_IO_STORE, KERAS_H5_GET_FILE,
)
"""All of these or none: the in-place reader needs every one."""
_TF_SNAPSHOT = "keras_ckpt._tfsnapshot (the TF2 CheckpointManager's async_save)"
_TF_SNAPSHOT_FALLBACK = "async_save writes synchronously, with a warning"
TF_GATHER_SERIALIZED_TENSORS = PrivateAPI(
    "tensorflow", "tensorflow.python.checkpoint.checkpoint",
    "TrackableSaver._gather_serialized_tensors", ("object_graph_tensor",),
    _TF_SNAPSHOT + ": what Checkpoint.write would save (called on checkpoint._saver), "
    "returning (serialized tensors, feed additions, registered savers, object graph proto)",
    _TF_SNAPSHOT_FALLBACK,
)
TF_MULTI_DEVICE_SAVER = PrivateAPI(
    "tensorflow", "tensorflow.python.checkpoint.functional_saver", "MultiDeviceSaver",
    ("serialized_tensors", "registered_savers"),
    _TF_SNAPSHOT + ": Checkpoint.write's own saver, over the snapshot's tensors",
    _TF_SNAPSHOT_FALLBACK,
)
TF_MULTI_DEVICE_SAVER_SAVE = PrivateAPI(
    "tensorflow", "tensorflow.python.checkpoint.functional_saver", "MultiDeviceSaver.save",
    ("file_prefix", "options"), _TF_SNAPSHOT + " (on the background writer)",
    _TF_SNAPSHOT_FALLBACK,
)
TF_SAVE_SPEC = PrivateAPI(
    "tensorflow", "tensorflow.python.training.saving.saveable_object", "SaveSpec",
    ("tensor", "slice_spec", "name", "dtype", "device"),
    _TF_SNAPSHOT + ": the gathered values are SaveSpecs (.tensor, .device; a callable tensor "
    "reads the variable) or tensors; the snapshot's are SaveSpecs of its buffers",
    _TF_SNAPSHOT_FALLBACK,
)
TF_SNAPSHOT: tuple[PrivateAPI, ...] = (
    TF_GATHER_SERIALIZED_TENSORS, TF_MULTI_DEVICE_SAVER, TF_MULTI_DEVICE_SAVER_SAVE, TF_SAVE_SPEC,
)
"""All of these or none: the TF2 snapshot needs every one."""
TENSORFLOW: tuple[PrivateAPI, ...] = (
    *TF_SNAPSHOT,
    # Not called by keras_ckpt but overridden: TPUEstimator tells every CheckpointSaverHook how
    # many steps one session.run advances through it. Valid in TF 2.15 and 2.21.
    PrivateAPI(
        "tensorflow",
        "tensorflow",
        "compat.v1.train.CheckpointSaverHook._set_steps_per_run",
        params=("steps_per_run",),
        used_by="keras_ckpt.estimator.CheckpointHook._set_steps_per_run (its override)",
        fallback="none needed: if TF stops calling it, the hook keeps its default (a save may be "
        "due after any run, one extra global-step read per run)",
    ),
)
TORCH_SAVE = PrivateAPI(
    "torch",
    "torch.serialization",
    "_save",
    params=("obj", "zip_file", "pickle_module", "pickle_protocol", "_disable_byteorder_record"),
    used_by="keras_ckpt.torch._torch_save: torch's pickling step, into keras_ckpt's own zip "
    "writer (called as write_record(name, str-or-CPU-UntypedStorage, size))",
    fallback="torch.save (torch's C++ zip writer: the CRC-32s on one core before each write)",
)
_TORCH_FAST_READ = ("keras_ckpt.torch._load_image: torch.load's zip reading step over the verified "
                    "image, its tensors views of it (overall_storage, as torch.load(mmap=True))")
_TORCH_READ_FALLBACK = "torch.load(weights_only=True) of the verified image (one copy more)"
TORCH_LOAD = PrivateAPI(
    "torch", "torch.serialization", "_load",
    params=("zip_file", "map_location", "pickle_module", "overall_storage"),
    used_by=_TORCH_FAST_READ, fallback=_TORCH_READ_FALLBACK,
)
TORCH_FILE_READER = PrivateAPI(
    "torch", "torch._C", "PyTorchFileReader", used_by=_TORCH_FAST_READ + " (over a file object)",
    fallback=_TORCH_READ_FALLBACK,
)
TORCH_WEIGHTS_ONLY_UNPICKLER = PrivateAPI(
    "torch", "torch", "_weights_only_unpickler",
    used_by=_TORCH_FAST_READ + " (the pickle_module torch.load uses for weights_only=True)",
    fallback=_TORCH_READ_FALLBACK,
)
TORCH_FAST_READ: tuple[PrivateAPI, ...] = (TORCH_LOAD, TORCH_FILE_READER, TORCH_WEIGHTS_ONLY_UNPICKLER)
TORCH: tuple[PrivateAPI, ...] = (TORCH_SAVE, *TORCH_FAST_READ)

ALL: tuple[PrivateAPI, ...] = KERAS + TENSORFLOW + TORCH


def resolve(api: PrivateAPI) -> object:
    """The object ``api`` names; AttributeError/ImportError naming the symbol if it is gone."""
    obj: object = importlib.import_module(api.module)
    for part in api.name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(
                f"keras_ckpt needs the private {api.framework} API {api.module}.{api.name}, which "
                "this version does not have (keras_ckpt/_compat.py lists what is used where)"
            ) from None
    return obj


def check(api: PrivateAPI) -> None:
    """Raise if ``api`` is missing or no longer accepts the parameters our code passes."""
    obj = resolve(api)
    if not api.params:
        return
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # builtins without a signature: existence is what we can check
        return
    accepted = sig.parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    missing = [p for p in api.params if p not in accepted and not takes_kwargs]
    if missing:
        raise TypeError(
            f"the private {api.framework} API {api.module}.{api.name} no longer takes "
            f"{', '.join(missing)} (signature now {sig}); keras_ckpt/_compat.py lists its users"
        )


def available(api: PrivateAPI) -> bool:
    """Whether ``api`` exists with the expected signature (callers with a fallback ask this)."""
    try:
        check(api)
    except (ImportError, AttributeError, TypeError):
        return False
    return True
