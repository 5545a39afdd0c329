"""``keras-ckpt export``: one checkpoint as a standalone model file, without keras_ckpt's state.

What each front-end's file becomes (the output format follows OUT's extension):

- Keras ``.keras`` -> ``.keras`` (loads with ``keras.models.load_model``) or ``.weights.h5``;
  Keras ``.weights.h5`` -> ``.weights.h5``; legacy ``.h5`` -> ``.h5``. The training state
  (the HDF5 group ``keras_ckpt``) is left out; ``include_optimizer=False`` drops the optimizer's
  variables too (a smaller file for serving).
- PyTorch ``.pt`` -> ``.pt``/``.pth``: the model's ``state_dict`` alone, for
  ``model.load_state_dict(torch.load(OUT, weights_only=True))``.
- TensorFlow (``.index`` + ``.data-*``, an Estimator's ``.meta``): the files, copied under the
  prefix OUT, for ``tf.train.Checkpoint.restore`` / ``tf.train.load_checkpoint``. They hold no
  keras_ckpt state (that lives in the manifest). A SavedModel needs the Python objects that
  built the graph, which a checkpoint directory does not have, so none is written.

The chosen checkpoint is verified against its checksums before anything is written, every output
file is written to a temporary beside it and renamed into place, and an existing OUT is replaced
only when asked. Frameworks (h5py, torch) are imported here, only when their format is exported.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import zipfile
from collections.abc import Iterator
from typing import IO, Any

from keras_ckpt import _zip, storage
from keras_ckpt import manifest as mf
from keras_ckpt._fileobj import Positioned
from keras_ckpt.engine import in_flight, verify
from keras_ckpt.manifest import Manifest, Record

# The same names as keras_ckpt._kerasio's STATE_GROUP and Keras's weights member; not imported
# from there because _kerasio imports Keras, and exporting must not need it (a test checks them).
STATE_GROUP = "keras_ckpt"
WEIGHTS_MEMBER = "model.weights.h5"
_OPTIMIZER_GROUPS = ("optimizer", "optimizer_weights")  # Keras 3 files; legacy whole-model .h5
_TORCH_EXTENSIONS = (".pt", ".pth", ".pth.tar")


def select(m: Manifest, directory: str, *, which: str, name: str | None = None,
           series: str | None = None) -> Record:
    """The record ``which`` ("best", "latest" or "name") points at.

    ``series`` narrows the choice; without it a directory of several series needs ``--name``
    (or ``--series``), since "the best" of two checkpointers is ambiguous.
    """
    if series is not None and series not in {r.series for r in m.checkpoints} | set(m.series):
        raise ValueError(f"--series {series!r} is not in {directory} (series: {', '.join(m.series)})")
    records = [r for r in m.checkpoints if series is None or r.series == series]
    if not records:
        raise ValueError(f"{directory} lists no checkpoints" + (f" of series {series!r}" if series else ""))
    if which == "name":
        found = [r for r in records if r.name == name]
        if not found:
            raise ValueError(f"--name {name!r}: no such checkpoint in {directory} "
                             f"(checkpoints: {', '.join(r.name for r in records)})")
        if len(found) > 1:
            raise ValueError(f"--name {name!r} is in several series of {directory} "
                             f"({', '.join(r.series for r in found)}): pass --series")
        return found[0]
    names = sorted({r.series for r in records})
    if len(names) > 1:
        raise ValueError(f"{directory} holds several series ({', '.join(names)}): pass --series "
                         f"to say whose {which} checkpoint to export")
    chosen = names[0]
    if which == "latest":
        return max(records, key=lambda r: r.seq)
    state = m.series.get(chosen)
    best = None if state is None else next((r for r in records if r.name == state.best_name), None)
    if best is None:
        why = "it monitors no metric" if state is None or not state.monitor else "no checkpoint is best yet"
        raise ValueError(f"series {chosen!r} of {directory} has no best checkpoint ({why}); "
                         "use --latest or --name")
    return best


def kind_of(record: Record) -> str:
    """``"keras"``, ``"weights.h5"``, ``"h5"``, ``"torch"`` or ``"tf"``, from the record's files."""
    main = record.files[0].path
    if any(f.path.endswith(".index") for f in record.files):
        return "tf"
    for ext, kind in ((".keras", "keras"), (".weights.h5", "weights.h5"), (".h5", "h5")):
        if main.endswith(ext):
            return kind
    if main.endswith(_TORCH_EXTENSIONS):
        return "torch"
    raise ValueError(f"checkpoint {record.name!r} ({main}) is in no format keras-ckpt export knows")


def _out_kind(kind: str, out: str) -> str:
    allowed = {
        "keras": (".keras", ".weights.h5"),
        "weights.h5": (".weights.h5",),
        "h5": (".h5",),
        "torch": _TORCH_EXTENSIONS,
    }[kind]
    for ext in allowed:
        if out.endswith(ext) and not (ext == ".h5" and out.endswith(".weights.h5")):
            return ext
    raise ValueError(f"OUT must end in {' or '.join(allowed)} for a {kind} checkpoint. Received: OUT={out!r}")


