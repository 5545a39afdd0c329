"""The ``keras-ckpt`` command: look at, verify, prune, export and plot a checkpoint directory.

Reads only the manifest and the files it lists; imports no framework except to ``export`` a
framework's file (lazily, in :mod:`keras_ckpt._export`), and matplotlib only to ``plot``.
``prune`` is a writer: it takes the directory's writer lock (refused while training writes
there), finishes a commit a crash interrupted, and applies the retention policy training stored
unless told otherwise. Exit status: 0 done, 1 nothing to show or something corrupt, 2 an error
(no manifest, a newer format, bad arguments).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Sequence

from keras_ckpt import manifest as mf
from keras_ckpt import storage
from keras_ckpt.engine import Engine, in_flight, verify
from keras_ckpt.policy import UNSET, RetentionPolicy


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _number(v: float | None) -> str:
    return "nan" if v is None else f"{v:.4g}"


def _load(directory: str) -> mf.Manifest:
    if storage.path_kind(directory) != "dir":
        raise mf.ManifestError(f"{directory} is not a directory")
    m = mf.read(storage.LocalStorage(directory))
    if m is None:
        raise mf.ManifestError(
            f"{directory} has no {mf.FILENAME}: it holds no checkpoints written by keras_ckpt"
        )
    return m


def _is_best(m: mf.Manifest, r: mf.Record) -> bool:
    state = m.series.get(r.series)
    return state is not None and state.best_name == r.name


def _ls_json(directory: str, m: mf.Manifest) -> dict:
    """``ls --json``: the manifest's series and records as stored, plus what readers derive.

    Stable keys: records carry the manifest's fields, ``bytes`` (all files) and ``best``.
    """
    return {
        "directory": os.path.abspath(directory),
        "format": mf.FORMAT,
        "series": {k: v.to_json() for k, v in m.series.items()},
        "checkpoints": [
            {**r.to_json(), "bytes": sum(f.bytes for f in r.files), "best": _is_best(m, r)}
            for r in sorted(m.checkpoints, key=lambda r: r.seq)
        ],
        "in_flight": None if m.intent is None else m.intent.record.name,
    }


def _series_tables(m: mf.Manifest, terminal: bool) -> list:
    """One rich table per series: its records oldest first, the best marked, a caption on its best."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    tables = []
    for name in sorted({r.series for r in m.checkpoints}, key=lambda s: min(r.seq for r in m.records(s))):
        state = m.series.get(name) or mf.SeriesState()
        records = m.records(name)
        metrics = list(dict.fromkeys(
            [*([state.monitor] if state.monitor else []), *(k for r in records for k in r.metrics)]
        ))
        table = Table(box=box.SIMPLE_HEAD if terminal else None, show_edge=terminal, pad_edge=terminal,
                      title=None)
        table.add_column("")
        table.add_column("name")
        for col in ("run", "epoch", "step"):
            table.add_column(col, justify="right")
        table.add_column("saved")
        for col in metrics:
            table.add_column(col, justify="right")
        table.add_column("size", justify="right")
        table.add_column("kept")
        for r in records:
            best = _is_best(m, r)
            table.add_row(
                "*" if best else "", Text(r.name), str(r.run), str(r.epoch), str(r.step),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.time)),
                *(_number(r.metrics[k]) if k in r.metrics else "" for k in metrics),
                _size(sum(f.bytes for f in r.files)), Text(",".join(r.kept)),
                style="bold green" if best and terminal else None,
            )
        head = f"series {name} ({state.framework or 'unknown framework'})"
        if state.monitor:
            head += (f": best {state.monitor} ({state.mode}) = {_number(state.best)}"
                     f" [{state.best_name or 'none'}], * = best")
        tables.append((Text(head), table))
    return tables


