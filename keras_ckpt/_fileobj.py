"""The seekable file-object base that keras_ckpt's in-memory and windowed files share."""

from __future__ import annotations

import io


class Positioned(io.RawIOBase):
    """A readable, seekable file object that keeps its own position over ``_end()`` bytes.

    Readers such as h5py, ``zipfile`` and torch's zip reader take a file object; subclasses
    add ``readinto`` (and ``write``) over their own storage. A seek before the start lands at 0.
    """

    _pos = 0

    def _end(self) -> int:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._end()}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos
