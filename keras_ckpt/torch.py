"""PyTorch shim: ``ModelCheckpoint`` for a hand-written training loop, over ``torch.save``.

The same arguments, lifecycle method names, attributes and ``checkpoints.json`` as the Keras
callback; everything framework-neutral (validation, presets, scheduling, naming, best-N,
retention) is :class:`keras_ckpt.checkpointer.Checkpointer`'s. This module only captures the
torch objects into one ``torch.save`` payload and puts them back.

A checkpoint file is a dict that ``torch.load(path, weights_only=True)`` reads (tensors and
plain Python values only)::

    {"model": ..., "optimizer": ..., "scheduler": ..., "extra": {name: ...},
     "training_state": {"epoch", "step", "batch", "monitor", "rng": {"python", "numpy", "torch"}}}

(``optimizer``/``scheduler``/``extra`` only where they were given.) Imports neither TensorFlow
nor Keras.
"""

from __future__ import annotations

import bisect
import builtins
import contextlib
import inspect
import itertools
import os
import pickle
import random
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any

import numpy as np
import torch
from torch.nn.parallel import DataParallel, DistributedDataParallel

from keras_ckpt import _compat, _stream, _zip, rng, storage
from keras_ckpt._async import ReusableBuffers
from keras_ckpt.checkpointer import CheckpointAttributes, Checkpointer, Payload, check_state
from keras_ckpt.config import CheckpointConfig, check_filepath
from keras_ckpt.engine import Transaction
from keras_ckpt.policy import UNSET

__all__ = ["ModelCheckpoint"]

# The PyTorch tutorial's own name is checkpoint.pth.tar (a zip file nonetheless, as torch.save writes).
_EXTENSIONS = (".pt", ".pth", ".pth.tar")
_EXACT_LEAVES = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)


