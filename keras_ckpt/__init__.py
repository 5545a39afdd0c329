"""keras_ckpt: checkpoints that rotate, keep the best, and resume exactly.

Public names are imported lazily so that ``import keras_ckpt`` pulls in no framework: a PyTorch
user never imports TensorFlow, and a TF 2.15 user never imports Keras 3.
"""

from __future__ import annotations

import importlib
from typing import Any

from keras_ckpt._version import __version__

_LAZY = {
    "ModelCheckpoint": ("keras_ckpt.keras", "ModelCheckpoint"),
    "RetentionPolicy": ("keras_ckpt.policy", "RetentionPolicy"),
    "Record": ("keras_ckpt.manifest", "Record"),
    "ManifestError": ("keras_ckpt.manifest", "ManifestError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'keras_ckpt' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
