"""The tensors of one checkpoint file, by name, as numpy arrays (for ``keras-ckpt diff``).

Keras files are read with h5py (no Keras needed): every dataset but keras_ckpt's state, named
by its HDF5 path. PyTorch: the model's ``state_dict`` (``torch.load(weights_only=True)``).
TensorFlow: every variable of the checkpoint (``tf.train.load_checkpoint``), named by its key.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from keras_ckpt import _export
from keras_ckpt.manifest import Record

_TF_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"  # TF's serialized object graph, not a tensor


def read(directory: str, record: Record) -> dict[str, np.ndarray]:
    kind = _export.kind_of(record)
    path = os.path.join(directory, record.files[0].path)
    if kind == "tf":
        return _tf(os.path.join(directory, record.name))
    if kind == "torch":
        return _torch(path)
    if kind == "keras":
        with _export._zip_member(path, _export.WEIGHTS_MEMBER) as member:
            return _h5(member)
    with open(path, "rb") as f:
        return _h5(f)


def _h5(f: Any) -> dict[str, np.ndarray]:
    h5py = _export._h5py()
    out: dict[str, np.ndarray] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and name.split("/")[0] != _export.STATE_GROUP:
            out[name] = np.asarray(obj[()])

    with h5py.File(f, "r") as h5:
        h5.visititems(visit)
    return out


def _torch(path: str) -> dict[str, np.ndarray]:
    import torch

    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = payload.get("model", {}) if isinstance(payload, dict) else {}
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in model.items() if isinstance(v, torch.Tensor)}


def _tf(prefix: str) -> dict[str, np.ndarray]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    return {k: np.asarray(reader.get_tensor(k)) for k in sorted(reader.get_variable_to_shape_map())
            if k != _TF_GRAPH_KEY}


def diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per tensor name: ``status`` (same, changed, added, removed, reshaped) and, where both
    hold numbers of one shape, the largest absolute change and the change's norm relative to A's.
    """
    rows = []
    for name in sorted(set(a) | set(b)):
        row: dict[str, Any] = {"name": name}
        if name not in b or name not in a:
            row["status"] = "removed" if name not in b else "added"
            row["shape"] = list((a.get(name) if name in a else b[name]).shape)
        elif a[name].shape != b[name].shape:
            row.update(status="reshaped", shape_a=list(a[name].shape), shape_b=list(b[name].shape))
        elif not (np.issubdtype(a[name].dtype, np.number) and np.issubdtype(b[name].dtype, np.number)):
            row.update(status="same" if np.array_equal(a[name], b[name]) else "changed",
                       shape=list(a[name].shape))
        else:
            x, y = a[name].astype(np.float64), b[name].astype(np.float64)
            delta = y - x
            max_abs = float(np.max(np.abs(delta))) if delta.size else 0.0
            norm = float(np.linalg.norm(x))
            row.update(
                status="same" if np.array_equal(x, y) else "changed",
                shape=list(a[name].shape),
                max_abs_diff=max_abs,
                rel_l2=float(np.linalg.norm(delta)) / norm if norm else (0.0 if max_abs == 0 else None),
            )
        rows.append(row)
    return rows
