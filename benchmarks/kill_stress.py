"""kill -9 a checkpointing process at random instants, many times; count clean recoveries.

Each round starts a real writer process that saves checkpoints in a loop through the engine
(3 MB each, written in 1 MB pieces, so kills land inside writes, fsyncs, renames, manifest
commits and deletions alike), SIGKILLs it after a random delay, then opens the directory as the
next run would and checks: the open finishes or rolls back what was in flight, every record
verifies, every file in the directory is listed, and the newest committed step never goes back.

    python benchmarks/kill_stress.py --rounds 500            # rotating series (ckpt-{epoch})
    python benchmarks/kill_stress.py --rounds 500 --single   # one file overwritten in place

Prints one line per 50 rounds and a summary; exits 1 if any round left a dirty directory.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

WRITER = r"""
import os, sys
from keras_ckpt.engine import Engine
from keras_ckpt.policy import RetentionPolicy
d, template = sys.argv[1], sys.argv[2]
rotate = "{" in template
e = Engine(os.path.join(d, template), framework="stress",
           policy=RetentionPolicy(max_to_keep=2 if rotate else None, keep_best=int(rotate), monitor="m"))
e.open()
epoch = max([r.epoch for r in e.records], default=0)
print("ready", flush=True)
while True:
    epoch += 1
    payload = bytes([epoch % 251]) * (3 << 20)
    with e.transaction(os.path.join(d, template.format(epoch=epoch)), epoch=epoch, step=epoch,
                       metrics={"m": (epoch * 7919) % 13}) as tx:
        f = tx.open()
        for i in range(0, len(payload), 1 << 20):
            f.write(payload[i:i + (1 << 20)])
"""


def check(directory: str, template: str, last_step: int) -> tuple[bool, int, str]:
    from keras_ckpt import manifest as mf
    from keras_ckpt.engine import Engine, verify
    from keras_ckpt.policy import RetentionPolicy

    e = Engine(os.path.join(directory, template), framework="stress", policy=RetentionPolicy(monitor="m"))
    e.open()
    e.close()
    m = mf.load(directory)
    if m.intent is not None:
        return False, last_step, "an intent survived the open"
    for r in m.checkpoints:
        problem = verify(directory, r)
        if problem:
            return False, last_step, f"{r.name}: {problem}"
        with open(os.path.join(directory, r.path), "rb") as f:
            if f.read(1)[0] != r.epoch % 251:
                return False, last_step, f"{r.name} holds another epoch's bytes"
    on_disk = set(os.listdir(directory)) - {mf.FILENAME, ".checkpoints.lock"}
    if on_disk != m.listed_files():
        return False, last_step, f"unlisted files: {sorted(on_disk - m.listed_files())}"
    newest = max((r.step for r in m.checkpoints), default=0)
    if newest < last_step:
        return False, last_step, f"the newest step went back from {last_step} to {newest}"
    return True, newest, ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--single", action="store_true", help="one file overwritten in place")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    template = "model.bin" if args.single else "ckpt-{epoch:05d}.bin"
    rnd = random.Random(args.seed)
    clean = 0
    last_step = 0
    failures: list[str] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "writer.py")
        with open(script, "w") as f:
            f.write(WRITER)
        directory = os.path.join(tmp, "ckpts")
        os.makedirs(directory)
        for i in range(1, args.rounds + 1):
            p = subprocess.Popen([sys.executable, script, directory, template], stdout=subprocess.PIPE)
            p.stdout.readline()  # opened (and recovered) the directory
            time.sleep(rnd.random() * 0.25)
            p.send_signal(signal.SIGKILL)
            p.wait()
            ok, last_step, why = check(directory, template, last_step)
            clean += ok
            if not ok:
                failures.append(f"round {i}: {why}")
            if i % 50 == 0:
                print(f"{i} rounds: {clean} clean, newest step {last_step}", flush=True)
    print(f"{clean}/{args.rounds} kills left a clean directory ({template}, "
          f"{time.monotonic() - t0:.0f} s); newest committed step {last_step}")
    for line in failures[:20]:
        print("  " + line)
    return 0 if clean == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