def export(directory: str, m: Manifest, record: Record, out: str, *, force: bool = False,
           include_optimizer: bool = True) -> list[str]:
    """Write ``record`` of ``directory`` as a standalone file (TF: files) at ``out``; their paths."""
    problem = verify(directory, record, in_flight(m))
    if problem is not None:
        raise ValueError(f"checkpoint {record.name!r} in {directory} is corrupt ({problem}); "
                         "nothing exported. `keras-ckpt verify` lists the intact ones.")
    kind = kind_of(record)
    out = os.path.abspath(out)
    store = storage.LocalStorage(directory)
    if kind == "tf":
        prefix = out[: -len(".index")] if out.endswith(".index") else out
        main = mf.checkpoint_name(record.files[0].path)
        targets = [(f, prefix + f.path[len(main):]) for f in record.files]
        _refuse_existing([t for _, t in targets], force)
        # The .index last: TF takes a prefix whose index exists to be complete.
        for f, target in sorted(targets, key=lambda ft: ft[1].endswith(".index")):
            with _atomic(target) as dst:
                if store.copy_to(f.path, dst, f.bytes) != f.xxh3_128:
                    raise ValueError(f"{f.path} changed while it was copied; nothing exported")
        return [t for _, t in targets]
    out_ext = _out_kind(kind, out)
    _refuse_existing([out], force)
    source = store.path(record.files[0].path)
    if kind == "torch":
        _export_torch(source, out)
    elif kind == "keras" and out_ext == ".keras":
        _export_keras(source, out, include_optimizer)
    elif kind == "keras":
        with _zip_member(source, WEIGHTS_MEMBER) as member, _atomic(out) as dst:
            _strip_h5(member, dst, include_optimizer)
    else:
        with open(source, "rb") as src, _atomic(out) as dst:
            _strip_h5(src, dst, include_optimizer)
    return [out]


def _refuse_existing(paths: list[str], force: bool) -> None:
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not force:
        raise ValueError(f"{existing[0]} exists; pass --force to replace it")
    for p in existing:
        if os.path.isdir(p) and not os.path.islink(p):
            raise ValueError(f"{p} is a directory; refusing to replace it")


@contextlib.contextmanager
def _atomic(path: str) -> Iterator[IO[bytes]]:
    """``storage.atomic_file``, creating the directory ``OUT`` names first."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with storage.atomic_file(path) as f:
        yield f


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise ValueError("exporting a Keras checkpoint needs h5py: pip install 'keras-ckpt[keras]'") from None
    return h5py


def _strip_h5(src: IO[bytes], dst: IO[bytes], include_optimizer: bool) -> None:
    """Copy the HDF5 file ``src`` into ``dst`` without our state group (and the optimizer's).

    A copy, not a delete in place: HDF5 never gives a deleted dataset's space back.
    """
    h5py = _h5py()
    skip = {STATE_GROUP} | (set() if include_optimizer else set(_OPTIMIZER_GROUPS))
    with h5py.File(src, "r") as s, h5py.File(dst, "w") as d:
        for key, value in s.attrs.items():
            d.attrs[key] = value
        for key in s:
            if key not in skip:
                s.copy(s[key], d, name=key)


def _export_keras(source: str, out: str, include_optimizer: bool) -> None:
    """The archive's members in their order, the weights member stripped (see :func:`_strip_h5`)."""
    with zipfile.ZipFile(source) as src:
        if WEIGHTS_MEMBER not in src.namelist():
            raise ValueError(f"{source} is not a .keras archive (no {WEIGHTS_MEMBER})")
        with _atomic(out) as dst, zipfile.ZipFile(dst, "w") as archive:
            for info in src.infolist():
                if info.filename != WEIGHTS_MEMBER:
                    archive.writestr(info, src.read(info))
                    continue
                scratch = storage.temp_path(os.path.dirname(out), WEIGHTS_MEMBER)
                try:
                    with _zip_member(source, WEIGHTS_MEMBER) as member, open(scratch, "w+b") as h5:
                        _strip_h5(member, h5, include_optimizer)
                    with open(scratch, "rb") as h5, archive.open(_member_info(info), "w") as w:
                        shutil.copyfileobj(h5, w, 1 << 20)
                finally:
                    os.remove(scratch)


def _member_info(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    new = zipfile.ZipInfo(info.filename, date_time=info.date_time)
    new.compress_type, new.external_attr = info.compress_type, info.external_attr
    return new


class _Window(Positioned):
    """``[start, start + length)`` of an open file as a seekable file (a stored zip member).

    h5py seeks often; ``zipfile``'s member reader rereads from the start on a backward seek.
    """

    def __init__(self, f: IO[bytes], start: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def _end(self) -> int:
        return self._length

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self._length - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(view[:want]) or 0
        self._pos += got
        return got


@contextlib.contextmanager
def _zip_member(path: str, name: str) -> Iterator[IO[bytes]]:
    with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        try:
            info = archive.getinfo(name)
        except KeyError:
            raise ValueError(f"{path} is not a .keras archive (no {name})") from None
        if info.compress_type != zipfile.ZIP_STORED:
            with archive.open(info) as member:
                yield member
            return
        yield _Window(f, _zip.member_data_offset(f.fileno(), info), info.file_size)


def _export_torch(source: str, out: str) -> None:
    try:
        import torch
    except ImportError:
        raise ValueError(
            "exporting a PyTorch checkpoint needs torch: pip install 'keras-ckpt[torch]'"
        ) from None
    payload = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "model" not in payload:
        raise ValueError(f"{source} is not a keras_ckpt.torch checkpoint (no 'model' entry)")
    with _atomic(out) as dst:
        torch.save(payload["model"], dst)
