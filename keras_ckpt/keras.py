"""Keras 3 front-end: ``keras_ckpt.ModelCheckpoint``, a drop-in superset of Keras's own."""

from __future__ import annotations

import base64
import functools
import inspect
import json
import os
import types
import warnings
from typing import Any

import keras
import numpy as np

from keras_ckpt import _callbacks, _compat, _fastforward, _kerasio, rng
from keras_ckpt._async import ReusableBuffers
from keras_ckpt.checkpointer import CheckpointAttributes, Checkpointer, Payload, check_state
from keras_ckpt.config import CheckpointConfig, check_filepath
from keras_ckpt.engine import Transaction
from keras_ckpt.policy import UNSET
from keras_ckpt.storage import StreamedRead

_SEED_STATE = "seed_generator_state"


class ModelCheckpoint(CheckpointAttributes, keras.callbacks.ModelCheckpoint):
    """Keras's ``ModelCheckpoint`` plus rotation, best-N, full training state and exact resume.

    Every argument and behaviour of ``keras.callbacks.ModelCheckpoint`` keeps working. On top of
    them it keeps the latest N ∪ the best N ∪ every N-th epoch ∪ one per N hours, writes each file
    atomically (a crash never destroys a committed checkpoint) with a checksum in the directory's
    ``checkpoints.json``, stores the whole training state in each file (weights, optimizer
    variables and iterations, SeedGenerator states, numpy/Python/backend RNGs, epoch, step and
    this callback's best-N state, and the state of the other callbacks of the same ``fit``:
    EarlyStopping, ReduceLROnPlateau, any callback with ``state_dict()``/``load_state_dict()``;
    CSVLogger appends on resume) and, with ``resume=True``, continues an interrupted ``fit`` at
    the next epoch, bit for bit — or, from a mid-epoch checkpoint, at the next batch of the
    interrupted epoch: its shuffle is drawn again from the RNGs saved as it began, the batches
    already trained are read and dropped without a training step, and its running metrics are
    put back (numpy, ``PyDataset`` and fixed-order ``tf.data`` inputs; docs/faq.md says which
    inputs cannot be replayed). So that an epoch's checkpoint holds those callbacks' state after
    that epoch, this callback runs after them in ``fit`` wherever it is listed.

    Example:

    ```python
    ckpt = keras_ckpt.ModelCheckpoint(
        "runs/a/ckpt-{epoch:03d}.keras", monitor="val_accuracy", mode="max",
        max_to_keep=3, keep_best=2, resume=True)
    model.fit(x, y, validation_split=0.2, epochs=20, callbacks=[ckpt])
    ckpt.best, ckpt.best_path        # 0.97, "runs/a/ckpt-012.keras"
    ```

    Args:
        filepath: where to save, a template as in Keras (``{epoch:02d}``, ``{batch}``, log keys).
            Ends in ``.keras`` (full model), ``.weights.h5`` (with ``save_weights_only=True``)
            or ``.h5`` (legacy).
        monitor, verbose, save_best_only, save_weights_only, mode, save_freq,
            initial_value_threshold: as in ``keras.callbacks.ModelCheckpoint``.
        max_to_keep: keep the N most recent checkpoints (None: all). The newest is never deleted.
        keep_best: also keep the N best by ``monitor``/``mode`` (with rotation on, the single best
            is kept even at 0).
        keep_every_n_epochs: never delete the checkpoint of every N-th epoch.
        keep_every_n_hours: never delete one checkpoint per N hours of training (wall clock, as
            recorded in the manifest, so it survives restarts).
        save_every_n_seconds: also save when this many seconds passed since the last save.
        save_optimizer: save the optimizer variables and iteration count. The bookkeeping
            (epoch, step, RNG, best-N state) is saved either way.
        resume: ``True``: at train begin, restore the newest checkpoint of this directory that
            verifies and continue at the next epoch (``fit(epochs=N)`` trains the remaining ones;
            no checkpoint yet: start fresh). A path: restore from that file or directory (e.g. a
            read-only copy of an earlier job's output) and write new checkpoints to ``filepath``.
            ``False`` starts fresh, with a warning if ``filepath`` already has checkpoints from an
            earlier run (they stay in its rotation and best-N).
        preset: ``"short"`` (keep latest 1 + best 1), ``"normal"`` (latest 10 + best 1) or
            ``"long"`` (save every 5 epochs or hourly, keep latest 20 + best 3 + one per day);
            it fills in only the arguments you did not pass.
        save_on_preemption: ``True`` (the default): during ``fit``, SIGTERM or SIGUSR1 (what
            Kubernetes, spot VMs and SLURM send before they kill a job) makes the callback save
            a checkpoint at the next batch end, named and resumable like a mid-epoch save (even
            if none is due; ``save_best_only`` still applies), and stop training; when ``fit``
            returns (``on_train_end``) the handlers installed before are restored and the signal
            is re-delivered to them: the default action ends the process with status 143 for
            SIGTERM (138 for SIGUSR1), and your own handler, if you installed one, runs. The
            handler only sets a flag, so a signal during a save never interrupts it; at most the
            batch in progress is lost. A tuple of signals replaces the default pair; ``False``
            leaves signal handling alone. Handlers are installed in ``on_train_begin`` from the
            main thread only (elsewhere nothing is installed). If ``fit`` raises (no
            ``on_train_end``), the handler notices when a signal comes that ``fit`` is no longer
            running and re-delivers it at once; the next ``on_train_begin`` restores the previous
            handlers first. Put this callback last in ``callbacks`` if the others need their
            ``on_train_end`` too: the default action of the signal ends the process in ours.
            ``preempted`` tells whether it happened. A run resumed from that checkpoint goes on
            at the next batch, as from any mid-epoch checkpoint.
        async_save: ``True``: a save copies the weights and optimizer variables into host
            buffers (allocated at the first save, reused by the next ones; one more copy of the
            state in memory) and returns to training; a background thread writes, checksums,
            fsyncs, commits and prunes. At most one save is in flight: the next one waits for
            it, so decisions (``save_best_only``, best-N, rotation) and ``checkpoints``,
            ``best_path``, ``latest_path`` see committed checkpoints only. An error of the
            background write (a full disk) is raised at the next save or in ``on_train_end``;
            ``on_train_end``, the preemption save (always synchronous) and interpreter exit wait
            for the save in flight. The files are byte for byte those of a synchronous save.
            Legacy ``.h5`` files (Keras's own writer) are saved synchronously.
    """

    def __init__(
        self,
        filepath: str | os.PathLike,
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        *,
        max_to_keep: int | None = UNSET,
        keep_best: int = UNSET,
        keep_every_n_epochs: int | None = UNSET,
        keep_every_n_hours: float | None = UNSET,
        save_every_n_seconds: float | None = UNSET,
        save_optimizer: bool = True,
        resume: bool | str | os.PathLike = False,
        preset: str | None = None,
        save_on_preemption: bool | tuple = True,
        async_save: bool = False,
    ) -> None:
        filepath = check_filepath(filepath)  # Keras's base class would fail on ``filepath.endswith``
        # Before Keras's base class: it takes any truthy value as True and then blames filepath.
        save_weights_only = _flag("save_weights_only", save_weights_only)
        save_optimizer = _flag("save_optimizer", save_optimizer)
        super().__init__(
            filepath,
            monitor=monitor,
            verbose=verbose,
            save_best_only=save_best_only,
            save_weights_only=save_weights_only,
            mode=mode,
            save_freq=save_freq,
            initial_value_threshold=initial_value_threshold,
        )
        if not save_weights_only and self.filepath.endswith(".weights.h5"):
            # Keras accepts it (it ends in ".h5") and then writes a legacy whole-model file under
            # a weights-only name.
            raise ValueError(
                "A `.weights.h5` filepath holds weights only: pass save_weights_only=True, or use "
                f"a `.keras` filepath to save the whole model. Received: filepath={self.filepath}"
            )
        self.save_optimizer = save_optimizer
        # Keras's base class already warned about an unknown mode and fell back to "auto".
        config = CheckpointConfig.from_arguments(locals(), mode=self.mode, owner=type(self).__name__)
        self._core = Checkpointer(config, framework="keras", print_fn=_print_msg)
        self._snapshots: ReusableBuffers[np.ndarray] = ReusableBuffers(
            lambda nbytes: np.empty(nbytes, dtype=np.uint8)
        )
        self._layouts = _kerasio.Layouts()  # the last file's layout, for the next save's plan
        self._resume_pending = resume is not False
        self._resumed_mid_epoch: _fastforward.Resumed | None = None
        self._resumed_epoch: _fastforward.Resumed | None = None  # while that epoch runs
        self._siblings = _callbacks.Siblings(self)
        if not self._core.needs_batch_events:
            # Without a batch-end hook Keras may dispatch batch callbacks asynchronously, so steps
            # that do not save cost nothing (stock ModelCheckpoint always defines one). The
            # preemption check then runs at batch begin, which Keras calls on the training thread.
            self.on_train_batch_end = types.MethodType(
                keras.callbacks.Callback.on_train_batch_end, self
            )

    # -- attributes ---------------------------------------------------------------------------

    @property
    def best(self) -> float | None:
        """The best ``monitor`` value so far (this series, across restarts), or None."""
        core = self.__dict__.get("_core")
        return core.best if core is not None else self.__dict__.get("_baseline")

    @best.setter
    def best(self, value: float | None) -> None:
        # Keras's base class assigns ``best`` (its baseline) before the engine exists.
        if "_core" not in self.__dict__:
            self.__dict__["_baseline"] = value

    # -- training events ----------------------------------------------------------------------

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        # fit's CallbackList calls this on each of its callbacks, before any on_train_begin.
        self._siblings.attach(inspect.currentframe().f_back, resume=self._resume_pending)

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._layouts.clear()  # whatever changed between two fits is planned afresh
        if not self._resume_pending:
            self._core.resume = False
        path = self._core.begin(infer_mode=self._infer_mode)
        self._resume_pending = False
        self.monitor_op = keras.ops.less if self._core.policy.mode == "min" else keras.ops.greater
        if path is not None:
            try:
                self._restore(path)
            except BaseException:
                self._siblings.end()
                self._core.end()
                raise
        self._siblings.begin(self._core.epochs_done if path is not None else None)
        # The loop frame is fit's (the outermost Keras frame): once it is gone, fit has ended.
        self._core.preemption.install(inspect.currentframe(), through=("keras",), loop=("keras",))

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._current_epoch = epoch
        # Keras read ``_initial_epoch`` (our resume point) before the first epoch began. Clear it
        # now: a fit() that raises skips on_train_end, and the next fit() would skip epochs.
        self._clear_initial_epoch()
        self._core.on_epoch_begin(epoch)
        resumed, self._resumed_mid_epoch = self._resumed_mid_epoch, None
        self._resumed_epoch = None
        if resumed is not None and epoch == self._core.epochs_done:
            self._resumed_epoch = resumed
            # The interrupted epoch again: its batch order and its saves' epoch_rng are the
            # checkpoint's, and its first start_batch batches are already trained.
            self._core.epoch_rng = resumed.epoch_rng
            _fastforward.skip(inspect.currentframe(), self.model, resumed, self._core.start_batch)
        else:
            self._core.mark_epoch_begin(_global_rng())

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self._replayed(batch):
            return
        if batch and self._core.preemption.requested and not self._core.needs_batch_events:
            # Batches 0..batch-1 are trained: the state a save at the last batch end would hold.
            # (Keras still trains this batch before it sees stop_training; it is not saved.)
            self._save(self._current_epoch, batch - 1, logs)
            self._stop_for_preemption()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._replayed(batch):
            return
        due = self._core.needs_batch_events and self._core.batch_due(batch)
        preempt = self._core.preemption.requested
        if due or preempt:
            self._save(self._current_epoch, batch, logs)
        if preempt:
            self._stop_for_preemption()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._core.preemption.preempted:
            return  # stopped mid-epoch: this epoch is not done, and its state is saved
        due = self._core.epoch_due(epoch)
        preempt = self._core.preemption.requested
        if due or preempt:
            self._save(epoch, None, logs)
        if preempt:
            self._stop_for_preemption()

    def on_train_end(self, logs: dict | None = None) -> None:
        # Also here: a resume that left no epoch to train never reaches on_epoch_begin.
        self._clear_initial_epoch()
        guard = self._core.preemption
        try:
            # First: a signal that arrives while the save in flight commits is acted on below.
            self._core.wait()
            if guard.requested:  # the signal came after the last epoch end's save decision
                self._core.step = self._iterations()
                if not self._core.saved_current_step():
                    self._save(max(self._core.epochs_done - 1, 0), None, logs)
                guard.preempted = True
        finally:
            self._layouts.clear()
            self._siblings.end()
            self._core.end()
        if guard.received:  # also one that came after the check above, until end() restored
            guard.redeliver()

    def _replayed(self, batch: int) -> bool:
        """Whether ``batch`` is the resumed epoch's already-trained last batch, which fit steps
        through again without training (see _fastforward) and which is already saved."""
        resumed = self._resumed_epoch
        return resumed is not None and resumed.replayed == batch

    def _stop_for_preemption(self) -> None:
        self._core.preemption.preempted = True
        self.model.stop_training = True

    def _clear_initial_epoch(self) -> None:
        # Keras reads ``_initial_epoch`` in every fit(): left set, the next fit would skip epochs.
        if self.model is not None and getattr(self.model, "_initial_epoch", None) is not None:
            self.model._initial_epoch = None

    # -- saving -------------------------------------------------------------------------------

    def _save(self, epoch: int, batch: int | None, logs: dict | None) -> None:
        self._core.step = self._iterations()
        self._core.save(epoch, batch, logs, self._capture)

    def _iterations(self) -> int:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return self._core.step
        return int(keras.ops.convert_to_numpy(optimizer.iterations))

    def _capture(self, path: str, state: dict, snapshot: bool) -> Payload:
        """The file's content as of now; with ``snapshot``, copied out of the variables."""
        state["keras"] = self._keras_state()
        if state["batch"] is not None:
            # The epoch's running metrics (loss and compiled metrics so far): a resume that
            # skips the trained batches continues them, so the epoch's logs are the straight run's.
            state["keras"]["fit_metrics"] = _fastforward.metric_values(self.model)
        # The other callbacks' state: JSON here, its arrays as HDF5 datasets beside it.
        state["keras"]["callbacks"], arrays = self._siblings.capture()
        blob = json.dumps(state).encode("utf-8")
        include_optimizer = self.save_optimizer
        fast = _kerasio.fast_write_available()
        if fast and path.endswith((".keras", ".weights.h5")):
            plan = _kerasio.plan_keras if path.endswith(".keras") else _kerasio.plan_weights_h5
            planned = plan(self.model, state=blob, include_optimizer=include_optimizer,
                           arrays=arrays, layouts=self._layouts)
            if snapshot:
                planned.snapshot(self._snapshots)
            return Payload(functools.partial(_write_planned, planned), detached=snapshot)
        # Keras's own writers read the live variables: written before the save returns.
        return Payload(lambda tx: self._write_with_keras(tx, path, blob, arrays), detached=False)

    def _write_with_keras(self, tx: Transaction, path: str, blob: bytes, arrays: dict) -> None:
        include_optimizer = self.save_optimizer
        if path.endswith(".keras"):  # Keras's own writer, then the archive copied with our state
            scratch = os.path.join(tx.staging_dir(), "model.keras")
            self.model.save(scratch)
            _kerasio.copy_keras_with_state(
                scratch, tx.temp_path(), state=blob, include_optimizer=include_optimizer,
                arrays=arrays,
            )
        elif path.endswith(".weights.h5"):  # Keras's own writer, then our state beside its data
            tmp = tx.temp_path()
            self.model.save_weights(tmp, overwrite=True)
            _kerasio.add_state_h5(tmp, blob, drop_optimizer=not include_optimizer, arrays=arrays)
        else:  # legacy .h5: always Keras's own writer (it honours include_optimizer)
            tmp = tx.temp_path()
            self.model.save(tmp, overwrite=True, include_optimizer=include_optimizer)
            _kerasio.add_state_h5(tmp, blob, drop_optimizer=False, arrays=arrays)

    def _keras_state(self) -> dict[str, Any]:
        """What Keras's files leave out: SeedGenerator states and the backend's global RNG."""
        seeds = {
            v.path: [int(x) for x in keras.ops.convert_to_numpy(v).ravel()]
            for v in self._seed_variables()
        }
        return {"backend": keras.backend.backend(), "seed_generators": seeds, **_global_rng()}

    def _seed_variables(self) -> list:
        found = [v for v in self.model.variables if v.name == _SEED_STATE]
        apis = (_compat.KERAS_GET_GLOBAL_ATTRIBUTE, _compat.KERAS_GLOBAL_SEED_GENERATOR)
        if all(_compat.available(api) for api in apis):
            get, key = (_compat.resolve(api) for api in apis)
            gen = get(key)
            if gen is not None:
                found.append(gen.state)
        return found

    # -- restoring ----------------------------------------------------------------------------

    def _restore(self, path: str) -> None:
        # Read once and checksummed before anything is assigned; a corrupt file is skipped for
        # the previous checkpoint.
        path, state = self._core.load(path, self._load_file)
        if state is None:
            warnings.warn(
                f"{path} holds no keras_ckpt training state (a stock Keras file?): restored the "
                "weights only; epochs, RNG and best-N bookkeeping start fresh.",
                stacklevel=3,
            )
        else:
            keras_state = state.get("keras") or {}
            self._restore_keras_state(keras_state)
            self._siblings.restore(
                keras_state.get("callbacks"), lambda: _kerasio.read_arrays(path)
            )
        self._core.restored(path, state)
        if self._siblings.finished:
            # EarlyStopping had ended this run: the resumed fit trains no further epochs (the
            # straight run would not have either); EarlyStopping's on_train_end still runs.
            epochs = max(self._core.epochs_done, int((self.params or {}).get("epochs") or 0))
            self._set_initial_epoch(epochs)
            if self.verbose > 0:
                _print_msg(f"Restored {path}: EarlyStopping had stopped this run; no epochs left.")
        elif self._core.epochs_done:
            self._set_initial_epoch(self._core.epochs_done)
        if state and state.get("batch") is not None:
            self._resumed_mid_epoch = _fastforward.Resumed(
                path=path,
                epoch_rng=self._core.epoch_rng,
                batch_rng={"rng": state.get("rng"),
                           "torch_rng": (state.get("keras") or {}).get("torch_rng")},
                restore_rng=_restore_rng,
                enter_epoch=lambda: self._core.enter_epoch_rng(
                    _restore_rng, lambda: {"rng": rng.capture(), **_global_rng()}
                ),
                ran_out=self._core.input_ran_out,
                metrics=(state.get("keras") or {}).get("fit_metrics"),
            )
        if self.verbose > 0:
            _print_msg(
                f"Restored {path}: continuing at epoch {self._core.epochs_done + 1} "
                f"(step {self._core.step}, best {self.monitor}="
                f"{'None' if self.best is None else f'{self.best:.5f}'})"
            )

    def _load_file(self, path: str, source: StreamedRead | None) -> dict[str, Any] | None:
        """Load the model's and optimizer's variables from ``path`` (through ``source``, the
        stream that checksums it, where given: nothing is assigned before the file matched its
        checksum); return the training state."""
        self._check_format(path, source)
        # Decoded first: a damaged state (whose checksum the manifest may still vouch for)
        # must be refused before any variable is assigned.
        state = _decode_state(path, _kerasio.read_state(path, source))
        check_state(path, state)
        if path.endswith(".h5") and not path.endswith(".weights.h5"):
            if source is not None:
                source.verified()  # Keras's legacy loader assigns as it reads the file
            self._load_legacy_h5(path, source)
        else:
            _kerasio.load_into(self.model, path, source)
        return state

    def _check_format(self, path: str, source: StreamedRead | None = None) -> None:
        """A ValueError naming ``resume`` for a file no Keras loader reads (e.g. a torch ``.pt``)."""
        expected = "h5" if path.endswith(".h5") else "keras"
        found = _kerasio.file_format(path, source)
        if found == expected:
            return
        kinds = {"keras": "a .keras zip archive", "h5": "an HDF5 file"}
        if found is None:
            what = "neither a .keras archive nor an HDF5 file (another framework's checkpoint?)"
        else:
            what = f"{kinds[found]}, but its name calls for {kinds[expected]}"
        raise ValueError(
            f"resume: {path!r} is not a Keras checkpoint this callback can restore: it is {what}. "
            f"Received: resume={self._core.resume!r}"
        )

    def _set_initial_epoch(self, epoch: int) -> None:
        # Every backend's fit() reads ``_initial_epoch`` right after on_train_begin. A Keras
        # whose Trainer no longer sets it would ignore it: say so rather than retrain silently.
        if "_initial_epoch" not in vars(self.model):
            warnings.warn(
                f"This Keras version does not read model._initial_epoch: the training state is "
                f"restored, but pass initial_epoch={epoch} to fit() to skip the {epoch} epochs "
                "already done.",
                stacklevel=4,
            )
        self.model._initial_epoch = epoch

    def _load_legacy_h5(self, path: str, source: StreamedRead | None) -> None:
        """Legacy HDF5 files have their own layout; Keras's loader reads the weights, we copy the
        values (and the optimizer's, read from the verified bytes)."""
        loaded = keras.models.load_model(path, compile=False)
        optimizer = getattr(self.model, "optimizer", None)
        saved = _kerasio.read_legacy_optimizer(path, source) if optimizer is not None else []
        if saved and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        groups = [("model", "weights", list(self.model.weights), list(loaded.weights))]
        if saved:
            groups.append(("optimizer", type(optimizer).__name__, list(optimizer.variables), saved))
        for what, ours, targets, values in groups:  # all checked before any is assigned
            if len(values) != len(targets) or any(
                    tuple(t.shape) != tuple(v.shape) for t, v in zip(targets, values)):
                raise ValueError(
                    f"{path} could not be loaded into the model (nothing was loaded): its {what} "
                    f"has {len(values)} variables, the model's {ours} has {len(targets)} (or "
                    "of other shapes; compile with the optimizer the file was saved with)"
                )
        for target, value in (pair for *_, targets, values in groups for pair in zip(targets, values)):
            target.assign(keras.ops.convert_to_numpy(value))

    def _restore_keras_state(self, state: dict[str, Any]) -> None:
        seeds = state.get("seed_generators") or {}
        for v in self._seed_variables():
            if v.path in seeds:
                v.assign(np.asarray(seeds[v.path], dtype=v.dtype).reshape(v.shape))
        _set_global_rng(state)

    def _infer_mode(self) -> str | None:
        """``mode="auto"`` from the compiled metrics' direction, as Keras decides it."""
        if not _compat.available(_compat.KERAS_SET_MONITOR_OP):
            return None  # the monitor's name decides, or it is a ValueError at train begin
        saved = self.mode
        try:
            self._set_monitor_op()
        except ValueError:
            return None
        finally:
            self.mode = saved
        return "max" if self.monitor_op is keras.ops.greater else "min"