class ModelCheckpoint(CheckpointAttributes):
    """Saves a PyTorch training loop's full state; keeps the latest N and the best N; resumes exactly.

    The PyTorch counterpart of `keras_ckpt.ModelCheckpoint`: the same arguments (those that
    make sense without Keras), the same lifecycle method names, attributes and manifest. Each
    checkpoint holds the model, the optimizer (with its step counts), the scheduler, the `extra`
    objects, the epoch, the global step, this checkpointer's best-N state and the RNG states
    (Python `random`, numpy, torch CPU and each CUDA device). Files are written with torch's
    own serializer and load with `torch.load(path, weights_only=True)`; restoring never runs
    code from a file.

    Example:

    ```python
    ckpt = ModelCheckpoint("runs/a/ckpt-{epoch:03d}.pt", monitor="val_accuracy", mode="max",
                           max_to_keep=3, keep_best=2, resume=True,
                           model=model, optimizer=opt, scheduler=sched)
    start_epoch = ckpt.on_train_begin()         # restores if resuming; 0 on a fresh start
    for epoch in range(start_epoch, epochs):
        for batch, (x, y) in ckpt.enumerate(loader):  # at start_batch after a mid-epoch save
            ...
            ckpt.on_train_batch_end(batch, logs={"loss": loss.item()})
        sched.step()                            # before the save, so it saves the stepped state
        ckpt.on_epoch_end(epoch, logs={"val_accuracy": acc})
    ckpt.on_train_end()
    best = torch.load(ckpt.best_path, weights_only=True, map_location="cpu")["model"]
    ```

    A `DistributedDataParallel`, `DataParallel` or `torch.compile`d model is saved as its plain
    module (no `module.`/`_orig_mod.` key prefixes) and restores into either form. Under
    `torch.distributed`, only rank 0 writes; every rank restores.

    CUDA tensors are copied into pinned host memory before the write (the whole state at
    once: the host needs that much memory), so every tensor in a file is a CPU tensor and a
    checkpoint written on a GPU loads on a CPU-only machine. Restoring loads onto the CPU and
    copies into the model wherever it lives. Shapes and dtypes are checked first, whatever
    `strict` says (`load_state_dict` would silently cast float64 into float32): a mismatch
    raises a `ValueError` naming the key, and nothing is loaded.

    The global step counts `on_train_batch_end` calls (one call per batch); a loop that never
    calls it gets the step from the optimizer's state (Adam-style `step` entries). A mid-epoch
    checkpoint (integer `save_freq`, a preemption) sets `start_batch`, and also holds the RNG
    states as that epoch began (taken in `on_train_begin` and after each `on_epoch_end`):
    `ckpt.enumerate(loader)` uses them to draw the interrupted epoch's order again and resume
    at `start_batch` exactly (see `enumerate`).

    Args:
        filepath: where to save, a template ending in `.pt`, `.pth` or `.pth.tar` (the same
            zip format whatever the name): `{epoch}` (1-based), `{batch}` and log keys, as
            Keras (`"runs/a/ckpt-{epoch:03d}-{val_loss:.3f}.pt"`).
        model: the `torch.nn.Module` to save (wrapped or not).
        optimizer: its optimizer, or None.
        scheduler: a learning-rate scheduler (anything with `state_dict()`/`load_state_dict()`),
            or None.
        extra: further objects to save by name, each with `state_dict()`/`load_state_dict()`
            (restored in `on_train_begin`, like the model): what else the loop needs to
            continue exactly, e.g. a mixed-precision `GradScaler` (its loss scale and growth
            tracker), an EMA of the weights (`torch.optim.swa_utils.AveragedModel`, a module)
            and a data sampler that says where it is (`torchdata`'s `StatefulDataLoader`, or
            your own with an epoch and a seed):

            ```python
            class EpochSampler(torch.utils.data.Sampler):
                def __init__(self, n, seed=0):
                    self.n, self.seed, self.epoch = n, seed, 0
                def __iter__(self):
                    g = torch.Generator().manual_seed(self.seed + self.epoch)
                    return iter(torch.randperm(self.n, generator=g).tolist())
                def __len__(self):
                    return self.n
                def state_dict(self):
                    return {"seed": self.seed, "epoch": self.epoch}
                def load_state_dict(self, state):
                    self.seed, self.epoch = state["seed"], state["epoch"]

            scaler = torch.amp.GradScaler("cuda")
            ema = torch.optim.swa_utils.AveragedModel(
                model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999))
            sampler = EpochSampler(len(dataset))
            ckpt = ModelCheckpoint("runs/a/ckpt-{epoch}.pt", model=model, optimizer=opt,
                                   extra={"scaler": scaler, "ema": ema, "sampler": sampler},
                                   resume=True)
            for epoch in range(ckpt.on_train_begin(), epochs):
                sampler.epoch = epoch  # before the batches: the order depends on it
                ...                    # scaler.scale(loss).backward(); scaler.step(opt);
                                       # scaler.update(); ema.update_parameters(model)
                ckpt.on_epoch_end(epoch, logs={"val_loss": val_loss})
            ```

            State values may be tensors, numpy values and plain Python data (files load
            with `weights_only=True`).
        monitor: the log key that ranks checkpoints (`save_best_only`, `keep_best`).
        verbose: 0 silent, 1 a message per save, 2 also per deleted checkpoint.
        save_best_only: save only when `monitor` improves on `best`.
        mode: `"min"`, `"max"` or `"auto"` (from the monitor's name; an error in
            `on_train_begin` if the name does not tell).
        save_freq: `"epoch"`, or an integer: save every N batches (needs `on_train_batch_end`).
        initial_value_threshold: a checkpoint counts as best only if it beats this value.
        max_to_keep: keep the N most recent checkpoints (None: all). The newest is never deleted.
        keep_best: also keep the N best by `monitor`/`mode`.
        keep_every_n_epochs: never delete the checkpoint of every N-th epoch.
        keep_every_n_hours: never delete one checkpoint per N hours of training.
        save_every_n_seconds: also save when this many seconds passed since the last save.
        resume: `True`: `on_train_begin` restores the newest checkpoint of `filepath`'s directory
            that passes its checksum (starting fresh if there is none); a path: restore from that
            file or directory and write new checkpoints to `filepath`. `False` starts fresh, with
            a warning if `filepath` already has checkpoints from an earlier run (they stay in
            its rotation and best-N).
        preset: `"short"`, `"normal"` or `"long"`; fills in only the arguments not passed.
        save_on_preemption: `True` (the default): between `on_train_begin` and `on_train_end`,
            SIGTERM or SIGUSR1 (what Kubernetes, spot VMs and SLURM send before they kill a
            job) makes the next `on_train_batch_end` (or `on_epoch_end`) save a checkpoint,
            named and resumable like a mid-epoch save (`start_batch`), even if none is due
            (`save_best_only` still applies); right after it the handlers installed before are
            restored and the signal is re-delivered to them: the default action ends the
            process with status 143 for SIGTERM (138 for SIGUSR1), your own handler runs
            (raise `SystemExit` there, or check `preempted` in your loop, to stop training).
            The handler only sets a flag, so a signal during a save never interrupts it; at
            most the batch in progress is lost. A tuple of signals replaces the default pair;
            `False` leaves signal handling alone. Installed from the main thread only. If the
            loop raises before `on_train_end`, a later signal finds the function that called
            `on_train_begin` gone and is re-delivered at once; the next `on_train_begin`
            restores the previous handlers first.
        async_save: `True`: a save copies every tensor of the state into host buffers
            (allocated at the first save, reused by the next ones: one more copy of the state in
            host memory; pinned memory for CUDA tensors, copied on the current stream) and
            returns; a background thread writes, checksums, fsyncs, commits and prunes. At most
            one save is in flight: the next one waits for it, so `save_best_only`, best-N,
            rotation and `checkpoints`, `best_path`, `latest_path` see committed checkpoints
            only. An error of the background write (a full disk) is raised by the next save or
            by `on_train_end`; `on_train_end`, the preemption save (always synchronous) and
            interpreter exit wait for the save in flight. The files are byte for byte those of
            a synchronous save (except torch's random serialization id, as with any two
            `torch.save` files).
        strict: whether model keys missing from or unexpected in a checkpoint, and objects
            given here (`optimizer`, `scheduler`, `extra` entries) that it holds no state for,
            are errors (True) or warnings (False). Shapes and dtypes are checked either way;
            state of objects not given is skipped (to load only the weights, pass only `model`).
    """

    def __init__(
        self,
        filepath: str | os.PathLike,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        extra: Mapping[str, Any] | None = None,
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        mode: str = "auto",
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        max_to_keep: int | None = UNSET,
        keep_best: int = UNSET,
        keep_every_n_epochs: int | None = UNSET,
        keep_every_n_hours: float | None = UNSET,
        save_every_n_seconds: float | None = UNSET,
        resume: bool | str | os.PathLike = False,
        preset: str | None = None,
        save_on_preemption: bool | tuple = True,
        async_save: bool = False,
        strict: bool = True,
    ) -> None:
        path = check_filepath(filepath)
        if not path.endswith(_EXTENSIONS):
            raise ValueError(
                "The filepath provided must end in `.pt`, `.pth` or `.pth.tar` (torch.save "
                f"format). Received: filepath={path!r}"
            )
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module. Received: model={model!r}")
        if optimizer is not None:
            _check_stateful("optimizer", optimizer)
        if scheduler is not None:
            _check_stateful("scheduler", scheduler)
        if extra is not None and not isinstance(extra, Mapping):
            raise ValueError(
                "extra must be a dict of objects with state_dict() and load_state_dict(). "
                f"Received: extra={extra!r}"
            )
        for name, obj in (extra or {}).items():
            if not isinstance(name, str):
                raise ValueError(
                    f"extra's keys must be strings (they name the objects in the checkpoint). "
                    f"Received: extra key {name!r} in extra={extra!r}"
                )
            _check_stateful(f"extra[{name!r}]", obj)
        if not isinstance(strict, bool):
            raise ValueError(f"strict must be True or False. Received: strict={strict!r}")
        self._core = Checkpointer(
            CheckpointConfig.from_arguments(locals(), filepath=path), framework="torch"
        )
        self.filepath = path
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.extra = dict(extra or {})
        self.strict = strict
        self._host = _HostCopies()
        self.start_batch = 0
        self._skip_pending = False  # whether enumerate() has start_batch batches to skip
        self._batch_calls = 0  # on_train_batch_end calls in the running epoch
        self._counts_batches = False
        self._next_epoch: int | None = None  # the epoch on_epoch_end should get next

    # -- attributes shared with the Keras callback --------------------------------------------

    # -- lifecycle ----------------------------------------------------------------------------

    def on_train_begin(self) -> int:
        """Check the directory and `mode`; restore if resuming. Returns the epoch to start at."""
        self._batch_calls = 0
        self._counts_batches = False
        self.start_batch = 0
        path = self._core.begin()
        if path is not None:
            try:
                # Read once, checksummed while it loads; the previous one if it is corrupt. Only
                # a verified payload reaches the objects, so a corrupt one leaves nothing in them.
                path, payload = self._core.load(path, self._load_file)
                check_state(path, payload.get("training_state"))  # before anything is assigned
                self._assign(path, payload)
                self._adopt(path, payload)
            except BaseException:
                self._core.end()  # nothing was trained: leave the directory to other writers
                raise
        # The loop frame is the caller's: once it has returned or raised, training is over.
        self._core.preemption.install(inspect.currentframe())
        self._next_epoch = self._core.epochs_done
        if not self.start_batch:  # else the interrupted epoch's, restored from the checkpoint
            self._mark_epoch_begin()
        return self._core.epochs_done

    def enumerate(self, loader: Iterable[Any]) -> Iterator[tuple[int, Any]]:
        """``enumerate(loader)`` that resumes a mid-epoch checkpoint at `start_batch`.

        In the epoch a mid-epoch checkpoint interrupted, it yields ``(batch, data)`` from
        `start_batch` on, in the order the interrupted run drew: the RNGs as that epoch began
        are put back while the loader's iterator and sampler draw, and the sampler's first
        `start_batch` batches of indices are dropped without loading their data; then the
        checkpoint's RNG state is back for the batches to train. Any other epoch: the plain
        ``enumerate(loader)``.

        ```python
        for epoch in range(ckpt.on_train_begin(), epochs):
            for batch, (x, y) in ckpt.enumerate(loader):
                ...
                ckpt.on_train_batch_end(batch, logs={"loss": loss.item()})
            ckpt.on_epoch_end(epoch, logs={"val_loss": val_loss})
        ```

        Exact for a `torch.utils.data.DataLoader` over a map-style dataset whose order comes
        from its sampler drawing from torch's global RNG (`shuffle=True`, a custom sampler),
        `num_workers` 0 or more; not with a generator of its own (`generator=`, whose state is
        not saved) or `persistent_workers=True`. Any other iterable (an `IterableDataset`,
        `batch_size=None`, a generator) is read from its start and its first `start_batch` items
        dropped, with the epoch-begin RNGs in place: exact if it draws its order from them as it
        starts. A loader shorter than `start_batch` yields nothing, with a warning. Random
        augmentation in worker processes draws from per-worker generators whose states are not
        saved: its draws for the resumed batches differ (seed augmentation from the sample
        index to keep them). Call it after `on_train_begin` / `on_epoch_end`, with nothing
        drawing from the RNGs in between (validation before `on_epoch_end`, as shown).

        Args:
            loader: the epoch's data, usually a `DataLoader`.
        """
        start, self._skip_pending = (self.start_batch if self._skip_pending else 0), False
        if not start:
            return builtins.enumerate(loader)
        return self._resumed_epoch(loader, start)

    def _resumed_epoch(self, loader: Iterable[Any], start: int) -> Iterator[tuple[int, Any]]:
        now = {"rng": rng.capture(), "torch": _capture_torch_rng()}
        path = self._core.restored_path or self.filepath
        self._core.enter_epoch_rng(lambda state: _set_rng(state, path), lambda: now)

        def drawn(skipped: int) -> None:  # the trained batches are passed: the save's RNGs again
            _set_rng(now, path)
            if skipped < start:
                self._core.input_ran_out(skipped)

        sampler = getattr(loader, "batch_sampler", None)
        dataset = getattr(loader, "dataset", None)
        if not isinstance(loader, torch.utils.data.DataLoader) or sampler is None or isinstance(
            dataset, torch.utils.data.IterableDataset
        ):
            items = iter(loader)
            # Still with the epoch-begin RNGs: an iterable that draws its order as it starts
            # (a generator, an IterableDataset, batch_size=None's sampler) draws the same one.
            drawn(sum(1 for _ in itertools.islice(items, start)))
            yield from builtins.enumerate(items, start)
            return
        skipped = _SkipBatches(sampler, start, drawn)
        yield from builtins.enumerate(_with_batch_sampler(loader, skipped), start)

    def _mark_epoch_begin(self) -> None:
        self._core.mark_epoch_begin({"torch": _capture_torch_rng()})

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        """Count one trained batch (the global step); save if an integer `save_freq` says so.

        Args:
            batch: the batch's index in the epoch (0-based; names `{batch}` files).
            logs: the batch's metrics, e.g. `{"loss": loss.item()}`.
        """
        self._counts_batches = True
        self._core.step += 1
        due = False
        if self._core.needs_batch_events:
            # One call is one batch whatever the user's indices (a resumed epoch starts at
            # start_batch): the core counts calls, numbered from 0 in each epoch.
            due = self._core.batch_due(self._batch_calls)
            self._batch_calls += 1
        preempt = self._core.preemption.requested
        if due or preempt:
            self._save(self._core.epochs_done, batch, logs)
        if preempt:
            self._preempted()

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        """Save if due (every epoch by default). Call it after `scheduler.step()`.

        The first call's `epoch` is what `on_train_begin` returned, then each next one: a loop
        that numbers its epochs otherwise (1-based) gets a warning, once.

        Args:
            epoch: the epoch that just ended (0-based, the loop's `range` value).
            logs: this epoch's metrics, e.g. `{"loss": 0.31, "val_accuracy": 0.94}`; numpy
                and 0-d tensor values are fine.
        """
        self._batch_calls = 0
        self.start_batch = 0
        self._check_epoch(epoch)
        if not self._counts_batches:
            steps = _optimizer_steps(self.optimizer)
            if steps is not None:
                self._core.step = steps
        due = self._core.epoch_due(epoch)
        preempt = self._core.preemption.requested
        if due or preempt:
            self._save(epoch, None, logs)
        if preempt:
            self._preempted()
        self._mark_epoch_begin()  # the next epoch's order is drawn from the RNGs as they are now

    def _preempted(self) -> None:
        """Saved for a signal: hand it to the handler that was there before ours."""
        self._core.preemption.preempted = True
        self._core.preemption.redeliver()

    def _check_epoch(self, epoch: int) -> None:
        """Warn (once per run) when ``epoch`` does not follow the numbering on_train_begin set."""
        expected, self._next_epoch = self._next_epoch, epoch + 1
        if expected is None or epoch == expected:
            return
        self._next_epoch = None  # once: the rest of the run keeps its own numbering
        warnings.warn(
            f"on_epoch_end(epoch={epoch}) where epoch={expected} was expected: epochs are "
            "0-based, the first one being what on_train_begin() returned, then consecutive "
            "(`for epoch in range(ckpt.on_train_begin(), epochs)`). Checkpoint names use "
            f"epoch + 1 ({{epoch}} = {epoch + 1} here), and a resumed run starts at the epoch "
            "after the last saved one, so a loop passing 1-based epochs names its files one too "
            "high and skips an epoch when it resumes.",
            stacklevel=3,
        )

    def on_train_end(self) -> None:
        """End of training: waits for the save in flight (`async_save`; its error is raised
        here), so every due checkpoint is committed; the directory is released, so another
        process may write to it."""
        guard = self._core.preemption
        try:
            # First: a signal that arrives while the save in flight commits is acted on below.
            self._core.wait()
            if guard.requested:  # the signal came after the last epoch end
                if not self._core.saved_current_step():
                    self._save(max(self._core.epochs_done - 1, 0), None, None)
                guard.preempted = True
        finally:
            self._core.end()
        if guard.received:  # also one that came after the check above, until end() restored
            guard.redeliver()

    # -- restoring ----------------------------------------------------------------------------

    def restore(self, path: str | os.PathLike) -> None:
        """Load a checkpoint file into the model, optimizer, scheduler and extras (and the RNGs).

        `on_train_begin` calls this when resuming; call it directly to load a specific file.
        Model keys, shapes and dtypes, the objects' presence and the optimizer's parameter
        groups are all checked before anything is loaded.
        """
        path = os.fspath(path)
        try:
            payload = _load(path)
        except _Unreadable as e:
            raise ValueError(str(e)) from None
        self._assign(path, payload)
        self._adopt(path, payload)

    def _load_file(self, path: str, source: storage.StreamedRead | None) -> Mapping[str, Any]:
        """The checkpoint at ``path`` read (through ``source`` where given), not yet assigned."""
        try:
            return _load(path, source)
        except _Unreadable as e:
            raise ValueError(
                f"resume={self._core.resume!r}: {e} Received: resume={self._core.resume!r}"
            ) from None

    def _assign(self, path: str, payload: Mapping[str, Any]) -> None:
        """Check the payload against the objects, then load it into them."""
        module = _plain_module(self.model)
        current = module.state_dict()
        self._check_keys(path, "model key", set(payload["model"]), set(current))
        _check_tensors(path, payload["model"], current)
        targets = self._objects()
        saved = {"optimizer": payload.get("optimizer"), "scheduler": payload.get("scheduler")}
        saved.update({f"extra[{k!r}]": v for k, v in (payload.get("extra") or {}).items()})
        saved = {k: v for k, v in saved.items() if v is not None}
        # State for objects not given (an optimizer, when only the weights are wanted) is skipped.
        self._check_keys(path, "object", set(saved) & set(targets), set(targets))
        if "optimizer" in saved and self.optimizer is not None:
            _check_optimizer(path, saved["optimizer"], self.optimizer)

        # Checked above, so strict=False here only keeps torch from refusing what we allowed.
        module.load_state_dict(payload["model"], strict=False)
        for name, obj in targets.items():
            if name in saved:
                obj.load_state_dict(saved[name])
        if isinstance(payload, _FromImage):
            _release_copied(payload)

    def _adopt(self, path: str, payload: Mapping[str, Any]) -> None:
        """The training state (epoch, step, RNGs, best) of the checkpoint loaded from ``path``."""
        state = payload.get("training_state") or {}
        self._core.restored(path, state)
        self.start_batch = self._core.start_batch
        self._skip_pending = self.start_batch > 0
        torch_rng = (state.get("rng") or {}).get("torch")
        if torch_rng:
            _restore_torch_rng(torch_rng, path)

    def _check_keys(self, path: str, what: str, saved: set, wanted: set) -> None:
        """Missing and unexpected entries: an error if ``strict``, else a warning."""
        missing, unexpected = sorted(wanted - saved), sorted(saved - wanted)
        if not missing and not unexpected:
            return
        parts = [f"{what}s missing from the checkpoint: {missing}"] if missing else []
        if unexpected:
            parts.append(f"{what}s in the checkpoint but not in the model: {unexpected}")
        message = f"{path}: " + "; ".join(parts)
        if self.strict:
            raise ValueError(message + ". Pass strict=False to restore the rest.")
        warnings.warn(message, stacklevel=4)

    # -- saving -------------------------------------------------------------------------------

    def _objects(self) -> dict[str, Any]:
        objects = {"optimizer": self.optimizer, "scheduler": self.scheduler}
        objects.update({f"extra[{k!r}]": v for k, v in self.extra.items()})
        return {k: v for k, v in objects.items() if v is not None}

    def _save(self, epoch: int, batch: int | None, logs: Mapping[str, Any] | None) -> None:
        if _is_distributed_follower():
            return
        self._core.save(epoch, batch, logs, self._capture)

    def _capture(self, path: str, state: dict, snapshot: bool) -> Payload:
        """The payload as of now; with ``snapshot``, every tensor copied into reused buffers."""
        state["rng"]["torch"] = _capture_torch_rng()
        payload: dict[str, Any] = {"model": _plain_module(self.model).state_dict()}
        if self.optimizer is not None:
            payload["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            payload["scheduler"] = self.scheduler.state_dict()
        if self.extra:
            payload["extra"] = {k: v.state_dict() for k, v in self.extra.items()}
        payload["training_state"] = state
        self._host.begin(snapshot)
        payload = _portable(payload, "checkpoint", self._host)
        ready = self._host.end()

        def write(tx: Transaction) -> None:
            ready()
            _torch_save(payload, tx.open(), path)

        return Payload(write, detached=snapshot)


# -- helpers ----------------------------------------------------------------------------------


class _SkipBatches:
    """A batch sampler without its first ``skip`` batches; ``then(n)`` runs once they are drawn
    (``n``: how many there were, fewer than ``skip`` if the sampler ran out)."""

    def __init__(self, inner: Iterable[Any], skip: int, then: Callable[[int], None]) -> None:
        self.inner, self.skip, self.then = inner, skip, then

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.inner)
        self.then(sum(1 for _ in itertools.islice(batches, self.skip)))
        yield from batches

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0)  # type: ignore[arg-type]