def cmd_ls(args: argparse.Namespace) -> int:
    m = _load(args.dir)
    if args.json:
        print(json.dumps(_ls_json(args.dir, m), indent=1))
        return 0
    if not m.checkpoints:
        print(f"no checkpoints in {args.dir}")
        return 1
    from rich.console import Console

    terminal = sys.stdout.isatty()
    if terminal:
        console = Console(highlight=False)
        for head, table in _series_tables(m, terminal):
            console.print(head, style="bold")
            console.print(table)
    else:
        # Plain columns for pipes and files: no colour, no wrapping, no trailing blanks.
        buffer = io.StringIO()
        console = Console(file=buffer, force_terminal=False, color_system=None, width=1 << 16,
                          highlight=False)
        tables = _series_tables(m, terminal)
        for i, (head, table) in enumerate(tables):
            console.print(head)
            console.print(table)
            if i < len(tables) - 1:
                console.print()
        print("\n".join(line.rstrip() for line in buffer.getvalue().splitlines()))
    if m.intent is not None:
        print(f"in flight: {m.intent.record.name} (a save was interrupted; the next writer finishes it)")
    return 0


def _unlisted(directory: str, m: mf.Manifest) -> list[str]:
    """Files in ``directory`` that no record lists (not ours: the manifest, lock, temporaries)."""
    ours = {mf.FILENAME, storage.LOCK_NAME, "checkpoint"}  # TF's state file is written by us too
    listed = m.listed_files()
    return [
        n for n in storage.LocalStorage(directory).list()
        if n not in listed and n not in ours and not n.startswith(storage.TMP_PREFIX)
    ]


def cmd_verify(args: argparse.Namespace) -> int:
    m = _load(args.dir)
    bad = 0
    incoming = in_flight(m)
    results = []
    for r in sorted(m.checkpoints, key=lambda r: r.seq):
        problem = verify(args.dir, r, incoming)
        results.append({"name": r.name, "series": r.series, "ok": problem is None, "problem": problem})
        bad += problem is not None
    unlisted = _unlisted(args.dir, m)
    if args.json:
        print(json.dumps({"ok": not bad, "checkpoints": results, "unlisted": unlisted,
                          "in_flight": m.intent is not None}, indent=1))
    else:
        for res in results:
            print(f"{'OK ' if res['ok'] else 'BAD'} {res['name']}"
                  + (f": {res['problem']}" if res["problem"] else ""))
        for name in unlisted:
            print(f"UNLISTED {name}")
        if m.intent is not None:
            print(f"IN FLIGHT {m.intent.record.name} (a save was interrupted; the next writer finishes it)")
        print(f"{len(results) - bad} ok, {bad} bad, {len(unlisted)} unlisted")
    return 1 if bad else 0


def cmd_prune(args: argparse.Namespace) -> int:
    m = _load(args.dir)
    names = [n for n in m.series if not args.series or n == args.series]
    if args.series and not names:
        raise ValueError(f"--series {args.series!r} is not in {args.dir} (series: {', '.join(m.series)})")
    for name in names:
        state = m.series[name]
        policy = RetentionPolicy.from_json(
            state.policy or {}, monitor=state.monitor, mode=state.mode or "min",
            max_to_keep=args.max_to_keep, keep_best=args.keep_best,
            keep_every_n_epochs=args.keep_every_n_epochs, keep_every_n_hours=args.keep_every_n_hours,
        )
        engine = Engine(os.path.join(args.dir, name), framework=state.framework, policy=policy)
        if os.path.realpath(engine.directory) != os.path.realpath(args.dir):  # the manifest checks names too
            raise ValueError(f"series {name!r} of {args.dir} names another directory; refusing to prune it")
        engine.open("DIR", args.dir)
        try:
            for r in engine.prune(dry_run=args.dry_run):
                print(f"{'would remove' if args.dry_run else 'removed'} {r.name}")
        finally:
            engine.close()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from keras_ckpt import _export

    m = _load(args.dir)
    which = "best" if args.best else "latest" if args.latest else "name"
    record = _export.select(m, args.dir, which=which, name=args.name, series=args.series)
    written = _export.export(args.dir, m, record, args.out, force=args.force,
                             include_optimizer=not args.no_optimizer)
    for path in written:
        print(f"exported {record.name} (epoch {record.epoch}, step {record.step}) -> {path}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from keras_ckpt import _plot

    m = _load(args.dir)
    if args.series:
        if args.series not in {r.series for r in m.checkpoints}:
            raise ValueError(f"--series {args.series!r} has no checkpoints in {args.dir} "
                             f"(series: {', '.join(m.series)})")
        m = mf.Manifest(series={args.series: m.series[args.series]} if args.series in m.series else {},
                        checkpoints=m.records(args.series),
                        history=[h for h in m.history if h.series == args.series])
    if not m.checkpoints:
        print(f"no checkpoints in {args.dir}")
        return 1
    fig = _plot.figure(m, metric=args.metric, x=args.x, title=os.path.abspath(args.dir))
    _plot.save(fig, args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from keras_ckpt import _export, _tensors

    m = _load(args.dir)
    tensors = []
    for name in (args.a, args.b):
        record = _export.select(m, args.dir, which="name", name=name, series=args.series)
        problem = verify(args.dir, record, in_flight(m))
        if problem is not None:
            raise ValueError(f"checkpoint {name!r} in {args.dir} is corrupt: {problem}")
        tensors.append(_tensors.read(args.dir, record))
    rows = _tensors.diff(*tensors)
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, "tensors": rows}, indent=1))
        return 0
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        if row["status"] == "same":
            continue
        detail = ""
        if "max_abs_diff" in row:
            rel = "n/a" if row["rel_l2"] is None else f"{row['rel_l2']:.3g}"
            detail = f"  max |diff| {row['max_abs_diff']:.4g}  relative L2 {rel}"
        elif row["status"] == "reshaped":
            detail = f"  {row['shape_a']} -> {row['shape_b']}"
        print(f"{row['status']:<8} {row['name']}{detail}")
    print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no tensors")
    return 0


