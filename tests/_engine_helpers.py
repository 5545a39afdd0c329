"""What the engine-level tests share: an open engine, one byte-payload save, a manifest edit."""

from __future__ import annotations

import json
import os

from keras_ckpt.engine import Engine
from keras_ckpt.policy import RetentionPolicy


def make_engine(directory, template="ck-{epoch:03d}.bin", **policy):
    policy.setdefault("monitor", "val_loss")
    e = Engine(os.path.join(directory, template), framework="test", policy=RetentionPolicy(**policy))
    e.open()
    return e


def save(engine, epoch, value, payload=b"x" * 1000, template=None):
    path = os.path.join(engine.directory, (template or engine.series).format(epoch=epoch))
    with engine.transaction(path, epoch=epoch, step=epoch * 10, metrics={"val_loss": value}) as tx:
        with tx.open() as f:
            f.write(payload)
    return tx


def rewrite(directory, fn):
    """Edit ``checkpoints.json`` by hand, as a damaged or hostile manifest would be."""
    p = os.path.join(directory, "checkpoints.json")
    with open(p) as f:
        data = json.load(f)
    fn(data)
    with open(p, "w") as f:
        json.dump(data, f)