def _with_batch_sampler(loader: torch.utils.data.DataLoader, batch_sampler: Any) -> Any:
    """A DataLoader like ``loader`` (workers, collate, pinning, seeds) over ``batch_sampler``."""
    names = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
             "multiprocessing_context", "generator", "prefetch_factor", "persistent_workers",
             "pin_memory_device", "in_order")
    accepted = inspect.signature(torch.utils.data.DataLoader).parameters
    options = {n: getattr(loader, n) for n in names if n in accepted and hasattr(loader, n)}
    return torch.utils.data.DataLoader(loader.dataset, batch_sampler=batch_sampler, **options)


def _set_rng(state: Mapping[str, Any], path: str) -> None:
    rng.restore(state.get("rng") or {})
    if state.get("torch"):
        _restore_torch_rng(state["torch"], path)


class _Unreadable(Exception):
    """A file that is not a checkpoint this module wrote (the message says what it is)."""


def _load(path: str, source: storage.StreamedRead | None = None) -> Mapping[str, Any]:
    """``torch.load(path, weights_only=True)`` of a keras_ckpt.torch checkpoint, onto the CPU.

    Anything else raises :class:`_Unreadable`, whose message says what the file is instead of
    torch's advice to retry with ``weights_only=False`` (which would run code from the file).

    With ``source`` (the stream reading and checksumming the file, see
    :meth:`keras_ckpt.engine.Engine.restore_newest`), the file is loaded from the bytes that
    stream read, once they matched their checksum (:class:`keras_ckpt.storage.CorruptFile`
    else): nothing of a corrupt file reaches the caller's objects.
    """
    try:
        if source is not None:
            payload = _load_image(source.verified())
        else:
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as e:
        if not zipfile.is_zipfile(path):
            what = "not a file torch.save wrote"
        elif not _has_record(path, "data.pkl"):
            what = "a zip archive that is not torch.save's format (a .keras file?)"
        elif isinstance(e, pickle.UnpicklingError):
            what = ("a torch.save file holding objects other than tensors and plain Python "
                    "values, which keras_ckpt never loads (that would run code from it)")
        else:
            what = "a damaged torch.save file"
        raise _Unreadable(f"{path} is {what} ({type(e).__name__}).") from None
    if not isinstance(payload, Mapping) or "model" not in payload:
        raise _Unreadable(f"{path} is not a keras_ckpt.torch checkpoint (no 'model' entry).")
    return payload


