"""Example data: scikit-learn's digits by default (no download), real MNIST with --data DIR."""

from __future__ import annotations

import gzip
import os

import numpy as np


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"--data: no {stem}[.gz] in {directory!r}")


def load(data_dir: str | None) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((x_train, y_train), (x_test, y_test)) with images as float32 in [0, 1], shape (N, H, W)."""
    if data_dir is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.images / 16.0).astype("float32")
        y = digits.target.astype("int64")
        rng = np.random.default_rng(0)
        order = rng.permutation(len(x))
        x, y = x[order], y[order]
        split = int(0.8 * len(x))
        return (x[:split], y[:split]), (x[split:], y[split:])
    npz = os.path.join(data_dir, "mnist.npz")
    if os.path.exists(npz):
        with np.load(npz) as f:
            parts = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    else:
        parts = tuple(_read_idx(_find(data_dir, stem)) for stem in (
            "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    x_train, y_train, x_test, y_test = parts
    return ((x_train / 255.0).astype("float32"), y_train.astype("int64")), (
        (x_test / 255.0).astype("float32"), y_test.astype("int64"))
