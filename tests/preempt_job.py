"""Tiny training jobs that tests/test_preemption.py signals in the middle of an epoch.

    python tests/preempt_job.py keras DIR [--pace MARKER] [--log FILE] [--dump FILE] [--resume] ...
    python tests/preempt_job.py torch DIR [--pace MARKER] [--log FILE] [--dump FILE] [--resume]
        [--workers N] ...
    python tests/preempt_job.py mts DIR [--pace MARKER] [--log FILE] --last-step N
    python tests/preempt_job.py estimator DIR ...   (TF <= 2.15 with tensorflow-estimator)

``--pace MARKER``: once the job is in the middle of an epoch (the second epoch; global step 15
for ``mts``), it writes MARKER and from then on sleeps between batches, so a signal sent after
MARKER appears lands mid-epoch. ``--log FILE`` gets one line per trained batch: the global step
after it (written before the checkpointer sees that batch end). ``--user-handler FILE``
installs a SIGTERM handler before training that writes FILE and exits with status 3.
``--slow-save MARKER`` (torch) makes the save after the pace marker write MARKER and take 1 s,
so a second signal can be sent while that save is running. The last stdout line of a run that
finishes is a JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

PACE_S = 0.3


def _append(path: str | None, text: str) -> None:
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


def _touch(path: str) -> None:
    with open(path, "w") as f:
        f.write("ready\n")


def _signals(value: str) -> bool | tuple:
    if value in ("true", "false"):
        return value == "true"
    return tuple(signal.Signals[f"SIG{name}"] for name in value.split(","))


def _user_handler(path: str) -> None:
    def handler(signum, frame):
        with open(path, "w") as f:
            f.write(f"{signal.Signals(signum).name}\n")
        sys.exit(3)

    signal.signal(signal.SIGTERM, handler)


def keras_job(args: argparse.Namespace) -> dict:
    import keras
    import numpy as np

    import keras_ckpt

    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 6)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dropout(0.3), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")

    class Pace(keras.callbacks.Callback):
        paced = False

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            _append(args.log, str(int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))))
            if args.pace and self.epoch == 1 and batch == 2:
                _touch(args.pace)
                self.paced = True
            if self.paced:
                time.sleep(PACE_S)

    ckpt = keras_ckpt.ModelCheckpoint(
        os.path.join(args.dir, "ckpt-{epoch:02d}.keras"), monitor="loss", resume=args.resume,
        save_on_preemption=_signals(args.signals),
    )
    hist = model.fit(x, y, batch_size=16, epochs=3, shuffle=True, callbacks=[Pace(), ckpt],
                     verbose=0)
    if args.dump:
        arrays = {f"w{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.weights)}
        arrays.update({f"o{i}": keras.ops.convert_to_numpy(v)
                       for i, v in enumerate(model.optimizer.variables)})
        np.savez(args.dump, loss=np.asarray(hist.history["loss"]), **arrays)
    return {"epochs": hist.epoch, "restored": ckpt.restored_path, "preempted": ckpt.preempted,
            "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations))}


def torch_job(args: argparse.Namespace) -> dict:
    import random

    import numpy as np
    import torch

    from keras_ckpt.torch import ModelCheckpoint

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    x = torch.randn(96, 6, generator=torch.Generator().manual_seed(1234))
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    paced = False

    class SlowState:
        """Saved with the checkpoint; the save after the pace marker takes a second."""

        def state_dict(self) -> dict:
            if paced and args.slow_save:
                _touch(args.slow_save)
                time.sleep(1.0)
            return {"n": 0}

        def load_state_dict(self, state: dict) -> None:
            pass

    ckpt = ModelCheckpoint(os.path.join(args.dir, "ckpt-{epoch:02d}.pt"), model=model,
                           optimizer=opt, scheduler=sched, extra={"slow": SlowState()},
                           monitor="loss", resume=args.resume,
                           save_on_preemption=_signals(args.signals))
    batches, epochs = 6, 3
    # Shuffled by the DataLoader from torch's global RNG, which dropout draws from too.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16,
                                         shuffle=True, num_workers=args.workers)
    start = ckpt.on_train_begin()
    for epoch in range(start, epochs):
        for batch, (xb, yb) in ckpt.enumerate(loader):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            _append(args.log, str(epoch * batches + batch + 1))
            if args.pace and epoch == 1 and batch == 1:
                _touch(args.pace)
                paced = True
            if paced:
                time.sleep(PACE_S)
            ckpt.on_train_batch_end(batch, logs={"loss": loss.item()})
        sched.step()
        ckpt.on_epoch_end(epoch, logs={"loss": loss.item()})
    ckpt.on_train_end()
    if args.dump:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, args.dump)
    return {"restored": ckpt.restored_path, "preempted": ckpt.preempted,
            "handler": str(signal.getsignal(signal.SIGTERM))}


def mts_job(args: argparse.Namespace) -> dict:
    import numpy as np
    import tensorflow as tf

    from keras_ckpt.estimator import CheckpointHook

    tf.compat.v1.set_random_seed(7)
    gs = tf.compat.v1.train.get_or_create_global_step()
    data = tf.constant(np.random.RandomState(0).randn(16, 4, 3).astype("float32"))
    xb = tf.gather(data, gs % 16)
    target = tf.reduce_sum(xb * [1.0, -2.0, 0.5], axis=1, keepdims=True)
    pred = tf.matmul(xb, tf.compat.v1.get_variable("w", [3, 1]))
    loss = tf.identity(tf.reduce_mean((pred - target) ** 2), name="loss")
    train_op = tf.compat.v1.train.AdamOptimizer(0.01).minimize(loss, global_step=gs)

    class Pace(tf.compat.v1.train.SessionRunHook):
        paced = False
        first: int | None = None

        def after_create_session(self, session, coord):
            self.first = int(session.run(gs))

        def after_run(self, run_context, run_values):
            step = int(run_context.session.run(gs))
            _append(args.log, str(step))
            if args.pace and step == 15:
                _touch(args.pace)
                self.paced = True
            if self.paced:
                time.sleep(PACE_S)

    hook = CheckpointHook(args.dir, save_steps=10, max_to_keep=3, monitor="loss",
                          save_on_preemption=_signals(args.signals))
    pace = Pace()
    hooks = [pace, hook, tf.compat.v1.train.StopAtStepHook(last_step=args.last_step)]
    with tf.compat.v1.train.MonitoredTrainingSession(
        checkpoint_dir=args.dir, save_checkpoint_secs=None, save_summaries_steps=None,
        log_step_count_steps=None, hooks=hooks,
    ) as sess:
        while not sess.should_stop():
            sess.run(train_op)
    return {"first_step": pace.first, "preempted": hook.preempted}


def estimator_job(args: argparse.Namespace) -> dict:
    """tf.estimator (TF <= 2.15): the same graph as ``mts``, trained with Estimator.train."""
    import numpy as np
    import tensorflow as tf

    from keras_ckpt.estimator import CheckpointHook

    def model_fn(features, labels, mode):
        gs = tf.compat.v1.train.get_global_step()
        w = tf.compat.v1.get_variable("w", [3, 1])
        loss = tf.identity(tf.reduce_mean((tf.matmul(features, w) - labels) ** 2), name="loss")
        train_op = tf.compat.v1.train.AdamOptimizer(0.01).minimize(loss, global_step=gs)
        return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op)

    def input_fn():
        x = np.random.RandomState(0).randn(64, 3).astype("float32")
        y = x @ np.array([[1.0], [-2.0], [0.5]], dtype="float32")
        return tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(8)

    class Pace(tf.compat.v1.train.SessionRunHook):
        paced = False
        first: int | None = None

        def begin(self):
            self.gs = tf.compat.v1.train.get_global_step()

        def after_create_session(self, session, coord):
            self.first = int(session.run(self.gs))

        def after_run(self, run_context, run_values):
            step = int(run_context.session.run(self.gs))
            _append(args.log, str(step))
            if args.pace and step == 15:
                _touch(args.pace)
                self.paced = True
            if self.paced:
                time.sleep(PACE_S)

    hook = CheckpointHook(args.dir, save_steps=10, max_to_keep=3, monitor="loss",
                          save_on_preemption=_signals(args.signals))
    pace = Pace()
    estimator = tf.estimator.Estimator(model_fn, model_dir=args.dir)
    estimator.train(input_fn, max_steps=args.last_step, hooks=[pace, hook])
    return {"first_step": pace.first, "preempted": hook.preempted}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["keras", "torch", "mts", "estimator"])
    ap.add_argument("dir")
    ap.add_argument("--pace")
    ap.add_argument("--log")
    ap.add_argument("--dump")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--signals", default="true")
    ap.add_argument("--user-handler")
    ap.add_argument("--slow-save")
    ap.add_argument("--last-step", type=int, default=40)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    if args.user_handler:
        _user_handler(args.user_handler)
    if args.kind == "mts":
        import tensorflow as tf

        with tf.Graph().as_default():
            report = mts_job(args)
    else:
        report = {"keras": keras_job, "torch": torch_job, "estimator": estimator_job}[args.kind](args)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