def _load_image(image: Any) -> Any:
    """``torch.load(weights_only=True)`` of a file's verified bytes (a uint8 array), its tensors
    views of those bytes: what ``torch.load(mmap=True)`` does with a mapped file, over the image
    instead. The optimizer's state then keeps that memory (``load_state_dict`` adopts tensors
    of its parameters' dtype and device), the model's is copied into its parameters.

    Without torch's private loading step the bytes are read by ``torch.load``, one copy more.
    """
    if not all(_compat.available(api) for api in _compat.TORCH_FAST_READ):
        return torch.load(_stream.MemoryFile(image), map_location="cpu", weights_only=True)
    result = _load_views(image)
    return _FromImage(result) if isinstance(result, dict) else result


def _load_views(image: Any) -> Any:
    reader = _compat.resolve(_compat.TORCH_FILE_READER)(_stream.MemoryFile(image))  # type: ignore[operator]
    if "constants.pkl" in reader.get_all_records():
        raise RuntimeError("a TorchScript archive, not a torch.save file")
    whole = torch.frombuffer(image, dtype=torch.uint8).untyped_storage()
    _check_records_apart(image)
    unpickler = _compat.resolve(_compat.TORCH_WEIGHTS_ONLY_UNPICKLER)
    try:
        result = _compat.resolve(_compat.TORCH_LOAD)(  # type: ignore[operator]
            zip_file=reader, map_location="cpu", pickle_module=unpickler, overall_storage=whole)
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(str(e)) from None
    # A storage is a view of the image as long as the pickle says, not its record's size.
    spans = sorted({(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                    for t in _tensors(result)})
    _refuse_overlap(spans, "tensor storages")
    return result


def _check_records_apart(image: Any) -> None:
    """RuntimeError if two records' bytes overlap (a crafted central directory): their tensors
    would be views of the same memory, so that updating one writes the other."""
    source = _stream.MemoryFile(image)
    with zipfile.ZipFile(source) as archive:
        spans = sorted((_zip.member_data_offset(source.pread, info), info.file_size)
                       for info in archive.infolist())
    _refuse_overlap(spans, "records")


def _refuse_overlap(spans: list[tuple[int, int]], what: str) -> None:
    """RuntimeError if any two of the sorted ``(start, nbytes)`` spans share a byte."""
    for (start, nbytes), (following, size) in itertools.pairwise(spans):
        if size and following < start + nbytes:
            raise RuntimeError(f"two {what} of the archive overlap at byte {following}")


class _FromImage(dict):
    """A payload whose tensors are views of a resume image (see :func:`_release_copied`)."""


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _release_copied(payload: Mapping[str, Any]) -> None:
    """Give back the image memory of the model's tensors once they are copied into the
    parameters: the optimizer's state keeps its views of the same image for the whole run, and
    would keep the model's bytes with them (a second copy of the model). Storages that anything
    outside the model's entry also uses are kept."""
    def span(tensor: torch.Tensor) -> tuple[int, int]:
        store = tensor.untyped_storage()
        return store.data_ptr(), store.data_ptr() + store.nbytes()

    kept = sorted(span(t) for key, value in payload.items() if key != "model"
                  for t in _tensors(value) if t.device.type == "cpu")
    for tensor in _tensors(payload["model"]):
        start, stop = span(tensor)
        at = bisect.bisect(kept, (start, stop))
        if (at and kept[at - 1][1] > start) or (at < len(kept) and kept[at][0] < stop):
            continue
        _stream.release(start, stop)


def _has_record(path: str, name: str) -> bool:
    """Whether the zip archive at ``path`` has a record ``name``; True for one whose record
    names cannot be decoded (a damaged torch.save file, not another format)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.rsplit("/", 1)[-1] == name for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
    except UnicodeDecodeError:
        return True


def _check_stateful(name: str, obj: Any) -> None:
    if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
        raise ValueError(
            f"{name} must have state_dict() and load_state_dict() methods. Received: {name}={obj!r}"
        )


def _plain_module(model: Any) -> Any:
    """The module under DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_distributed_follower() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def _optimizer_steps(optimizer: Any) -> int | None:
    """The largest per-parameter ``step`` in the optimizer's state (Adam & co.), else None."""
    state = getattr(optimizer, "state", None) or {}
    steps = [s["step"] for s in state.values() if isinstance(s, Mapping) and "step" in s]
    return int(max(float(s) for s in steps)) if steps else None


def _portable(value: Any, where: str, host: _HostCopies) -> Any:
    """``value`` as it is written: CUDA tensors as host copies, numpy values converted.

    ``torch.load(weights_only=True)`` refuses numpy objects (an ``np.float64`` from scikit-learn
    is a ``float`` subclass but pickles as numpy's), so numpy scalars become Python numbers and
    arrays tensors. Anything else it would refuse raises a TypeError naming where it is, before
    a file is written. Containers are copied only when something inside changed, so a
    ``state_dict``'s ``_metadata`` survives.
    """
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise _refused(value, where)
        return host(torch.from_numpy(np.ascontiguousarray(value)))
    if isinstance(value, torch.Tensor):
        return host(value)
    if type(value) in _EXACT_LEAVES or type(value) is torch.Size:
        return value
    if type(value) in (dict, OrderedDict):
        items = [
            (_portable(k, where, host), _portable(v, f"{where}[{k!r}]", host))
            for k, v in value.items()
        ]
        if not host.snapshot and all(
            k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, value.items())
        ):
            return value
        out = type(value)(items)
        if isinstance(value, OrderedDict):  # where state_dict() keeps its _metadata
            out.__dict__.update(vars(value))
        return out
    if type(value) in (list, tuple, set):
        items = [_portable(v, f"{where}[{i}]", host) for i, v in enumerate(value)]
        if not host.snapshot and all(v is v0 for v, v0 in zip(items, value)):
            return value
        return type(value)(items)
    raise _refused(value, where)


