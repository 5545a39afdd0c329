"""keras-ckpt plot: the plotted data (saves, kept, best, runs), the PNG, and the missing extra."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from keras_ckpt import _plot  # noqa: E402
from keras_ckpt import manifest as mf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _cli_dirs  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("torch")
    _cli_dirs.torch_dir(str(d))
    return str(d)


def by_gid(ax, gid):
    return [a for a in [*ax.lines, *ax.collections] if a.get_gid() == gid]


def points(artist):
    if hasattr(artist, "get_offsets"):
        return [tuple(p) for p in np.asarray(artist.get_offsets())]
    return list(zip(*artist.get_data()))


def test_plot_marks_every_save_each_run_the_kept_and_the_best(torch_run):
    m = mf.load(torch_run)
    fig = _plot.figure(m)
    metric_ax, loss_ax = fig.axes
    assert metric_ax.get_ylabel() == "val_loss" and loss_ax.get_ylabel() == "loss"
    assert loss_ax.get_xlabel() == "epoch"
    runs = by_gid(metric_ax, "saves")
    assert [line.get_label() for line in runs] == ["run 1", "run 2"]  # the restart is its own line
    # Every save is a marker, at (epoch, val_loss) as training logged them: also the ones whose
    # files retention deleted (the manifest's history remembers them).
    expected = sorted((h.epoch, h.metrics["val_loss"]) for h in m.history)
    np.testing.assert_allclose(sorted(p for line in runs for p in points(line)), expected)
    assert sum(len(points(line)) for line in runs) == len(m.history) > len(m.checkpoints) == 3
    assert [p[0] for p in points(runs[0])] == [h.epoch for h in m.history if h.run == 1]
    (kept,) = by_gid(metric_ax, "kept")
    assert len(points(kept)) == sum(1 for r in m.checkpoints if r.kept)
    (best,) = by_gid(metric_ax, "best")
    best_record = next(r for r in m.checkpoints if r.name == m.series[next(iter(m.series))].best_name)
    assert points(best) == [(best_record.epoch, pytest.approx(best_record.metrics["val_loss"]))]
    assert points(best) == [(2.0, pytest.approx(_cli_dirs.VAL_LOSSES[1] + 0.05))]
    (loss_best,) = by_gid(loss_ax, "best")  # the best checkpoint is marked in every panel
    assert points(loss_best) == [(2.0, pytest.approx(best_record.metrics["loss"]))]


def test_plot_command_writes_a_png(torch_run, tmp_path):
    out = tmp_path / "plots" / "history.png"
    done = subprocess.run([sys.executable, "-m", "keras_ckpt", "plot", torch_run, "-o", str(out),
                           "--x", "step"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == PNG and os.path.getsize(out) > 5000
    assert os.listdir(out.parent) == ["history.png"]


def test_plot_a_chosen_metric_and_the_step_axis(torch_run):
    m = mf.load(torch_run)
    fig = _plot.figure(m, metric="loss", x="step")
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss"]
    assert fig.axes[0].get_xlabel() == "step"
    with pytest.raises(ValueError, match="'accuracy' was not logged"):
        _plot.figure(m, metric="accuracy")


def test_plot_tf_manager_uses_steps(tmp_path):
    pytest.importorskip("tensorflow")
    _cli_dirs.tf_dir(str(tmp_path))
    fig = _plot.figure(mf.load(str(tmp_path)))
    assert fig.axes[-1].get_xlabel() == "step"
    (line,) = by_gid(fig.axes[0], "saves")
    m = mf.load(str(tmp_path))
    # Every save, the rotated-out ones too; the three still listed are circled.
    assert [p[0] for p in points(line)] == [float(h.step) for h in m.history] == [1.0, 2.0, 3.0, 4.0, 5.0]
    (kept,) = by_gid(fig.axes[0], "kept")
    assert sorted(p[0] for p in points(kept)) == [2.0, 4.0, 5.0]
    (best,) = by_gid(fig.axes[0], "best")
    assert points(best) == [(2.0, pytest.approx(0.4))]


def test_without_matplotlib_the_message_names_the_extra(torch_run, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["matplotlib"] = None  # as if it were not installed
        from keras_ckpt.cli import main
        sys.exit(main(["plot", {torch_run!r}, "-o", {str(tmp_path / "x.png")!r}]))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "needs matplotlib" in done.stderr and "keras-ckpt[plot]" in done.stderr
    assert not (tmp_path / "x.png").exists()
