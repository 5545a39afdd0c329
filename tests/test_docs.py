"""Every code block in README.md and docs/*.md runs.

Each fenced ``python`` block runs as a script in a fresh subprocess. The blocks of one document
run in order in one temporary directory, so a later block (or a ``console`` block of
``keras-ckpt`` commands) works on what an earlier one wrote, as a reader following the page would.

Conventions, an HTML comment on the line right before a fence (several joined by ``;``):

- ``<!-- docs-test: setup=NAME -->``: prepend the setup snippet ``SETUPS[NAME]`` (for fragments
  such as the README's, which use a ``model`` and data defined elsewhere);
- ``<!-- docs-test: estimator -->``: needs tf.estimator (TF <= 2.15 + tensorflow-estimator): runs
  under the ``estimator`` marker, skipped where tf.estimator is not installed;
- ``<!-- docs-test: skip REASON -->``: not run (never used on docs/quickstart.md).

``console`` blocks: each ``$ ...`` line runs (``keras-ckpt`` as ``python -m keras_ckpt``) and must
exit 0; other lines are sample output. ``bash`` blocks: lines starting with ``keras-ckpt`` run,
the rest (``pip install``, ``make``) sets up an environment and is not run here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT = 300

_FENCE = re.compile(r"^```([\w-]*)\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->$")
_RUN_LANGS = ("python", "console", "bash")

_TORCH_LOOP = '''
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
scaler = torch.amp.GradScaler("cpu")
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=16)
epochs = 3
loss = torch.tensor(0.5)   # what the elided training step computes
acc = 0.9                  # what the elided evaluation computes
'''

SETUPS: dict[str, str] = {
    # A compiled tiny Keras classifier and its data (README's Keras fragment).
    "keras-model": '''
import numpy as np
import keras

rng = np.random.default_rng(0)
x = rng.normal(size=(256, 8)).astype("float32")
y = (x[:, 0] > 0).astype("int32")
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu"),
                          keras.layers.Dense(2, activation="softmax")])
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
''',
    # A model, optimizer, scheduler, scaler and loader (fragments of a hand-written torch loop).
    "torch-loop": _TORCH_LOOP,
    # A model, its optimizer and scheduler, one epoch of training and an evaluation (migration.md).
    "torch-train": '''
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
_data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))


def train_one_epoch():
    for xb, yb in torch.utils.data.DataLoader(_data, batch_size=16, shuffle=True):
        opt.zero_grad()
        nn.functional.mse_loss(model(xb), yb).backward()
        opt.step()


def evaluate():
    with torch.no_grad():
        return nn.functional.mse_loss(model(_data.tensors[0]), _data.tensors[1]).item()
''',
    # A tiny tf.estimator classifier with its input functions (README's Estimator fragment).
    "estimator": '''
import numpy as np
import tensorflow as tf

_x = np.random.RandomState(0).randn(128, 2).astype("float32")
_y = (_x[:, 0] > 0).astype("int64")


def _model_fn(features, labels, mode):
    logits = tf.compat.v1.layers.dense(features, 2)
    loss = tf.compat.v1.losses.sparse_softmax_cross_entropy(labels, logits)
    if mode == tf.estimator.ModeKeys.EVAL:
        accuracy = tf.compat.v1.metrics.accuracy(labels, tf.argmax(logits, 1))
        return tf.estimator.EstimatorSpec(mode, loss=loss, eval_metric_ops={"accuracy": accuracy})
    train_op = tf.compat.v1.train.AdamOptimizer(0.05).minimize(
        loss, global_step=tf.compat.v1.train.get_global_step())
    return tf.estimator.EstimatorSpec(mode, loss=loss, train_op=train_op)


def train_input_fn():
    return tf.data.Dataset.from_tensor_slices((_x, _y)).batch(32).repeat()


def eval_input_fn():
    return tf.data.Dataset.from_tensor_slices((_x, _y)).batch(32)


model_dir = "runs/estimator"
steps_per_epoch = 4
estimator = tf.estimator.Estimator(_model_fn, model_dir=model_dir)
''',
}


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    directives: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def parse_directives(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if part.startswith("setup="):
            out["setup"] = part[len("setup="):].strip()
        elif part == "estimator":
            out["estimator"] = ""
        elif part.startswith("skip"):
            out["skip"] = part[len("skip"):].strip()
        else:
            raise ValueError(f"unknown docs-test directive {part!r}")
    return out


def extract(doc: Path) -> list[Block]:
    """The fenced blocks of ``doc`` in order, with the directive on the line before each."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        previous = lines[start - 1].strip() if start else ""
        d = _DIRECTIVE.match(previous)
        blocks.append(Block(doc, start + 1, m.group(1), "\n".join(body) + "\n",
                            parse_directives(d.group(1)) if d else {}))
        i += 1
    return blocks