def _count(text: str) -> int | None:
    if text.lower() in ("none", "all"):
        return None
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="keras-ckpt", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ls", help="list the checkpoints of a directory")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_ls)
    p = sub.add_parser("verify", help="check every listed file against its checksum")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("prune", help="apply a retention policy after the fact (default: the stored one)")
    p.add_argument("dir")
    p.add_argument("--max-to-keep", type=_count, default=UNSET, help="N newest to keep ('none': all)")
    p.add_argument("--keep-best", type=int, default=UNSET)
    p.add_argument("--keep-every-n-epochs", type=_count, default=UNSET)
    p.add_argument("--keep-every-n-hours", type=float, default=UNSET)
    p.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    p.add_argument("--series", help="only this series (its filepath template)")
    p.set_defaults(fn=cmd_prune)
    p = sub.add_parser("export", help="write one checkpoint as a standalone model file (no training state)")
    p.add_argument("dir")
    pick = p.add_mutually_exclusive_group(required=True)
    pick.add_argument("--best", action="store_true", help="the series' best checkpoint")
    pick.add_argument("--latest", action="store_true", help="the newest checkpoint")
    pick.add_argument("--name", help="the checkpoint of this name (as `ls` shows it)")
    p.add_argument("out", help="the file to write: .keras, .weights.h5, .h5, .pt/.pth, or a TF prefix")
    p.add_argument("--series", help="the series to choose from (its filepath template)")
    p.add_argument("--no-optimizer", action="store_true", help="leave the optimizer's variables out (Keras)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("plot", help="plot the metric history across restarts to a PNG (needs [plot])")
    p.add_argument("dir")
    p.add_argument("-o", "--output", required=True, help="the PNG file to write")
    p.add_argument("--metric", help="the metric to plot (default: each series' monitor), with loss")
    p.add_argument("--x", choices=("epoch", "step", "time"), help="x axis (default: epoch, else step)")
    p.add_argument("--series", help="only this series (its filepath template)")
    p.set_defaults(fn=cmd_plot)
    p = sub.add_parser("diff", help="which tensors changed between two checkpoints, and by how much")
    p.add_argument("dir")
    p.add_argument("a", help="a checkpoint name (as `ls` shows it)")
    p.add_argument("b", help="another checkpoint name")
    p.add_argument("--series", help="the series both are in, where names repeat across series")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_diff)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (mf.ManifestError, storage.DirectoryLocked, ValueError, OSError) as e:
        print(f"keras-ckpt: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
