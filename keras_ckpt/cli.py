"""The ``keras-ckpt`` command: look at, verify and prune a checkpoint directory.

Reads only the manifest and the files it lists; imports no framework. ``prune`` is a writer: it
takes the directory's writer lock (refused while training writes there), finishes a commit a
crash interrupted, and applies the retention policy training stored unless told otherwise.
"""

from __future__ import annotations

import argparse
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


def _metrics(record: mf.Record) -> str:
    return " ".join(f"{k}={v:.4g}" if v is not None else f"{k}=nan" for k, v in record.metrics.items())


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


def cmd_ls(args: argparse.Namespace) -> int:
    m = _load(args.dir)
    if args.json:
        out = {
            "directory": os.path.abspath(args.dir),
            "series": {k: v.to_json() for k, v in m.series.items()},
            "checkpoints": [{**r.to_json(), "best": _is_best(m, r)} for r in m.checkpoints],
        }
        print(json.dumps(out, indent=1))
        return 0
    if not m.checkpoints:
        print(f"no checkpoints in {args.dir}")
        return 1
    rows = [("", "name", "epoch", "step", "saved", "size", "kept", "metrics")]
    for r in sorted(m.checkpoints, key=lambda r: r.seq):
        rows.append((
            "*" if _is_best(m, r) else "", r.name, str(r.epoch), str(r.step),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.time)),
            _size(sum(f.bytes for f in r.files)), ",".join(r.kept), _metrics(r),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    for name, s in m.series.items():
        if s.monitor:
            print(f"series {name}: best {s.monitor} ({s.mode}) = {s.best} [{s.best_name}]  (* = best)")
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
        print(json.dumps({"checkpoints": results, "unlisted": unlisted,
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
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (mf.ManifestError, storage.DirectoryLocked, ValueError, OSError) as e:
        print(f"keras-ckpt: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
