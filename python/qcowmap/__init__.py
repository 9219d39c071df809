"""qcowmap: read qcow2 disk images through one read-only memory mapping, without copying.

    import qcowmap
    with qcowmap.open("vm.qcow2") as img:
        for e in img.extents():
            e.data  # data: a read-only memoryview into the mapping; zero: None

    with qcowmap.open("vm.qcow2", writable=True) as img:
        img.write(0, b"...")   # in place, crash-safe; img.flush() makes it durable

The core is C++ (the _qcowmap extension); this file adds RawDisk, the io.RawIOBase view of
the virtual disk that Image.open_raw() returns, and the keyword forms of open() and create().
"""

import io
import os

from ._qcowmap import (  # noqa: F401  (re-exported)
    Error,
    Extent,
    ExtentIterator,
    Image,
    WritableImage,
    __version__,
    stream_convert,
)
from ._qcowmap import open as _open_read_only
from ._qcowmap import _create, _open_writable

__all__ = ["Error", "Extent", "ExtentIterator", "Image", "RawDisk", "WritableImage", "create",
           "open", "stream_convert"]


def open(path, snapshot=None, backing=True, data_file=None, untrusted=False, force_share=False,
         writable=False, lock=True):
    """Opens and validates a qcow2 (or qcow v1) image, its backing chain and data file.

    snapshot: an internal snapshot's ID or name; backing=False reads only this image;
    data_file: use this external data file; untrusted=True: backing and data file names the
    image holds are followed only inside its directory (as --untrusted). A read-only open
    takes QEMU's reader lock (as qemu-img) until the Image is closed, and raises Error with code
    "image_in_use" when a writer holds the image; force_share=True takes no lock (qemu-img -U).

    writable=True opens it for writing in place and returns a WritableImage (QEMU's image
    locks are taken unless lock=False: a VM or qemu-io writing it makes this fail).
    Otherwise returns a read-only Image.
    """
    if writable:
        if snapshot is not None:
            raise ValueError("an internal snapshot cannot be opened for writing")
        if force_share:
            raise ValueError("force_share can only be used with read-only images (as qemu-img)")
        return _open_writable(path, backing=backing, data_file=data_file, untrusted=untrusted,
                              lock=lock)
    return _open_read_only(path, snapshot=snapshot, backing=backing, data_file=data_file,
                           untrusted=untrusted, force_share=force_share)


def create(path, size, **options):
    """Creates an empty qcow2 image of `size` bytes, as ``qemu-img create -f qcow2 -o ...``.

    Options take qemu-img's names: cluster_size, extended_l2, compression_type,
    refcount_bits, lazy_refcounts, backing_file, backing_fmt, data_file, data_file_raw,
    compat ("1.1" or "0.10"). Booleans mean on/off; sizes may be ints or strings ("64k").
    With backing_file and size 0 the backing file's size is used.
    """
    parts = []
    for key, value in options.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        parts.append(f"{key}={str(value).replace(',', ',,')}")
    _create(path, size, ",".join(parts))


class RawDisk(io.RawIOBase):
    """The virtual disk as a seekable binary file (what ``Image.open_raw()`` gives): read-only
    for an Image, readable and writable for a WritableImage, so that
    ``shutil.copyfileobj(source, image.open_raw())`` restores a disk. Writes go to the image in
    place at the current position (past the end of the disk they raise qcowmap.Error);
    ``flush()`` (and closing) makes them durable.

    ``readinto`` copies into the caller's buffer, so ``hashlib.file_digest``,
    ``shutil.copyfileobj`` and ``tarfile`` read it like any file. Reads of an Image that follow
    each other (each starting where the last ended) are read ahead on worker threads while
    Python works (as ``Image.extents()`` does); a read elsewhere is served on its own. Reading past the end returns b"". Wrap it in ``io.BufferedReader``
    for many small reads. Closing it does not close the Image.
    """

    def __init__(self, image):
        super().__init__()
        self._image = image
        self._size = image.size
        self._pos = 0
        self.name = image.path
        self._writable = isinstance(image, WritableImage)
        self.mode = "r+b" if self._writable else "rb"
        # A WritableImage changes under its reads: those go to it directly.
        self._reader = None if self._writable else image._sequential_reader()

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
        return self._writable

    def write(self, data):
        self._checkClosed()
        if not self._writable:
            raise io.UnsupportedOperation("write: the virtual disk is read-only")
        n = self._image.write(self._pos, data)
        self._pos += n
        return n

    def flush(self):
        super().flush()
        if self._writable and self._image is not None and not self._image.closed:
            self._image.flush()

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

    def _source(self):
        # The Image itself once it is closed (it refuses, as it always did) or when it is written.
        if self._reader is None or self._image.closed:
            return self._image
        return self._reader

    def readinto(self, buffer):
        self._checkClosed()
        if self._pos >= self._size:
            return 0
        n = self._source().readinto(self._pos, buffer)
        self._pos += n
        return n

    def read(self, size=-1):
        self._checkClosed()
        if size is None or size < 0:
            size = self._size - self._pos
        if self._pos >= self._size or size == 0:
            return b""
        data = self._source().read(self._pos, size)
        self._pos += len(data)
        return data

    def readall(self):
        return self.read(-1)

    def close(self):
        if not self.closed:
            self.flush()
        self._image = None
        self._reader = None
        super().close()

    def __repr__(self):
        state = "closed" if self.closed else f"position={self._pos}"
        return f"<qcowmap.RawDisk {self.name!r} size={self._size} {state}>"
