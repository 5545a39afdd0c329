"""The arguments every ``ModelCheckpoint`` front-end shares, validated once.

The Keras callback and the PyTorch shim each have their own public signature (their docs and
IDE help depend on it) but hand the shared part here as one :class:`CheckpointConfig`, so the
checks, their messages, the presets and what the arguments mean are written once. Every error
is raised at construction and names the argument and the value received.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import string
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from keras_ckpt import manifest as mf
from keras_ckpt import storage
from keras_ckpt.policy import (
    UNSET,
    RetentionPolicy,
    SaveSchedule,
    resolve_mode,
    resolve_preset,
    validate_positive_number,
)
from keras_ckpt.preemption import signals_from

_TEMPLATE = re.compile(r"\{(epoch|batch)(?:[:!][^}]*)?\}")
_PLACEHOLDER_NAMES = ("epoch", "batch")


class LogValues(dict):
    """Log values for rendering a name where the logs are not known: missing keys read as NaN."""

    def __missing__(self, key: str) -> float:
        return float("nan")


def check_filepath(filepath: Any) -> str:
    """``filepath`` as a str, or a TypeError naming it (before Keras's own checks see it)."""
    if not isinstance(filepath, (str, os.PathLike)):
        raise TypeError(f"filepath must be a str or os.PathLike. Received: filepath={filepath!r}")
    path = os.fspath(filepath)
    if not isinstance(path, str) or not path:
        raise TypeError(f"filepath must be a non-empty str path. Received: filepath={filepath!r}")
    return path


def check_template(filepath: str) -> None:
    """Render ``filepath`` once with stand-in values so a broken template fails at construction.

    Catches bad format specs (``{epoch:zz}``), unbalanced braces, positional fields, and names
    that are a typo of ``epoch``/``batch`` (``{epcoh}``); other names are log keys, known only
    once training logs them.
    """
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(filepath) if f is not None]
    except ValueError as e:
        raise ValueError(f"filepath is not a valid template ({e}). Received: filepath={filepath!r}") from None
    for name in names:
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not root or root.isdigit():
            raise ValueError(
                "filepath placeholders must be named ({epoch}, {batch} or a log key such as "
                f"{{val_loss:.3f}}). Received: filepath={filepath!r}"
            )
        close = difflib.get_close_matches(root, _PLACEHOLDER_NAMES, n=1, cutoff=0.6)
        if root not in _PLACEHOLDER_NAMES and close and not root.startswith(("val_", "loss")):
            raise ValueError(
                f"filepath has a placeholder {{{root}}}: did you mean {{{close[0]}}}? "
                f"Received: filepath={filepath!r}"
            )
    try:
        filepath.format_map(LogValues(epoch=1, batch=1))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"filepath cannot be rendered ({e}). Received: filepath={filepath!r}") from None
    if "{" in os.path.dirname(filepath):
        raise ValueError(
            "filepath may use placeholders in its file name only, not in its directory. "
            f"Received: filepath={filepath!r}"
        )


def check_resume_path(resume: str) -> None:
    """``resume=<path>`` must exist and hold something to restore; ValueError naming it else."""
    kind = storage.path_kind(resume)
    if kind == "missing":
        raise ValueError(
            f"resume must be True, False or an existing checkpoint file or directory; this path "
            f"does not exist. Received: resume={resume!r}"
        )
    if kind == "dir":
        try:
            m = mf.load(resume)
        except mf.ManifestError as e:
            raise ValueError(f"resume={resume!r}: {e}") from e
        if not m.checkpoints:
            raise ValueError(
                f"resume={resume!r} is a directory without keras_ckpt checkpoints (no records in "
                f"{mf.FILENAME}); pass the path of a checkpoint file to restore from it."
            )
    elif kind != "file":
        raise ValueError(f"resume must name a regular file or a directory. Received: resume={resume!r}")


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool) and value not in (0, 1):
        raise TypeError(f"{name} must be True or False. Received: {name}={value!r}")
    return bool(value)


