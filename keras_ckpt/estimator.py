"""TF graph mode: ``CheckpointHook`` for ``tf.estimator`` and ``MonitoredTrainingSession``.

Runs on TF <= 2.15 with tensorflow-estimator (Keras 2 or none), and with
``tf.compat.v1.train.MonitoredTrainingSession`` on any TF 2.x. Never imports Keras 3.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf

from keras_ckpt._tfcommon import (
    PrefixSeries,
    SeriesAttributes,
    build_policy,
    validate_basename,
    validate_directory,
    warn_if_unscored,
)
from keras_ckpt.checkpointer import scalar_logs
from keras_ckpt.manifest import Record
from keras_ckpt.policy import validate_count, validate_positive_number
from keras_ckpt.preemption import PreemptionGuard, signals_from

_REDUCTIONS = ("mean", "last", "report")
_FOREIGN_HINT = (
    "With MonitoredTrainingSession pass save_checkpoint_secs=None (and no "
    "save_checkpoint_steps): otherwise it adds TF's own CheckpointSaverHook, which saves every "
    "600 s by default. Estimator adds no saver of its own when given this hook."
)


def _validate_listeners(listeners: Any) -> list[tf.compat.v1.train.CheckpointSaverListener]:
    """``listeners`` as a list; a TypeError naming the argument for anything but listeners."""
    if listeners is None:
        return []
    if isinstance(listeners, (str, bytes, Mapping)) or not isinstance(listeners, Sequence):
        raise TypeError(
            "listeners must be a list of tf.compat.v1.train.CheckpointSaverListener. "
            f"Received: listeners={listeners!r}"
        )
    bad = [x for x in listeners if not isinstance(x, tf.compat.v1.train.CheckpointSaverListener)]
    if bad:
        raise TypeError(
            "listeners must be tf.compat.v1.train.CheckpointSaverListener objects. "
            f"Received: listeners={list(listeners)!r}"
        )
    return list(listeners)


def _chief_from_tf_config() -> bool:
    """Whether this task is the chief, as Estimator's RunConfig reads ``TF_CONFIG``."""
    raw = os.environ.get("TF_CONFIG") or "{}"
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}); pass is_chief=... explicitly.") from None
    cluster = config.get("cluster") or {}
    if not cluster:
        return True
    task = config.get("task") or {}
    kind = task.get("type")
    if kind in ("chief", "master"):
        return True
    # Without a chief or master job, worker 0 is the chief (TF2's multi-worker convention).
    return kind == "worker" and int(task.get("index", 0)) == 0 and not {"chief", "master"} & set(cluster)


