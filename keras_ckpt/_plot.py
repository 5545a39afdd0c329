"""``keras-ckpt plot``: the metric history of a directory's checkpoints across restarts.

One panel per metric (each series' monitor, or the one asked for, and ``loss``); one line per
run of each series (a run is what one start without ``resume=True`` wrote), every save marked,
the checkpoints retention keeps circled and each series' best starred. Matplotlib's object API
with the Agg canvas: no pyplot state, no display needed.
"""

from __future__ import annotations

import math
import os
from typing import Any

from keras_ckpt import storage
from keras_ckpt.manifest import Manifest, Record, Save

_X = {"epoch": "epoch", "step": "step", "time": "time"}


def _matplotlib() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ValueError("keras-ckpt plot needs matplotlib: pip install 'keras-ckpt[plot]'") from None
    return Figure, FigureCanvasAgg, MaxNLocator


def metrics_to_plot(m: Manifest, metric: str | None) -> list[str]:
    """The asked-for metric or every series' monitor (else the first metric saved), then ``loss``."""
    logged = [k for r in m.saves() for k in r.metrics]
    if metric is not None:
        if metric not in logged:
            raise ValueError(f"--metric {metric!r} was not logged with any checkpoint "
                             f"(metrics: {', '.join(sorted(set(logged))) or 'none'})")
        wanted = [metric]
    else:
        wanted = [s.monitor for s in m.series.values() if s.monitor and s.monitor in logged]
        if not wanted and logged:
            wanted = [logged[0]]
    if "loss" in logged:
        wanted.append("loss")
    out = list(dict.fromkeys(wanted))
    if not out:
        raise ValueError("no checkpoint was saved with metrics: nothing to plot")
    return out


def _x_of(r: Record | Save, x: str) -> float:
    return float(getattr(r, _X[x]))


def _value(r: Record | Save, metric: str) -> float:
    v = r.metrics.get(metric)
    return math.nan if v is None else float(v)


def figure(m: Manifest, *, metric: str | None = None, x: str | None = None, title: str = "") -> Any:
    """The plot as a matplotlib ``Figure`` (its artists carry gids: ``saves``, ``kept``, ``best``).

    Every save is drawn from the manifest's history (the last ``HISTORY_MAX``), also those whose
    files retention has deleted; the checkpoints still listed are circled. ``x`` is ``"epoch"``,
    ``"step"`` or ``"time"``; by default the epoch, or the step where no save counted epochs (a
    TF ``CheckpointManager``).
    """
    Figure, _, MaxNLocator = _matplotlib()
    if x is None:
        x = "epoch" if any(r.epoch for r in m.checkpoints) else "step"
    if x not in _X:
        raise ValueError(f"x must be one of {', '.join(_X)}. Received: x={x!r}")
    metrics = metrics_to_plot(m, metric)
    fig = Figure(figsize=(8, 3.2 * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    several = len({r.series for r in m.checkpoints}) > 1
    for ax, name in zip(axes, metrics):
        kept_label, best_label = "kept", "best"  # one legend entry each, whatever the series
        saves = m.saves()
        for series in sorted({r.series for r in m.checkpoints}):
            records = m.records(series)
            history = [h for h in saves if h.series == series]
            for run in sorted({h.run for h in history}):
                in_run = [h for h in history if h.run == run and name in h.metrics]
                if not in_run:
                    continue
                label = f"{series} run {run}" if several else f"run {run}"
                ax.plot([_x_of(r, x) for r in in_run], [_value(r, name) for r in in_run],
                        marker="o", markersize=4, label=label, gid="saves")
            kept = [r for r in records if r.kept and name in r.metrics]
            if kept:
                ax.scatter([_x_of(r, x) for r in kept], [_value(r, name) for r in kept], s=110,
                           facecolors="none", edgecolors="black", linewidths=1.2, zorder=3,
                           label=kept_label, gid="kept")
                kept_label = None
            state = m.series.get(series)
            best = [r for r in records if state is not None and r.name == state.best_name
                    and name in r.metrics]
            if best:
                ax.scatter([_x_of(r, x) for r in best], [_value(r, name) for r in best], s=220,
                           marker="*", color="gold", edgecolors="black", zorder=4,
                           label=best_label, gid="best")
                best_label = None
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    if x != "time":
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("time (Unix seconds)" if x == "time" else x)
    if title:
        axes[0].set_title(title)
    return fig


def save(fig: Any, path: str) -> None:
    """Write ``fig`` as a PNG at ``path``, atomically."""
    _, FigureCanvasAgg, _ = _matplotlib()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = storage.temp_path(directory, os.path.basename(path))
    try:
        FigureCanvasAgg(fig).print_png(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