ALL_BLOCKS = [b for doc in DOCS for b in extract(doc)]
RUNNABLE = [b for b in ALL_BLOCKS if b.lang in _RUN_LANGS]


def _params():
    for b in RUNNABLE:
        marks = [pytest.mark.estimator] if "estimator" in b.directives else []
        yield pytest.param(b, id=b.id, marks=marks)


@pytest.fixture(scope="module")
def doc_dirs(tmp_path_factory):
    """One working directory per document, shared by its blocks in order."""
    made: dict[Path, Path] = {}

    def get(doc: Path) -> Path:
        if doc not in made:
            made[doc] = tmp_path_factory.mktemp(doc.stem)
        return made[doc]

    return get


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("KERAS_BACKEND", "tensorflow")
    env["MPLBACKEND"] = "Agg"
    return env


def _run(cmd: list[str] | str, cwd: Path, block: Block, *, shell: bool = False) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), shell=shell, capture_output=True, text=True,
                          timeout=TIMEOUT, executable="/bin/bash" if shell else None)
    if proc.returncode != 0:
        pytest.fail(f"{block.id} ({block.lang}) exited {proc.returncode}\n--- command: {cmd}\n"
                    f"--- stdout:\n{proc.stdout[-3000:]}\n--- stderr:\n{proc.stderr[-6000:]}")


def _cli(command: str) -> str:
    """A shell command with ``keras-ckpt`` run from this checkout by the test's interpreter."""
    if command.startswith("keras-ckpt"):
        command = f"{shlex.quote(sys.executable)} -m keras_ckpt" + command[len("keras-ckpt"):]
    return command


def _commands(block: Block) -> list[str]:
    lines = [ln.strip() for ln in block.code.splitlines()]
    if block.lang == "console":
        return [ln[2:] for ln in lines if ln.startswith("$ ")]
    return [ln for ln in lines if ln.startswith("keras-ckpt ")]


def _estimator_available() -> bool:
    return importlib.util.find_spec("tensorflow_estimator") is not None


@pytest.mark.parametrize("block", _params())
def test_block_runs(block: Block, doc_dirs) -> None:
    if "skip" in block.directives:
        pytest.skip(block.directives["skip"])
    if "estimator" in block.directives and not _estimator_available():
        pytest.skip("needs tf.estimator (TensorFlow <= 2.15 with tensorflow-estimator)")
    cwd = doc_dirs(block.doc)
    if block.lang == "python":
        setup = SETUPS[block.directives["setup"]] if "setup" in block.directives else ""
        script = cwd / f"block_{block.line}.py"
        script.write_text(setup + "\n" + block.code, encoding="utf-8")
        _run([sys.executable, script.name], cwd, block)
        return
    for command in _commands(block):
        _run(_cli(command), cwd, block, shell=True)


# -- the conventions themselves -------------------------------------------------------------------


def test_the_guides_have_runnable_python() -> None:
    for name in ("README.md", "quickstart.md", "presets.md", "migration.md", "manifest.md", "faq.md"):
        doc = next(d for d in DOCS if d.name == name)
        assert any(b.lang == "python" for b in extract(doc)), f"{doc} has no python block"


def test_directives_are_used_as_documented() -> None:
    for b in ALL_BLOCKS:
        if "setup" in b.directives:
            assert b.directives["setup"] in SETUPS, f"{b.id}: unknown setup {b.directives['setup']!r}"
        if "skip" in b.directives:
            assert b.directives["skip"], f"{b.id}: a skip needs a reason"
            assert b.doc.name != "quickstart.md", f"{b.id}: the quickstarts always run"
        if b.directives:
            assert b.lang in _RUN_LANGS, f"{b.id}: a directive on a {b.lang!r} block does nothing"


def test_unknown_directive_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown docs-test directive"):
        parse_directives("setup=keras-model; run-twice")


def test_python_blocks_are_valid_python() -> None:
    for b in ALL_BLOCKS:
        if b.lang == "python":
            compile(b.code, b.id, "exec")
