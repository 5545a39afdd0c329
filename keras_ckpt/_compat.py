"""Every private Keras, TensorFlow and torch API keras_ckpt uses, named in one place.

Private APIs change without notice between releases. Each one used anywhere in the package is
listed here with the parameters the calling code passes, and ``tests/test_compat.py`` asserts each
exists with that signature in the installed frameworks, so an upgrade fails loudly naming the
symbol instead of misbehaving. Where a public path exists, the caller falls back to it when
:func:`available` says the private one is gone.

Importing this module imports no framework: entries are looked up on demand.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class PrivateAPI:
    """One private symbol: ``module`` + dotted ``name``, and the parameters our code passes.

    ``params`` are checked to be accepted by the callable (by name); empty for non-callables.
    ``fallback`` says what the calling code does when the symbol is missing ("" = none: fatal).
    """

    framework: str
    module: str
    name: str
    params: tuple[str, ...] = ()
    used_by: str = ""
    fallback: str = ""


KERAS: tuple[PrivateAPI, ...] = ()
TENSORFLOW: tuple[PrivateAPI, ...] = ()
TORCH_SAVE = PrivateAPI(
    "torch",
    "torch.serialization",
    "_save",
    params=("obj", "zip_file", "pickle_module", "pickle_protocol", "_disable_byteorder_record"),
    used_by="keras_ckpt.torch._torch_save: torch's pickling step, into keras_ckpt's own zip "
    "writer (called as write_record(name, str-or-CPU-UntypedStorage, size))",
    fallback="torch.save (torch's C++ zip writer: the CRC-32s on one core before each write)",
)
TORCH: tuple[PrivateAPI, ...] = (TORCH_SAVE,)

ALL: tuple[PrivateAPI, ...] = KERAS + TENSORFLOW + TORCH


def resolve(api: PrivateAPI) -> object:
    """The object ``api`` names; AttributeError/ImportError naming the symbol if it is gone."""
    obj: object = importlib.import_module(api.module)
    for part in api.name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(
                f"keras_ckpt needs the private {api.framework} API {api.module}.{api.name}, which "
                "this version does not have (keras_ckpt/_compat.py lists what is used where)"
            ) from None
    return obj


def check(api: PrivateAPI) -> None:
    """Raise if ``api`` is missing or no longer accepts the parameters our code passes."""
    obj = resolve(api)
    if not api.params:
        return
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # builtins without a signature: existence is what we can check
        return
    accepted = sig.parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    missing = [p for p in api.params if p not in accepted and not takes_kwargs]
    if missing:
        raise TypeError(
            f"the private {api.framework} API {api.module}.{api.name} no longer takes "
            f"{', '.join(missing)} (signature now {sig}); keras_ckpt/_compat.py lists its users"
        )


def available(api: PrivateAPI) -> bool:
    """Whether ``api`` exists with the expected signature (callers with a fallback ask this)."""
    try:
        check(api)
    except (ImportError, AttributeError, TypeError):
        return False
    return True