class _HostCopies:
    """Tensors copied into host buffers that are reused from one save to the next.

    CUDA tensors always (into pinned memory, every copy queued on the current stream, then one
    wait): torch.save would copy each storage to fresh pageable memory, one at a time, with the
    disk idle meanwhile; this takes a fraction of that. It needs host memory for the whole state,
    and the file then names the CPU as every tensor's location, so it loads on any machine
    without ``map_location``. Tensors viewing the same memory (tied weights) share one copy.

    With ``snapshot`` (``async_save``) CPU tensors are copied too, storage by storage with
    their views rebuilt over the copy, so the file is byte for byte the one the tensors
    themselves give. CUDA copies need no wait on the training thread: later kernels on the
    stream run after them; the writer waits (``end()``'s result) before it reads them.
    """

    def __init__(self) -> None:
        self._pinned: ReusableBuffers[torch.UntypedStorage] = ReusableBuffers(
            lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True).untyped_storage()
        )
        self._host: ReusableBuffers[torch.UntypedStorage] = ReusableBuffers(torch.UntypedStorage)
        self.snapshot = False
        self.memo: dict[int, Any] = {}  # id -> copy, for one payload (see _portable)
        self._copies: dict[tuple, torch.Tensor] = {}
        self._storages: dict[tuple, torch.UntypedStorage] = {}
        self._devices: set[torch.device] = set()

    def begin(self, snapshot: bool) -> None:
        """Start copying one payload's tensors; ``snapshot``: CPU tensors too."""
        self.snapshot = snapshot
        # A capture that raised (a value torch.load would refuse) never reached end().
        self.memo, self._copies, self._storages, self._devices = {}, {}, {}, set()

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        # Sparse, quantized and subclassed tensors (DTensor) are left to torch.save.
        plain = type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.layout == torch.strided
        if not plain or tensor.is_quantized:
            return tensor.clone() if self.snapshot else tensor
        if tensor.device.type == "cuda":
            return self._pinned_copy(tensor)
        if tensor.device.type == "cpu" and self.snapshot:
            return self._storage_copy(tensor)
        return tensor

    def _pinned_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape,
               tensor.stride(), tensor.dtype)
        copy = self._copies.get(key)
        if copy is None:
            nbytes = tensor.numel() * tensor.element_size()
            buffer = self._pinned.take(key, nbytes)
            copy = torch.empty(0, dtype=tensor.dtype).set_(buffer, 0, tensor.shape)
            copy.copy_(tensor, non_blocking=True)
            self._copies[key] = copy
            self._devices.add(tensor.device)
        return copy

    def _storage_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        source = tensor.untyped_storage()
        key = (source.data_ptr(), source.nbytes())
        copy = self._storages.get(key)
        if copy is None:
            copy = self._host.take(key, source.nbytes())
            # numpy's copy: one memcpy, ~1.8x as fast here as torch's copy_ of the same bytes
            np.copyto(_bytes_of(copy), _bytes_of(source))
            self._storages[key] = copy
        view = torch.empty(0, dtype=tensor.dtype).set_(
            copy, tensor.storage_offset(), tensor.shape, tensor.stride()
        )
        if isinstance(tensor, torch.nn.Parameter):
            return torch.nn.Parameter(view, requires_grad=tensor.requires_grad)
        return view.requires_grad_(tensor.requires_grad)

    def end(self) -> Callable[[], None]:
        """The payload is captured: returns the wait for its CUDA copies (call before reading)."""
        events = [torch.cuda.current_stream(d).record_event() for d in self._devices]
        self._pinned.end()
        self._host.end()
        self.memo, self._copies, self._storages, self._devices = {}, {}, {}, set()

        def ready() -> None:
            for event in events:
                event.synchronize()

        return ready