class CheckpointHook(SeriesAttributes, tf.compat.v1.train.CheckpointSaverHook):
    """Saves TF checkpoints every N steps or seconds; keeps the latest N, the best N, one per N hours.

    A ``tf.compat.v1.train.CheckpointSaverHook`` (so Estimator adds no saver of its own) that saves
    every global variable (weights, optimizer slots and beta powers, the global step) with a TF
    Saver. The files are ordinary TF checkpoints (``model.ckpt-<global step>.index``,
    ``.data-*``, ``.meta``) that ``tf.train.load_checkpoint`` reads; each save is committed
    atomically with checksums in ``checkpoints.json`` and old ones are pruned by the retention
    policy (latest-N ∪ best-N ∪ one per N hours). TF's own ``checkpoint`` state file names the
    newest checkpoint that verifies (checked in ``begin()``: a corrupt newest one is skipped with a
    warning), so ``Estimator.train/evaluate/predict``, ``MonitoredTrainingSession`` and
    ``tf.train.latest_checkpoint`` resume from it natively, global step included.

    The hook saves again in ``end()``, and not right after a restore (TF's hook rewrites the
    checkpoint it just restored). Best-N ranks by either source:

    - a scalar tensor of the training graph (``monitor="loss"`` or ``"loss:0"``), reduced over the
      steps since the previous save (``monitor_reduce="mean"``, or ``"last"`` for a streaming
      metric that is already cumulative);
    - the metrics of ``estimator.evaluate`` (``monitor_reduce="report"``): each checkpoint waits,
      protected from rotation, until ``hook.report(eval_results)`` attaches its metrics.

    Example:

    ```python
    model_dir = "runs/mnist"
    hook = CheckpointHook(model_dir, save_steps=steps_per_epoch, max_to_keep=3, keep_best=1,
                          monitor="accuracy", monitor_reduce="report", mode="max")
    estimator = tf.estimator.Estimator(model_fn, model_dir=model_dir)
    for epoch in range(10):
        estimator.train(train_input_fn, steps=steps_per_epoch, hooks=[hook])
        hook.report(estimator.evaluate(eval_input_fn))   # keeps the best epoch
    ```

    With ``MonitoredTrainingSession``:

    ```python
    hook = CheckpointHook("runs/a", save_steps=100, max_to_keep=5, keep_best=2, monitor="loss")
    with tf.compat.v1.train.MonitoredTrainingSession(
            checkpoint_dir="runs/a", save_checkpoint_secs=None, hooks=[hook]) as sess:
        while not sess.should_stop():
            sess.run(train_op)
    ```

    Coexistence with other savers (two rotation schemes must never share a directory):

    - Estimator: this hook is a ``CheckpointSaverHook``, so Estimator adds none of its own and
      ``RunConfig``'s ``save_checkpoints_steps``/``save_checkpoints_secs`` have no effect (this
      hook's ``save_steps``/``save_secs`` rule), nor have ``keep_checkpoint_max`` and
      ``keep_checkpoint_every_n_hours`` (``max_to_keep`` and ``keep_every_n_hours`` rule).
      Estimator restores only from its ``model_dir``: give this hook the same directory. Saving
      listeners (``train(saving_listeners=...)``, ``train_and_evaluate``) run around each save as
      with TF's hook.
    - MonitoredTrainingSession: pass ``checkpoint_dir`` (this hook's directory) so it restores,
      and ``save_checkpoint_secs=None``; otherwise it adds TF's own ``CheckpointSaverHook`` (every
      600 s by default) whose Saver rotates ``model.ckpt-*`` by its own count.
    - The hook warns when it finds checkpoints its manifest does not list, or a ``checkpoint``
      state file it did not write, and when the session starts below the global step of the
      checkpoint it offered (the session restored from elsewhere). It never deletes files its
      manifest does not list: in a ``model_dir`` of stock TF checkpoints, Estimator restores the
      newest as usual, and those files stay until you remove them.

    Args:
        checkpoint_dir: the directory for checkpoints, ``checkpoints.json`` and TF's
            ``checkpoint`` file (Estimator's ``model_dir``).
        save_secs: save every N seconds. Exactly one of ``save_secs`` and ``save_steps``.
        save_steps: save every N global steps.
        max_to_keep: keep the N newest checkpoints (None: all). The newest is never deleted.
        keep_best: also keep the N best by ``monitor``/``mode``.
        keep_every_n_hours: never delete one checkpoint per N hours of wall-clock time (spaced by
            the manifest's save times, so it survives restarts).
        monitor: the metric ranked for best-N: a scalar tensor's name (``"loss"``, ``"loss:0"``),
            or with ``monitor_reduce="report"`` a key of ``estimator.evaluate``'s results.
        monitor_reduce: ``"mean"`` of the monitor tensor over the steps since the previous save,
            ``"last"`` value (a streaming metric), or ``"report"``: the value comes from
            :meth:`report`.
        mode: ``"min"``, ``"max"``, or ``"auto"`` (inferred from the monitor's name).
        is_chief: whether this task saves; default from ``TF_CONFIG`` (True without a cluster).
            On other tasks the hook does nothing.
        checkpoint_basename: the prefix base name (TF's default ``model.ckpt``).
        listeners: ``tf.compat.v1.train.CheckpointSaverListener`` objects called around saves.
        save_on_preemption: ``True`` (the default): SIGTERM or SIGUSR1 (what Kubernetes, spot
            VMs and SLURM send before they kill a job) makes the hook save after the step in
            progress (even if none is due) and request a stop; in ``end()`` the handlers
            installed before are restored and the signal is re-delivered to them: the default
            action ends the process with status 143 for SIGTERM (138 for SIGUSR1), your own
            handler runs. The handler only sets a flag, so a signal during a save never
            interrupts it. Installed in ``begin()``, from the main thread only, on the chief.
            A session that fails skips ``end()``: a later signal then finds the training call
            (``Estimator.train``, or the code that opened the session) gone and is re-delivered
            at once. A tuple of signals replaces the default pair; ``False`` leaves signal
            handling alone.

    Attributes:
        records: this directory's manifest records of the series, oldest first.
        best: the best monitored value so far (None before one is known).
        best_checkpoint: the prefix of the best checkpoint, or None.
        latest_checkpoint: the prefix of the newest checkpoint, or None.
        preempted: whether the last session saved and stopped for a preemption signal.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        save_secs: float | None = None,
        save_steps: int | None = None,
        *,
        max_to_keep: int | None = 5,
        keep_best: int = 0,
        keep_every_n_hours: float | None = None,
        monitor: str | None = None,
        monitor_reduce: str = "mean",
        mode: str = "auto",
        is_chief: bool | None = None,
        checkpoint_basename: str = "model.ckpt",
        listeners: Sequence[tf.compat.v1.train.CheckpointSaverListener] | None = None,
        save_on_preemption: bool | tuple = True,
    ) -> None:
        if (save_steps is None) == (save_secs is None):
            raise ValueError(
                "Pass exactly one of save_steps and save_secs. "
                f"Received: save_steps={save_steps!r}, save_secs={save_secs!r}"
            )
        validate_count("save_steps", save_steps, minimum=1)
        validate_positive_number("save_secs", save_secs)
        checkpoint_dir = validate_directory("checkpoint_dir", checkpoint_dir)
        validate_basename("checkpoint_basename", checkpoint_basename)
        if is_chief is not None and not isinstance(is_chief, bool):
            raise TypeError(f"is_chief must be True, False or None. Received: is_chief={is_chief!r}")
        listeners = _validate_listeners(listeners)
        self._preemption = PreemptionGuard(signals_from(save_on_preemption))
        if not isinstance(monitor_reduce, str) or monitor_reduce not in _REDUCTIONS:
            raise ValueError(
                f"monitor_reduce must be one of {list(_REDUCTIONS)}. "
                f"Received: monitor_reduce={monitor_reduce!r}"
            )
        if monitor_reduce == "report" and monitor is None:
            raise ValueError(
                "monitor_reduce='report' ranks checkpoints by a reported metric: pass "
                "monitor=<a key of estimator.evaluate's results>. Received: monitor=None"
            )
        super().__init__(
            checkpoint_dir,
            save_secs=save_secs,
            save_steps=save_steps,
            checkpoint_basename=checkpoint_basename,
            listeners=listeners,
        )
        # The state the hook uses is its own, not what CheckpointSaverHook.__init__ happens to
        # set under these private names in this TF version (the base class is subclassed only so
        # that Estimator adds no saver of its own; every hook method is overridden).
        self._checkpoint_dir = checkpoint_dir
        self._save_path = os.path.join(checkpoint_dir, checkpoint_basename)
        self._listeners = listeners
        self._timer = tf.compat.v1.train.SecondOrStepTimer(
            every_secs=save_secs, every_steps=save_steps
        )
        self._saver: tf.compat.v1.train.Saver | None = None
        # Steps one session.run advances; unknown unless TPUEstimator says (_set_steps_per_run):
        # then a save may be due after any run, as in TF's hook.
        self._steps_per_run = 1_000_000
        self._reduce = monitor_reduce
        # The manifest key: "loss:0" and "loss" both record as "loss".
        tensor_named = isinstance(monitor, str) and monitor_reduce != "report"
        key = re.sub(r":\d+$", "", monitor) if tensor_named else monitor
        self._monitor, self._monitor_key = monitor, key
        policy = build_policy(
            max_to_keep=max_to_keep,
            keep_best=keep_best,
            keep_every_n_hours=keep_every_n_hours,
            monitor=key,
            mode=mode,
        )
        self._is_chief = _chief_from_tf_config() if is_chief is None else is_chief
        self._series = PrefixSeries(
            checkpoint_dir,
            checkpoint_basename,
            framework="estimator",
            policy=policy,
            argname="checkpoint_dir",
            foreign_hint=_FOREIGN_HINT,
        )
        # The records are known from construction on (e.g. to resume a loop); begin() verifies.
        self._series.engine.reload()
        self._offered: Record | None = None
        self._global_step: tf.Variable | None = None
        self._monitor_tensor: tf.Tensor | None = None
        self._sum, self._count, self._last = 0.0, 0, None

    # -- what is there ------------------------------------------------------------------------

    @property
    def latest_checkpoint(self) -> str | None:
        """The prefix of the newest checkpoint, or None."""
        records = self._series.engine.records
        return self._series.prefix(records[-1] if records else None)

    @property
    def preempted(self) -> bool:
        """Whether the last session saved and stopped for a preemption signal."""
        return self._preemption.preempted

    def _set_steps_per_run(self, steps_per_run: int) -> None:
        # TPUEstimator calls this private CheckpointSaverHook method (keras_ckpt/_compat.py).
        self._steps_per_run = steps_per_run

    # -- SessionRunHook -----------------------------------------------------------------------

    def begin(self) -> None:
        if not self._is_chief:
            return
        graph = tf.compat.v1.get_default_graph()
        self._global_step = tf.compat.v1.train.get_global_step(graph)
        if self._global_step is None:
            raise RuntimeError("Global step should be created to use CheckpointHook.")
        uses_tensor = self._monitor is not None and self._reduce != "report"
        self._monitor_tensor = self._find_monitor(graph) if uses_tensor else None
        # Every saveable object of the graph. Saves use write_state=False, so this Saver neither
        # writes TF's state file nor rotates: the engine commits and prunes. Stored where TF's
        # hook keeps its saver, so the inherited _get_saver() returns it.
        self._saver = tf.compat.v1.train.Saver(sharded=True)
        self._offered = self._series.open()
        for listener in self._listeners:
            listener.begin()
        # Estimator.train's frame (the outermost estimator one), else the caller that opens the
        # MonitoredTrainingSession and runs its loop: while it runs, the session trains.
        self._preemption.install(
            inspect.currentframe(), through=("tensorflow", "tensorflow_estimator"),
            loop=("tensorflow_estimator",),
        )

    def after_create_session(self, session: tf.compat.v1.Session, coord: Any) -> None:
        if not self._is_chief:
            return
        step = int(session.run(self._global_step))
        if self._offered is not None and step < self._offered.step:
            warnings.warn(
                f"keras_ckpt: {self._series.directory} holds checkpoint {self._offered.name!r} "
                f"(global step {self._offered.step}), but the session started at global step "
                f"{step}: it did not restore from this directory. Give Estimator's model_dir or "
                "MonitoredTrainingSession's checkpoint_dir the hook's checkpoint_dir.",
                stacklevel=2,
            )
        # No save here: the next one is due a full interval after the restored (or initial) step.
        self._timer.update_last_triggered_step(step)
        self._sum, self._count, self._last = 0.0, 0, None
        # TF's hook writes the graph for TensorBoard here; keep that.
        graph = session.graph
        tf.io.write_graph(graph.as_graph_def(add_shapes=True), self._checkpoint_dir, "graph.pbtxt")
        tf.compat.v1.summary.FileWriterCache.get(self._checkpoint_dir).add_graph(graph)

    def before_run(self, run_context: Any) -> tf.compat.v1.train.SessionRunArgs | None:
        if not self._is_chief:
            return None
        fetches = {"step": self._global_step}
        if self._monitor_tensor is not None:
            fetches["monitor"] = self._monitor_tensor
        return tf.compat.v1.train.SessionRunArgs(fetches)

    def after_run(self, run_context: Any, run_values: Any) -> None:
        if not self._is_chief:
            return
        results = run_values.results
        if "monitor" in results:
            value = float(results["monitor"])
            self._sum, self._count, self._last = self._sum + value, self._count + 1, value
        # The fetched step is the value before this step's increment; read the real one, as TF's
        # CheckpointSaverHook does, only when a save may be due.
        if self._preemption.requested:
            step = int(run_context.session.run(self._global_step))
            if step != self._timer.last_triggered_step():
                self._timer.update_last_triggered_step(step)
                self._save(run_context.session, step)
            self._preemption.preempted = True
            run_context.request_stop()
        elif self._timer.should_trigger_for_step(results["step"] + self._steps_per_run):
            step = int(run_context.session.run(self._global_step))
            if self._timer.should_trigger_for_step(step):
                self._timer.update_last_triggered_step(step)
                if self._save(run_context.session, step):
                    run_context.request_stop()

    def end(self, session: tf.compat.v1.Session) -> None:
        if not self._is_chief:
            return
        step = int(session.run(self._global_step))
        if step != self._timer.last_triggered_step():
            self._save(session, step)
        for listener in self._listeners:
            listener.end(session, step)
        self._series.engine.close()  # another process may write here between train() calls
        if self._preemption.received:  # handled in after_run, or it came after the last step
            self._preemption.preempted = True
        self._preemption.redeliver()

    # -- metrics from evaluation --------------------------------------------------------------

    def report(self, eval_results: Mapping[str, Any]) -> Record | None:
        """Attach ``estimator.evaluate``'s results to the checkpoint they evaluated.

        The checkpoint is the one of ``eval_results["global_step"]``; retention is re-applied,
        so a better evaluation can make it best and a worse one lets it rotate away. Checkpoints
        saved before it stop waiting for a report (``evaluate`` reads the newest checkpoint, so
        theirs will not come). With a monitor tensor, the reported metrics are recorded, but the
        monitored value keeps coming from the tensor so that all checkpoints rank alike.

        Example:

        ```python
        estimator.train(train_input_fn, steps=steps_per_epoch, hooks=[hook])
        hook.report(estimator.evaluate(eval_input_fn))
        ```

        Args:
            eval_results: the dict ``estimator.evaluate`` returns (with its ``global_step``).

        Returns:
            The updated record, or None (with a warning) when no checkpoint of that global step
            exists in this directory.
        """
        if "global_step" not in eval_results:
            raise ValueError(
                "report() takes the dict that estimator.evaluate returns; its 'global_step' "
                f"names the evaluated checkpoint. Received keys: {sorted(eval_results)}"
            )
        step = int(eval_results["global_step"])
        metrics = scalar_logs({k: v for k, v in eval_results.items() if k != "global_step"})
        if self._reduce != "report":
            metrics.pop(self._monitor_key, None)
        engine = self._series.engine
        engine.reload()
        name = f"{self._series.basename}-{step}"
        records = engine.records
        index = next((i for i, r in enumerate(records) if r.name == name), None)
        if index is None:
            warnings.warn(
                f"keras_ckpt: no checkpoint of global step {step} in {self._series.directory} "
                f"to attach the evaluation to (kept: {[r.name for r in records]}); its metrics "
                "are dropped. Report right after evaluating the newest checkpoint.",
                stacklevel=2,
            )
            return None
        if self._reduce == "report":
            warn_if_unscored(metrics, engine.policy, f"checkpoint {name}")
        engine.report(name, metrics)
        for older in records[:index]:
            if older.pending and engine.record_named(older.name) is not None:
                engine.report(older.name, {})
        return engine.record_named(name)

    # -- internals ----------------------------------------------------------------------------

    def _find_monitor(self, graph: tf.Graph) -> tf.Tensor:
        name = self._monitor
        try:
            if ":" in name:
                tensor = graph.get_tensor_by_name(name)
            else:
                tensor = graph.get_operation_by_name(name).outputs[0]
        except (KeyError, ValueError, IndexError):
            ops = [op.name for op in graph.get_operations()]
            close = difflib.get_close_matches(self._monitor_key, ops, n=5)
            hint = f" Close matches: {', '.join(map(repr, close))}." if close else ""
            raise ValueError(
                f"monitor={name!r} is not a tensor of the training graph.{hint} Name the tensor "
                "(e.g. tf.identity(loss, name='loss')), or pass monitor_reduce='report' to rank "
                f"by the metrics given to hook.report(). Received: monitor={name!r}"
            ) from None
        numeric = tensor.dtype.is_floating or tensor.dtype.is_integer
        if not numeric or tensor.shape.num_elements() not in (1, None):
            raise ValueError(
                f"monitor={name!r} must name a numeric scalar tensor; it is "
                f"{tensor.dtype.name} with shape {tensor.shape}. Received: monitor={name!r}"
            )
        return tensor

    def _take_monitored(self, step: int) -> dict[str, float]:
        """The monitor's value for the checkpoint at ``step``; restarts the reduction."""
        if self._monitor_tensor is None:
            return {}
        if self._reduce == "mean":
            value = self._sum / self._count if self._count else None
        else:
            value = self._last
        self._sum, self._count, self._last = 0.0, 0, None
        metrics = {} if value is None else {self._monitor_key: value}
        warn_if_unscored(metrics, self._series.engine.policy, f"checkpoint at global step {step}")
        return metrics

    def _save(self, session: tf.compat.v1.Session, step: int) -> bool:
        """Save the checkpoint of ``step``; True when a listener asks to stop training."""
        for listener in self._listeners:
            listener.before_save(session, step)
        metrics = self._take_monitored(step)

        def write(prefix: str) -> None:
            self._saver.save(session, prefix, write_meta_graph=True, write_state=False)

        tf.compat.v1.logging.info("Saving checkpoints for %d into %s.", step, self._save_path)
        tx = self._series.commit(
            step, write, step=step, metrics=metrics, pending=self._reduce == "report"
        )
        for gone in tx.deleted:
            tf.compat.v1.logging.info("Removed checkpoint %s (retention).", gone.name)
        stops = [listener.after_save(session, step) for listener in self._listeners]
        return any(stops)