@dataclass(frozen=True)
class CheckpointConfig:
    """The validated public arguments of a ``ModelCheckpoint`` (see DESIGN.md's API section).

    ``policy`` and ``schedule`` are derived: the retention policy (presets filled in, ``mode``
    resolved from the monitor's name where it tells) and when to save; ``preemption_signals``
    the signals ``save_on_preemption`` handles (empty when False).

    Args:
        owner: the front-end's class name, for Keras's warning texts.
    """

    filepath: str
    monitor: str = "val_loss"
    verbose: int = 0
    save_best_only: bool = False
    save_freq: str | int = "epoch"
    mode: str = "auto"
    initial_value_threshold: float | None = None
    max_to_keep: Any = UNSET
    keep_best: Any = UNSET
    keep_every_n_epochs: Any = UNSET
    keep_every_n_hours: Any = UNSET
    save_every_n_seconds: Any = UNSET
    resume: bool | str = False
    preset: str | None = None
    save_on_preemption: Any = True
    async_save: Any = False
    owner: str = "ModelCheckpoint"
    policy: RetentionPolicy = field(init=False, repr=False)
    preemption_signals: tuple = field(init=False, repr=False)
    schedule: SaveSchedule = field(init=False, repr=False)

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any], **overrides: Any) -> CheckpointConfig:
        """The config from a front-end's ``locals()`` (other names in it are ignored)."""
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in {**arguments, **overrides}.items() if k in names})

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalized values are set once, here
        filepath = check_filepath(self.filepath)
        check_template(filepath)
        set_(self, "filepath", filepath)
        if not isinstance(self.monitor, str) or not self.monitor:
            raise TypeError(f"monitor must be a non-empty string. Received: monitor={self.monitor!r}")
        verbose = self.verbose
        if isinstance(verbose, bool) or not isinstance(verbose, int) or verbose < 0:
            raise TypeError(f"verbose must be an integer >= 0 (0, 1 or 2). Received: verbose={verbose!r}")
        set_(self, "save_best_only", check_bool("save_best_only", self.save_best_only))
        if self.mode not in ("auto", "min", "max"):
            warnings.warn(f"{self.owner} mode '{self.mode}' is unknown, fallback to auto mode.",
                          stacklevel=4)
            set_(self, "mode", "auto")
        save_freq = self.save_freq
        if save_freq != "epoch" and (
            isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq <= 0
        ):
            raise ValueError(
                "save_freq must be 'epoch' or an integer > 0 (a number of batches). "
                f"Received: save_freq={save_freq!r}"
            )
        if save_freq == "epoch" and re.search(r"\{batch(?:[:!][^}]*)?\}", self.filepath):
            # Epoch-end saves have no batch to fill in: Keras's own callback fails with a
            # KeyError after the first epoch's training; this says so before any.
            raise ValueError(
                "filepath uses {batch}, but save_freq='epoch' saves at epoch ends, where there is "
                "no batch number. Pass an integer save_freq (a number of batches) or drop {batch}. "
                f"Received: filepath={self.filepath!r}, save_freq='epoch'"
            )
        if self.initial_value_threshold is not None:
            try:
                threshold = float(self.initial_value_threshold)
                if math.isnan(threshold):
                    raise ValueError("NaN")
                set_(self, "initial_value_threshold", threshold)
            except (TypeError, ValueError):
                raise ValueError(
                    "initial_value_threshold must be a number or None. "
                    f"Received: initial_value_threshold={self.initial_value_threshold!r}"
                ) from None
        resume = self.resume
        if not isinstance(resume, (bool, str, os.PathLike)):
            raise ValueError(
                "resume must be True, False or a path to a checkpoint file or directory. "
                f"Received: resume={resume!r}"
            )
        if not isinstance(resume, bool):
            set_(self, "resume", os.fspath(resume))
            check_resume_path(self.resume)  # type: ignore[arg-type]
        set_(self, "preemption_signals", signals_from(self.save_on_preemption))
        set_(self, "async_save", check_bool("async_save", self.async_save))
        self._derive()

    def _derive(self) -> None:
        opts = resolve_preset(
            self.preset,
            {
                "max_to_keep": self.max_to_keep,
                "keep_best": self.keep_best,
                "keep_every_n_epochs": self.keep_every_n_epochs,
                "keep_every_n_hours": self.keep_every_n_hours,
                "save_every_n_seconds": self.save_every_n_seconds,
            },
        )
        validate_positive_number("save_every_n_seconds", opts["save_every_n_seconds"])
        policy = RetentionPolicy(
            max_to_keep=opts["max_to_keep"],
            keep_best=opts["keep_best"],
            keep_every_n_epochs=opts["keep_every_n_epochs"],
            keep_every_n_hours=opts["keep_every_n_hours"],
            monitor=self.monitor,
            mode=resolve_mode(self.mode, self.monitor) or "min",
        )
        base = os.path.basename(self.filepath)
        rotates = (policy.max_to_keep is not None and policy.max_to_keep > 1) or policy.keep_best > 0
        if rotates and not _TEMPLATE.search(base):
            raise ValueError(
                "filepath names a single file (no {epoch} or {batch} placeholder), so it cannot "
                f"hold max_to_keep={policy.max_to_keep} / keep_best={policy.keep_best} "
                f"checkpoints. Add '{{epoch:03d}}' to the name. Received: filepath={self.filepath!r}"
            )
        schedule = SaveSchedule(
            every_n_epochs=opts["save_every_n_epochs"] if self.save_freq == "epoch" else None,
            every_n_batches=self.save_freq if self.save_freq != "epoch" else None,  # type: ignore[arg-type]
            every_n_seconds=opts["save_every_n_seconds"],
            # The "long" preset checks the clock at epoch ends only; an explicit argument is per batch.
            seconds_at_batch=self.save_every_n_seconds is not UNSET,
        )
        object.__setattr__(self, "policy", policy)
        object.__setattr__(self, "schedule", schedule)

    @property
    def single_file(self) -> bool:
        """Whether ``filepath`` names one file (no placeholder): saves replace it in place."""
        return "{" not in os.path.basename(self.filepath)