def _bytes_of(storage: torch.UntypedStorage) -> np.ndarray:
    """A CPU storage's bytes as a numpy array over the same memory."""
    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy()


def _refused(value: Any, where: str) -> TypeError:
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    return TypeError(
        f"{where} is a {kind}, which torch.load(weights_only=True) refuses. state_dict() values "
        "must be tensors, numbers, strings, or lists/tuples/dicts of them."
    )


def _torch_save(obj: Any, f: storage.HashingWriter | IO[bytes], path: str) -> None:
    """``torch.save(obj, f)``'s format, written by :class:`_TorchZipWriter` (CRC-32s included).

    torch's own writer (``torch._C.PyTorchFileWriter``) either computes each record's CRC-32
    before writing it, on one core (a third of the save time), or, with ``compute_crc32=False``,
    leaves zeros that strict zip tools reject; and when a write fails it throws again from its
    destructor, which aborts the process. torch's pickling step (``torch.serialization._save``,
    listed in ``keras_ckpt._compat``) writes into any object with ``write_record``, so the zip
    container is written here instead. Without ``_save`` this is plain ``torch.save``. Errors
    surface as ``OSError`` naming ``path`` (the checkpoint's final name).
    """
    out = storage.EarlyWriteback(f)
    try:
        if _compat.available(_compat.TORCH_SAVE):
            save = _compat.resolve(_compat.TORCH_SAVE)
            writer = _TorchZipWriter(out)
            # _save hands over the tensors' own storages (unchanged during the save: no step
            # runs; a snapshot's copies) and bytes objects: safe to hash behind the writes.
            # torch.save's writer below passes views of its own buffers: hashed at once.
            behind = f.hashing_behind() if isinstance(f, storage.HashingWriter) else contextlib.nullcontext()
            with behind:
                save(obj, writer, pickle, torch.serialization.DEFAULT_PROTOCOL, False)
                writer.finish()
        else:
            _public_save(obj, out)
        out.flush()
    except OSError as e:
        raise OSError(e.errno, f"writing the checkpoint failed: {e.strerror or e}", path) from e


