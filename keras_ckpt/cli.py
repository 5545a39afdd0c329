"""The ``keras-ckpt`` command: look at, verify and prune a checkpoint directory.

Reads only the manifest and the files it lists; imports no framework.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from keras_ckpt import manifest as mf
from keras_ckpt.engine import Engine, verify
from keras_ckpt.policy import RetentionPolicy


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _metrics(record: mf.Record) -> str:
    return " ".join(f"{k}={v:.4g}" if v is not None else f"{k}=nan" for k, v in record.metrics.items())


def cmd_ls(args: argparse.Namespace) -> int:
    m = mf.load(args.dir)
    if not m.checkpoints:
        print(f"no checkpoints in {args.dir}")
        return 1
    rows = [("", "name", "epoch", "step", "saved", "size", "kept", "metrics")]
    for r in m.checkpoints:
        state = m.series.get(r.series)
        star = "*" if state is not None and state.best_name == r.name else ""
        rows.append((
            star, r.name, str(r.epoch), str(r.step),
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


def cmd_verify(args: argparse.Namespace) -> int:
    m = mf.load(args.dir)
    bad = 0
    for r in m.checkpoints:
        problem = verify(args.dir, r)
        print(f"{'OK ' if problem is None else 'BAD'} {r.name}" + (f": {problem}" if problem else ""))
        bad += problem is not None
    print(f"{len(m.checkpoints) - bad} ok, {bad} bad")
    return 1 if bad else 0


def cmd_prune(args: argparse.Namespace) -> int:
    m = mf.load(args.dir)
    for name, state in m.series.items():
        if args.series and name != args.series:
            continue
        policy = RetentionPolicy(
            max_to_keep=args.max_to_keep, keep_best=args.keep_best,
            monitor=state.monitor, mode=state.mode or "min",
        )
        engine = Engine(os.path.join(args.dir, name), framework=state.framework, policy=policy)
        engine.reload()
        for r in engine.prune():
            print(f"removed {r.name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="keras-ckpt", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ls", help="list the checkpoints of a directory")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_ls)
    p = sub.add_parser("verify", help="check every listed file against its checksum")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("prune", help="apply a retention policy after the fact")
    p.add_argument("dir")
    p.add_argument("--max-to-keep", type=int, default=None)
    p.add_argument("--keep-best", type=int, default=0)
    p.add_argument("--series", help="only this series (its filepath template)")
    p.set_defaults(fn=cmd_prune)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (mf.ManifestError, ValueError, OSError) as e:
        print(f"keras-ckpt: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
