"""Python's and numpy's global RNG states as plain values (JSON, ``torch.load(weights_only=True)``)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np


def capture() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {
            "kind": kind,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def restore(state: dict[str, Any]) -> None:
    py = state.get("python")
    if py:
        random.setstate((py["version"], tuple(int(x) for x in py["state"]), py["gauss_next"]))
    npy = state.get("numpy")
    if npy:
        keys = np.asarray([int(k) for k in npy["keys"]], dtype=np.uint32)
        np.random.set_state(
            (npy["kind"], keys, int(npy["pos"]), int(npy["has_gauss"]), float(npy["cached_gaussian"]))
        )