def _public_save(obj: Any, out: storage.EarlyWriteback) -> None:
    """``torch.save``, with the first write error kept and raised once torch's writer is done.

    torch's C++ writer aborts the process when a write fails twice (again from its destructor),
    so after a failure the rest of its output is discarded instead of written.
    """
    failure: list[BaseException] = []

    class Latch:
        def write(self, data: Any) -> int:
            if not failure:
                try:
                    out.write(data)
                except BaseException as e:  # KeyboardInterrupt too: re-raised below
                    failure.append(e)
            return memoryview(data).nbytes

        def flush(self) -> None:
            pass

    torch.save(obj, Latch())
    if failure:
        raise failure[0]


_ZIP64_LIMIT = 0xFFFFFFFF  # where torch's writer switches to ZIP64 fields
_FORMAT_VERSION = b"3\n"  # what torch's writer records for torch.save files (the "version" record)


class _TorchZipWriter:
    """torch's zip container (what ``torch._C.PyTorchFileWriter`` writes), strictly front to back.

    The records ``torch.serialization._save`` hands over (``write_record(name, data, size)``,
    ``data`` a str/bytes or a CPU ``UntypedStorage``) go in as ``archive/<name>`` members,
    stored, each one's data aligned as its ``.storage_alignment`` record says (torch pads the
    local header's extra field with an ``FB`` block, as here; ``torch.load(mmap=True)`` maps
    storages in place). The zip structures are :class:`keras_ckpt._zip.ZipWriter`'s, with
    torch's header fields: a large record's CRC-32 is computed on another thread from the same
    memory while the main thread writes it, and goes in a data descriptor after the data, so
    nothing is seeked back over and the engine hashes the bytes as they stream. The result is
    a valid zip archive (``zipfile``'s ``testzip`` passes).
    """

    def __init__(self, out: storage.EarlyWriteback, archive: str = "archive") -> None:
        # torch's header fields: no timestamps, no creator attributes, every name UTF-8.
        self._zip = _zip.ZipWriter(
            out, always_utf8=True, zip64_limit=_ZIP64_LIMIT, zip64_end_sentinels=True
        )
        self._prefix = archive + "/"
        self._alignment = 64  # torch's default, until _save's .storage_alignment record says
        self._total = 0

    def write_record(self, name: str, data: Any, size: int) -> None:
        """Add member ``name`` holding the first ``size`` bytes of ``data``."""
        view = _record_bytes(data)[:size]
        if name == ".storage_alignment":
            self._alignment = int(bytes(view))
        self._zip.add_streamed(self._prefix + name, [view], align=self._alignment)
        self._total += size

    def finish(self) -> None:
        """The records torch's writer adds at the end, then the central directory."""
        self.write_record("version", _FORMAT_VERSION, len(_FORMAT_VERSION))
        # 40 digits, as torch writes: an id for this file, then its total data size.
        serial = f"{random.SystemRandom().getrandbits(63):020d}{self._total:020d}".encode()
        self.write_record(".data/serialization_id", serial, len(serial))
        self._zip.finish()