def _decode_state(path: str, blob: bytes | None) -> dict[str, Any] | None:
    """The training state stored as ``blob`` (None: none stored); ValueError if it is not a
    JSON object (bytes from disk are untrusted)."""
    if not blob:
        return None
    try:
        state = json.loads(blob)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError alike
        raise ValueError(f"{path} holds a damaged training state: not JSON ({e}).") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a damaged training state: a JSON object was expected. "
                         f"Received: {type(state).__name__}")
    return state


def _write_planned(planned: _kerasio.Planned, tx: Transaction) -> None:
    out = tx.open()
    # The plan's large segments view the variables (no training during a synchronous save) or
    # its snapshot's buffers: unchanged until the write ends, so they may be hashed behind it.
    with out.hashing_behind():
        planned.write(out)


def _global_rng() -> dict[str, Any]:
    """The backend's global generator, as the training state stores it (torch only: the
    torch backend's data loader and unseeded ops draw from it)."""
    if keras.backend.backend() != "torch":
        return {}
    import torch

    return {"torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def _set_global_rng(state: dict[str, Any]) -> None:
    if state.get("torch_rng") and keras.backend.backend() == "torch":
        import torch

        raw = np.frombuffer(base64.b64decode(state["torch_rng"]), dtype=np.uint8).copy()
        torch.set_rng_state(torch.from_numpy(raw))


def _restore_rng(saved: dict[str, Any] | None) -> None:
    """Python's, numpy's and the backend's global RNGs from an ``epoch_rng``-shaped state."""
    if not saved:
        return
    rng.restore(saved.get("rng") or {})
    _set_global_rng(saved)


def _flag(name: str, value: Any) -> bool:
    """``value`` as a bool; anything else is a TypeError naming the argument."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False. Received: {name}={value!r}")


def _print_msg(message: str) -> None:
    """Keras's own message printer (absl logging when Keras is set to use it), else print."""
    if _compat.available(_compat.KERAS_PRINT_MSG):
        _compat.resolve(_compat.KERAS_PRINT_MSG)(message)
    else:
        print(message)
