"""qcowmap: read qcow2 disk images through one read-only memory mapping, without copying.

    import qcowmap
    with qcowmap.open("vm.qcow2") as img:
        for e in img.extents():
            e.data  # data: a read-only memoryview into the mapping; zero: None

The core is C++ (the _qcowmap extension); this file adds RawDisk, the io.RawIOBase view of
the virtual disk that Image.open_raw() returns.
"""

import io

from ._qcowmap import (  # noqa: F401  (re-exported)
    Error,
    Extent,
    ExtentIterator,
    Image,
    __version__,
    open,
    stream_convert,
)

__all__ = ["Error", "Extent", "ExtentIterator", "Image", "RawDisk", "open", "stream_convert"]


class RawDisk(io.RawIOBase):
    """The virtual disk as a read-only, seekable binary file (what ``Image.open_raw()`` gives).

    ``readinto`` copies straight from the mapping into the caller's buffer (one copy, no
    intermediate bytes), so ``hashlib.file_digest``, ``shutil.copyfileobj`` and ``tarfile``
    read it like any file. Reading past the end returns b"". Wrap it in ``io.BufferedReader``
    for many small reads. Closing it does not close the Image.
    """

    def __init__(self, image):
        super().__init__()
        self._image = image
        self._size = image.size
        self._pos = 0
        self.name = image.path
        self.mode = "rb"

    @property
    def size(self):
        """The virtual disk size in bytes."""
        return self._size

    def readable(self):
        self._checkClosed()
        return True

    def seekable(self):
        self._checkClosed()
        return True

    def writable(self):
        self._checkClosed()
        return False

    def write(self, data):
        raise io.UnsupportedOperation("write: the virtual disk is read-only")

    def tell(self):
        self._checkClosed()
        return self._pos

    def seek(self, offset, whence=io.SEEK_SET):
        self._checkClosed()
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._pos + offset
        elif whence == io.SEEK_END:
            position = self._size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._pos = position
        return position

    def readinto(self, buffer):
        self._checkClosed()
        if self._pos >= self._size:
            return 0
        n = self._image.readinto(self._pos, buffer)
        self._pos += n
        return n

    def read(self, size=-1):
        self._checkClosed()
        if size is None or size < 0:
            size = self._size - self._pos
        if self._pos >= self._size or size == 0:
            return b""
        data = self._image.read(self._pos, size)
        self._pos += len(data)
        return data

    def readall(self):
        return self.read(-1)

    def close(self):
        self._image = None
        super().close()

    def __repr__(self):
        state = "closed" if self.closed else f"position={self._pos}"
        return f"<qcowmap.RawDisk {self.name!r} size={self._size} {state}>"