def _record_bytes(data: Any) -> memoryview:
    """A record's bytes, without a copy: ``_save`` passes strings and CPU storages."""
    if isinstance(data, str):
        return memoryview(data.encode("utf-8"))
    if isinstance(data, torch.UntypedStorage):
        return memoryview(torch.empty(0, dtype=torch.uint8).set_(data).numpy())
    return memoryview(data).cast("B")


def _check_tensors(path: str, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    problems = []
    for key, value in saved.items():
        have = current.get(key)
        if not isinstance(value, torch.Tensor) or not isinstance(have, torch.Tensor):
            continue
        if value.shape != have.shape:
            problems.append(
                f"{key!r}: shape {tuple(value.shape)} in the checkpoint, "
                f"{tuple(have.shape)} in the model"
            )
        elif value.dtype != have.dtype:
            problems.append(f"{key!r}: dtype {value.dtype} in the checkpoint, {have.dtype} in the model")
    if problems:
        raise ValueError(f"cannot restore {path} into this model: " + "; ".join(problems))


def _check_optimizer(path: str, saved: Mapping[str, Any], optimizer: Any) -> None:
    """The parameter-group layout ``Optimizer.load_state_dict`` requires, checked up front."""
    groups = getattr(optimizer, "param_groups", None)
    saved_groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if groups is None or saved_groups is None:
        return
    have = [len(g["params"]) for g in groups]
    want = [len(g["params"]) for g in saved_groups]
    if have != want:
        raise ValueError(
            f"cannot restore {path}: the optimizer's parameter groups hold {have} parameters, "
            f"the checkpoint's {want}"
        )


def _capture_torch_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    # An uninitialised CUDA has drawn nothing; reading its generators would create a context
    # on every device.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_torch_rng(state: Mapping[str, Any], path: str) -> None:
    torch.set_rng_state(state["cpu"])
    saved = list(state.get("cuda") or ())
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, device_state in enumerate(saved[:present]):
        torch.cuda.set_rng_state(device_state, index)
    if len(saved) > present:
        warnings.warn(
            f"{path} holds the RNG state of {len(saved)} CUDA device(s), this process sees "
            f"{present}: devices {list(range(present, len(saved)))} are not restored.",
            stacklevel=4,
        )
    elif present > len(saved) and torch.cuda.is_initialized():
        warnings.warn(
            f"{path} holds no RNG state for CUDA device(s) {list(range(len(saved), present))} "
            "(not in use when it was saved): their generators are left as they are.",
            stacklevel=4,
        )
